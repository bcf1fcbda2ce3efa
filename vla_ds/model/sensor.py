"""The sensor encoder: a (B, T, C) force + A-scan window -> sensor tokens (B, T', S) + pooled (B, S).

Input is the normalized sensor window (per-channel z-scores, invalid rows zeroed; see
`normalize.Normalizer`). Channel 0 (force) and channels 1.. (A-scan) go through separate stride-2
conv stems whose outputs are summed: in one shared stem the single force channel would be 1/1026th
of the first layer's input and could be drowned out. A small pre-norm transformer then mixes the
T' = T / 2^blocks steps, and a linear layer maps to the output width S.

Normalization is per time step over channels (LayerNorm), never across the batch: 95 % of the
training samples carry no sensor, and a BatchNorm would learn their zeros.

Samples without a sensor (has_sensor False, or no valid row) must not look like "a reading of all
zeros": they get a learned missing-sensor embedding, and the encoder never runs on them -- 94.5 %
of our users' samples have no sensor, and encoding their zero windows was 77 % of a cache-mode
step. It runs on the packed windows of the sensed samples only (`rows`). A batch with none still
runs it, on one dummy window of 2^blocks zero rows (one token) whose output enters the result times
zero: under ZeRO-3 every rank must run every submodule every step, and that is the cheapest input
that does.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vla_ds.model.layers import masked_mean

KERNEL = 5  # conv kernel; stride 2, padding 2 -> out length ceil(T / 2)


class SensorFeatures(NamedTuple):
    """tokens (B, T', S), mask (B, T') bool (True = valid step), pooled (B, S), present (B,) bool.

    A NamedTuple so that ZeRO-3 sees the tensors the encoder returns: it hooks the backward of a
    module's own parameters (here the positional and missing-sensor embeddings) through them.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor
    present: torch.Tensor


def downsampled_length(length: int, blocks: int) -> int:
    for _ in range(blocks):
        length = (length - 1) // 2 + 1
    return length


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, T) tensor, independently at every step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


