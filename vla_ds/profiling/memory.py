"""Peak memory of this process per phase: the CUDA allocator on a GPU, the resident set on CPU.

On a GPU, a phase's peak is `max_memory_allocated` / `max_memory_reserved` after
`reset_peak_memory_stats` at its start. On CPU it is the kernel's high-water mark of the resident
set (`VmHWM`), which Linux resets when "5" is written to `/proc/self/clear_refs`; where that is not
allowed the mark only grows, and the result says so (`peak_resets: false`).

`--gpu-mem-limit G` caps the CUDA caching allocator of this process at G GiB
(`torch.cuda.set_per_process_memory_fraction`), so an allocation beyond it raises
`torch.OutOfMemoryError` as it would on a card with G GiB (the CUDA context itself, ~0.5 GiB, sits
outside the allocator and is not capped).
"""
from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path

import torch

GIB = 2**30
_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def rss_bytes() -> int:
    """The resident set size of this process now."""
    value = _status_kib("VmRSS")
    if value is None:
        import psutil

        value = psutil.Process().memory_info().rss
    return value


def _reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_peak() -> int:
    value = _status_kib("VmHWM")
    return value if value is not None else rss_bytes()


class MemoryMeter:
    """Per-phase peaks of this process (see the module docstring). Not collective."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.phases: dict[str, dict] = {}  # name -> peak figures (max over the phase's repeats)
        self.seconds: dict[str, float] = {}
        self.peak_resets = True
        self.current_phase: str | None = None
        self.baseline = self.current()

    def current(self) -> dict:
        if self.cuda:
            return {"allocated": torch.cuda.memory_allocated(self.device),
                    "reserved": torch.cuda.memory_reserved(self.device)}
        return {"rss": rss_bytes()}

    def _reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_resets = _reset_rss_peak() and self.peak_resets

    def _peak(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return {"allocated": torch.cuda.max_memory_allocated(self.device),
                    "reserved": torch.cuda.max_memory_reserved(self.device)}
        return {"rss": rss_peak()}

    @contextlib.contextmanager
    def phase(self, name: str):
        """Measure the peak inside the block; repeats of a phase keep the maximum."""
        self._reset()
        self.current_phase = name
        start = time.perf_counter()
        yield
        peak = self._peak()
        self.current_phase = None
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        old = self.phases.get(name)
        self.phases[name] = peak if old is None else {k: max(v, old[k]) for k, v in peak.items()}

    def overall_peak(self) -> dict:
        keys = ("allocated", "reserved") if self.cuda else ("rss",)
        return {k: max((p[k] for p in self.phases.values()), default=0) for k in keys}

    @property
    def main_key(self) -> str:
        """The figure that decides whether a run fits: allocator-reserved on GPU, RSS on CPU."""
        return "reserved" if self.cuda else "rss"


def apply_gpu_limit(limit_gib: float | None, device: torch.device) -> float | None:
    """Cap this process's CUDA allocator at `limit_gib`; returns the card's total GiB (None on CPU)."""
    from vla_ds.errors import UsageError

    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory / GIB
    if limit_gib is not None:
        if limit_gib > total:
            raise UsageError(f"--gpu-mem-limit {limit_gib:g} GiB exceeds this GPU's {total:.1f} GiB; "
                             "give a smaller limit or leave it out")
        torch.cuda.set_per_process_memory_fraction(limit_gib / total, device)
    return total


def start_snapshot(device: torch.device) -> None:
    """Record allocation history for a CUDA memory snapshot (pytorch.org/memory_viz)."""
    torch.cuda.memory._record_memory_history(max_entries=200_000, device=device)


def dump_snapshot(path: Path) -> Path:
    # torch writes the snapshot as a pickle, the format pytorch.org/memory_viz reads.
    import os

    tmp = path.with_name(f".{path.name}.tmp")
    torch.cuda.memory._dump_snapshot(str(tmp))
    os.replace(tmp, path)
    torch.cuda.memory._record_memory_history(enabled=None)
    return path
