"""TCM and AuxT building blocks under CompressAI master's attribute names, upstream numerics.

Master stores TCM's Swin attention the timm way (``msa.attn.{relative_position_bias_table,
relative_position_index, qkv, proj}`` + ``msa.output_proj``, ``norm1/norm2``, ``mlp.fc1/fc2``)
and AuxT's wavelet stages with pytorch_wavelets filter buffers (``dwt.transform.h0_col`` ...,
``idwt.inverse.g0_col`` ...) and a lower-case ``olp``. The modules here hold exactly those keys,
in master's registration order, but compute what LIC_TCM / AuxT compute:

* attention logits are ``(q k^T) * scale`` (timm pre-scales ``q``), shifted windows are masked
  with ``-inf`` (timm uses ``-100``), and the table bias equals upstream's
  ``relative_position_params`` gather (the converter permutes one into the other);
* ``attn.proj`` is applied; converted checkpoints hold an identity there (upstream has no such
  layer), and an identity float32 matmul is exact;
* the Haar DWT/IDWT run as two 1-D passes with the separable filter buffers; upstream uses 2-D
  2x2 kernels, so results agree up to float rounding only.

The conv/transformer mixing, the SWAtten gating and the Swin pair reuse the forward passes of
our upstream blocks (:mod:`..blocks.tcm_blocks`); only names and registration order differ.
"""

from __future__ import annotations

from collections.abc import Sequence

import pywt
import torch
from compressai.layers import AttentionBlock, ResidualBlock
from torch import Tensor, nn

from ..blocks import tcm_blocks as upstream_blocks
from ..blocks.tcm_blocks import drop_path_or_identity
from ..blocks.wavelets import OLP
from ..blocks.window_attention import WindowType, relative_position_lookup, shifted_window_mask
from ..upstream.tcm import TCMAuxT

__all__ = [
    "AuxTTransform",
    "ConvTransBlock",
    "HaarAnalysis",
    "HaarSynthesis",
    "SWAtten",
    "SwinBlock",
    "TransformerBlock",
    "WLS",
    "WindowAttention",
    "WindowMSA",
    "iWLS",
    "relative_position_index",
]


