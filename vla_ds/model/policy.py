"""`QwenVLA`: Qwen2.5-VL backbone -> (sensor encoder) -> fusion -> action expert.

    images + instructions --VLEncoder--> VL memory (B, M, D) + mask      (or a VL cache's features)
                          M = L (--vl-tokens -1), 1 (0: pooled) or K pooled tokens, the same live and cached
    sensor (B, T, C)      --Normalizer, SensorEncoder--> tokens (B, T', S), pooled (B, S)
    fusion(VL, sensor)    --> memory (B, M, E) + mask
    ActionExpert(memory)  --> actions (B, H, A), normalized

`forward(batch)` returns normalized predictions and, when the batch has target actions, the
per-sample masked loss (the trainer weights and averages it). `predict(...)` is the robot-side
API returning denormalized actions. See docs/model.md for shapes and flags.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from vla_ds.data.batch import packed_sensor
from vla_ds.data.stats import NormStats
from vla_ds.errors import UsageError
from vla_ds.model.action_head import ActionExpert, masked_action_loss
from vla_ds.model.backbone import (
    VLEncoder,
    check_backbone_path,
    hidden_size,
    load_vl_model,
    read_backbone_config,
    resolve_dtype,
)
from vla_ds.model.config import ModelConfig
from vla_ds.model.finetune import apply_finetune, backbone_component
from vla_ds.model.fusion import build_fusion
from vla_ds.model.normalize import Normalizer
from vla_ds.model.sensor import SensorEncoder, SensorFeatures
from vla_ds.model.vl_tokens import VLFeatures
from vla_ds.utils.dist import device_for

log = logging.getLogger(__name__)

BAD_SENSOR_POLICIES = ("error", "treat_as_missing")  # predict(bad_sensor=...): a window with NaN/inf
BACKBONE_PREFIX = "vl.model."  # parameter names of the HF backbone inside the policy
COMPONENTS = ("expert", "sensor", "vl", "vision")  # optimizer groups, in order
# Learned embeddings and queries are not decayed, like biases and norm weights.
_NO_DECAY_SUFFIXES = ("queries", "_embedding", "embed_tokens.weight")


class PolicyOutput(NamedTuple):
    """What `QwenVLA.forward` returns; the loss fields are None when the batch has no targets.

    A NamedTuple (like VLFeatures/SensorFeatures) so DeepSpeed's ZeRO-3 hooks see its tensors.
    """

    actions: torch.Tensor  # (B, H, A) predictions, normalized action space
    per_sample_loss: torch.Tensor | None = None  # (B,) masked mean elementwise loss, fp32
    target: torch.Tensor | None = None  # (B, H, A) normalized targets, fp32
    valid_steps: torch.Tensor | None = None  # (B,) number of valid (unpadded) chunk steps


class QwenVLA(nn.Module):
    """The vision-language-action policy.

    `load_backbone=False` builds everything but the backbone weights (only its config is read, for
    D): such a policy runs on VL-cache batches (`vl_pooled`, optional `vl_tokens`) only, and needs
    `--finetune-vl none`. With `--load-in-8bit`, build it on its final `device`: bitsandbytes
    layers cannot be moved afterwards.
    """

    def __init__(self, config: ModelConfig, stats: NormStats | None = None, device: torch.device | str | None = None,
                 load_backbone: bool = True, vl_model=None, views: list[str] | None = None):
        super().__init__()
        self.config = config
        # The camera views it is trained on, in order (kept in config.json): predict refuses another
        # number of views. None (a policy saved before vla-ds recorded them): not checked.
        self.views = list(views) if views else None
        device = torch.device(device) if device is not None else device_for()
        if vl_model is None:
            check_backbone_path(config.backbone)
        if load_backbone or vl_model is not None:
            from vla_ds.model.processor import load_processor

            # `vl_model`: a Qwen2.5-VL built by the caller (e.g. on the meta device, to count
            # parameters for `vla-ds plan`); such a policy has no processor and cannot encode images.
            model = vl_model if vl_model is not None else load_vl_model(
                config.backbone, resolve_dtype(config.dtype, device), config.attn_implementation, device,
                load_in_8bit=config.load_in_8bit)
            apply_finetune(model, config)
            processor = load_processor(config.backbone, config.min_pixels, config.max_pixels) if vl_model is None else None
            self.vl = VLEncoder(model, processor, config.vl_feature_layer, config.resolved_vl_tokens)
            self.vl_dim = self.vl.hidden_size
            # Fixed at build time from the config, so freezing the policy later (e.g. for
            # inference) never changes what save_pretrained writes.
            self.backbone_trained = [BACKBONE_PREFIX + n for n, p in model.named_parameters() if p.requires_grad]
        else:
            if config.trains_backbone:
                raise ValueError(f"--finetune-vl {config.finetune_vl} trains the backbone, which a policy built "
                                 "without backbone weights (VL-cache mode) lacks; use --finetune-vl none")
            self.vl = None
            self.vl_dim = hidden_size(read_backbone_config(config.backbone))
            self.backbone_trained = []
        if stats is None:
            log.info("no normalization stats given: actions and sensor pass through unnormalized")
            stats = NormStats.identity(config.action_dim, config.sensor_input_channels if config.sensor_enabled else None)
        elif config.sensor_enabled and stats.sensor_mean is None:
            log.warning("--sensor-enabled but the stats have no sensor statistics: the sensor is not normalized")
        self.normalizer = Normalizer(stats, config.action_dim,
                                     config.sensor_input_channels if config.sensor_enabled else None)
        self.sensor_encoder = SensorEncoder(
            config.sensor_input_channels, config.sensor_temporal_length, config.sensor_hidden_dim,
            config.sensor_output_dim, config.sensor_conv_blocks, config.sensor_num_layers, config.sensor_num_heads,
            config.head_dropout,
        ).to(device) if config.sensor_enabled else None
        self.fusion = build_fusion(config.effective_fusion, self.vl_dim, config.sensor_output_dim,
                                   config.expert_hidden_dim, config.expert_num_heads, config.head_dropout).to(device)
        self.expert = ActionExpert(config.horizon, config.action_dim, config.expert_hidden_dim,
                                   config.expert_num_layers, config.expert_num_heads, config.head_dropout).to(device)
        self.train()  # a trainable backbone in train mode (LoRA dropout, checkpointing), a frozen one in eval

    # ------------------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.expert.out.weight.device

    @property
    def head_dtype(self) -> torch.dtype:
        return self.expert.out.weight.dtype

    @property
    def stats(self) -> NormStats:
        return self.normalizer.stats

    def train(self, mode: bool = True):
        """Like nn.Module.train, but a frozen backbone stays in eval mode (no dropout, no checkpointing)."""
        super().train(mode)
        if self.vl is not None and not self.vl.trains():
            self.vl.model.eval()
        return self

    # ------------------------------------------------------------------------------ forward
    def encode_vl(self, batch: dict) -> VLFeatures:
        """VL features from the batch's `vl_pooled`/`vl_tokens` (VL cache) if present, else from the
        live backbone on `images` + `instructions`, reduced to `config.resolved_vl_tokens` tokens exactly
        as a VL cache of that many tokens stores them."""
        if "vl_pooled" in batch:
            feats = VLFeatures.from_cache(batch, self.vl_dim)
            return VLFeatures(*(t.to(self.device) for t in feats))
        if self.vl is None:
            raise ValueError("this QwenVLA was built without backbone weights (load_backbone=False): batches must "
                             "carry vl_pooled from a VL cache")
        return self.vl(batch["images"], batch["instructions"])

    def encode_sensor(self, batch: dict, batch_size: int) -> SensorFeatures:
        """Sensor features of the batch: the encoder runs on the windows of the sensed samples only
        (`packed_sensor`: the collate format, or a dense window packed), which cross to the device
        as they came (float16) and are normalized there; the others get the missing-sensor embedding.
        A batch without one still runs the encoder, on a dummy row (ZeRO-3: every rank runs every
        submodule every step)."""
        enc, device = self.sensor_encoder, self.device
        sensor, valid, rows = packed_sensor(batch, batch_size, enc.temporal_length, enc.input_channels)
        valid = valid.to(device, non_blocking=True)
        x = self.normalizer.normalize_sensor(sensor.to(device, non_blocking=True), valid).to(self.head_dtype)
        return enc(x, valid, rows=rows.to(device), batch_size=batch_size)

    def forward(self, batch: dict) -> PolicyOutput:
        """Predict normalized action chunks; with `actions` in the batch also the per-sample loss.

        Ground-truth actions are only ever used for the loss, never as an input. Collective under
        ZeRO-3: every rank calls it every step, and it runs every submodule (the sensor encoder
        included) whatever the batch holds.
        """
        vl = self.encode_vl(batch)
        dtype = self.head_dtype
        vl = vl._replace(tokens=vl.tokens.to(dtype), pooled=vl.pooled.to(dtype))
        b = vl.tokens.shape[0]
        sensor = self.encode_sensor(batch, b) if self.sensor_encoder is not None else None
        memory, mask = self.fusion(vl, sensor)
        actions = self.expert(memory, mask)
        if batch.get("actions") is None:
            return PolicyOutput(actions)
        raw = batch["actions"].to(actions.device)
        if raw.shape != actions.shape:
            raise ValueError(f"batch actions are {tuple(raw.shape)}, the model predicts {tuple(actions.shape)} "
                             "(--horizon, --action-dim)")
        target = self.normalizer.normalize_actions(raw)
        step_mask = batch.get("action_mask")
        step_mask = (torch.ones(raw.shape[:2], dtype=torch.bool, device=raw.device) if step_mask is None
                     else step_mask.to(raw.device))
        per_sample, valid = masked_action_loss(actions, target, step_mask, self.config.action_loss)
        return PolicyOutput(actions, per_sample, target, valid)

    @torch.no_grad()
    def predict(self, text_inputs: list[str], image_inputs: list[list], sensor_data: torch.Tensor | None = None,
                sensor_mask: torch.Tensor | None = None, bad_sensor: str = "error") -> torch.Tensor:
        """Denormalized action chunks `(B, H, A)` (fp32, on CPU) for the robot.

        `image_inputs[b]` is sample b's list of views (PIL images or file paths); `sensor_data` a raw
        `(B, T, C)` window (all rows valid unless `sensor_mask` says otherwise) or None. Runs in eval
        mode under no_grad, with bf16 autocast on CUDA.

        A window with NaN/inf in a valid row is a `UsageError` (on a robot a NaN action is a safety
        fault), unless `bad_sensor="treat_as_missing"`: that sample is then predicted as one without
        a sensor (the learned missing-sensor embedding). A wrong channel count is a `UsageError`; a
        non-finite prediction is a `RuntimeError`, never returned. Each sample must have the views the
        policy was trained on (`self.views`), in that order; another number is a `UsageError`.
        """
        if bad_sensor not in BAD_SENSOR_POLICIES:
            raise UsageError(f"predict: bad_sensor={bad_sensor!r}; choose one of {', '.join(BAD_SENSOR_POLICIES)}")
        if len(text_inputs) != len(image_inputs):
            raise ValueError(f"predict: {len(text_inputs)} instructions but {len(image_inputs)} image lists")
        for b, views in enumerate(image_inputs):
            if self.views is not None and len(views) != len(self.views):
                raise UsageError(f"predict: sample {b} has {len(views)} view(s), the policy was trained on "
                                 f"{len(self.views)} ({', '.join(self.views)}); give those views, in that order")
        batch = {"images": [list(v) for v in image_inputs], "instructions": list(text_inputs)}
        if sensor_data is not None:
            sensor_data = torch.as_tensor(sensor_data, dtype=torch.float32)
            if sensor_data.dim() != 3 or sensor_data.shape[0] != len(text_inputs):
                raise ValueError(f"predict: sensor_data must be (B={len(text_inputs)}, T, C), got "
                                 f"{tuple(sensor_data.shape)}")
            if self.sensor_encoder is not None and sensor_data.shape[2] != self.config.sensor_input_channels:
                raise UsageError(f"predict: sensor_data has {sensor_data.shape[2]} channels, the policy reads "
                                 f"{self.config.sensor_input_channels} (--sensor-input-channels it was trained with)")
            mask = (torch.ones(sensor_data.shape[:2], dtype=torch.bool) if sensor_mask is None
                    else torch.as_tensor(sensor_mask, dtype=torch.bool))
            # (a policy without a sensor encoder ignores the window, and its values)
            bad = (~torch.isfinite(sensor_data) & mask[..., None]).flatten(1).any(1)
            if self.sensor_encoder is not None and bad.any():
                rows = bad.nonzero().flatten().tolist()
                if bad_sensor == "error":
                    raise UsageError(f"predict: sensor_data of sample(s) {rows} holds NaN/inf; fix the window, or pass "
                                     "bad_sensor='treat_as_missing' to predict those samples without a sensor")
                sensor_data = torch.where(bad[:, None, None], 0.0, sensor_data)
                mask = mask & ~bad[:, None]
                log.warning("predict: NaN/inf in the sensor window of sample(s) %s: predicted without a sensor", rows)
            batch["sensor"] = sensor_data
            batch["sensor_mask"] = mask
        was_training = self.training
        self.eval()
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                    else contextlib.nullcontext())
        try:
            with autocast:
                out = self(batch)
        finally:
            self.train(was_training)
        actions = self.normalizer.denormalize_actions(out.actions).cpu()
        if not torch.isfinite(actions).all():
            raise RuntimeError("predict: the policy produced non-finite actions (NaN/inf); not returning them -- "
                               "check its weights (a diverged training?) and its inputs")
        return actions

    # ------------------------------------------------------------------------------ optimizer
    def component_of(self, name: str) -> str:
        """The optimizer group (expert | sensor | vl | vision) of a policy parameter name."""
        if name.startswith(BACKBONE_PREFIX):
            return backbone_component(name[len(BACKBONE_PREFIX):])
        if name.startswith("sensor_encoder."):
            return "sensor"
        return "expert"  # fusion and action expert

    def parameter_groups(self, weight_decay: float = 0.0) -> list[dict]:
        """Trainable parameters as optimizer groups, each {"name", "component", "params", "weight_decay"}.

        component is expert (fusion + action expert: --lr), sensor (--sensor-lr), vl (LoRA or
        unfrozen LM blocks: --vl-lr) or vision (unfrozen vision blocks: --vision-lr); the trainer
        attaches the learning rates. Biases, norm weights, embeddings and queries get no weight
        decay ("<component>.no_decay" groups). Empty groups are left out.
        """
        buckets: dict[tuple[str, bool], list] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            decay = p.ndim >= 2 and not name.endswith(_NO_DECAY_SUFFIXES)
            buckets.setdefault((self.component_of(name), decay), []).append(p)
        groups = []
        for component in COMPONENTS:
            for decay in (True, False):
                params = buckets.get((component, decay))
                if params:
                    groups.append({"name": component if decay else f"{component}.no_decay", "component": component,
                                   "params": params, "weight_decay": weight_decay if decay else 0.0})
        return groups

    def parameter_counts(self) -> dict[str, float]:
        """Millions of parameters: trainable_M, frozen_M and trainable per component (<component>_M)."""
        counts = {"trainable_M": 0.0, "frozen_M": 0.0, **{f"{c}_M": 0.0 for c in COMPONENTS}}
        for name, p in self.named_parameters():  # tied weights counted once
            n = p.numel() / 1e6
            if p.requires_grad:
                counts["trainable_M"] += n
                counts[f"{self.component_of(name)}_M"] += n
            else:
                counts["frozen_M"] += n
        return counts

    # ------------------------------------------------------------------------------ save / load
    def saved_parameter_names(self) -> list[str]:
        """What `save_pretrained` writes: all vla-ds-owned parameters (sensor encoder, fusion,
        expert) plus the backbone parameters the finetune mode trains (LoRA adapters or unfrozen
        blocks). Never the frozen backbone, never a second name of a tied tensor."""
        owned = [n for n, _ in self.named_parameters() if not n.startswith("vl.")]
        return owned + list(self.backbone_trained)

    def save_pretrained(self, out_dir: str | os.PathLike, state_dict: dict | None = None) -> Path:
        """Write config.json, model.safetensors and stats.json to `out_dir` (atomically).

        `state_dict` (e.g. DeepSpeed's consolidated 16-bit state dict under ZeRO-3) replaces the
        live parameters as the source of the tensors. Not collective: gather first, call on one rank.
        """
        from vla_ds.model.serialization import save_policy

        return save_policy(self, out_dir, state_dict)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, backbone: str | os.PathLike | None = None,
                        device: torch.device | str | None = None, load_backbone: bool = True) -> QwenVLA:
        """Rebuild a saved policy (in eval mode). `backbone` overrides the saved backbone path/id,
        for a policy moved to a machine where the backbone lives elsewhere."""
        from vla_ds.model.serialization import load_policy

        return load_policy(cls, path, backbone=backbone, device=device, load_backbone=load_backbone)