def _conv_stem(in_channels: int, hidden: int, blocks: int) -> nn.ModuleList:
    """`blocks` x (stride-2 Conv1d -> channel LayerNorm -> GELU); with 0 blocks a pointwise conv."""
    if blocks == 0:
        return nn.ModuleList([nn.Sequential(nn.Conv1d(in_channels, hidden, 1), ChannelLayerNorm(hidden), nn.GELU())])
    return nn.ModuleList(
        nn.Sequential(
            nn.Conv1d(in_channels if i == 0 else hidden, hidden, KERNEL, stride=2, padding=KERNEL // 2),
            ChannelLayerNorm(hidden),
            nn.GELU(),
        )
        for i in range(blocks)
    )


class SensorEncoder(nn.Module):
    """Separate force / A-scan conv stems -> transformer -> tokens + masked-mean pooled vector."""

    def __init__(
        self,
        input_channels: int = 1026,
        temporal_length: int = 650,
        hidden_dim: int = 512,
        output_dim: int = 3072,
        conv_blocks: int = 4,
        num_layers: int = 2,
        num_heads: int = 8,
        dropout: float = 0.1,
    ):
        super().__init__()
        if input_channels < 2:
            raise ValueError("--sensor-input-channels must be >= 2 (force + A-scan)")
        self.input_channels = input_channels
        self.temporal_length = temporal_length
        self.conv_blocks = conv_blocks
        self.output_dim = output_dim
        self.force_stem = _conv_stem(1, hidden_dim, conv_blocks)
        self.ascan_stem = _conv_stem(input_channels - 1, hidden_dim, conv_blocks)
        self.num_steps = downsampled_length(temporal_length, conv_blocks)
        self.pos_embedding = nn.Parameter(torch.randn(self.num_steps, hidden_dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            hidden_dim, num_heads, 4 * hidden_dim, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(hidden_dim),
                                                 enable_nested_tensor=False)
        self.out = nn.Linear(hidden_dim, output_dim)
        self.missing_embedding = nn.Parameter(torch.randn(output_dim) * 0.02)

    def _block_masks(self, valid: torch.Tensor) -> list[torch.Tensor]:
        """The (B, 1, T_i) valid-step mask after each conv block: output step j (centred on input
        2j) is valid if input 2j or 2j+1 is, so L valid rows give ceil(L/2) valid steps and a
        sample with any valid row keeps at least one."""
        masks = []
        for _ in range(max(self.conv_blocks, 1)):
            if self.conv_blocks:
                valid = F.max_pool1d(valid, 2, stride=2, ceil_mode=True)
            masks.append(valid)
        return masks

    @staticmethod
    def _stem(stem: nn.ModuleList, x: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
        """Run one conv stem, re-zeroing padded steps after every block so padding never spreads."""
        for block, valid in zip(stem, masks):
            x = block(x) * valid
        return x

    def forward(self, sensor: torch.Tensor, valid: torch.Tensor, has_sensor: torch.Tensor | None = None, *,
                rows: torch.Tensor | None = None, batch_size: int | None = None) -> SensorFeatures:
        """Features of a batch of B samples, normalized windows with invalid rows zeroed.

        Packed (the training batches): `sensor` (n, T, C) and `valid` (n, T) are the windows of the
        batch positions `rows` (n,) of a batch of `batch_size`; n may be 0. Dense: `sensor` (B, T, C),
        `valid` (B, T) and `has_sensor` (B,); only the rows with has_sensor are encoded."""
        if rows is None:
            rows = has_sensor.bool().nonzero().flatten()
            batch_size, sensor, valid = sensor.shape[0], sensor[rows], valid[rows]
        n, t, c = sensor.shape
        if (t, c) != (self.temporal_length, self.input_channels):
            raise ValueError(
                f"sensor window is (B, {t}, {c}); the model expects (B, {self.temporal_length}, {self.input_channels}) "
                "(--sensor-temporal-length, --sensor-input-channels)"
            )
        if n == 0:  # every submodule still runs (ZeRO-3), on the smallest window: 2^blocks rows -> 1 token
            sensor = sensor.new_zeros(1, 2 ** self.conv_blocks, c)
            valid = torch.ones(1, sensor.shape[1], dtype=torch.bool, device=sensor.device)
        tokens, token_mask = self._encode(sensor, valid)
        missing = self.missing_embedding.to(tokens.dtype)
        full_tokens = missing.expand(batch_size, self.num_steps, -1)
        full_pooled = missing.expand(batch_size, -1)
        full_mask = torch.ones(batch_size, self.num_steps, dtype=torch.bool, device=tokens.device)
        present = torch.zeros(batch_size, dtype=torch.bool, device=tokens.device)
        if n == 0:
            zero = tokens.sum() * 0.0
            return SensorFeatures(full_tokens + zero, full_mask, full_pooled + zero, present)
        pooled = masked_mean(tokens, token_mask)
        here = token_mask.any(dim=1)  # a window without one valid row is no reading either
        keep = here.view(n, 1, 1)
        tokens = torch.where(keep, tokens, missing.expand_as(tokens))
        pooled = torch.where(keep.view(n, 1), pooled, missing.expand_as(pooled))
        token_mask = token_mask | ~keep.view(n, 1)  # the missing embedding is a valid token
        return SensorFeatures(full_tokens.index_copy(0, rows, tokens), full_mask.index_copy(0, rows, token_mask),
                              full_pooled.index_copy(0, rows, pooled), present.index_copy(0, rows, here))

    def _encode(self, sensor: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (n, T', S), token mask (n, T')) of n windows."""
        x = sensor.transpose(1, 2)  # (n, C, T)
        masks = self._block_masks(valid.to(x.dtype).unsqueeze(1))
        force = self._stem(self.force_stem, x[:, :1], masks)
        ascan = self._stem(self.ascan_stem, x[:, 1:], masks)
        steps = force.shape[2]
        h = (force + ascan).transpose(1, 2) + self.pos_embedding[:steps]  # (n, T', hidden)
        token_mask = masks[-1].squeeze(1) > 0  # (n, T')
        # A row with every key masked gives NaN attention (and NaN gradients even where the output
        # is replaced by the missing embedding): let a window without a valid row attend to its zeros.
        key_padding = ~token_mask & token_mask.any(dim=1, keepdim=True)
        return self.out(self.transformer(h, src_key_padding_mask=key_padding)), token_mask
