"""The Qwen2.5-VL backbone: loading (one code path for the real 3B and the tiny model) and the
per-sample VL features the policy consumes.

Each sample is its own chat message (all of its camera views, then its instruction); the samples
are tokenized together with right padding, and the features are the chosen hidden state with the
attention mask, reduced to the VL memory of `--vl-tokens` tokens (every token `(B, L, D)`, the
pooled vector, or K pooled tokens: `vla_ds.model.vl_tokens`), plus a masked mean `(B, D)` over real
tokens only. (The old trainer put the whole batch into one conversation and so crashed for
batch > 1.) D is read from the backbone's config, never assumed.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vla_ds.errors import UsageError
from vla_ds.model.vl_tokens import VLFeatures, reduce_features
from vla_ds.utils.dist import device_for

log = logging.getLogger(__name__)

# Module names inside transformers' Qwen2_5_VLForConditionalGeneration (checked on 5.17-5.24).
VISION_MODULE = "model.visual"
LANGUAGE_MODEL = "model.language_model"
LM_HEAD = "lm_head"


def default_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bf16 on a CUDA device that supports it, fp32 otherwise (CPU bf16 matmuls are slow)."""
    device = torch.device(device) if device is not None else device_for()
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolve_dtype(name: str, device: torch.device | str | None = None) -> torch.dtype:
    """`ModelConfig.dtype` ("auto" or a torch dtype name) as a torch dtype."""
    return default_dtype(device) if name == "auto" else getattr(torch, name)


def load_vl_model(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    device: torch.device | str | None = None,
    load_in_8bit: bool = False,
    zero3: dict | None = None,
):
    """`Qwen2_5_VLForConditionalGeneration.from_pretrained(path)` in eval mode on `device`.

    `zero3`, a resolved ZeRO-3 DeepSpeed config: Collective; the model is built partitioned, each
    rank reading only its shard of the weights (`vla_ds.model.zero3_load`), never the whole backbone.

    With `load_in_8bit` the language model's linear layers become bitsandbytes int8 layers, loaded
    straight onto `device` (CPU included: bitsandbytes >= 0.45 has a CPU backend); the vision tower
    and the lm_head stay in `dtype`, because int8 vision features cost accuracy for little memory.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    if attn_implementation == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            raise ValueError("--attn-implementation flash_attention_2 needs the flash-attn package; use sdpa")
    dtype = dtype or default_dtype(device)
    if zero3 is not None and not load_in_8bit:  # 8-bit with ZeRO-3 is refused before this (train.engine)
        from vla_ds.model.zero3_load import load_partitioned

        return load_partitioned(path, dtype, attn_implementation, zero3)
    kwargs = {}
    if load_in_8bit:
        from transformers import BitsAndBytesConfig

        # bitsandbytes layers cannot be moved after loading: place them on the target device now.
        target = torch.device(device or "cpu")
        if target.type == "cuda" and target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
        kwargs["device_map"] = {"": str(target)}
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_skip_modules=[VISION_MODULE, LM_HEAD]
        )
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation, **kwargs
    )
    if device is not None and not load_in_8bit:
        model.to(device)
    return model.eval()


def check_backbone_path(path: str | os.PathLike) -> None:
    """A backbone that is clearly a local path (absolute, relative with ./, or deeper than a hub
    id's org/name) must exist: otherwise transformers reports a confusing hub lookup failure."""
    text = str(path)
    local = os.path.isabs(text) or text.startswith(".") or text.count("/") > 1
    if local and not Path(text).is_dir():
        raise FileNotFoundError(f"--backbone {text}: no such directory (for a policy moved from another machine, "
                                "pass the new location: QwenVLA.from_pretrained(dir, backbone=PATH))")


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
BACKBONE_FIX = "give a Qwen2.5-VL model directory (config.json + weights, e.g. `vla-ds tiny-model DIR`) or a hub id"


def check_backbone(spec: str) -> None:
    """--backbone of a training run, before anything loads: a directory holding a Qwen2.5-VL
    config.json, or a hub id (offline: in the local Hugging Face cache); a one-line UsageError
    otherwise. Only config.json is read. (`check_backbone_path` is the looser check of a saved
    policy's backbone, whose message says how to point at a moved one.)"""
    import json

    p = Path(spec).expanduser()
    if p.is_dir():
        try:
            model_type = json.loads((p / "config.json").read_text()).get("model_type")
        except FileNotFoundError:
            raise UsageError(f"--backbone {spec}: no config.json in that directory; {BACKBONE_FIX}") from None
        except (OSError, ValueError, AttributeError) as e:
            raise UsageError(f"--backbone {spec}: unreadable config.json ({e}); {BACKBONE_FIX}") from None
        if model_type != "qwen2_5_vl":
            raise UsageError(f"--backbone {spec}: config.json has model_type {model_type!r}, not qwen2_5_vl; {BACKBONE_FIX}")
        return
    if p.exists() or not HUB_ID.fullmatch(spec):
        raise UsageError(f"--backbone {spec}: {'not a directory' if p.exists() else 'no such directory'}; {BACKBONE_FIX}")
    offline = any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if offline and not _in_hub_cache(spec):
        raise UsageError(f"--backbone {spec}: no such directory, and not in the local Hugging Face cache (offline); "
                         f"{BACKBONE_FIX} that is downloaded")


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an invalid id or an unreadable cache: not there
        return False


def read_backbone_config(path: str | os.PathLike):
    """The backbone's `Qwen2_5_VLConfig` alone (no weights), e.g. for VL-cache mode; `path` is a
    model directory, a hub id, or a config.json file."""
    from transformers import AutoConfig

    try:
        if Path(path).is_file():  # a bare config.json (e.g. for `vla-ds plan`)
            from transformers import Qwen2_5_VLConfig

            config = Qwen2_5_VLConfig.from_json_file(str(path))
        else:
            config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"--backbone {path}: cannot read a Qwen2.5-VL config there ({e})") from None
    if getattr(config, "model_type", None) != "qwen2_5_vl":
        raise UsageError(f"--backbone {path}: model_type is {config.model_type!r}, expected qwen2_5_vl")
    return config


