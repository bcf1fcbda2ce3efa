"""Loading the Qwen2.5-VL backbone: one code path for the real 3B directory and the tiny one."""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def default_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bf16 on a CUDA device that supports it, fp32 otherwise (CPU bf16 matmuls are slow)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_vl_model(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    device: torch.device | str | None = None,
):
    """`Qwen2_5_VLForConditionalGeneration.from_pretrained(path)` in eval mode on `device`."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    dtype = dtype or default_dtype(device)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation
    )
    if device is not None:
        model.to(device)
    return model.eval()


def chat_message(num_images: int, instruction: str) -> list[dict]:
    """One sample's chat message: all its camera views, then the instruction."""
    content = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": instruction})
    return [{"role": "user", "content": content}]
