"""`vla-ds ablate --config base.yaml --vary KEY=V1,V2 ...`: train, evaluate and compare a grid of runs.

    ABL/                      --output-dir
      plan.json               the grid: every cell's name and settings, and which cells repeat another
      <cell>/                 one run directory per cell (`vla-ds train` output) + <cell>/eval/<step>/
      <cell>.yaml             the cell's whole config (what `vla-ds train --config` ran)
      <cell>.log              its training output
      vl_cache/               the VL cache the cells share (a cell's default --cache-dir is ABL/vl_cache)
      compare/                `vla-ds compare` of the cells: compare.md, compare.json, compare.png

Cells share the dataset, its stats.json (computed once into ABL/stats.json when --data has none) and
the VL cache. Resumable: a cell whose training finished (checkpoints/final) is not trained again, one
interrupted resumes from its latest checkpoint (`--resume auto`), one evaluated is not evaluated
again. A cell that trains the same model as an earlier one (e.g. any fusion without the sensor) is
skipped and says which. A cell that fails is reported in one line, the others go on.
"""
from __future__ import annotations

import itertools
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from vla_ds.errors import UsageError, near_miss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AblateArgs:
    config: str  # the base YAML (vla-ds train --config)
    vary: list[str]  # KEY=V1,V2,...
    output_dir: str = "runs/ablation"
    nproc: int = 1  # processes per training (torchrun); 1 = one plain process
    episodes: str = "val"
    metric: str = "final_pos_err"
    overrides: dict = field(default_factory=dict)  # settings on top of the base YAML (tests, the demo)


def parse_vary(specs: list[str]) -> list[tuple[str, list]]:
    """[(field, [values typed as the field])] of --vary KEY=V1,V2 (a one-line error for a bad one)."""
    from vla_ds.config import _coerce, field_types

    types, axes = field_types(), []
    for spec in specs:
        key, eq, values = spec.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not values.strip():
            raise UsageError(f"--vary {spec}: write KEY=V1,V2 (e.g. fusion_strategy=concat,gated)")
        if key not in types:
            near = near_miss(key, list(types), cutoff=0.6)
            raise UsageError(f"--vary {spec}: no setting {key}{f' (did you mean {near}?)' if near else ''}; the "
                             "settings are the flags of `vla-ds train --help`, spelt with _")
        if key in ("output_dir", "mode", "resume"):
            raise UsageError(f"--vary {spec}: {key} is set by ablate itself")
        try:
            axes.append((key, [_coerce(v.strip(), types[key], f"--vary {key}") for v in values.split(",")]))
        except ValueError as e:
            raise UsageError(str(e).replace("; fix the value in the file", "")) from None
    if not axes:
        raise UsageError("--vary: give at least one KEY=V1,V2")
    return axes


def cell_name(settings: dict) -> str:
    return "__".join(f"{k}-{re.sub(r'[^A-Za-z0-9._-]+', '_', str(v))}" for k, v in settings.items())


def _effective(cfg) -> dict:
    """The settings that change what a run trains: without the sensor, the fusion, the sensor encoder's
    sizes, its learning rate and its loss weight do not (the run directory and logging never do)."""
    groups = {g: dict(v) for g, v in cfg.to_dict().items() if g != "run"}
    groups["seed"] = cfg.run.seed
    groups["model"]["fusion_strategy"] = cfg.model.effective_fusion
    if not cfg.model.sensor_enabled:
        for name in [k for k in groups["model"] if k.startswith("sensor_") and k != "sensor_enabled"]:
            del groups["model"][name]
        for name in ("sensor_lr", "sensor_loss_weight"):
            groups["optim"].pop(name, None)
    return groups


