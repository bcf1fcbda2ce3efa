"""What `vla-ds preprocess` did: the summary.json it writes and the lines it prints."""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)


def summarize(records: list[dict]) -> dict:
    ok = [r for r in records if r["status"] != "skipped"]
    dropped: Counter = Counter()
    missing: Counter = Counter()
    for r in ok:
        dropped.update(r.get("dropped", {}))
        missing.update(r.get("missing_views", {}))
    samples = sum(r["samples"] for r in ok)
    sensor_samples = sum(r["sensor_samples"] for r in ok)
    return {
        "episodes": len(ok),
        "episodes_with_sensor": sum(r["has_sensor"] for r in ok),
        "written": sum(r["status"] == "written" for r in ok),
        "unchanged": sum(r["status"] == "unchanged" for r in ok),
        "skipped_sessions": [{"source": r["source"], "reason": r["reason"]} for r in records if r["status"] == "skipped"],
        "samples": samples,
        "sensor_samples": sensor_samples,
        "sensor_share": sensor_samples / samples if samples else 0.0,
        "dropped": {k: v for k, v in dropped.items() if v},
        "frames_missing_a_view": {k: v for k, v in missing.items() if v},
        "episode_records": records,
    }


def log_summary(summary: dict, out: Path) -> None:
    """What `preprocess` did, as the lines `vla-ds preprocess` prints (rank 0's log)."""
    log.info(
        "%d episodes (%d written, %d unchanged, %d with sensor), %d samples, sensor share %.1f %%",
        summary["episodes"],
        summary["written"],
        summary["unchanged"],
        summary["episodes_with_sensor"],
        summary["samples"],
        100 * summary["sensor_share"],
    )
    for reason, n in sorted(summary["dropped"].items()):
        log.info("  dropped %5d  %s", n, reason)
    for view, n in sorted(summary["frames_missing_a_view"].items()):
        log.info("  %5d frames without a %s image within tolerance", n, view)
    for s in summary["skipped_sessions"]:
        log.info("  skipped session %s: %s", s["source"], s["reason"])
    log.info("dataset: %s (summary in %s)", out, json.dumps(str(Path(out) / "summary.json")))
