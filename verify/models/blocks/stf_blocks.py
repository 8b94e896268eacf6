"""Building blocks of the STF repository's two models (Zou et al., CVPR 2022).

* STF (``SymmetricalTransFormer``): a Swin encoder/decoder on token sequences ``[B, H*W, C]``:
  :class:`PatchEmbed`, :class:`SwinStage` (blocks + :class:`PatchMerging` / :class:`PatchSplit`).
* WACNN: a convolutional codec with window-attention modules (:class:`WindowAttentionModule`,
  upstream ``Win_noShift_Attention``) between its GDN stages.
* Both: the hyperprior stacks (:func:`hyper_analysis`, :func:`hyper_synthesis`) and the five-layer
  slice heads (:class:`DeepSliceTransform`).

Attribute names are the checkpoints' (``norm1``, ``attn``, ``mlp.fc1``, ``downsample.reduction``,
``conv_a``, ``conv_b`` ...); the same classes serve the reference and the CompressAI-layout models,
whose keys agree here except for WACNN's extra ``attn`` level (``wrapped=True``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from compressai.layers import conv1x1, conv3x3, subpel_conv3x3
from torch import Tensor, nn

from .swin_windows import SwinWindowAttention, merge_windows, partition_windows, shift_mask
from .tcm_blocks import drop_path_or_identity

__all__ = [
    "DeepSliceTransform",
    "Mlp",
    "PatchEmbed",
    "PatchMerging",
    "PatchSplit",
    "ResidualUnit",
    "SwinBlock",
    "SwinStage",
    "SwinTransforms",
    "WindowAttentionModule",
    "WindowAttentionUnit",
    "hyper_analysis",
    "hyper_synthesis",
]

#: Hidden widths of every slice head (mean, scale and LRP) in both models.
SLICE_HIDDEN_WIDTHS = (224, 176, 128, 64)


class DeepSliceTransform(nn.Sequential):
    """``conv3x3`` ``in -> 224 -> 176 -> 128 -> 64 -> out`` with GELUs between (keys .0 ... .8)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        widths = (in_channels, *SLICE_HIDDEN_WIDTHS, out_channels)
        layers: list[nn.Module] = []
        for i in range(len(widths) - 1):
            if i:
                layers.append(nn.GELU())
            layers.append(nn.Conv2d(widths[i], widths[i + 1], kernel_size=3, stride=1, padding=1))
        super().__init__(*layers)


def hyper_analysis(widths: Sequence[int]) -> nn.Sequential:
    """Five 3x3 convs ``widths[0] -> ... -> widths[5]`` with GELUs; the 3rd and 5th have stride 2."""
    a = widths
    return nn.Sequential(
        conv3x3(a[0], a[1]), nn.GELU(),
        conv3x3(a[1], a[2]), nn.GELU(),
        conv3x3(a[2], a[3], stride=2), nn.GELU(),
        conv3x3(a[3], a[4]), nn.GELU(),
        conv3x3(a[4], a[5], stride=2),
    )


def hyper_synthesis(widths: Sequence[int]) -> nn.Sequential:
    """conv, x2 sub-pixel conv, conv, x2 sub-pixel conv, conv (``widths[0] -> ... -> widths[5]``), GELUs between."""
    s = widths
    return nn.Sequential(
        conv3x3(s[0], s[1]), nn.GELU(),
        subpel_conv3x3(s[1], s[2], 2), nn.GELU(),
        conv3x3(s[2], s[3]), nn.GELU(),
        subpel_conv3x3(s[3], s[4], 2), nn.GELU(),
        conv3x3(s[4], s[5]),
    )


