"""Metrics: wandb (the old trainer's names) and the same rows in RUN_DIR/metrics.jsonl.

Only rank 0 writes. wandb is imported only when it is used (`--wandb-mode disabled` needs no
wandb at all). `--wandb-mode auto` logs online when an API key is configured (WANDB_API_KEY or a
netrc entry for api.wandb.ai) and offline otherwise, so a run on an air-gapped node never hangs.
The wandb run id is kept in the checkpoint so a resumed run continues the same wandb run.
"""
from __future__ import annotations

import json
import logging
import math
import netrc
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"


def resolve_wandb_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"


def new_run_id() -> str:
    import secrets

    return secrets.token_hex(4)


class MetricsLogger:
    """Rank-0 sink for metric rows: JSONL always, wandb unless disabled."""

    def __init__(self, run_dir: str | os.PathLike, config: dict, *, rank: int, wandb_mode: str = "auto",
                 project: str = "vla-ds", run_id: str | None = None, name: str | None = None):
        self.rank = rank
        self.run_dir = Path(run_dir)
        self.run_id = run_id or new_run_id()
        self.mode = resolve_wandb_mode(wandb_mode)
        self._wandb = None
        self._file = None
        if rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if (self.run_dir / METRICS_FILE).exists():
            _drop_torn_tail(self.run_dir / METRICS_FILE)
        self._file = open(self.run_dir / METRICS_FILE, "a", buffering=1)
        if self.mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_DIR", str(self.run_dir))
            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(project=project, id=self.run_id, resume="allow", mode=self.mode,
                                     dir=str(self.run_dir), config=config, name=name or self.run_dir.name)
            log.info("wandb %s run %s (%s)", self.mode, self.run_id, self.run_dir / "wandb")

    def log(self, metrics: dict, step: int) -> None:
        if self.rank != 0:
            return
        clean = {k: (float(v) if hasattr(v, "__float__") else v) for k, v in metrics.items()}
        row = {"step": int(step), "time": time.time(), **{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in clean.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()  # one record at a time reaches the file: a kill tears at most the last one
        if self._wandb is not None:
            self._wandb.log(clean, step=int(step))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _metric_lines(path: Path) -> list[tuple[str, dict]]:
    """(line, row) of each record of a metrics.jsonl. A torn last line -- a kill while it was being
    written -- is dropped with a notice; any other line that is not JSON is a one-line error."""
    from vla_ds.errors import UsageError

    lines = path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                log.warning("%s: its last line is torn (written when the run was killed): dropped", path)
                continue
            raise UsageError(f"{path}: line {i + 1} is not JSON; fix or delete that line (the file is the run's "
                             "metric history, one JSON object per line)") from None
    return out


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        from vla_ds.errors import UsageError

        raise UsageError(f"{run_dir}: no {METRICS_FILE}; is it a vla-ds run directory (--output-dir of a run)?")
    return [row for _, row in _metric_lines(path)]


def truncate_metrics(run_dir: str | os.PathLike, max_step: int) -> None:
    """Drop rows after `max_step` (written by a run that crashed before its next checkpoint), and a
    torn last line, so a resumed run's metrics.jsonl reads as one uninterrupted history."""
    from vla_ds.utils.io import atomic_file

    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    keep = [line for line, row in _metric_lines(path) if row["step"] <= max_step]
    with atomic_file(path) as f:
        f.write("".join(line + "\n" for line in keep))


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line that lacks its newline (a kill mid-write), so the next record starts a line."""
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
            log.warning("%s: its last line was torn (written when a run was killed): dropped", path)


def system_metrics() -> dict:
    import psutil
    import torch

    out = {"system/cpu_mem_%": psutil.virtual_memory().percent}
    if torch.cuda.is_available():
        out["system/gpu_mem_GB"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        out["system/gpu_mem_GB"] = 0.0
    return out


@dataclass
class Tally:
    """Running sums of the training loop (per step, per log window, per epoch)."""

    loss: float = 0.0  # sum of micro-batch losses
    micro: int = 0
    sensor: int = 0  # samples with a sensor reading
    samples: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, loss: float, sensor: int, samples: int) -> None:
        self.loss += loss
        self.micro += 1
        self.sensor += sensor
        self.samples += samples

    def merge(self, other: Tally) -> None:
        self.loss += other.loss
        self.micro += other.micro
        self.sensor += other.sensor
        self.samples += other.samples

    def reset(self) -> None:
        self.__init__()

    def all_sum(self, device) -> Tally:
        """Collective. The sums over every rank."""
        from vla_ds.utils.dist import all_sum

        loss, micro, sensor, samples = all_sum([self.loss, self.micro, self.sensor, self.samples], device)
        return Tally(loss, int(micro), int(sensor), int(samples), self.start)
