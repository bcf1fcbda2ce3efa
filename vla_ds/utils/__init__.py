"""The bottom floor: helpers every package shares, importing nothing of vla-ds but `vla_ds.errors`.

io (atomic writes), logging (rank-0 logging), progress (rank-0 bars), dist (process group, device
choice, collectives, the local torchrun launcher), faults (the one crash hook for tests), weights
(safetensors only, strict loading, pickles refused).
"""