# --------------------------------------------------------------------------- STF (token sequences)


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-norm window attention and MLP, both residual, on tokens ``[B, H*W, C]``.

    The map is zero-padded to whole windows *before* the cyclic shift (upstream's order; timm pads
    after it, which gives the same result whenever no padding is needed).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: float | None = None, drop_path: float = 0.0) -> None:
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift {shift_size} must lie in [0, window {window_size})")
        self.window_size, self.shift_size = window_size, shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SwinWindowAttention(dim, window_size, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale)
        self.drop_path = drop_path_or_identity(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, height: int, width: int, mask: Tensor | None) -> Tensor:
        batch, length, channels = x.shape
        if length != height * width:
            raise ValueError(f"{length} tokens do not form a {height}x{width} map")
        w, shift = self.window_size, self.shift_size
        shortcut = x
        x = self.norm1(x).view(batch, height, width, channels)
        pad_bottom, pad_right = (w - height % w) % w, (w - width % w) % w
        x = F.pad(x, (0, 0, 0, pad_right, 0, pad_bottom))
        padded_h, padded_w = x.shape[1:3]
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        windows = self.attn(partition_windows(x, w), mask if shift else None)
        x = merge_windows(windows, w, padded_h, padded_w)
        if shift:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        if pad_bottom or pad_right:
            x = x[:, :height, :width, :].contiguous()
        x = shortcut + self.drop_path(x.view(batch, height * width, channels))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Halve H and W: concatenate each 2x2 neighbourhood (4C), LayerNorm, Linear to 2C."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return (height + 1) // 2, (width + 1) // 2

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        batch, _, channels = x.shape
        x = x.view(batch, height, width, channels)
        if height % 2 or width % 2:
            x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        # the four phases in upstream's order: (even, even), (odd, even), (even, odd), (odd, odd)
        phases = [x[:, r::2, c::2, :] for c in (0, 1) for r in (0, 1)]
        x = torch.cat(phases, dim=-1).view(batch, -1, 4 * channels)
        return self.reduction(self.norm(x))


