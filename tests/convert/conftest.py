"""The convert tests use the session's real ZeRO-2/3 runs (tests/conftest.py: zero2_run, zero3_run)."""
