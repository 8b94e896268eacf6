"""Swin-flavoured window self-attention, as the STF repository (Googolxx/STF) uses it.

This differs from the TCM/DCAE flavour of :mod:`.window_attention` in its parameters and in its
arithmetic, and both matter for bit-level parity with the authors' code:

* the bias lives in a ``[(2w-1)^2, heads]`` table read through a persistent integer buffer
  ``relative_position_index`` (the layout timm and CompressAI master use too);
* the projections are called ``qkv`` and ``proj``; the query is scaled *before* ``q @ k^T``;
* in shifted windows, pairs of pixels that came from opposite borders get ``-100`` added to their
  logits (not ``-inf``), and the softmax runs on that.

Windows are taken row-major from channels-last maps ``[B, H, W, C]``; a window batch is
``[B * windows, w * w, C]``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .window_attention import relative_position_lookup

__all__ = [
    "SHIFT_MASK_VALUE",
    "SwinWindowAttention",
    "merge_windows",
    "partition_windows",
    "relative_position_index",
    "shift_mask",
]

#: What a blocked (query, key) pair gets added to its logit in a shifted window.
SHIFT_MASK_VALUE = -100.0


def relative_position_index(window_size: int) -> Tensor:
    """``[w*w, w*w]`` int64 indices into the ``[(2w-1)^2, heads]`` bias table."""
    rows, cols = relative_position_lookup(window_size)
    return rows * (2 * window_size - 1) + cols


def partition_windows(x: Tensor, window_size: int) -> Tensor:
    """``[B, H, W, C]`` -> ``[B * (H/w) * (W/w), w * w, C]``."""
    batch, height, width, channels = x.shape
    w = window_size
    tiles = x.view(batch, height // w, w, width // w, w, channels).permute(0, 1, 3, 2, 4, 5)
    return tiles.contiguous().view(-1, w * w, channels)


def merge_windows(windows: Tensor, window_size: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`partition_windows`: ``[B * windows, w * w, C]`` -> ``[B, H, W, C]``."""
    w = window_size
    channels = windows.shape[-1]
    batch = windows.shape[0] // ((height // w) * (width // w))
    tiles = windows.view(batch, height // w, width // w, w, w, channels).permute(0, 1, 3, 2, 4, 5)
    return tiles.contiguous().view(batch, height, width, channels)


def shift_mask(height: int, width: int, window_size: int, shift: int, device=None) -> Tensor:
    """Additive mask ``[windows, w*w, w*w]`` (0 or -100) for windows after a cyclic shift by ``shift``.

    After the shift, the last ``w`` rows (columns) of the map hold two bands: ``w - shift`` rows
    from the bottom (right) of the original map and ``shift`` rows from its top (left). Pixels are
    labelled by band (three bands per axis); only pixels with equal labels may attend to each other.
    """

    def bands(size: int) -> Tensor:
        index = torch.arange(size, device=device)
        return (index >= size - window_size).long() + (index >= size - shift).long()

    labels = (bands(height)[:, None] * 3 + bands(width)[None, :]).to(torch.float32)
    windows = partition_windows(labels.view(1, height, width, 1), window_size).squeeze(-1)
    differs = windows[:, None, :] != windows[:, :, None]
    return torch.zeros(differs.shape, device=device).masked_fill(differs, SHIFT_MASK_VALUE)


class SwinWindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative-position bias."""

    relative_position_index: Tensor

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True,
                 qk_scale: float | None = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible into {num_heads} heads")
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        side = 2 * window_size - 1
        self.relative_position_bias_table = nn.Parameter(torch.zeros(side * side, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_bias(self) -> Tensor:
        """``[heads, w*w, w*w]`` bias of every (query, key) pair of a window."""
        pairs = self.window_size * self.window_size
        table = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return table.view(pairs, pairs, -1).permute(2, 0, 1).contiguous()

    def forward(self, windows: Tensor, mask: Tensor | None = None) -> Tensor:
        """``windows`` ``[B * nW, w*w, C]``; ``mask`` ``[nW, w*w, w*w]`` (additive) or None."""
        count, pixels, channels = windows.shape
        heads = self.num_heads
        qkv = self.qkv(windows).reshape(count, pixels, 3, heads, channels // heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).contiguous()  # each [B*nW, heads, P, head_dim]
        logits = (query * self.scale) @ key.transpose(-2, -1)
        logits = logits + self.relative_bias().unsqueeze(0)
        if mask is not None:
            num_windows = mask.shape[0]
            logits = logits.view(count // num_windows, num_windows, heads, pixels, pixels)
            logits = (logits + mask.unsqueeze(1).unsqueeze(0)).view(-1, heads, pixels, pixels)
        weights = torch.softmax(logits, dim=-1)
        out = (weights @ value).transpose(1, 2).reshape(count, pixels, channels)
        return self.proj(out)