class PatchSplit(nn.Module):
    """Double H and W: LayerNorm, Linear C -> 2C, pixel shuffle by 2 (C/2 channels out)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(dim)
        self.shuffle = nn.PixelShuffle(2)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return 2 * height, 2 * width

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        batch, length, channels = x.shape
        x = self.reduction(self.norm(x))
        x = x.permute(0, 2, 1).contiguous().view(batch, 2 * channels, height, width)
        x = self.shuffle(x)
        return x.permute(0, 2, 3, 1).contiguous().view(batch, 4 * length, -1)


class SwinStage(nn.Module):
    """``depth`` Swin blocks (unshifted / shifted by half a window, alternating), then a resampler."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: float | None = None, drop_paths: Sequence[float] = (),
                 downsample: type[PatchMerging] | type[PatchSplit] | None = None) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        rates = list(drop_paths) or [0.0] * depth
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else self.shift_size, mlp_ratio,
                      qkv_bias, qk_scale, rates[i])
            for i in range(depth)
        )
        self.downsample = downsample(dim) if downsample is not None else None

    def forward(self, x: Tensor, height: int, width: int) -> tuple[Tensor, int, int]:
        w = self.window_size
        padded = (-(-height // w) * w, -(-width // w) * w)
        mask = shift_mask(*padded, w, self.shift_size, device=x.device)
        for block in self.blocks:
            x = block(x, height, width, mask)
        if self.downsample is None:
            return x, height, width
        return self.downsample(x, height, width), *self.downsample.output_size(height, width)


class SwinTransforms:
    """``analysis`` and ``synthesis`` of STF, for a model holding ``patch_embed``, the ``layers`` and
    ``syn_layers`` stages, ``end_conv``, ``latent_channels`` and ``embed_dim`` (both STF models, whose
    keys agree there): images to token sequences and back, stage by stage."""

    def analysis(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        height, width = x.shape[-2:]
        tokens = x.flatten(2).transpose(1, 2)
        for stage in self.layers:
            tokens, height, width = stage(tokens, height, width)
        return tokens.view(-1, height, width, self.latent_channels).permute(0, 3, 1, 2).contiguous()

    def synthesis(self, y_hat: Tensor) -> Tensor:
        height, width = y_hat.shape[-2:]
        tokens = y_hat.permute(0, 2, 3, 1).contiguous().view(-1, height * width, self.latent_channels)
        for stage in self.syn_layers:
            tokens, height, width = stage(tokens, height, width)
        return self.end_conv(tokens.view(-1, height, width, self.embed_dim).permute(0, 3, 1, 2).contiguous())


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` convolution to ``embed_dim`` channels, then LayerNorm."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm: bool = True) -> None:
        super().__init__()
        self.patch_size, self.embed_dim = patch_size, embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> ``[B, embed_dim, H/p, W/p]`` (zero-padded right/bottom to whole patches)."""
        p = self.patch_size
        height, width = x.shape[-2:]
        if width % p:
            x = F.pad(x, (0, p - width % p))
        if height % p:
            x = F.pad(x, (0, 0, 0, p - height % p))
        x = self.proj(x)
        if self.norm is not None:
            rows, cols = x.shape[-2:]
            x = self.norm(x.flatten(2).transpose(1, 2)).transpose(1, 2).view(-1, self.embed_dim, rows, cols)
        return x


# --------------------------------------------------------------------------- WACNN (channels-first maps)


class ResidualUnit(nn.Module):
    """``GELU(x + conv1x1(GELU(conv3x3(GELU(conv1x1(x))))))`` with a half-width bottleneck."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv = nn.Sequential(
            conv1x1(channels, half), nn.GELU(), conv3x3(half, half), nn.GELU(), conv1x1(half, channels),
        )
        self.relu = nn.GELU()  # upstream's name for it

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.conv(x) + x)


class _NestedAttention(nn.Module):
    """One more ``attn`` level around the attention (CompressAI master's ``WMSA`` wrapper keys)."""

    def __init__(self, attention: SwinWindowAttention) -> None:
        super().__init__()
        self.attn = attention

    def forward(self, windows: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.attn(windows, mask)


class WindowAttentionUnit(nn.Module):
    """``x + window_attention(x)`` on ``[B, C, H, W]`` (no norm, no MLP); H, W multiples of the window.

    ``wrapped=True`` holds the attention one level deeper (``attn.attn.*``, CompressAI master's keys);
    the computation is the same.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int, wrapped: bool = False) -> None:
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift {shift_size} must lie in [0, window {window_size})")
        self.window_size, self.shift_size = window_size, shift_size
        attention = SwinWindowAttention(dim, window_size, num_heads)
        self.attn = _NestedAttention(attention) if wrapped else attention
        self.drop_path = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        _, _, height, width = x.shape
        w, shift = self.window_size, self.shift_size
        if height % w or width % w:
            raise ValueError(f"window attention needs H and W divisible by {w}, got {height}x{width}")
        mask = shift_mask(height, width, w, shift, device=x.device) if shift else None
        tokens = x.permute(0, 2, 3, 1)
        if shift:
            tokens = torch.roll(tokens, shifts=(-shift, -shift), dims=(1, 2))
        windows = self.attn(partition_windows(tokens, w), mask)
        tokens = merge_windows(windows, w, height, width)
        if shift:
            tokens = torch.roll(tokens, shifts=(shift, shift), dims=(1, 2))
        return x + self.drop_path(tokens.permute(0, 3, 1, 2).contiguous())


class WindowAttentionModule(nn.Module):
    """``x + conv_a(x) * sigmoid(conv_b(x))`` (upstream ``Win_noShift_Attention``).

    ``conv_a``: three residual units; ``conv_b``: a window-attention unit, three residual units and
    a 1x1 conv.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int, wrapped: bool = False) -> None:
        super().__init__()
        self.conv_a = nn.Sequential(ResidualUnit(dim), ResidualUnit(dim), ResidualUnit(dim))
        self.conv_b = nn.Sequential(
            WindowAttentionUnit(dim, num_heads, window_size, shift_size, wrapped=wrapped),
            ResidualUnit(dim),
            ResidualUnit(dim),
            ResidualUnit(dim),
            conv1x1(dim, dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_a(x) * torch.sigmoid(self.conv_b(x)) + x
