"""What `vla-ds eval POLICY_OR_RUN` evaluates: the policy directory, the run it came from, the episodes.

POLICY_OR_RUN may be
  - a run directory (`--output-dir` of `vla-ds train`): its `checkpoints/best`, else `final`, else `latest`;
  - a step directory or pointer (RUN/checkpoints/step_NNNNNN, RUN/checkpoints/best): its `policy/`;
  - a policy directory (`save_pretrained`, a step's `policy/`, or `vla-ds convert`'s OUT_DIR/policy);
  - a converted directory (`vla-ds convert` OUT_DIR): its `policy/`; the run is found through convert.json.
When the run is known, its `config.yaml` gives the data and the validation split it trained with, so
`--episodes val` (the default) evaluates exactly the episodes training never saw.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vla_ds.errors import UsageError

POINTER_ORDER = ("best", "final", "latest")
RUN_CONFIG = "config.yaml"


@dataclass(frozen=True)
class Located:
    policy_dir: Path
    run_dir: Path | None  # the training run (holding config.yaml), when known
    checkpoint: str  # how the policy was chosen, for the report ("best -> step_000040", "policy dir")


def _is_policy(p: Path) -> bool:
    return (p / "config.json").is_file() and (p / "model.safetensors").is_file()


def _run_of_step(step: Path) -> Path | None:
    """RUN for RUN/checkpoints/step_N (followed through symlinks), if RUN holds config.yaml."""
    step = step.resolve()
    run = step.parent.parent
    return run if step.parent.name == "checkpoints" and (run / RUN_CONFIG).is_file() else None


def locate(spec: str | Path) -> Located:
    given = Path(spec)
    if not given.exists():
        raise UsageError(f"POLICY_OR_RUN {spec}: no such directory; give a run directory (--output-dir of "
                         "vla-ds train), a checkpoint (RUN/checkpoints/best) or a policy directory")
    if (given / "checkpoints").is_dir():
        for name in POINTER_ORDER:
            ptr = given / "checkpoints" / name
            if _is_policy(ptr / "policy"):
                return Located(ptr / "policy", given if (given / RUN_CONFIG).is_file() else None,
                               f"{name} -> {ptr.resolve().name}")
        raise UsageError(f"POLICY_OR_RUN {spec}: the run has no checkpoint with a policy yet (no checkpoints/best, "
                         "final or latest); train it longer, or pass a step directory")
    if _is_policy(given / "policy"):
        if (given / "convert.json").is_file():  # vla-ds convert OUT_DIR
            try:
                source = Path(json.loads((given / "convert.json").read_text()).get("source", ""))
            except (json.JSONDecodeError, AttributeError):
                source = Path()
            run = _run_of_step(source) if source.name and source.exists() else None
            return Located(given / "policy", run, f"converted from {source.name or '?'}")
        return Located(given / "policy", _run_of_step(given), given.resolve().name)
    if _is_policy(given):
        step = given.resolve().parent
        run = _run_of_step(step) if given.resolve().name == "policy" else None
        return Located(given, run, step.name if run else "policy directory")
    raise UsageError(f"POLICY_OR_RUN {spec}: not a run, checkpoint or policy directory (expected checkpoints/, "
                     "policy/ or config.json + model.safetensors in it)")


def select_episodes(selection: str, all_ids: list[str], val_ids: list[str] | None, where: str) -> list[str]:
    """The episode ids of `--episodes`: "val" (the run's validation split; `val_ids` None when the run
    is not known), "all", or comma-separated ids (each must be in the data)."""
    if selection == "all":
        return list(all_ids)
    if selection == "val":
        if val_ids is None:
            raise UsageError(f"--episodes val: {where} is not inside a training run (no config.yaml found), so its "
                             "validation split is unknown; pass --episodes all or --episodes ID,ID with --data")
        if not val_ids:
            raise UsageError(f"--episodes val: {where} was trained with --val-ratio 0 and has no validation episodes; "
                             "pass --episodes all with --data of held-out sessions, or --episodes ID,ID")
        return list(val_ids)
    wanted = [e.strip() for e in selection.split(",") if e.strip()]
    missing = [e for e in wanted if e not in set(all_ids)]
    if missing or not wanted:
        known = ", ".join(all_ids[:5]) + (", ..." if len(all_ids) > 5 else "")
        raise UsageError(f"--episodes: no episode {', '.join(missing) or repr(selection)} in --data (it has {known}); "
                         "give ids from there, or val / all")
    return wanted
