"""Memory profiling (`vla-ds profile`: measured) and planning (`vla-ds plan`: estimated) of a
training configuration. See docs/memory.md."""
