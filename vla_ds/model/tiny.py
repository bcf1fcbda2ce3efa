"""A tiny, randomly initialised Qwen2.5-VL written as a complete Hugging Face model directory.

No model hub is reachable from our machines, so tests, the demo and CPU benchmarks need a backbone
that vla-ds can make offline. `write_tiny_model(out_dir)` writes what a real
Qwen2.5-VL-3B-Instruct directory holds -- `config.json`, `model.safetensors`, tokenizer files with
the Qwen special tokens and chat template, the Qwen2-VL image processor config and a processor
config -- so that the backbone loader reads it through exactly the path it uses for the real model.

Everything is deterministic for a given seed: the BPE merges come from a fixed corpus, the weights
from `torch.manual_seed(seed)`.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from vla_ds.utils.io import atomic_dir

log = logging.getLogger(__name__)

# Qwen2.5-VL's special tokens in the order of the real vocabulary (ids 151643..151656), so that
# the relative layout of the tiny tokenizer matches the real one.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL style chat template: one <|vision_start|><|image_pad|><|vision_end|> per image entry
# (the processor expands <|image_pad|> to the image's token count), text entries verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A fixed corpus for the BPE merges: the words our instructions and chat turns are made of.
_CORPUS = [
    "You are a helpful assistant.",
    "Insert the needle into the target tissue slowly and stop at the membrane.",
    "Advance the needle along the planned trajectory while keeping the tip centred.",
    "Retract the needle carefully. Align the tool with the vessel before insertion.",
    "Move the end effector toward the marked point on the phantom eye.",
    "system user assistant picture image video view camera left right force sensor OCT FPI",
    "What action should the robot take next? Predict the next eight poses.",
    "0 1 2 3 4 5 6 7 8 9 x y z roll pitch yaw degrees millimetres",
]


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the tiny backbone. Defaults give ~0.1 M parameters and a ~4 ms forward pass."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    vision_depth: int = 2
    vision_hidden_size: int = 32
    vision_heads: int = 2
    vision_intermediate_size: int = 64
    bpe_vocab_size: int = 400
    min_pixels: int = 56 * 56
    max_pixels: int = 112 * 112

    def __post_init__(self):
        head_dim = self.hidden_size // self.num_heads
        if head_dim * self.num_heads != self.hidden_size or head_dim % 2:
            raise ValueError(f"hidden_size {self.hidden_size} must split into {self.num_heads} even heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (temporal, height, width) like the real [16, 24, 24]."""
    half = head_dim // 2
    t = half // 4 if half >= 4 else 0
    h = (half - t) // 2
    return [t, h, half - t - h]


def build_tokenizer():
    """A byte-level BPE trained on a fixed corpus, wrapped as a `Qwen2Tokenizer` with Qwen's tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TinySpec.bpe_vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tok = Qwen2Tokenizer(
        vocab=state["vocab"],
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
    )
    tok.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS]},
        replace_extra_special_tokens=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 32768
    return tok


def special_token_ids(tokenizer) -> dict[str, int]:
    """The config's special token ids (bos, eos, pad, vision and image/video) as the tokenizer's ids."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    return {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
    }


def build_config(spec: TinySpec, tokenizer):
    """A `Qwen2_5_VLConfig` whose special token ids are the tokenizer's ids."""
    from transformers import Qwen2_5_VLConfig

    vocab = -(-len(tokenizer) // 64) * 64  # padded like the real vocabulary (151936 > 151665)
    head_dim = spec.hidden_size // spec.num_heads
    return Qwen2_5_VLConfig.from_dict(
        {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "hidden_size": spec.hidden_size,
            "intermediate_size": spec.intermediate_size,
            "num_hidden_layers": spec.num_layers,
            "num_attention_heads": spec.num_heads,
            "num_key_value_heads": spec.num_kv_heads,
            "max_window_layers": spec.num_layers,
            "max_position_embeddings": 4096,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "rope_scaling": {"type": "mrope", "mrope_section": _mrope_section(head_dim)},
            "vocab_size": vocab,
            "tie_word_embeddings": True,
            "use_cache": True,
            **special_token_ids(tokenizer),
            "vision_config": {
                "depth": spec.vision_depth,
                "hidden_size": spec.vision_hidden_size,
                "intermediate_size": spec.vision_intermediate_size,
                "num_heads": spec.vision_heads,
                "hidden_act": "silu",
                "in_chans": 3,
                "out_hidden_size": spec.hidden_size,
                "patch_size": 14,
                "spatial_merge_size": 2,
                "spatial_patch_size": 14,
                "temporal_patch_size": 2,
                "window_size": 112,
                "fullatt_block_indexes": [spec.vision_depth - 1],
                "tokens_per_second": 2,
            },
        }
    )


def build_image_processor(spec: TinySpec):
    """The Qwen2-VL image processor (Pillow backend: no torchvision needed), small pixel bounds."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)


def full_size_config(config_json: str | os.PathLike, tokenizer):
    """A published Qwen2.5-VL config.json (e.g. 3B-Instruct) with its special token ids mapped to
    the offline tokenizer's: the architecture, vocabulary size included, is unchanged."""
    from transformers import Qwen2_5_VLConfig

    config = Qwen2_5_VLConfig.from_json_file(str(config_json))
    # Which level holds which id moved between transformers releases (5.24 keeps bos/eos/pad on
    # text_config only): set each wherever the config has it.
    for key, value in special_token_ids(tokenizer).items():
        for level in (config, getattr(config, "text_config", None)):
            if level is not None and hasattr(level, key):
                setattr(level, key, value)
    return config


def write_tiny_model(out_dir: str | os.PathLike, seed: int = 0, spec: TinySpec | None = None,
                     config_json: str | os.PathLike | None = None, dtype=None, max_pixels: int | None = None) -> Path:
    """Write a complete, loadable tiny Qwen2.5-VL model directory to `out_dir` and return its path.

    With `config_json` (a published config such as the 3B's) the same offline tokenizer and
    processor come with a randomly initialised model of that full size instead, in `dtype` (for
    memory and speed benchmarks; never a model to use). The directory is assembled in a temporary
    sibling and renamed into place, so an interrupted call never leaves a half-written model
    behind. An existing `out_dir` is replaced.
    """
    import dataclasses

    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vla_ds.model.processor import ImageOnlyQwenVLProcessor, save_processor

    spec = spec or TinySpec()
    if max_pixels:
        spec = dataclasses.replace(spec, max_pixels=max_pixels)
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    config = full_size_config(config_json, tokenizer) if config_json else build_config(spec, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype or torch.float32).eval()
    processor = ImageOnlyQwenVLProcessor(image_processor=build_image_processor(spec), tokenizer=tokenizer,
                                         chat_template=tokenizer.chat_template)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_processor(processor, tmp)
    n = sum(p.numel() for p in model.parameters())
    log.info("wrote tiny Qwen2.5-VL (%.2f M parameters, seed %d) to %s", n / 1e6, seed, out_dir)
    return out_dir
