"""`QwenVLA`: Qwen2.5-VL backbone -> (sensor encoder) -> fusion -> action expert.

    images + instructions --VLEncoder--> VL memory (B, M, D) + mask      (or a VL cache's features)
                          M = L (--vl-tokens -1), 1 (0: pooled) or K pooled tokens, the same live and cached
    sensor (B, T, C)      --Normalizer, SensorEncoder--> tokens (B, T', S), pooled (B, S)
    fusion(VL, sensor)    --> memory (B, M, E) + mask
    robot state (B, 12)   --StateEncoder--> one more memory token (B, 1, E)       (--state-enabled)
    ActionExpert(memory)  --> actions (B, H, A), normalized                     (--action-head regression)
    FlowExpert(memory, x_t, t) --> velocity; Euler-integrated from noise        (--action-head flow)

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
from vla_ds.data.state import STATE_KEYS, state_features, state_slice
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
from vla_ds.model.flow import FlowExpert, flow_loss_inputs, integrate, sample_noise, time_from_uniform, validation_draws
from vla_ds.model.fusion import build_fusion
from vla_ds.model.normalize import Normalizer
from vla_ds.model.sensor import SensorEncoder, SensorFeatures
from vla_ds.model.state import StateEncoder
from vla_ds.model.vl_tokens import VLFeatures
from vla_ds.model.zero3_load import full_shape
from vla_ds.utils.dist import device_for

log = logging.getLogger(__name__)

BACKBONE_PREFIX = "vl.model."  # parameter names of the HF backbone inside the policy
COMPONENTS = ("expert", "sensor", "vl", "vision")  # optimizer groups, in order
# Learned embeddings and queries are not decayed, like biases and norm weights.
_NO_DECAY_SUFFIXES = ("queries", "_embedding", "embed_tokens.weight")


class PolicyOutput(NamedTuple):
    """What `QwenVLA.forward` returns; the loss fields are None when the batch has no targets.

    A NamedTuple (like VLFeatures/SensorFeatures) so DeepSpeed's ZeRO-3 hooks see its tensors.
    """

    # (B, H, A) predictions, normalized action space. A flow head's forward with targets returns its
    # one-step estimate x_t - t v from the noised target instead: a training diagnostic, not a prediction.
    actions: torch.Tensor
    per_sample_loss: torch.Tensor | None = None  # (B,) masked mean elementwise loss, fp32
    target: torch.Tensor | None = None  # (B, H, A) normalized targets, fp32
    valid_steps: torch.Tensor | None = None  # (B,) number of valid (unpadded) chunk steps


class QwenVLA(nn.Module):
    """The vision-language-action policy.

    `load_backbone=False` builds everything but the backbone weights (only its config is read, for
    D): such a policy runs on VL-cache batches (`vl_pooled`, optional `vl_tokens`) only, and needs
    `--finetune-vl none`. With `--load-in-8bit`, build it on its final `device`: bitsandbytes
    layers cannot be moved afterwards. `zero3`, the trainer's resolved ZeRO-3 DeepSpeed config, builds
    the backbone partitioned over the ranks (then the constructor is Collective); the policy's own
    modules are built whole and partitioned by `deepspeed.initialize`.
    """

    def __init__(self, config: ModelConfig, stats: NormStats | None = None, device: torch.device | str | None = None,
                 load_backbone: bool = True, vl_model=None, views: list[str] | None = None, zero3: dict | None = None):
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
                load_in_8bit=config.load_in_8bit, zero3=zero3)
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
        state_keys = config.state_key_names() if config.state_enabled else ()
        if state_keys and not stats.state_mean:
            log.warning("--state-enabled but the stats have no robot-state statistics: the state is not normalized")
        self.normalizer = Normalizer(stats, config.action_dim,
                                     config.sensor_input_channels if config.sensor_enabled else None, state_keys)
        self.sensor_encoder = SensorEncoder(
            config.sensor_input_channels, config.sensor_temporal_length, config.sensor_hidden_dim,
            config.sensor_output_dim, config.sensor_conv_blocks, config.sensor_num_layers, config.sensor_num_heads,
            config.head_dropout,
        ).to(device) if config.sensor_enabled else None
        self.fusion = build_fusion(config.effective_fusion, self.vl_dim, config.sensor_output_dim,
                                   config.expert_hidden_dim, config.expert_num_heads, config.head_dropout).to(device)
        self.state_encoder = StateEncoder(state_keys, config.expert_hidden_dim).to(device) if state_keys else None
        head = FlowExpert if config.action_head == "flow" else ActionExpert
        self.expert = head(config.horizon, config.action_dim, config.expert_hidden_dim,
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

    def encode_state(self, batch: dict, batch_size: int) -> torch.Tensor:
        """The robot-state memory token (B, 1, E) of the batch's raw `state` (B, 12) + `state_mask` (B, 2)."""
        if batch.get("state") is None:
            raise ValueError("this policy reads the robot state (--state-enabled): the batch needs `state` (B, 12) "
                             "and `state_mask` (B, 2) (predict: state={'pose': ..., 'joints': ...})")
        raw, device = batch["state"].to(self.device).float(), self.device
        present = batch.get("state_mask")
        present = torch.ones(batch_size, 2, dtype=torch.bool, device=device) if present is None else present.to(device).bool()
        if raw.shape != (batch_size, 12) or present.shape != (batch_size, 2):
            raise ValueError(f"batch state is {tuple(raw.shape)} / state_mask {tuple(present.shape)}; expected "
                             f"({batch_size}, 12) / ({batch_size}, 2)")
        keys = self.state_encoder.keys
        flags = torch.stack([present[:, list(STATE_KEYS).index(k)] for k in keys], dim=1)
        feats = [self.normalizer.normalize_state(state_features(raw[:, state_slice(k)], k), k)
                 .masked_fill(~flags[:, i:i + 1], 0.0) for i, k in enumerate(keys)]
        return self.state_encoder(torch.cat(feats, dim=1).to(self.head_dtype), flags)

    def memory(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """What the action expert attends over: the fused VL (+ sensor) tokens and, with
        --state-enabled, the robot-state token -> (memory (B, L, E), mask (B, L))."""
        vl = self.encode_vl(batch)
        dtype = self.head_dtype
        vl = vl._replace(tokens=vl.tokens.to(dtype), pooled=vl.pooled.to(dtype))
        b = vl.tokens.shape[0]
        sensor = self.encode_sensor(batch, b) if self.sensor_encoder is not None else None
        memory, mask = self.fusion(vl, sensor)
        if self.state_encoder is not None:
            memory = torch.cat([memory, self.encode_state(batch, b)], dim=1)
            mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.bool, device=mask.device)], dim=1)
        return memory, mask

    def forward(self, batch: dict) -> PolicyOutput:
        """Predict normalized action chunks; with `actions` in the batch also the per-sample loss.

        Ground-truth actions are only ever used for the loss, never as an input (a flow head trains on
        the noised target, as the method requires; without `actions` it samples from noise alone).
        Collective under ZeRO-3: every rank calls it every step, and it runs every submodule (the
        sensor encoder included) whatever the batch holds.
        """
        memory, mask = self.memory(batch)
        b, flow = memory.shape[0], self.config.action_head == "flow"
        shape = (self.config.horizon, self.config.action_dim)
        if batch.get("actions") is None:
            if not flow:
                return PolicyOutput(self.expert(memory, mask))
            noise = batch.get("flow_noise")
            if noise is None:
                noise = (torch.randn(b, *shape, device=memory.device) if self.training
                         else sample_noise(self._ids(batch, b), *shape))
            return PolicyOutput(integrate(self.expert, memory, mask, noise.to(memory.device), self.config.flow_steps))
        raw = batch["actions"].to(memory.device)
        if raw.shape != (b, *shape):
            raise ValueError(f"batch actions are {tuple(raw.shape)}, the model predicts {(b, *shape)} (--horizon, "
                             "--action-dim)")
        target = self.normalizer.normalize_actions(raw)
        step_mask = batch.get("action_mask")
        step_mask = (torch.ones(raw.shape[:2], dtype=torch.bool, device=raw.device) if step_mask is None
                     else step_mask.to(raw.device))
        if not flow:
            actions = self.expert(memory, mask)
            per_sample, valid = masked_action_loss(actions, target, step_mask, self.config.action_loss)
            return PolicyOutput(actions, per_sample, target, valid)
        if batch.get("flow_noise") is not None:  # the trainer's seeded draws (vla_ds/model/flow.py)
            noise, t = batch["flow_noise"], batch["flow_time"]
        elif self.training:  # a plain training loop: the global RNG
            noise, t = torch.randn_like(target), time_from_uniform(torch.rand(b, device=target.device))
        else:  # validation: the same draws at every validation
            noise, t = validation_draws(self._ids(batch, b), *shape)
        noise, t = noise.to(target.device), t.to(target.device)
        x_t, velocity = flow_loss_inputs(target, noise, t)
        v = self.expert(memory, mask, x_t, t)
        per_sample, valid = masked_action_loss(v, velocity, step_mask, self.config.action_loss)
        return PolicyOutput((x_t - t[:, None, None] * v.float()).to(v.dtype), per_sample, target, valid)

    @staticmethod
    def _ids(batch: dict, b: int) -> list[str]:
        """What seeds a sample's flow draws in eval mode: its sample id (else its batch position)."""
        return list(batch.get("sample_ids") or map(str, range(b)))

    @torch.no_grad()
    def predict(self, text_inputs: list[str], image_inputs: list[list], sensor_data: torch.Tensor | None = None,
                sensor_mask: torch.Tensor | None = None, bad_sensor: str = "error", state: dict | None = None,
                num_samples: int | None = None, seed: int | list[int] = 0, generator: torch.Generator | None = None,
                flow_steps: int | None = None) -> torch.Tensor:
        """Denormalized action chunks `(B, H, A)` (fp32, on CPU) for the robot; `(B, K, H, A)` with
        `num_samples=K`.

        `image_inputs[b]` is sample b's list of views (PIL images or file paths); `sensor_data` a raw
        `(B, T, C)` window (all rows valid unless `sensor_mask` says otherwise) or None; `state` the
        robot state {"pose": (B, 6), "joints": (B, 6) or None (not recorded)} in robot units and
        degrees, needed by a policy trained with --state-enabled. Runs in eval mode under no_grad,
        with bf16 autocast on CUDA.

        A flow head (--action-head flow) integrates `flow_steps` (default: its --flow-steps) Euler
        steps from noise drawn by `generator`, else by a generator seeded with `seed`: the same call
        gives the same chunks. `seed` may be a list, one per sample: each sample then draws from its
        own stream, so its chunks do not depend on what else is in the batch (the policy server's
        batches of concurrent requests). `num_samples=K` draws K chunks per observation (the VL backbone runs
        once); a regression head's K chunks are K copies of its one.

        A window with NaN/inf in a valid row is a `UsageError` (on a robot a NaN action is a safety
        fault), unless `bad_sensor="treat_as_missing"`: that sample is then predicted as one without
        a sensor (the learned missing-sensor embedding). A wrong channel count is a `UsageError`; a
        non-finite prediction is a `RuntimeError`, never returned. Each sample must have the views the
        policy was trained on (`self.views`), in that order; another number is a `UsageError`.
        """
        from vla_ds.model.inputs import predict_batch

        if num_samples is not None and num_samples < 1 or flow_steps is not None and flow_steps < 1:
            raise UsageError(f"predict: num_samples={num_samples}, flow_steps={flow_steps}; both must be >= 1")
        if isinstance(seed, (list, tuple)) and len(seed) != len(text_inputs):
            raise ValueError(f"predict: {len(seed)} seeds for {len(text_inputs)} samples")
        batch = predict_batch(self, text_inputs, image_inputs, sensor_data, sensor_mask, bad_sensor, state)
        k, steps = num_samples or 1, flow_steps or self.config.flow_steps
        was_training = self.training
        self.eval()
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                    else contextlib.nullcontext())
        try:
            with autocast:
                memory, mask = self.memory(batch)
                if self.config.action_head == "flow":
                    memory, mask = memory.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
                    shape = (self.config.horizon, self.config.action_dim)
                    if isinstance(seed, (list, tuple)) and generator is None:  # one stream per sample
                        noise = torch.cat([torch.randn(k, *shape, generator=torch.Generator().manual_seed(int(s)))
                                           for s in seed])
                    else:
                        g = generator if generator is not None else torch.Generator().manual_seed(seed)
                        noise = torch.randn(memory.shape[0], *shape, generator=g, device=g.device)
                    out = integrate(self.expert, memory, mask, noise.to(self.device), steps)
                else:
                    out = self.expert(memory, mask).repeat_interleave(k, 0)
        finally:
            self.train(was_training)
        actions = self.normalizer.denormalize_actions(out).cpu()
        if not torch.isfinite(actions).all():
            raise RuntimeError("predict: the policy produced non-finite actions (NaN/inf); not returning them -- "
                               "check its weights (a diverged training?) and its inputs")
        return actions if num_samples is None else actions.view(-1, k, *actions.shape[1:])

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
            ndim = len(full_shape(p))  # (a ZeRO-3 partitioned parameter's data is empty)
            decay = ndim >= 2 and not name.endswith(_NO_DECAY_SUFFIXES)
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
            n = getattr(p, "ds_numel", p.numel()) / 1e6  # (a ZeRO-3 partitioned parameter: its full size)
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
