"""Evaluation: open-loop metrics in physical units (`vla-ds eval`), run comparison and ablations."""
