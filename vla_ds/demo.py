"""`vla-ds demo`: the whole pipeline on made-up data, small enough for a laptop CPU.

Stages so far:
  1. write the tiny Qwen2.5-VL backbone (`vla-ds tiny-model`)
  2. load it through the real loading path and run a forward pass on a 2-view chat message
Each later stage (preprocess, stats, cache, DeepSpeed training, convert, predict) is added here
as it lands, so the demo always shows everything vla-ds can do.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


def synthetic_view(seed: int, height: int = 120, width: int = 160):
    """A camera-like RGB frame (smooth background + a dark needle line) as a PIL image."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = 0.5 + 0.3 * np.sin(xx / width * np.pi * rng.uniform(1, 3)) * np.cos(yy / height * np.pi)
    img = np.stack([base * c for c in rng.uniform(0.6, 1.0, size=3)], axis=-1)
    x0, y0 = rng.integers(width // 4, width // 2), rng.integers(height // 4, height // 2)
    for t in range(min(height, width) // 2):  # a diagonal needle shaft
        img[min(y0 + t, height - 1), min(x0 + t, width - 1)] = 0.05
    img += rng.normal(0, 0.02, img.shape)
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


def backbone_forward_check(model_dir: str | Path, num_views: int = 2) -> dict:
    """Load processor + model from `model_dir` and run one forward pass of a multi-view message."""
    from vla_ds.model.backbone import chat_message, load_vl_model
    from vla_ds.model.processor import load_processor

    processor = load_processor(model_dir)
    model = load_vl_model(model_dir, device="cpu")
    msg = chat_message(num_views, "Insert the needle into the target and stop at the membrane.")
    text = processor.apply_chat_template(msg, tokenize=False, add_generation_prompt=True)
    images = [synthetic_view(i) for i in range(num_views)]
    inputs = processor(text=[text], images=images, return_tensors="pt")
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    hidden = out.hidden_states[-1]
    if not torch.isfinite(hidden).all():
        raise RuntimeError(f"{model_dir}: forward pass produced non-finite hidden states")
    return {
        "tokens": int(inputs["input_ids"].shape[1]),
        "image_tokens": int((inputs["input_ids"] == model.config.image_token_id).sum()),
        "hidden_shape": tuple(hidden.shape),
        "forward_ms": (time.perf_counter() - t0) * 1e3,
        "parameters_M": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def run_demo(out: str | Path, seed: int = 0) -> dict:
    """Run every demo stage under `out`; return where each artefact went."""
    from vla_ds.model.tiny import write_tiny_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    backbone = out / "backbone"
    log.info("[1/2] tiny Qwen2.5-VL backbone -> %s", backbone)
    write_tiny_model(backbone, seed=seed)
    log.info("[2/2] forward pass of a 2-view chat message through the backbone")
    check = backbone_forward_check(backbone)
    log.info(
        "      %d tokens (%d image tokens) -> last hidden state %s in %.1f ms (%.2f M parameters)",
        check["tokens"],
        check["image_tokens"],
        check["hidden_shape"],
        check["forward_ms"],
        check["parameters_M"],
    )
    result = {"backbone": str(backbone), "forward": check, "seconds": time.perf_counter() - t0}
    log.info("demo finished in %.1f s; outputs under %s", result["seconds"], out)
    return result
