"""The VL memory (`VLFeatures`): how a sample's VL hidden states become the tokens the fusion and the
action expert attend over.

`--vl-tokens` (`ModelConfig.resolved_vl_tokens`) K chooses, the same way for the live backbone and for
a VL cache (a cache stores exactly `reduce_features`' output for its K, so a head trained from the
cache sees at inference, with the live backbone, the same function of the inputs):

- K = -1: every token of the sequence, `(B, L, D)` + the attention mask (live backbone only);
- K = 0: the pooled vector as a memory of one token, `(B, 1, D)`;
- K >= 2: K pooled tokens `(B, K, D)` (`pool_tokens`): slots 0..K-2 split evenly over each
  sample's views, each view's image tokens average-pooled on a spatial grid, slot K-1 the mean of
  the text tokens. K must be at least 1 + the number of views.

`pooled` `(B, D)` is always the masked mean over the sample's real tokens. Reduced features
(K >= 0) are float32 whatever the backbone's dtype, as `VLFeatures.from_cache` returns them; K = -1
keeps the backbone's dtype.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from vla_ds.model.layers import masked_mean

TOKEN_POOLING = "view_grid+text/v1"  # the version of `pool_tokens` (recorded in a cache's layout)


class VLFeatures(NamedTuple):
    """Vision-language features of a batch: tokens `(B, M, D)`, mask `(B, M)` bool, pooled `(B, D)`.

    M is the VL memory's length: L (every token, `--vl-tokens -1`), 1 (the pooled vector) or K
    (pooled tokens). `pooled` is the masked mean over the sample's real tokens, from the live
    backbone or as a VL cache stored it (the same computation, when the cache was built).
    A NamedTuple, not a dataclass: ZeRO-3 finds a module's output tensors (to hook its backward)
    only inside tuples, lists and dicts.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def validated(self) -> VLFeatures:
        """Self, after checking that the three shapes agree (for features from outside, e.g. a cache)."""
        if self.tokens.dim() != 3 or self.mask.shape != self.tokens.shape[:2]:
            raise ValueError(f"VL tokens {tuple(self.tokens.shape)} and mask {tuple(self.mask.shape)} disagree")
        if self.pooled.shape != (self.tokens.shape[0], self.tokens.shape[2]):
            raise ValueError(f"VL pooled {tuple(self.pooled.shape)} does not match tokens {tuple(self.tokens.shape)}")
        return self

    @classmethod
    def from_cache(cls, batch: dict, width: int) -> VLFeatures:
        """Features from a VL-cache batch: `vl_pooled` (B, D), optional `vl_tokens` (B, K, D) + mask;
        what `VLEncoder(vl_tokens=K)` (K = 0 without `vl_tokens`) computes live for the same samples."""
        pooled = batch["vl_pooled"]
        if pooled.dim() != 2 or pooled.shape[1] != width:
            raise ValueError(f"batch vl_pooled is {tuple(pooled.shape)}, the backbone's features are (B, {width}); "
                             "was the VL cache built with another --backbone?")
        tokens = batch.get("vl_tokens")
        if tokens is None:
            # Pooled-only cache: the memory is one token per sample.
            return cls(pooled.unsqueeze(1), torch.ones(pooled.shape[0], 1, dtype=torch.bool, device=pooled.device),
                       pooled)
        mask = batch.get("vl_tokens_mask")
        if mask is None:
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return cls(tokens, mask.bool(), pooled).validated()


