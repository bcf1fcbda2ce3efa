"""`vla-ds compare RUN_OR_EVAL...`: the eval metrics of several runs side by side (the ablation report).

Each argument is an eval directory (or its eval.json), or a run directory, whose newest eval
(RUN/eval/*/eval.json) is taken. The table has one row per run, sorted by `--metric`, the best
marked; its columns are the settings that differ between the runs (read from each run's
config.yaml: fusion, sensor, loss weights, finetune mode, ...), then the policy's metrics overall and
with / without a sensor, then the yardsticks'. Runs scored on different episodes are flagged: their
numbers are not comparable. Writes compare.json, compare.md and compare.png (one bar per run).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from vla_ds.errors import UsageError
from vla_ds.eval.report import LABELS, REPORT_FILE, fmt, nan_to_none, read_report
from vla_ds.utils.io import atomic_dir

log = logging.getLogger(__name__)

# Settings that tell runs apart without being an ablation axis
IGNORED = {"output_dir", "cache_dir", "wandb_project", "wandb_run_name", "wandb_mode", "resume", "log_every",
           "save_every", "save_total_limit", "num_workers", "init_from"}
HIGHER_IS_BETTER = {"within_tol"}
METRICS = ("final_pos_err", "pos_mae", "ang_mae", "final_ang_err", "progress_mae", "within_tol")


def find_eval(spec: str | Path) -> Path:
    """The eval.json that SPEC names: the file, an eval directory, or a run's newest eval."""
    p = Path(spec)
    if p.is_file() and p.name == REPORT_FILE:
        return p
    if (p / REPORT_FILE).is_file():
        return p / REPORT_FILE
    found = sorted((p / "eval").glob(f"*/{REPORT_FILE}"), key=lambda f: f.stat().st_mtime) if p.is_dir() else []
    if found:
        return found[-1]
    if not p.exists():
        raise UsageError(f"RUN_OR_EVAL {spec}: no such file or directory")
    raise UsageError(f"RUN_OR_EVAL {spec}: no evaluation there (no eval.json, no eval/*/eval.json); run "
                     f"`vla-ds eval {spec}` first")


def _settings(report: dict) -> dict:
    from vla_ds.config import load_yaml

    run = report.get("run")
    if not run or not (Path(run) / "config.yaml").is_file():
        return {}
    try:
        return load_yaml(Path(run) / "config.yaml")
    except ValueError as e:
        log.warning("compare: %s; its settings are left out of the table", e)
        return {}


def _label(report: dict, path: Path) -> str:
    return Path(report["run"]).name if report.get("run") else path.parent.name


def compare(specs: list[str], metric: str = "final_pos_err") -> dict:
    """{"rows": [...sorted, best first], "columns": differing settings, "metric", "comparable"}."""
    if metric not in METRICS:
        raise UsageError(f"--metric {metric}: choose one of {', '.join(METRICS)}")
    if len(specs) < 2:
        raise UsageError("compare needs at least two runs or evals")
    entries = []
    for spec in specs:
        path = find_eval(spec)
        try:
            report = read_report(path)
        except (json.JSONDecodeError, OSError) as e:
            raise UsageError(f"{path}: not readable ({e}); rerun `vla-ds eval`") from None
        if report.get("format") != "vla-ds-eval":
            raise UsageError(f"{path}: not a vla-ds eval report")
        entries.append((path, report, _settings(report)))
    keys = sorted({k for _, _, s in entries for k in s} - IGNORED)
    differing = [k for k in keys if len({json.dumps(s.get(k), sort_keys=True) for _, _, s in entries}) > 1]
    episode_sets = {tuple(r["episode_ids"]) for _, r, _ in entries}
    rows = []
    for path, r, s in entries:
        m = r["metrics"]
        row = {"label": _label(r, path), "eval": str(path.parent), "checkpoint": r.get("checkpoint"),
               "samples": r["samples"], "settings": {k: s.get(k) for k in differing},
               "policy": {k: m["summary"]["policy"][k] for k in METRICS},
               "zero_motion": m["summary"]["zero_motion"][metric], "mean_chunk": m["summary"]["mean_chunk"][metric]}
        for group in ("sensor", "no_sensor"):
            row[group] = m["by_sensor"].get(group, {}).get("policy", {}).get(metric)
        rows.append(row)
    sign = -1 if metric in HIGHER_IS_BETTER else 1

    def key(row):
        v = row["policy"][metric]
        return math.inf if v is None or (isinstance(v, float) and math.isnan(v)) else sign * v

    rows.sort(key=key)
    return {"metric": metric, "columns": differing, "rows": rows, "comparable": len(episode_sets) == 1,
            "best": rows[0]["label"]}


def markdown(result: dict) -> str:
    metric = result["metric"]
    cols = result["columns"]
    head = ["", "run", *cols, *(LABELS[k] for k in METRICS), f"sensor: {metric}", f"no sensor: {metric}",
            f"zero motion: {metric}", f"mean chunk: {metric}", "samples"]
    lines = [f"# Comparison by {LABELS[metric]} ({'higher' if metric in HIGHER_IS_BETTER else 'lower'} is better)", ""]
    if not result["comparable"]:
        lines += ["**Not comparable**: the runs were scored on different episodes (other data or other validation "
                  "splits); evaluate them on the same episodes (`vla-ds eval RUN --data D --episodes ...`).", ""]
    if not cols:
        lines += ["The runs' settings do not differ (or their config.yaml was not found).", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k, row in enumerate(result["rows"]):
        cells = ["★" if k == 0 else "", row["label"], *(fmt(row["settings"][c]) for c in cols),
                 *(fmt(row["policy"][m]) for m in METRICS), fmt(row["sensor"]), fmt(row["no_sensor"]),
                 fmt(row["zero_motion"]), fmt(row["mean_chunk"]), str(row["samples"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Evals: " + "; ".join(f"{r['label']}: {r['eval']} ({r['checkpoint']})" for r in result["rows"])]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metric, rows = result["metric"], result["rows"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(rows) + 3), 4.2))
    width = 0.27
    for k, (name, get) in enumerate((("all samples", lambda r: r["policy"][metric]), ("sensor", lambda r: r["sensor"]),
                                     ("no sensor", lambda r: r["no_sensor"]))):
        vals = [np.nan if get(r) is None else get(r) for r in rows]
        ax.bar(x + (k - 1) * width, vals, width, label=name, color=("C0", "C2", "C4")[k])
    for name, style in (("zero_motion", ":"), ("mean_chunk", "--")):
        vals = [r[name] for r in rows]
        ax.hlines(vals, x - 1.5 * width, x + 1.5 * width, colors="k", linestyles=style, lw=1, label=name)
    ax.set_xticks(x, [("★ " if k == 0 else "") + r["label"] for k, r in enumerate(rows)], rotation=20, ha="right",
                  fontsize=8)
    ax.set_ylabel(LABELS[metric])
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    ax.set_title(f"{LABELS[metric]} by run" + ("" if result["comparable"] else " (NOT comparable: other episodes)"),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def write_compare(result: dict, out: str | Path) -> Path:
    """OUT/compare.json, compare.md, compare.png, written together."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "compare.json").is_file():
        raise UsageError(f"--output-dir {out}: exists and is not a compare directory; give a new one")
    with atomic_dir(out) as tmp:
        (tmp / "compare.json").write_text(json.dumps(nan_to_none(result), indent=1, default=str))
        (tmp / "compare.md").write_text(markdown(result))
        plot(result, tmp / "compare.png")
    return out
