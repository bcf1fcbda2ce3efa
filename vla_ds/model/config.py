"""`ModelConfig`: every choice that shapes a QwenVLA policy, validated once, saved with the policy.

Field names map 1:1 to command-line flags (`finetune_vl` <-> `--finetune-vl`), so the CLI can be
generated from this dataclass and a saved `config.json` reads like the command that trained it.
Per-group learning rates are not here: they belong to the trainer, which attaches them to the named
groups of `QwenVLA.parameter_groups()`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from vla_ds.data.format import SENSOR_CHANNELS
from vla_ds.data.state import STATE_KEYS

FINETUNE_MODES = ("none", "lora", "full")
FUSION_STRATEGIES = ("concat", "cross_attention", "gated", "none")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ACTION_LOSSES = ("mse", "l1")
ACTION_HEADS = ("regression", "flow")
ALL_LINEAR = "all-linear"
# The VL tokens a frozen backbone's policy attends over by default (--vl-tokens auto with
# --finetune-vl none): 1 text token + 8 pooled tokens per view for 2 views, the layout of a VL cache.
FROZEN_VL_TOKENS = 17


@dataclass
class ModelConfig:
    """The model half of a training run's settings (see docs/model.md for what each one changes)."""

    # --- backbone -------------------------------------------------------------------------------
    backbone: str = "Qwen/Qwen2.5-VL-3B-Instruct"  # local directory or hub id of a Qwen2.5-VL model
    finetune_vl: str = "lora"  # none: frozen; lora: PEFT LoRA; full: unfreeze the last LM blocks
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    # Comma-separated leaf names of language-model linear layers, or "all-linear" (every linear
    # layer of the language model). The vision tower is never a LoRA target: it is trained, if at
    # all, through `train_vision_blocks` in full mode.
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"
    unfreeze_last_n: int = 2  # full mode: the last N LM blocks (and the final norm) train
    # full mode: the last N vision blocks (and the patch merger) train. The trainer sets this when
    # --vision-lr > 0; 0 keeps the vision tower frozen.
    train_vision_blocks: int = 0
    load_in_8bit: bool = False  # bitsandbytes int8 language model; vision tower + lm_head stay float
    gradient_checkpointing: bool | None = None  # None = on exactly when the backbone trains
    attn_implementation: str = "sdpa"
    dtype: str = "auto"  # backbone dtype; auto = bf16 on a CUDA device with bf16, else fp32
    min_pixels: int | None = None  # image resolution bounds; None = the backbone directory's own
    max_pixels: int | None = None
    vl_feature_layer: int = -1  # which hidden state the VL tokens are (-1 = last, after the norm)
    # How many VL tokens the fusion and the action expert attend over (docs/model.md, "VL memory"):
    # -1 every token of the sequence (live backbone only); 0 the pooled vector (one token); K >= 2
    # K pooled tokens (each view's image tokens pooled on a grid + 1 text token), which is what a VL
    # cache stores. None = auto: -1 when the backbone trains (lora/full), FROZEN_VL_TOKENS when it is
    # frozen (none), so that the old workflow (`--mode cache`, then train with --finetune-vl none)
    # uses the cache out of the box. The live backbone and a cache reduce the same way for the same
    # value, so a policy trained from a cache predicts with the live backbone on the same inputs.
    vl_tokens: int | None = None

    # --- sensor ---------------------------------------------------------------------------------
    # Off by default, as in the old trainer: the sensor encoder is then not built and batches'
    # sensor tensors are ignored, whatever the fusion strategy.
    sensor_enabled: bool = False
    sensor_input_channels: int = SENSOR_CHANNELS  # channel 0 = force, 1.. = A-scan samples
    sensor_temporal_length: int = 650
    sensor_hidden_dim: int = 512
    sensor_output_dim: int = 3072  # width of sensor tokens and pooled vector (the old default)
    sensor_conv_blocks: int = 4  # stride-2 conv blocks: 650 -> 325 -> 163 -> 82 -> 41 steps
    sensor_num_layers: int = 2  # transformer layers over the downsampled steps
    sensor_num_heads: int = 8

    # --- fusion and action expert ---------------------------------------------------------------
    fusion_strategy: str = "concat"
    expert_hidden_dim: int = 512  # width of the fused memory and of the action expert
    expert_num_layers: int = 4
    expert_num_heads: int = 8  # also the head count of cross_attention fusion
    head_dropout: float = 0.1  # dropout inside sensor encoder, fusion and expert
    horizon: int = 8
    action_dim: int = 7
    action_loss: str = "mse"  # elementwise loss in normalized action space: mse | l1
    # regression: one chunk per observation (the loss above on the chunk); flow: conditional flow
    # matching (the loss above on the velocity), sampled with `flow_steps` Euler steps from noise.
    action_head: str = "regression"
    flow_steps: int = 10

    # --- robot state ------------------------------------------------------------------------------
    # The frame's own pose/joints as one more memory token (vla_ds/model/state.py); off by default.
    state_enabled: bool = False
    state_keys: str = "pose,joints"

    def __post_init__(self):
        _choice("finetune_vl", self.finetune_vl, FINETUNE_MODES)
        _choice("fusion_strategy", self.fusion_strategy, FUSION_STRATEGIES)
        _choice("attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        _choice("dtype", self.dtype, DTYPES)
        _choice("action_loss", self.action_loss, ACTION_LOSSES)
        _choice("action_head", self.action_head, ACTION_HEADS)
        if not str(self.backbone).strip():
            raise ValueError("--backbone is empty; give a Qwen2.5-VL model directory or hub id")
        for name in ("lora_r", "lora_alpha", "sensor_temporal_length", "sensor_hidden_dim", "sensor_output_dim",
                     "sensor_num_heads", "expert_hidden_dim", "expert_num_layers", "expert_num_heads",
                     "horizon", "action_dim", "flow_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{_flag(name)} must be >= 1 (got {getattr(self, name)})")
        for name in ("unfreeze_last_n", "train_vision_blocks", "sensor_conv_blocks", "sensor_num_layers"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"--{_flag(name)} must be >= 0 (got {getattr(self, name)})")
        for name in ("lora_dropout", "head_dropout"):
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                raise ValueError(f"--{_flag(name)} must be in [0, 1) (got {getattr(self, name)})")
        if self.sensor_input_channels < 2:
            raise ValueError("--sensor-input-channels must be >= 2: channel 0 is the force, the rest the A-scan")
        if self.load_in_8bit and self.finetune_vl != "lora":
            raise ValueError("--load-in-8bit requires --finetune-vl lora")
        if self.finetune_vl == "full" and self.unfreeze_last_n < 1:
            raise ValueError("--finetune-vl full needs --unfreeze-last-n >= 1 (use --finetune-vl none to freeze all)")
        if self.train_vision_blocks and self.finetune_vl != "full":
            raise ValueError("training vision blocks (--vision-lr > 0) requires --finetune-vl full")
        if self.sensor_enabled and self.fusion_strategy == "none":
            raise ValueError(
                "--fusion-strategy none never uses the sensor; drop --sensor-enabled or pick concat|cross_attention|gated"
            )
        for dim, heads in (("sensor_hidden_dim", "sensor_num_heads"), ("expert_hidden_dim", "expert_num_heads")):
            if getattr(self, dim) % getattr(self, heads):
                raise ValueError(f"--{_flag(dim)} {getattr(self, dim)} is not divisible by --{_flag(heads)} "
                                 f"{getattr(self, heads)}")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"--min-pixels {self.min_pixels} is larger than --max-pixels {self.max_pixels}")
        if self.vl_tokens is not None and (self.vl_tokens < -1 or self.vl_tokens == 1):
            raise ValueError(f"--vl-tokens {self.vl_tokens}: use -1 (every VL token), 0 (the pooled vector) or "
                             "K >= 2 (K pooled tokens: each view's image tokens on a grid + 1 text token)")
        keys = self.state_key_names()
        unknown = [k for k in keys if k not in STATE_KEYS]
        if unknown or not keys or len(set(keys)) != len(keys):
            raise ValueError(f"--state-keys {self.state_keys!r}: give distinct names among {','.join(STATE_KEYS)}")
        if not self.lora_target_names():
            raise ValueError("--lora-targets is empty; give e.g. q_proj,k_proj,v_proj,o_proj or all-linear")

    # ------------------------------------------------------------------------------------------
    @property
    def trains_backbone(self) -> bool:
        return self.finetune_vl != "none"

    @property
    def use_gradient_checkpointing(self) -> bool:
        """The resolved `gradient_checkpointing`: auto means on exactly when the backbone trains."""
        if self.gradient_checkpointing is None:
            return self.trains_backbone
        return bool(self.gradient_checkpointing) and self.trains_backbone

    @property
    def resolved_vl_tokens(self) -> int:
        """The resolved `vl_tokens`: -1 (every token), 0 (pooled) or K >= 2 pooled tokens; auto
        means -1 when the backbone trains and FROZEN_VL_TOKENS when it is frozen."""
        if self.vl_tokens is None:
            return -1 if self.trains_backbone else FROZEN_VL_TOKENS
        return int(self.vl_tokens)

    @property
    def effective_fusion(self) -> str:
        """The fusion actually built: without the sensor every strategy degenerates to VL only."""
        return self.fusion_strategy if self.sensor_enabled else "none"

    def lora_target_names(self) -> tuple[str, ...]:
        """`lora_targets` as a tuple of leaf names, or `("all-linear",)`."""
        names = tuple(t.strip() for t in str(self.lora_targets).split(",") if t.strip())
        if ALL_LINEAR in names and len(names) > 1:
            raise ValueError(f"--lora-targets: {ALL_LINEAR} cannot be combined with other names ({self.lora_targets})")
        return names

    def state_key_names(self) -> tuple[str, ...]:
        """`state_keys` as a tuple, in the order given (e.g. ("pose", "joints"))."""
        return tuple(k.strip() for k in str(self.state_keys).split(",") if k.strip())

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "model config") -> ModelConfig:
        """Build from a dict (e.g. a saved `config.json`); unknown keys are an error, not ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown model settings {unknown}; was it written by a newer vla-ds?")
        return cls(**d)


# The fields whose value is one of a fixed set (the CLI's `choices`).
CHOICES = {"finetune_vl": FINETUNE_MODES, "fusion_strategy": FUSION_STRATEGIES, "action_loss": ACTION_LOSSES,
           "action_head": ACTION_HEADS, "attn_implementation": ATTN_IMPLEMENTATIONS, "dtype": DTYPES}


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"--{_flag(name)} {value!r} is not one of {'|'.join(choices)}")
