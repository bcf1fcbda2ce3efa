"""Small helpers shared across vla-ds: atomic file writes, logging, distributed rank queries."""
