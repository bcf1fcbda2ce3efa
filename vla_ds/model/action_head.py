"""The regression action expert, the decoder it shares with the flow head, and the masked loss.

The expert owns one learned query per horizon step; the queries self-attend and cross-attend to
the fused memory through a pre-norm transformer decoder, and a linear layer reads out
`(B, horizon, action_dim)` in normalized action space. It never receives ground-truth actions:
the old trainer fed the target chunk in and predicted a residual, so the loss went to zero without
learning anything.
"""
from __future__ import annotations

import torch
from torch import nn


class QueryDecoder(nn.Module):
    """Learned horizon queries -> pre-norm transformer decoder over the memory -> (B, H, A): the
    body both action heads share (the flow head adds the noisy chunk and the time to the queries)."""

    def __init__(self, horizon: int = 8, action_dim: int = 7, width: int = 512, num_layers: int = 4,
                 num_heads: int = 8, dropout: float = 0.1):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(horizon, width) * 0.02)
        layer = nn.TransformerDecoderLayer(width, num_heads, 4 * width, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, num_layers, norm=nn.LayerNorm(width))
        self.out = nn.Linear(width, action_dim)

    def decode(self, memory: torch.Tensor, memory_mask: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """The queries (+ `extra` (B, H, E)) through the decoder -> (B, H, A)."""
        queries = self.queries.to(memory.dtype).unsqueeze(0).expand(memory.shape[0], -1, -1)
        if extra is not None:
            queries = queries + extra
        return self.out(self.decoder(queries, memory, memory_key_padding_mask=~memory_mask))


class ActionExpert(QueryDecoder):
    """`--action-head regression`: the queries alone -> one chunk (B, H, A) per observation."""

    def forward(self, memory: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        """`memory` (B, L, E), `memory_mask` (B, L) bool True = attend -> actions (B, H, A)."""
        return self.decode(memory, memory_mask)


def masked_action_loss(pred: torch.Tensor, target: torch.Tensor, step_mask: torch.Tensor,
                       kind: str = "mse") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loss over the valid chunk steps, and the number of valid steps per sample.

        loss_b = sum_{h valid, a} l(pred[b,h,a] - target[b,h,a]) / (n_valid_b * A)

    with l = square (mse) or absolute value (l1), in fp32. A sample with no valid step gives 0
    (not NaN), and padded steps contribute nothing whatever their values.
    """
    if kind not in ("mse", "l1"):
        raise ValueError(f"--action-loss {kind!r} is not one of mse|l1")
    diff = pred.float() - target.float()
    elem = diff.square() if kind == "mse" else diff.abs()
    elem = elem.masked_fill(~step_mask.bool().unsqueeze(-1), 0.0)
    valid = step_mask.bool().sum(dim=1)
    per_sample = elem.sum(dim=(1, 2)) / (valid.clamp(min=1) * pred.shape[-1])
    return per_sample, valid