def _grid(n: int, h: int, w: int) -> tuple[int, int]:
    """The (rows, cols) grid of at most n cells, at most h x w, with the most cells and then the
    aspect ratio closest to the image's."""
    best = (1, 1)
    for gh in range(1, min(n, h) + 1):
        gw = min(n // gh, w)
        key = (gh * gw, -abs(np.log((gh / gw) / (h / w))))
        if key > (best[0] * best[1], -abs(np.log((best[0] / best[1]) / (h / w)))):
            best = (gh, gw)
    return best


def pool_tokens(hidden, mask, input_ids, grid_thw, views: list[int], image_token_id: int, merge: int, k: int):
    """(B, K, D) float32 tokens + (B, K) mask: slots 0..K-2 split evenly over each sample's views,
    each view's image tokens average-pooled on a grid of that many cells (spatial layout kept; a
    cell the image's token grid cannot fill is masked out); slot K-1 the mean of the sample's real
    non-image tokens (instruction and chat text). Differentiable (a training backbone gets grads).

    `views[i]` is sample i's number of images (in order in `grid_thw`, one row per image), `merge`
    the processor's merge size (patches per merged token side)."""
    b, _, d = hidden.shape
    if len(views) != b:
        raise ValueError(f"{len(views)} view counts for a batch of {b} samples")
    for i, v in enumerate(views):
        if k - 1 < v:
            raise ValueError(f"--vl-tokens K must be at least 1 + the number of views (V): got K = {k} for sample {i} "
                             f"with V = {v}; use --vl-tokens {1 + v} or more, or 0 for the pooled vector")
    if grid_thw is None and sum(views):
        raise ValueError(f"{sum(views)} views but no image_grid_thw in the processor's output")
    tokens = torch.zeros(b, k, d, dtype=torch.float32, device=hidden.device)
    tmask = torch.zeros(b, k, dtype=torch.bool, device=hidden.device)
    is_image = (input_ids == image_token_id) & mask
    img = 0
    for i in range(b):
        pos = is_image[i].nonzero().squeeze(1)
        start, slot = 0, 0
        for v in range(views[i]):
            cells = (k - 1) // views[i] + (1 if v < (k - 1) % views[i] else 0)
            t, gh, gw = (int(x) for x in grid_thw[img])
            gh, gw, img = gh // merge, gw // merge, img + 1
            x = hidden[i, pos[start : start + t * gh * gw]].float().reshape(t, gh, gw, d).mean(0)
            start += t * gh * gw
            rows, cols = _grid(cells, gh, gw)
            pooled = torch.nn.functional.adaptive_avg_pool2d(x.permute(2, 0, 1), (rows, cols)).flatten(1).T
            tokens[i, slot : slot + rows * cols], tmask[i, slot : slot + rows * cols] = pooled, True
            slot += cells
        if start != len(pos):
            raise ValueError(f"sample {i}: {len(pos)} image tokens but its {views[i]} views' grids hold {start}")
        text = mask[i] & ~is_image[i]
        tokens[i, k - 1], tmask[i, k - 1] = hidden[i, text].float().mean(0), True
    return tokens, tmask


def reduce_features(hidden: torch.Tensor, mask: torch.Tensor, input_ids: torch.Tensor,
                    image_grid_thw: torch.Tensor | None, views: list[int], image_token_id: int, merge: int,
                    k: int) -> VLFeatures:
    """The VL memory of K tokens (see the module docstring) from the backbone's hidden states
    `(B, L, D)` and attention mask `(B, L)`; `input_ids`, `image_grid_thw`, `views` (images per
    sample), `image_token_id` and `merge` locate each view's image tokens for K >= 2."""
    mask = mask.bool()
    if k == -1:
        return VLFeatures(hidden, mask, masked_mean(hidden, mask))
    pooled = masked_mean(hidden.float(), mask)
    if k == 0:
        return VLFeatures(pooled.unsqueeze(1), torch.ones(pooled.shape[0], 1, dtype=torch.bool, device=pooled.device),
                          pooled)
    if k < 2:
        raise ValueError(f"--vl-tokens {k}: use -1 (every token), 0 (the pooled vector) or K >= 2")
    tokens, tmask = pool_tokens(hidden, mask, input_ids, image_grid_thw, views, image_token_id, merge, k)
    return VLFeatures(tokens, tmask, pooled)
