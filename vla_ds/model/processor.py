"""The Qwen2.5-VL processor without the video half, and the one function that loads it.

vla-ds feeds still images only. `Qwen2_5_VLProcessor` insists on a video processor, which needs
torchvision (absent on CPU-only installs: there is no CPU build of it on our machines), and
`AutoProcessor.from_pretrained` then either raises or silently returns only the tokenizer, which
drops the images. `ImageOnlyQwenVLProcessor` is the same processor with `image_processor` and
`tokenizer` only; `load_processor` builds it from any Qwen2.5-VL directory (the real 3B or the
tiny one) by reading the tokenizer and image processor from that directory.

`save_processor` writes the processor files of every backbone directory vla-ds makes (the tiny model,
a merged LoRA) the way the published Qwen2.5-VL-3B-Instruct holds them: a flat
`preprocessor_config.json` and `tokenizer_config.json` naming the stock `Qwen2_5_VLProcessor`, and the
chat template. `AutoProcessor` then builds the full stock processor where torchvision is installed,
and raises (naming torchvision) where it is not; a file naming vla-ds's own class would make it
return a bare tokenizer, with which `generate` runs silently without the image.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, PretrainedConfig
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin

log = logging.getLogger(__name__)


class ImageOnlyQwenVLProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` whose sub-processors are the image processor and the tokenizer."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # Same token bookkeeping as Qwen2_5_VLProcessor.__init__, minus the video processor.
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.image_token
        )
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.video_token
        )
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


class _ImageOnlyProcessorConfig(PretrainedConfig):
    # Registration key only: lets AutoProcessor resolve the class name that directories written by
    # vla-ds before `save_processor` hold in processor_config.json, without overriding the mapping
    # of any real model type.
    model_type = "vla_ds_image_only_qwen_vl"


AutoProcessor.register(_ImageOnlyProcessorConfig, ImageOnlyQwenVLProcessor, exist_ok=True)


def load_processor(
    path: str | os.PathLike,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> ImageOnlyQwenVLProcessor:
    """Load the image+text processor of the Qwen2.5-VL model at `path` (directory or hub id).

    `min_pixels`/`max_pixels` override the image processor's resolution bounds (the number of
    vision tokens per image scales with pixels / (14*14*4)).
    """
    tokenizer = AutoTokenizer.from_pretrained(path)
    kwargs = {}
    if min_pixels is not None:
        kwargs["min_pixels"] = int(min_pixels)
    if max_pixels is not None:
        kwargs["max_pixels"] = int(max_pixels)
    image_processor = AutoImageProcessor.from_pretrained(path, **kwargs)
    if not hasattr(image_processor, "merge_size"):
        raise ValueError(
            f"{path}: image processor {type(image_processor).__name__} is not a Qwen2-VL image processor; "
            "point --backbone at a Qwen2.5-VL model directory"
        )
    if min_pixels is not None or max_pixels is not None:
        # Some releases keep the bounds in `size` only; keep both in step.
        size = dict(getattr(image_processor, "size", None) or {})
        if min_pixels is not None:
            size["shortest_edge"] = int(min_pixels)
        if max_pixels is not None:
            size["longest_edge"] = int(max_pixels)
        image_processor.size = size
    chat_template = getattr(tokenizer, "chat_template", None)
    if not chat_template:
        raise ValueError(f"{path}: the tokenizer has no chat template; the backbone directory is incomplete")
    return ImageOnlyQwenVLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


STOCK_PROCESSOR = "Qwen2_5_VLProcessor"
STOCK_IMAGE_PROCESSOR = "Qwen2VLImageProcessor"  # transformers picks the Pillow or torchvision backend
PREPROCESSOR_FILE = "preprocessor_config.json"
# Processor files of other layouts, which a copied or older directory may hold: never written beside ours
# (processor_config.json would win over preprocessor_config.json and may name vla-ds's own class).
FOREIGN_PROCESSOR_FILES = ("processor_config.json", "video_preprocessor_config.json", "chat_template.json")


def save_processor(processor: ImageOnlyQwenVLProcessor, out_dir: str | os.PathLike) -> Path:
    """Write `processor`'s tokenizer, image processor and chat template into `out_dir` as the published
    Qwen2.5-VL directory has them, naming the stock classes (see the module docstring)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in FOREIGN_PROCESSOR_FILES:
        (out / name).unlink(missing_ok=True)
    processor.tokenizer._set_processor_class(STOCK_PROCESSOR)
    processor.tokenizer.save_pretrained(out)
    image = processor.image_processor.to_dict()
    size = image.get("size") or {}
    image.update(image_processor_type=STOCK_IMAGE_PROCESSOR, processor_class=STOCK_PROCESSOR)
    for key, edge in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
        if image.get(key) is None and size.get(edge) is not None:
            image[key] = size[edge]  # the published file's keys, which older transformers read
    (out / PREPROCESSOR_FILE).write_text(json.dumps(image, indent=2, sort_keys=True) + "\n")
    if processor.chat_template and not (out / "chat_template.jinja").is_file():
        (out / "chat_template.jinja").write_text(processor.chat_template)
    return out
