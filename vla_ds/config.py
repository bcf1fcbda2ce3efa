"""One typed configuration for a run: dataclasses <-> command-line flags <-> YAML.

`TrainConfig` groups `ModelConfig` (vla_ds/model/config.py), `DataConfig`, `OptimConfig` and
`RunConfig`. Every field is a flag named after it (`grad_accum_steps` <-> `--grad-accum-steps`),
field names are unique across the groups, and the old trainer's flags keep their names and
defaults. `--config run.yaml` reads the same fields (flat, or nested under model/data/optim/run);
flags given on the command line override the file. The resolved config is printed at start and
saved as `config.yaml` in the run directory.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from vla_ds.errors import near_miss
from vla_ds.model import config as mc
from vla_ds.model.config import ModelConfig

SCHED_ON = ("step", "epoch")
WANDB_MODES = ("online", "offline", "disabled", "auto")
CACHE_POLICIES = ("auto", "require", "off")
MODES = ("train", "cache")


def _f(default, help: str, **extra):
    """A dataclass field with its --help text (and optional argparse extras) as metadata."""
    meta = {"help": help, **extra}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    data: list[str] = _f([], "dataset directories, episode directories or globs (vla-ds preprocess output)", nargs="+")
    views: list[str] | None = _f(None, "camera views per sample (default: the views every episode has)", nargs="+")
    stats: str | None = _f(None, "normalization stats JSON (default: stats.json of the first --data dir)")
    val_ratio: float = _f(0.05, "share of episodes held out for validation (split by episode)")
    sensor_sample_ratio: float | None = _f(None, "target share of sensor samples per epoch (balanced sampler); none = natural share")
    batch_size: int = _f(1, "micro batch per GPU/process")
    num_workers: int = _f(4, "DataLoader workers per process")

    def __post_init__(self):
        if not 0 <= self.val_ratio < 1:
            raise ValueError("--val-ratio must be in [0, 1)")
        if self.sensor_sample_ratio is not None and not 0 <= self.sensor_sample_ratio <= 1:
            raise ValueError("--sensor-sample-ratio must be in [0, 1]")
        if self.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")
        if self.num_workers < 0:
            raise ValueError("--num-workers must be >= 0")


@dataclass
class OptimConfig:
    lr: float = _f(1e-4, "learning rate of the action expert and fusion")
    sensor_lr: float = _f(5e-4, "learning rate of the sensor encoder")
    vl_lr: float = _f(1e-5, "learning rate of the backbone's LoRA / unfrozen LM blocks")
    vision_lr: float = _f(5e-6, "learning rate of the vision tower's unfrozen blocks (--finetune-vl full; 0 keeps it frozen)")
    min_lr: float = _f(1e-6, "floor of the cosine decay (scaled per group relative to --lr)")
    warmup_ratio: float = _f(0.03, "share of steps with linear warm-up")
    hold_ratio: float = _f(0.02, "share of steps held at the peak after warm-up")
    sched_on: str = _f("step", "advance the schedule every optimizer step or once per epoch", choices=SCHED_ON)
    weight_decay: float = _f(0.01, "AdamW weight decay (never on biases and norms)")
    grad_accum_steps: int = _f(8, "micro batches per optimizer step")
    global_batch_size: int | None = _f(None, "samples per optimizer step over all processes: sets --grad-accum-steps "
                                             "to it / (processes x --batch-size), the same on any number of GPUs")
    grad_clip: float = _f(1.0, "gradient norm clipping (0 = off)")
    epochs: int = _f(1, "passes over the training data (ignored when --max-steps is set)")
    max_steps: int | None = _f(None, "stop after this many optimizer steps")
    sensor_loss_weight: float = _f(2.0, "loss weight of samples that carry a sensor reading")

    def __post_init__(self):
        if self.sched_on not in SCHED_ON:
            raise ValueError(f"--sched-on must be one of {'|'.join(SCHED_ON)}")
        for name in ("lr", "sensor_lr", "vl_lr", "vision_lr", "min_lr", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
        if not (0 <= self.warmup_ratio <= 1 and 0 <= self.hold_ratio <= 1 and self.warmup_ratio + self.hold_ratio <= 1):
            raise ValueError("--warmup-ratio and --hold-ratio must be in [0, 1] and sum to at most 1")
        if self.grad_accum_steps < 1 or self.epochs < 1 or (self.global_batch_size is not None and self.global_batch_size < 1):
            raise ValueError("--grad-accum-steps, --epochs and --global-batch-size must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("--max-steps must be >= 1")
        if self.sensor_loss_weight <= 0:
            raise ValueError("--sensor-loss-weight must be > 0")


# eval/<vla_ds.eval.metrics.SUMMARY_KEYS> (tests/eval/test_in_training.py keeps the two lists equal)
BEST_METRICS = ("val/loss_epoch", *(f"eval/{k}" for k in ("pos_mae", "ang_mae", "progress_mae", "final_pos_err",
                                                         "final_ang_err", "within_tol")))


@dataclass
class RunConfig:
    mode: str = _f("train", "train the policy, or build the VL feature cache", choices=MODES)
    output_dir: str = _f("runs/vla", "run directory (checkpoints, metrics, config)")
    ds_config: str = _f("ds_configs/zero2.json", "DeepSpeed config JSON ('auto' values are resolved from these flags)")
    seed: int = _f(42, "seed for weights, sampling and dropout")
    wandb_mode: str = _f("auto", "wandb: online, offline, disabled, or auto (online with an API key, else offline)", choices=WANDB_MODES)
    wandb_project: str = _f("vla-ds", "wandb project")
    log_every: int = _f(10, "optimizer steps between metric logs")
    val_every: int = _f(0, "optimizer steps between validations (0 = at each epoch end)")
    save_every: int = _f(500, "optimizer steps between checkpoints (also one at every epoch end; 0 = epoch ends only)")
    keep_last: int = _f(3, "step checkpoints kept (those that latest/best/final point at are always kept; 0 = all)")
    resume: str = _f("auto", "auto: continue from OUTPUT_DIR/checkpoints/latest if present; none; or a checkpoint path")
    rewarm: bool = _f(False, "after resuming, re-warm the lr from 0 to its saved value over 3%% of the remaining steps")
    init_from: str | None = _f(None, "stage-1 checkpoint/policy dir to load weights from (fresh optimizer)")
    cache_dir: str | None = _f(None, "VL feature cache directory (default: OUTPUT_DIR/../vl_cache)")
    cache_policy: str = _f("auto", "use the VL cache: auto (when valid), require, off", choices=CACHE_POLICIES)
    eval_every: int = _f(0, "optimizer steps between open-loop evals of the validation episodes, in robot units "
                            "(eval/... metrics, docs/evaluation.md; 0 = off)")
    eval_max_samples: int = _f(256, "validation samples an in-training eval scores (evenly spaced; 0 = all)")
    eval_tol: float = _f(1.0, "robot units: eval/within_tol counts chunk steps at most this far off")
    best_metric: str = _f("val/loss_epoch", "what checkpoints/best follows", choices=BEST_METRICS)

    def __post_init__(self):
        if self.log_every < 1 or self.val_every < 0 or self.eval_every < 0 or self.eval_max_samples < 0:
            raise ValueError("--log-every must be >= 1; --val-every, --eval-every, --eval-max-samples >= 0")
        if self.best_metric.startswith("eval/") and not self.eval_every:
            raise ValueError(f"--best-metric {self.best_metric} needs --eval-every N (evals during training)")
        if self.save_every < 0 or self.keep_last < 0:
            raise ValueError("--save-every and --keep-last must be >= 0")


# Flags the old trainer or the launchers spell differently from the field name.
ALIASES = {"ds_config": ["--deepspeed_config", "--deepspeed-config"], "action_loss": ["--loss"]}
MODEL_HELP = {
    "backbone": "Qwen2.5-VL model directory or hub id",
    "finetune_vl": "backbone training: none (frozen), lora, full (last --unfreeze-last-n LM blocks)",
    "lora_targets": "comma-separated LM linear layers for LoRA, or all-linear",
    "unfreeze_last_n": "LM blocks trained with --finetune-vl full",
    "train_vision_blocks": "vision blocks trained with --finetune-vl full (set automatically to 2 when --vision-lr > 0)",
    "load_in_8bit": "load the backbone's language model in 8 bit (bitsandbytes); requires --finetune-vl lora",
    "gradient_checkpointing": "recompute backbone activations in backward (default: on when the backbone trains)",
    "sensor_enabled": "use the OCT/FPI sensor (off: the sensor is ignored even when present)",
    "sensor_output_dim": "width of the sensor tokens",
    "fusion_strategy": "how VL and sensor features meet",
    "action_loss": "elementwise loss on normalized actions (flow: on the velocity)",
    "action_head": "regression: one chunk per observation; flow: flow matching, sampled from noise (docs/model.md)",
    "flow_steps": "Euler steps a flow head integrates from noise to a chunk",
    "state_enabled": "give the policy the frame's robot state (--state-keys) as one more memory token",
    "state_keys": "robot state the policy reads: pose (x,y,z,a,b,r), joints (6 angles)",
    "min_pixels": "lower bound of image pixels (vision tokens scale with pixels/784)",
    "max_pixels": "upper bound of image pixels",
    "vl_tokens": "VL tokens the expert attends over, live and in a VL cache alike: -1 every token, 0 the pooled "
                 "vector, K >= 1 + views K pooled tokens; None = auto: -1 with lora/full, 17 with none",
}


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    GROUPS: typing.ClassVar[dict] = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "run": RunConfig}

    def __post_init__(self):
        # --vision-lr > 0 trains the vision tower's last blocks in full mode (the old behaviour)
        if self.model.finetune_vl == "full" and self.optim.vision_lr > 0 and not self.model.train_vision_blocks:
            self.model = dataclasses.replace(self.model, train_vision_blocks=2)
        if self.run.mode == "train" and not self.data.data:
            raise ValueError("--data is required: give the dataset directories written by `vla-ds preprocess`")

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in self.GROUPS}

    @classmethod
    def from_flat(cls, values: dict) -> TrainConfig:
        """Build from {field name: value} over all groups (unknown names are an error)."""
        owner = field_owners()
        unknown = sorted(set(values) - set(owner))
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}")
        parts = {g: {k: v for k, v in values.items() if owner[k] == g} for g in cls.GROUPS}
        return cls(**{g: cls.GROUPS[g](**kw) for g, kw in parts.items()})

    def flat(self) -> dict:
        return {k: v for group in self.to_dict().values() for k, v in group.items()}


def with_world(cfg: TrainConfig, world: int) -> TrainConfig:
    """`cfg` for `world` processes: --global-batch-size G sets --grad-accum-steps to G / (world x
    --batch-size); a G that does not divide is a one-line UsageError."""
    from vla_ds.errors import UsageError

    g, micro = cfg.optim.global_batch_size, cfg.data.batch_size
    if g is None:
        return cfg
    if g % (world * micro):
        raise UsageError(f"--global-batch-size {g} is not a multiple of {world} process(es) x --batch-size {micro} = "
                         f"{world * micro}; pass a multiple of {world * micro}, or change --batch-size")
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, grad_accum_steps=g // (world * micro)))


def field_owners() -> dict[str, str]:
    owners: dict[str, str] = {}
    for group, dc in TrainConfig.GROUPS.items():
        for f in fields(dc):
            if f.name in owners:  # pragma: no cover - guarded by a test
                raise AssertionError(f"field {f.name} defined in both {owners[f.name]} and {group}")
            owners[f.name] = group
    return owners


def field_types() -> dict[str, type]:
    """{field name: annotation} over every TrainConfig group."""
    hints = {}
    for dc in TrainConfig.GROUPS.values():
        hints.update(typing.get_type_hints(dc))
    return hints


def _is_union(origin) -> bool:
    return origin in (typing.Union, getattr(__import__("types"), "UnionType", None))


def _arg_type(tp):
    """(argparse type, nargs-list?) for a dataclass field annotation."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if _is_union(origin) and args:
        return _arg_type(args[0])
    if origin is list:
        return args[0] if args else str, True
    return tp, False


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, defaults shown in --help, parsed values SUPPRESSed when
    absent so that a YAML file can fill them and explicit flags override it."""
    parser.add_argument("--config", default=None, help="YAML file with any of these settings (flags override it)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    hints = field_types()
    for group, dc in TrainConfig.GROUPS.items():
        grp = parser.add_argument_group(f"{group} settings")
        defaults = dc.__new__(dc)  # defaults without running __post_init__ validation
        for f in fields(dc):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            setattr(defaults, f.name, default)
            flag = "--" + f.name.replace("_", "-")
            names = [flag] + ALIASES.get(f.name, [])
            help_text = f.metadata.get("help") or MODEL_HELP.get(f.name, f.name.replace("_", " "))
            help_text = f"{help_text} (default: {default})"
            tp, is_list = _arg_type(hints[f.name])
            kw = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
            if tp is bool:
                kw["action"] = argparse.BooleanOptionalAction if default is not False else "store_true"
                if default is False:
                    grp.add_argument(*names, **kw)
                    continue
            else:
                kw["type"] = tp
                kw["metavar"] = f.name.upper()
                if is_list:
                    kw["nargs"] = f.metadata.get("nargs", "+")
                if "choices" in f.metadata:
                    kw["choices"] = f.metadata["choices"]
                elif f.name in mc.CHOICES:
                    kw["choices"] = mc.CHOICES[f.name]
                if "choices" in kw:
                    kw.pop("metavar")
            grp.add_argument(*names, **kw)


def load_yaml(path: str | Path) -> dict:
    """Flat {field: value} from a YAML file (flat keys or nested under model/data/optim/run)."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise ValueError(f"--config {path}: cannot be read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ValueError(f"--config {path}: not valid YAML ({where}{getattr(e, 'problem', None) or e}); fix the "
                         "file") from None
    if not isinstance(raw, dict):
        raise ValueError(f"--config {path}: expected a mapping of settings")
    flat: dict = {}
    for k, v in raw.items():
        if k in TrainConfig.GROUPS and isinstance(v, dict):
            flat.update(v)
        else:
            flat[k.replace("-", "_")] = v
    hints = field_types()
    unknown = sorted(k for k in flat if k not in hints)
    if unknown:
        near = {k: near_miss(k, list(hints), cutoff=0.6) for k in unknown}
        named = ", ".join(f"{k} (did you mean {near[k]}?)" if near[k] else k for k in unknown)
        raise ValueError(f"--config {path}: unknown setting(s) {named}; the settings are the flags of "
                         "`vla-ds train --help`, spelt with _")
    return {k: _coerce(v, hints[k], f"--config {path}: {k}") for k, v in flat.items()}


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _coerce(value, tp, where: str):
    """`value` (as YAML read it) as the field type `tp`, or a ValueError naming `where`. YAML 1.1
    reads `1e-4` as a string (its floats need a dot) and `views: View1` as a scalar: both mean what
    a user wrote. Never a silent change of meaning: "fast" for a float, 0.5 for an int are errors."""
    origin, args = typing.get_origin(tp), [a for a in typing.get_args(tp) if a is not type(None)]
    if _is_union(origin):
        return None if value is None else _coerce(value, args[0], where)
    if origin is list:
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_coerce(x, args[0] if args else str, where) for x in items]
    wrong = ValueError(f"{where}: {value!r} is not {'a number' if tp in (int, float) else f'a {tp.__name__}'}"
                       f"{' (an integer)' if tp is int else ''}; fix the value in the file")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).strip().lower() in _TRUE + _FALSE:
            return str(value).strip().lower() in _TRUE
        raise wrong
    if tp in (int, float):
        if isinstance(value, bool):
            raise wrong
        try:
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            raise wrong from None
        if not isinstance(number, (int, float)):
            raise wrong
        if tp is int:
            if float(number) != int(number):
                raise wrong
            return int(number)
        return float(number)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise wrong
        return str(value)
    return value


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults <- YAML (--config) <- explicit flags, validated into a TrainConfig."""
    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    owners = field_owners()
    values.update({k: v for k, v in vars(args).items() if k in owners})
    return TrainConfig.from_flat(values)


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """`config_from_args` for a command line, then `check_inputs`: invalid settings and bad paths
    become a one-line UsageError on every entry point, before a process group starts or weights load."""
    from vla_ds.errors import UsageError

    try:
        cfg = config_from_args(args)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    config_file = getattr(args, "config", None)
    from_file = set(load_yaml(config_file)) - set(vars(args)) if config_file else set()
    check_inputs(cfg, dict.fromkeys(from_file, f" (from --config {config_file})"))
    return cfg


# ------------------------------------------------------------------------------------ paths on disk
PATH_FIXES = {
    "init_from": "give a policy directory (a run's checkpoints/final/policy, or `vla-ds convert` OUT/policy) or a "
                 "checkpoint directory",
    "resume": "give a checkpoint (RUN/checkpoints/step_N) or a run directory, or --resume auto / none",
}


def check_inputs(cfg: TrainConfig, origin: dict | None = None) -> None:
    """Every path a run reads, checked before anything loads: --data (paths and globs) and whether
    its episodes and --stats (else DATASET_DIR/stats.json) fit the model, --backbone, --init-from,
    --resume, --cache-dir. A one-line UsageError naming the flag, the path and the fix. What a
    checkpoint or policy directory must hold the trainer checks, also before any weights load.
    `origin` maps a setting to where it was set, for the messages."""
    from vla_ds.data.format import find_episode_dirs
    from vla_ds.data.stats import check_fit
    from vla_ds.errors import UsageError
    from vla_ds.model.backbone import check_backbone

    m, run = cfg.model, cfg.run
    dirs = find_episode_dirs(cfg.data.data) if cfg.data.data else []
    check_fit(cfg.data.data, dirs, cfg.data.stats, m.action_dim, m.sensor_input_channels if m.sensor_enabled else None,
              origin, m.state_key_names() if m.state_enabled else ())
    check_backbone(m.backbone)
    for name, spec in (("init_from", run.init_from), ("resume", None if run.resume in ("auto", "none") else run.resume)):
        if spec and not Path(spec).exists():
            raise UsageError(f"--{name.replace('_', '-')} {spec}: no such file or directory; {PATH_FIXES[name]}")
    if run.cache_dir:
        p = Path(run.cache_dir)
        blocker = next((a for a in (p, *p.parents) if a.exists() and not a.is_dir()), None)
        if blocker is not None:
            raise UsageError(f"--cache-dir {p}: {'not a directory' if blocker == p else f'{blocker} is a file'}; give the "
                             "directory of a VL cache, or a new directory for `vla-ds cache` to build one in")


def config_from_yaml(path: str | Path, **overrides) -> TrainConfig:
    """The TrainConfig a run's YAML (`vla-ds train --config`) describes, `overrides` on top; bad
    content is a one-line UsageError naming the file."""
    from vla_ds.errors import UsageError

    try:
        return TrainConfig.from_flat({**load_yaml(path), **overrides})
    except (ValueError, TypeError) as e:
        msg = str(e)
        raise UsageError(msg if msg.startswith("--config") else f"--config {path}: {msg}") from None


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    import yaml

    from vla_ds.utils.io import atomic_file

    with atomic_file(path) as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