def plan_cells(base: dict, axes: list[tuple[str, list]], out: Path) -> list[dict]:
    """[{"name", "settings", "config" (TrainConfig), "same_as"}] of the grid, every config validated."""
    from vla_ds.config import TrainConfig

    cells, seen = [], {}
    for values in itertools.product(*(v for _, v in axes)):
        settings = dict(zip((k for k, _ in axes), values))
        name = cell_name(settings)
        try:
            cfg = TrainConfig.from_flat({**base, **settings, "output_dir": str(out / name), "mode": "train"})
        except (ValueError, TypeError) as e:
            raise UsageError(f"--vary cell {name}: {e}") from None
        key = json.dumps(_effective(cfg), sort_keys=True, default=str)
        cells.append({"name": name, "settings": settings, "config": cfg, "same_as": seen.get(key)})
        seen.setdefault(key, name)
    return cells


def _stats_for(base: dict, out: Path) -> dict:
    """The base settings with --stats pointing at one stats file every cell uses."""
    from vla_ds.data.stats import compute_stats, stats_path

    if stats_path(base.get("stats"), base.get("data") or []) is not None:
        return base
    path = out / "stats.json"
    if not path.is_file():
        log.info("ablate: no stats.json beside --data: computing it once into %s", path)
        compute_stats(base["data"]).save(path)
    return {**base, "stats": str(path)}


def _finished(run: Path) -> bool:
    return (run / "checkpoints" / "final" / "policy" / "model.safetensors").is_file()


def ablate(args: AblateArgs) -> dict:
    """Train and evaluate every cell that is not done yet, then compare them all. Returns the compare
    result, plus "failed": {cell: one line}."""
    from vla_ds.config import load_yaml, save_config
    from vla_ds.eval.compare import compare, find_eval, write_compare
    from vla_ds.eval.run import EvalArgs, evaluate
    from vla_ds.utils.dist import torchrun
    from vla_ds.utils.io import write_json

    out = Path(args.output_dir)
    try:
        base = {**load_yaml(args.config), **args.overrides}
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not base.get("data"):
        raise UsageError(f"--config {args.config}: has no data (the dataset directories to train on)")
    axes = parse_vary(args.vary)
    out.mkdir(parents=True, exist_ok=True)
    base = _stats_for(base, out)
    cells = plan_cells(base, axes, out)
    write_json(out / "plan.json", {"base": args.config, "vary": args.vary,
                                   "cells": [{k: c[k] for k in ("name", "settings", "same_as")} for c in cells]})
    failed: dict[str, str] = {}
    done = []
    for k, cell in enumerate(cells, 1):
        name, run = cell["name"], out / cell["name"]
        if cell["same_as"]:
            log.info("ablate %d/%d %s: trains the same model as %s (a setting it varies is unused here): skipped",
                     k, len(cells), name, cell["same_as"])
            continue
        if not _finished(run):
            save_config(cell["config"], out / f"{name}.yaml")
            log.info("ablate %d/%d %s: training (%s)", k, len(cells), name, out / f"{name}.log")
            proc = torchrun("vla_ds", ["train", "--config", str(out / f"{name}.yaml")],
                            nproc=args.nproc if args.nproc > 1 else 0, log_file=out / f"{name}.log")
            if proc.returncode != 0 or not _finished(run):
                lines = [ln for ln in (out / f"{name}.log").read_text().splitlines() if ln.strip()]
                failed[name] = (lines[-1] if lines else f"exit code {proc.returncode}")[-300:]
                log.error("ablate %s: training failed: %s (whole output: %s)", name, failed[name], out / f"{name}.log")
                continue
        try:
            find_eval(run)
        except UsageError:
            log.info("ablate %d/%d %s: evaluating", k, len(cells), name)
            try:
                evaluate(EvalArgs(policy=str(run), episodes=args.episodes))
            except UsageError as e:
                failed[name] = str(e)
                log.error("ablate %s: eval failed: %s", name, e)
                continue
        done.append(str(run))
    if len(done) < 2:
        raise UsageError(f"ablate: {len(done)} cell(s) finished, nothing to compare"
                         + (f"; failed: {'; '.join(f'{n}: {m}' for n, m in failed.items())}" if failed else ""))
    result = compare(done, args.metric)
    write_compare(result, out / "compare")
    return {**result, "failed": failed, "output_dir": str(out / "compare")}