def hidden_size(config) -> int:
    """D, the width of the language model's hidden states (2048 for the 3B)."""
    text = getattr(config, "text_config", None) or config
    return int(text.hidden_size)


def num_lm_layers(config) -> int:
    text = getattr(config, "text_config", None) or config
    return int(text.num_hidden_layers)


def chat_message(num_images: int, instruction: str) -> list[dict]:
    """One sample's chat message: all its camera views, then the instruction."""
    content = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": instruction})
    return [{"role": "user", "content": content}]


def load_image(image):
    """A PIL image as RGB: a path is opened (the robot passes file paths), an (H, W, 3) uint8 array or
    tensor (the data loader's) wrapped, a PIL image converted if it is not RGB."""
    from PIL import Image

    if isinstance(image, (torch.Tensor, np.ndarray)):
        array = image.numpy() if isinstance(image, torch.Tensor) else image
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise TypeError(f"an image array must be (H, W, 3) uint8 RGB, got {array.dtype} {array.shape}")
        return Image.fromarray(array)
    if isinstance(image, (str, os.PathLike)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"image {image} does not exist")
        with Image.open(image) as im:
            return im.convert("RGB")
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    raise TypeError(f"images must be PIL images, (H, W, 3) uint8 arrays or file paths, got {type(image).__name__}")


class VLEncoder(nn.Module):
    """The Qwen2.5-VL model + processor, turning (views, instruction) samples into `VLFeatures`.

    `vl_tokens` (`ModelConfig.resolved_vl_tokens`) is the VL memory's size: -1 every token `(B, L, D)`,
    0 the pooled vector as one token, K >= 2 K pooled tokens (`vla_ds.model.vl_tokens`). A VL cache
    stores `encode_inputs`' output, so cached and live features are the same function of the inputs.
    Runs under `torch.no_grad()` whenever no backbone parameter requires grad (finetune none), so
    a frozen 3B keeps no activations for backward.
    """

    def __init__(self, model, processor, feature_layer: int = -1, vl_tokens: int = -1):
        super().__init__()
        self.model = model
        self.processor = processor
        layers = num_lm_layers(model.config)
        if not -(layers + 1) <= feature_layer <= layers:
            raise ValueError(f"--vl-feature-layer {feature_layer} is outside the backbone's hidden states "
                             f"(-{layers + 1}..{layers})")
        if vl_tokens < -1 or vl_tokens == 1:
            raise ValueError(f"--vl-tokens {vl_tokens}: use -1 (every token), 0 (the pooled vector) or K >= 2")
        self.feature_layer = feature_layer
        self.vl_tokens = int(vl_tokens)

    @property
    def hidden_size(self) -> int:
        return hidden_size(self.model.config)

    def trains(self) -> bool:
        return any(p.requires_grad for p in self.model.parameters())

    def processor_inputs(self, images: list[list], instructions: list[str]) -> dict:
        """Tokenize one chat message per sample (right-padded) and preprocess all views in order."""
        if len(images) != len(instructions):
            raise ValueError(f"batch has {len(images)} image lists but {len(instructions)} instructions")
        texts = [
            self.processor.apply_chat_template(chat_message(len(views), instr), tokenize=False,
                                               add_generation_prompt=True)
            for views, instr in zip(images, instructions)
        ]
        flat = [load_image(im) for views in images for im in views]
        return self.processor(text=texts, images=flat or None, padding=True, padding_side="right",
                              return_tensors="pt")

    def encode_inputs(self, inputs: dict, views: list[int]) -> VLFeatures:
        """Features of already-processed inputs (`processor_inputs`' output, e.g. made in a loader
        worker); `views[b]` is sample b's number of images. The one path of live and cached features."""
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        grad = contextlib.nullcontext() if self.trains() else torch.no_grad()
        want_all = self.feature_layer != -1
        with grad:
            # The inner Qwen2_5_VLModel: hidden states without the vocabulary-sized lm_head matmul.
            out = self.model.model(**inputs, use_cache=False, output_hidden_states=want_all, return_dict=True)
            hidden = out.hidden_states[self.feature_layer] if want_all else out.last_hidden_state
            return reduce_features(hidden, inputs["attention_mask"], inputs["input_ids"],
                                   inputs.get("image_grid_thw"), list(views), self.model.config.image_token_id,
                                   self.processor.image_processor.merge_size, self.vl_tokens)

    def forward(self, images: list[list], instructions: list[str]) -> VLFeatures:
        return self.encode_inputs(self.processor_inputs(images, instructions), [len(v) for v in images])
