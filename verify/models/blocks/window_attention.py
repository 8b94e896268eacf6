"""Window multi-head self-attention with a learned relative-position bias (TCM / DCAE flavour).

This is the attention used by the Swin-style blocks of LIC_TCM and DCAE: non-overlapping
``window_size x window_size`` windows, optionally cyclically shifted by half a window ("SW"), with
a per-head bias looked up from ``relative_position_params`` of shape
``[heads, 2*window_size-1, 2*window_size-1]``. Inputs and outputs are channels-last ``[B, H, W, C]``.
Parameter names (``embedding_layer``, ``relative_position_params``, ``linear``) are the checkpoint's.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["WMSA", "WindowMultiHeadAttention", "WindowType", "relative_position_lookup", "shifted_window_mask"]

WindowType = Literal["W", "SW"]


def relative_position_lookup(window_size: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Row and column indices into the bias table for every (query, key) pair of a window.

    Positions inside a window are numbered row-major; the offset between two positions is shifted
    by ``window_size - 1`` so that it indexes a ``2*window_size-1`` sided table.
    """
    coords = torch.arange(window_size, device=device)
    rows = coords.repeat_interleave(window_size)
    cols = coords.repeat(window_size)
    row_offset = rows[:, None] - rows[None, :] + window_size - 1
    col_offset = cols[:, None] - cols[None, :] + window_size - 1
    return row_offset, col_offset


def shifted_window_mask(
    windows_high: int, windows_wide: int, window_size: int, shift: int, device: torch.device | None = None
) -> Tensor:
    """Boolean mask ``[1, 1, windows, P, P]`` (True = blocked) for shifted-window attention.

    After the cyclic shift, the last window row and the last window column hold pixels that came
    from opposite image borders; a query in one of those parts must not attend to the other part.
    """
    p = window_size
    split = p - shift
    mask = torch.zeros(windows_high, windows_wide, p, p, p, p, dtype=torch.bool, device=device)
    # dims: (window row, window col, query row, query col, key row, key col)
    mask[-1, :, :split, :, split:, :] = True
    mask[-1, :, split:, :, :split, :] = True
    mask[:, -1, :, :split, :, split:] = True
    mask[:, -1, :, split:, :, :split] = True
    return mask.reshape(1, 1, windows_high * windows_wide, p * p, p * p)


class WindowMultiHeadAttention(nn.Module):
    """(Shifted-)window self-attention on channels-last maps whose sides are multiples of the window."""

    def __init__(self, input_dim: int, output_dim: int, head_dim: int, window_size: int, type: WindowType) -> None:
        super().__init__()
        if type not in ("W", "SW"):
            raise ValueError(f"window attention type must be 'W' or 'SW', got {type!r}")
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.head_dim = head_dim
        self.n_heads = input_dim // head_dim
        self.window_size = window_size
        self.type = type
        self.scale = head_dim ** -0.5
        self.embedding_layer = nn.Linear(input_dim, 3 * input_dim, bias=True)
        table_side = 2 * window_size - 1
        self.relative_position_params = nn.Parameter(torch.zeros(self.n_heads, table_side, table_side))
        nn.init.trunc_normal_(self.relative_position_params, std=0.02)
        self.linear = nn.Linear(input_dim, output_dim)

    @property
    def shifted(self) -> bool:
        return self.type != "W"

    def relative_bias(self) -> Tensor:
        """Per-head bias ``[heads, P, P]`` for all (query, key) position pairs of one window."""
        rows, cols = relative_position_lookup(self.window_size, self.relative_position_params.device)
        return self.relative_position_params[:, rows, cols]

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, _ = x.shape
        p = self.window_size
        half = p // 2
        if height % p or width % p:
            raise ValueError(f"window attention needs H and W divisible by {p}, got {height}x{width}")
        if self.shifted:
            x = torch.roll(x, shifts=(-half, -half), dims=(1, 2))
        rows, cols = height // p, width // p
        # [B, H, W, C] -> [B, windows, P*P, C], windows row-major, pixels row-major inside a window
        windows = x.reshape(batch, rows, p, cols, p, -1).permute(0, 1, 3, 2, 4, 5)
        windows = windows.reshape(batch, rows * cols, p * p, -1)

        qkv = self.embedding_layer(windows)
        # channels are laid out as (q heads | k heads | v heads), head_dim each
        qkv = qkv.reshape(batch, rows * cols, p * p, 3 * self.n_heads, self.head_dim).permute(3, 0, 1, 2, 4)
        query, key, value = qkv.chunk(3, dim=0)  # each [heads, B, windows, P*P, head_dim]

        logits = torch.einsum("hbwpc,hbwqc->hbwpq", query, key) * self.scale
        logits = logits + self.relative_bias()[:, None, None]
        if self.shifted:
            mask = shifted_window_mask(rows, cols, p, half, device=logits.device)
            logits = logits.masked_fill(mask, float("-inf"))
        weights = torch.softmax(logits, dim=-1)
        out = torch.einsum("hbwpq,hbwqc->hbwpc", weights, value)

        out = out.permute(1, 2, 3, 0, 4).reshape(batch, rows * cols, p * p, self.n_heads * self.head_dim)
        out = self.linear(out)
        out = out.reshape(batch, rows, cols, p, p, -1).permute(0, 1, 3, 2, 4, 5).reshape(batch, height, width, -1)
        if self.shifted:
            out = torch.roll(out, shifts=(half, half), dims=(1, 2))
        return out


#: Upstream name of the block (LIC_TCM / DCAE ``WMSA``), kept for readers of those codebases.
WMSA = WindowMultiHeadAttention
