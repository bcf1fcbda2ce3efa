"""Serving latency and throughput: `vla-ds serve` (its own process, as deployed) answering 1, 4 and
16 concurrent local clients (`PolicyClient`, one thread each), against the same policy's `predict`
called in-process on the same inputs, one request at a time: the serving overhead as a ratio.

The policy: the tiny backbone with vla-ds's default heads and a sensor encoder at the users' shape
(1026 channels, 650 rows). The observations: two 240x320 camera views as uint8 arrays (or JPEG
bytes), the robot state, and no sensor window (as 94.5 % of the users' samples), or a full window.
Writes the "serve" section of docs/serving.md.

    .venv/bin/python -m tests.benchmarks.bench_serve [--quick]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def _observation(seed: int, sensed: bool, as_jpeg: bool) -> dict:
    from tests.helpers.serving import jpeg

    rng = np.random.default_rng(seed)
    views = []
    for v in range(2):  # a smooth frame (compresses like a camera's), not noise
        y, x = np.mgrid[0:240, 0:320]
        img = np.stack([(x + 40 * v + seed) % 256, (y * 2) % 256, ((x + y) // 2) % 256], -1).astype(np.uint8)
        views.append(jpeg(img) if as_jpeg else img)
    obs = {"instruction": "Insert the needle.", "images": views,
           "state": {"pose": rng.uniform(-5, 5, 6).astype(np.float32), "joints": rng.uniform(-90, 90, 6).astype(np.float32)}}
    if sensed:
        obs["sensor"] = rng.normal(size=(650, 1026)).astype(np.float32)
    return obs


def _policy_dir(root: Path) -> tuple[Path, object]:
    import torch

    from tests.helpers.serving import VIEWS
    from vla_ds.data.stats import NormStats
    from vla_ds.model.config import ModelConfig
    from vla_ds.model.policy import QwenVLA
    from vla_ds.model.tiny import write_tiny_model

    backbone = write_tiny_model(root / "tiny", seed=0)
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=str(backbone), finetune_vl="none", sensor_enabled=True, state_enabled=True,
                      dtype="float32")
    policy = QwenVLA(cfg, stats=NormStats.identity(7, cfg.sensor_input_channels), device="cpu", views=VIEWS).eval()
    return policy.save_pretrained(root / "policy"), policy


def _start_server(policy_dir: Path, max_batch: int) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "vla_ds", "serve", str(policy_dir), "--port", "0", "--device", "cpu",
                             "--max-batch", str(max_batch)], stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        m = re.search(r"on ws://127\.0\.0\.1:(\d+)", line)
        if m:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining its log
            return proc, int(m.group(1))
    proc.kill()
    raise RuntimeError("vla-ds serve did not start")


def _clients(port: int, n: int, per_client: int, obs: dict) -> tuple[list[float], float]:
    """n client threads, `per_client` requests each (after 3 warm-up ones): latencies (s), wall time."""
    from vla_ds.serve import PolicyClient

    lat: list[float] = []
    barrier = threading.Barrier(n + 1)

    def run():
        with PolicyClient(port=port) as c:
            for _ in range(3):
                c.infer(obs)
            barrier.wait()
            for _ in range(per_client):
                t0 = time.perf_counter()
                c.infer(obs)
                lat.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return lat, time.perf_counter() - t0


def _in_process(policy, obs: dict, n: int) -> list[float]:
    from tests.helpers.serving import predict_like_the_server

    for _ in range(3):
        predict_like_the_server(policy, obs)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        predict_like_the_server(policy, obs)
        out.append(time.perf_counter() - t0)
    return out


def _row(label: str, clients: str, lat: list[float], rps: float, base_p50: float | None) -> str:
    p50, p99 = np.percentile(lat, 50) * 1e3, np.percentile(lat, 99) * 1e3
    ratio = f"{p50 / base_p50:.2f}×" if base_p50 else "(baseline)"
    return f"| {label} | {clients} | {p50:.1f} | {p99:.1f} | {rps:.1f} | {ratio} |"


def main() -> None:
    from tests.benchmarks.report import machine, publish

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    args = ap.parse_args()
    scale = 0.25 if args.quick else 1.0
    lines = [f"Measured by `tests/benchmarks/bench_serve.py` on {machine()}: `vla-ds serve` in its own process "
             "(`--max-batch 8 --max-wait-ms 0`), clients on threads of another process on the same machine; "
             "the baseline is `predict` in-process on the same inputs, one request at a time. Latency is one "
             "request's round trip as the client sees it, ms; requests/s over all clients.", "",
             "| observation | clients | p50 ms | p99 ms | requests/s | p50 vs in-process predict |",
             "|---|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        policy_dir, policy = _policy_dir(Path(tmp))
        proc, port = _start_server(policy_dir, 8)
        try:
            cases = {"2 views (uint8 arrays), no sensor": _observation(0, False, False),
                     "2 views (JPEG bytes), no sensor": _observation(0, False, True),
                     "2 views (uint8 arrays) + 650×1026 sensor window": _observation(0, True, False)}
            for label, obs in cases.items():
                n = max(12, int(60 * scale))
                # the baseline and the 1-client run interleaved in rounds: the machine's load drifts
                base, one, wall = [], [], 0.0
                for _ in range(6):
                    base += _in_process(policy, obs, n // 6)
                    lat, w = _clients(port, 1, n // 6, obs)
                    one, wall = one + lat, wall + w
                base_p50 = float(np.percentile(base, 50)) * 1e3
                lines.append(_row(label, "in-process `predict`", base, len(base) / sum(base), None))
                lines.append(_row(label, "1", one, len(one) / wall, base_p50))
                print(*lines[-2:], sep="\n", flush=True)
                for n_clients in ((4, 16) if "sensor window" not in label else ()):
                    lat, wall = _clients(port, n_clients, max(5, 2 * n // n_clients), obs)
                    lines.append(_row(label, str(n_clients), lat, len(lat) / wall, base_p50))
                    print(lines[-1], flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    publish("serve", lines, page="serving.md")


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