def relative_position_index(window_size: int) -> Tensor:
    """Row in the ``(2w-1)^2``-row bias table for every (query, key) pair of a window ``[w², w²]``."""
    row_offset, col_offset = relative_position_lookup(window_size)
    return row_offset * (2 * window_size - 1) + col_offset


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, timm's parameter names.

    Input ``[B, windows, P, C]`` (``P = w²`` pixels per window), output the same shape.
    """

    def __init__(self, dim: int, head_dim: int, window_size: int) -> None:
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"attention width {dim} is not divisible by head_dim {head_dim}")
        self.num_heads = dim // head_dim
        self.head_dim = head_dim
        self.window_size = window_size
        self.scale = head_dim**-0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, self.num_heads)
        )
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # persistent in master's layout (timm >= 1.0 would register it non-persistent)
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def position_bias(self) -> Tensor:
        """Per-head bias ``[heads, P, P]`` read from the table."""
        pixels = self.window_size**2
        rows = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return rows.reshape(pixels, pixels, self.num_heads).permute(2, 0, 1)

    def forward(self, windows: Tensor, mask: Tensor | None = None) -> Tensor:
        """``mask``: boolean ``[windows, P, P]``, True where attention is forbidden."""
        batch, count, pixels, channels = windows.shape
        qkv = self.qkv(windows).reshape(batch, count, pixels, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(3, 0, 1, 4, 2, 5)  # each [B, windows, heads, P, hd]
        # upstream scales the product, not q (timm pre-scales q)
        logits = (query @ key.transpose(-2, -1)) * self.scale + self.position_bias()
        if mask is not None:
            # upstream blocks with -inf; timm/master add -100
            logits = logits.masked_fill(mask[None, :, None], float("-inf"))
        out = torch.softmax(logits, dim=-1) @ value
        out = out.transpose(2, 3).reshape(batch, count, pixels, channels)
        return self.proj(out)


class WindowMSA(nn.Module):
    """(Shifted-)window attention on channels-last maps ``[B, H, W, C]``: ``attn`` + ``output_proj``.

    H and W must be multiples of the window (upstream's only working case; master pads).
    """

    def __init__(self, dim: int, head_dim: int, window_size: int, type: WindowType) -> None:
        super().__init__()
        if type not in ("W", "SW"):
            raise ValueError(f"window attention type must be 'W' or 'SW', got {type!r}")
        self.type = type
        self.window_size = window_size
        self.attn = WindowAttention(dim, head_dim, window_size)
        self.output_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, channels = x.shape
        w = self.window_size
        if height % w or width % w:
            raise ValueError(f"window attention needs H and W divisible by {w}, got {height}x{width}")
        shift = w // 2 if self.type == "SW" else 0
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        rows, cols = height // w, width // w
        windows = x.reshape(batch, rows, w, cols, w, channels).transpose(2, 3)
        windows = windows.reshape(batch, rows * cols, w * w, channels)
        mask = None
        if shift:
            mask = shifted_window_mask(rows, cols, w, shift, device=x.device).reshape(rows * cols, w * w, w * w)
        out = self.attn(windows, mask)
        out = out.reshape(batch, rows, cols, w, w, channels).transpose(2, 3).reshape(batch, height, width, channels)
        if shift:
            out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
        return self.output_proj(out)


class Mlp(nn.Module):
    """``fc1 -> GELU -> fc2`` (timm ``Mlp`` key names)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm window-attention block on channels-last maps (master's ``Block``)."""

    def __init__(
        self, dim: int, head_dim: int, window_size: int, drop_path: float, type: WindowType = "W"
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.msa = WindowMSA(dim, head_dim, window_size, type)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        self.drop_path = drop_path_or_identity(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.msa(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvTransBlock(upstream_blocks.ConvTransBlock):
    """LIC_TCM's conv/transformer mixing block, master's key order (forward inherited)."""

    def __init__(
        self, dim: int, head_dim: int, window_size: int, drop_path: float, type: WindowType = "W"
    ) -> None:
        # Registration differs from the upstream class (names and order), so its __init__ is skipped.
        nn.Module.__init__(self)
        self.conv_dim = dim
        self.trans_dim = dim
        self.conv1_1 = nn.Conv2d(2 * dim, 2 * dim, kernel_size=1)
        self.conv1_2 = nn.Conv2d(2 * dim, 2 * dim, kernel_size=1)
        self.conv_block = ResidualBlock(dim, dim)
        self.trans_block = TransformerBlock(dim, head_dim, window_size, drop_path, type)


class SwinBlock(upstream_blocks.SwinPair):
    """A W block then an SW block on channels-first maps (forward inherited)."""

    def __init__(self, dim: int, head_dim: int, window_size: int, drop_path: float) -> None:
        nn.Module.__init__(self)
        self.block_1 = TransformerBlock(dim, head_dim, window_size, drop_path, "W")
        self.block_2 = TransformerBlock(dim, head_dim, window_size, drop_path, "SW")
        self.window_size = window_size


class SWAtten(upstream_blocks.SWAtten):
    """Swin-gated attention block between 1x1 projections (forward inherited).

    Master registers ``conv_a, conv_b, in_conv, out_conv, non_local_block`` in that order.
    """

    def __init__(
        self, channels: int, head_dim: int, window_size: int, drop_path: float = 0.0, inter_dim: int = 128
    ) -> None:
        AttentionBlock.__init__(self, N=inter_dim)
        self.in_conv = nn.Conv2d(channels, inter_dim, kernel_size=1)
        self.out_conv = nn.Conv2d(inter_dim, channels, kernel_size=1)
        self.non_local_block = SwinBlock(inter_dim, head_dim, window_size, drop_path)


# ----------------------------------------------------------------------------- AuxT wavelets


def _haar_filters(wave: str, names: tuple[str, str, str, str], reverse: bool) -> dict[str, Tensor]:
    """float32 filter buffers ``{lo_col, hi_col, lo_row, hi_row}`` in pytorch_wavelets' shapes."""
    w = pywt.Wavelet(wave)
    lo, hi = (w.dec_lo[::-1], w.dec_hi[::-1]) if reverse else (w.rec_lo, w.rec_hi)
    taps = [torch.tensor(f, dtype=torch.float32) for f in (lo, hi)]
    lo_col, hi_col = (t.reshape(1, 1, -1, 1) for t in taps)
    lo_row, hi_row = (t.reshape(1, 1, 1, -1) for t in taps)
    return dict(zip(names, (lo_col, hi_col, lo_row, hi_row)))


def _analyse(x: Tensor, lo: Tensor, hi: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Two-tap analysis along ``dim`` with stride 2 (correlation, no padding)."""
    pairs = x.unflatten(dim, (-1, 2))
    even, odd = pairs.select(dim + 1, 0), pairs.select(dim + 1, 1)
    lo, hi = lo.reshape(-1), hi.reshape(-1)
    return even * lo[0] + odd * lo[1], even * hi[0] + odd * hi[1]


def _synthesise(low: Tensor, high: Tensor, lo: Tensor, hi: Tensor, dim: int) -> Tensor:
    """Two-tap transposed synthesis along ``dim`` (stride 2): doubles that size."""
    lo, hi = lo.reshape(-1), hi.reshape(-1)
    even = low * lo[0] + high * hi[0]
    odd = low * lo[1] + high * hi[1]
    return torch.stack((even, odd), dim=dim + 1).flatten(dim, dim + 1)


class HaarAnalysis(nn.Module):
    """One-level separable 2-D DWT ``[B, C, H, W] -> (LL, LH, HL, HH)``, each ``[B, C, H/2, W/2]``.

    Rows (W) are filtered first, then columns (H); LH is high-pass along H, HL along W.
    Buffers are pytorch_wavelets ``DWTForward``'s (time-reversed analysis filters).
    """

    def __init__(self, wave: str = "haar") -> None:
        super().__init__()
        for name, taps in _haar_filters(wave, ("h0_col", "h1_col", "h0_row", "h1_row"), reverse=True).items():
            self.register_buffer(name, taps)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if x.shape[-1] % 2 or x.shape[-2] % 2:
            raise ValueError(f"the Haar DWT needs even H and W, got {tuple(x.shape[-2:])}")
        low_w, high_w = _analyse(x, self.h0_row, self.h1_row, dim=3)
        ll, lh = _analyse(low_w, self.h0_col, self.h1_col, dim=2)
        hl, hh = _analyse(high_w, self.h0_col, self.h1_col, dim=2)
        return ll, lh, hl, hh


class HaarSynthesis(nn.Module):
    """Inverse of :class:`HaarAnalysis`; buffers are pytorch_wavelets ``DWTInverse``'s."""

    def __init__(self, wave: str = "haar") -> None:
        super().__init__()
        for name, taps in _haar_filters(wave, ("g0_col", "g1_col", "g0_row", "g1_row"), reverse=False).items():
            self.register_buffer(name, taps)

    def forward(self, ll: Tensor, lh: Tensor, hl: Tensor, hh: Tensor) -> Tensor:
        low_w = _synthesise(ll, lh, self.g0_col, self.g1_col, dim=2)
        high_w = _synthesise(hl, hh, self.g0_col, self.g1_col, dim=2)
        return _synthesise(low_w, high_w, self.g0_row, self.g1_row, dim=3)


class _Dwt(nn.Module):
    """Band-major DWT ``[B, C, H, W] -> [B, 4C, H/2, W/2]`` (``LL | LH | HL | HH``)."""

    def __init__(self) -> None:
        super().__init__()
        self.transform = HaarAnalysis()

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(self.transform(x), dim=1)


class _Idwt(nn.Module):
    """Inverse of :class:`_Dwt`: ``[B, 4C, H, W] -> [B, C, 2H, 2W]``."""

    def __init__(self) -> None:
        super().__init__()
        self.inverse = HaarSynthesis()

    def forward(self, x: Tensor) -> Tensor:
        return self.inverse(*x.chunk(4, dim=1))


def _band_log_scales(channels: int) -> nn.Parameter:
    """``[1, 1, 4C]`` log-scales initialised to 0.5 for LL, LH, HL and 0 for HH (as AuxT)."""
    init = torch.full((1, 1, 4 * channels), 0.5)
    init[..., 3 * channels :] = 0.0
    return nn.Parameter(init)


def _tokens(x: Tensor) -> Tensor:
    """``[B, C, H, W] -> [B, H*W, C]``."""
    return x.flatten(2).transpose(1, 2)


def _untokens(tokens: Tensor, height: int, width: int) -> Tensor:
    """``[B, H*W, C] -> [B, C, H, W]``."""
    return tokens.transpose(1, 2).unflatten(2, (height, width))


class WLS(nn.Module):
    """AuxT analysis stage: DWT, per-band ``exp`` scaling, token-wise projection ``olp``."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.scaling_factors = _band_log_scales(in_dim)
        self.dwt = _Dwt()
        self.olp = OLP(4 * in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        bands = self.dwt(x)
        tokens = self.olp(_tokens(bands) * torch.exp(self.scaling_factors))
        return _untokens(tokens, *bands.shape[-2:])


class iWLS(nn.Module):
    """AuxT synthesis stage: projection ``olp`` to 4 bands, undo the scaling, IDWT."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.scaling_factors = _band_log_scales(out_dim)
        self.idwt = _Idwt()
        self.olp = OLP(in_dim, 4 * out_dim)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.olp(_tokens(x)) / torch.exp(self.scaling_factors)
        return self.idwt(_untokens(tokens, *x.shape[-2:]))


class AuxTTransform(nn.Module):
    """A transform whose layer outputs get a chained auxiliary branch added at merge positions.

    Keys ``transform.{i}.*`` and ``auxiliary_layers.{j}.*``; after layer ``merge_positions[j]``
    the output of auxiliary stage ``j`` (fed by stage ``j-1``, stage 0 by the input) is added.
    """

    def __init__(
        self, transform: nn.Sequential, auxiliary_layers: Sequence[nn.Module], merge_positions: Sequence[int]
    ) -> None:
        super().__init__()
        positions = tuple(int(p) for p in merge_positions)
        if len(positions) != len(auxiliary_layers) or list(positions) != sorted(set(positions)):
            raise ValueError(
                f"need one increasing merge position per auxiliary layer, got {positions} "
                f"for {len(auxiliary_layers)} layers"
            )
        if positions and not 0 <= positions[-1] < len(transform):
            raise ValueError(f"merge position {positions[-1]} is outside the {len(transform)}-layer transform")
        self.transform = transform
        self.auxiliary_layers = nn.ModuleList(auxiliary_layers)
        self.merge_positions = positions

    def forward(self, x: Tensor) -> Tensor:
        # the merge loop is shared with our upstream AuxT model
        return TCMAuxT._with_auxiliary(x, self.transform, self.auxiliary_layers, self.merge_positions)
