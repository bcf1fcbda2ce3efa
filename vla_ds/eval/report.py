"""An evaluation's files, written together into OUT (a temporary sibling renamed into place):

    OUT/
      eval.json          everything measured (`EvalJob.results`): metadata, summary (policy, zero_motion,
                         mean_chunk), by_sensor, per_episode, per_dim_step (MAE/RMSE), integrated error by step
      eval.md            the same as tables
      predictions.npz    sample_ids, episode_ids, has_sensor, pred, target, mask (physical units)
      error_by_step.png  per-step MAE (position, angle, progress) and integrated position error vs step
      error_hist.png     the final integrated position error of every sample, policy vs yardsticks
      trajectories/<episode>.png   recorded pose (integrated from the first frame) with the predicted
                         chunks drawn from their start frames; progress as recorded / predicted
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from vla_ds.errors import UsageError
from vla_ds.eval.metrics import DIM_NAMES, DIM_UNITS, SUMMARY_KEYS
from vla_ds.utils.io import atomic_dir

REPORT_FILE, PREDICTIONS_FILE = "eval.json", "predictions.npz"
LABELS = {"pos_mae": "pos MAE", "ang_mae": "ang MAE (deg)", "progress_mae": "progress MAE",
          "final_pos_err": "final pos err", "final_ang_err": "final ang err (deg)", "within_tol": "within tol"}
MODELS = ("policy", "zero_motion", "mean_chunk")


def fmt(v) -> str:
    """A table cell: 4 significant digits, "–" for none / NaN, lists comma-joined."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return ", ".join(map(str, v)) if isinstance(v, list) else str(v)


def summary_rows(scored: dict, label: str = "") -> list[str]:
    return [f"| {label}{m} | {scored[m]['samples']} | " + " | ".join(fmt(scored[m][k]) for k in SUMMARY_KEYS) + " |"
            for m in MODELS]


def markdown(r: dict) -> str:
    m = r["metrics"]
    head = "| " + " | ".join(["", "samples", *(LABELS[k] for k in SUMMARY_KEYS)]) + " |"
    sep = "|" + "---|" * (len(SUMMARY_KEYS) + 2)
    lines = [
        f"# Evaluation of {r['policy']}",
        "",
        f"Checkpoint: {r['checkpoint']}; data: {' '.join(r['data'])}; episodes: {r['episodes']} "
        f"({len(r['episode_ids'])}: {', '.join(r['episode_ids'][:8])}{', ...' if len(r['episode_ids']) > 8 else ''}); "
        f"{r['samples']} samples, {r['sensor_samples']} with a sensor; VL features: {r['vl_source']}. "
        f"Position in robot units, angles in degrees, progress in [0, 1]; within tol = share of chunk steps "
        f"whose integrated position error is ≤ {r['tol']:g}. Mean chunk: {r['mean_chunk_source']}. "
        "Metrics are defined in docs/evaluation.md.",
        "", "## Summary", "", head, sep, *summary_rows(m["summary"]),
    ]
    if m["by_sensor"]:
        lines += ["", "## With and without a sensor", "", head, sep]
        for name, scored in m["by_sensor"].items():
            lines += summary_rows(scored, f"{name}: ")
    lines += ["", "## Per action dim and horizon step (policy MAE; RMSE in eval.json)", "",
              "| step | " + " | ".join(f"{d} ({u})" if u else d for d, u in zip(DIM_NAMES, DIM_UNITS)) + " |",
              "|" + "---|" * (len(DIM_NAMES) + 1)]
    for h, row in enumerate(m["per_dim_step"]["policy"]["mae"]):
        lines.append(f"| {h + 1} | " + " | ".join(fmt(v) for v in row) + " |")
    lines += ["", "## Per episode (policy; zero motion / mean chunk final pos err)", "",
              "| episode | sensor | samples | pos MAE | final pos err | within tol | zero motion | mean chunk |",
              "|---|---|---|---|---|---|---|---|"]
    for ep, s in m["per_episode"].items():
        p = s["policy"]
        lines.append(f"| {ep} | {'yes' if s['has_sensor'] else 'no'} | {p['samples']} | {fmt(p['pos_mae'])} | "
                     f"{fmt(p['final_pos_err'])} | {fmt(p['within_tol'])} | "
                     f"{fmt(s['zero_motion']['final_pos_err'])} | {fmt(s['mean_chunk']['final_pos_err'])} |")
    return "\n".join(lines) + "\n"


def nan_to_none(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [nan_to_none(v) for v in obj]
    return obj


def check_output_dir(out: Path) -> None:
    """OUT is replaced whole: refuse a directory that is not an earlier eval (a run directory, say)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / REPORT_FILE).is_file())):
        raise UsageError(f"--output-dir {out}: exists and is not an eval directory (no {REPORT_FILE}); an eval "
                         "replaces its output directory whole, so give a new directory or an earlier eval's")


def write_report(out: str | Path, results: dict, preds, max_plots: int) -> Path:
    """Write OUT as documented above (replacing an older OUT only once all of it is written)."""
    from vla_ds.eval.plots import plot_errors, plot_histogram, plot_trajectories

    out = Path(out)
    with atomic_dir(out) as tmp:
        (tmp / REPORT_FILE).write_text(json.dumps(nan_to_none(results), indent=1))
        (tmp / "eval.md").write_text(markdown(results))
        np.savez_compressed(tmp / PREDICTIONS_FILE, sample_ids=np.asarray(preds.sample_ids),
                            episode_ids=np.asarray(preds.episode_ids), has_sensor=preds.has_sensor,
                            pred=preds.pred, target=preds.target, mask=preds.mask)
        plot_errors(results, tmp / "error_by_step.png")
        plot_histogram(results, preds, tmp / "error_hist.png")
        plot_trajectories(preds, tmp / "trajectories", max_plots)
    return out


def read_report(path: str | Path) -> dict:
    """eval.json of an eval directory (or the file itself)."""
    p = Path(path)
    p = p / REPORT_FILE if p.is_dir() else p
    return json.loads(p.read_text())
