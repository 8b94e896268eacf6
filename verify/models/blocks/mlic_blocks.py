"""Layers of MLIC++ (JiangWeibeta/MLIC, ``MLIC++/modules``), shared by both of our MLIC++ models.

The authors' code and CompressAI master give these modules the same inner names (master only
re-roots them), so one implementation serves the reference and the CompressAI-layout model:

* GELU residual blocks with GDN / IGDN around them (:class:`AnalysisTransform`,
  :class:`SynthesisTransform`); compressai's own residual blocks use LeakyReLU, so they do not fit;
* the hyper transforms (:class:`HyperAnalysis`, :class:`HyperSynthesis`, whose output holds the
  scales first, then the means);
* the checkerboard helpers: anchors at (even row, odd column) and (odd row, even column);
* the context modules: :class:`LocalContext` (masked 5x5 window attention over the anchors),
  :class:`ChannelContext`, the linear-attention :class:`LinearGlobalInterContext` and
  :class:`LinearGlobalIntraContext`, :class:`EntropyParameters` and
  :class:`LatentResidualPrediction`.

The arithmetic follows upstream operation for operation (masking by copying into zeros, the
``-100`` additive mask, the per-head loops of the linear attention), so the results agree bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from compressai.layers import GDN, conv1x1, conv3x3, subpel_conv3x3
from torch import Tensor, nn

from .slice_transforms import SliceTransform

__all__ = [
    "AnalysisTransform",
    "ChannelContext",
    "EntropyParameters",
    "HyperAnalysis",
    "HyperSynthesis",
    "LatentResidualPrediction",
    "LinearGlobalInterContext",
    "LinearGlobalIntraContext",
    "LocalContext",
    "SynthesisTransform",
    "anchor_part",
    "nonanchor_part",
    "squeeze_anchor",
    "squeeze_nonanchor",
    "unsqueeze_anchor",
    "unsqueeze_nonanchor",
]

# --------------------------------------------------------------------------- checkerboard


def anchor_part(y: Tensor) -> Tensor:
    """``y`` at the anchor positions, zero elsewhere (a copy into zeros, as upstream)."""
    out = torch.zeros_like(y)
    out[:, :, 0::2, 1::2] = y[:, :, 0::2, 1::2]
    out[:, :, 1::2, 0::2] = y[:, :, 1::2, 0::2]
    return out


def nonanchor_part(y: Tensor) -> Tensor:
    """``y`` at the non-anchor positions, zero elsewhere."""
    out = torch.zeros_like(y)
    out[:, :, 0::2, 0::2] = y[:, :, 0::2, 0::2]
    out[:, :, 1::2, 1::2] = y[:, :, 1::2, 1::2]
    return out


def _squeeze(y: Tensor, even_col: int, odd_col: int) -> Tensor:
    b, c, h, w = y.shape
    out = torch.zeros([b, c, h, w // 2], dtype=y.dtype, device=y.device)
    out[:, :, 0::2, :] = y[:, :, 0::2, even_col::2]
    out[:, :, 1::2, :] = y[:, :, 1::2, odd_col::2]
    return out


def _unsqueeze(packed: Tensor, even_col: int, odd_col: int) -> Tensor:
    b, c, h, w = packed.shape
    out = torch.zeros([b, c, h, w * 2], dtype=packed.dtype, device=packed.device)
    out[:, :, 0::2, even_col::2] = packed[:, :, 0::2, :]
    out[:, :, 1::2, odd_col::2] = packed[:, :, 1::2, :]
    return out


def squeeze_anchor(y: Tensor) -> Tensor:
    """The anchors of ``y`` packed into ``[B, C, H, W/2]`` (row by row)."""
    return _squeeze(y, 1, 0)


def squeeze_nonanchor(y: Tensor) -> Tensor:
    """The non-anchors of ``y`` packed into ``[B, C, H, W/2]``."""
    return _squeeze(y, 0, 1)


def unsqueeze_anchor(packed: Tensor) -> Tensor:
    """Inverse of :func:`squeeze_anchor` (zeros at the non-anchors)."""
    return _unsqueeze(packed, 1, 0)


def unsqueeze_nonanchor(packed: Tensor) -> Tensor:
    """Inverse of :func:`squeeze_nonanchor` (zeros at the anchors)."""
    return _unsqueeze(packed, 0, 1)


# --------------------------------------------------------------------------- transforms


class ResidualBlockWithStride(nn.Module):
    """3x3 conv (strided) - GELU - 3x3 conv - GDN, plus a (strided) 1x1 shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 2) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch, stride=stride)
        self.act = nn.GELU()
        self.conv2 = conv3x3(out_ch, out_ch)
        self.gdn = GDN(out_ch)
        self.skip = conv1x1(in_ch, out_ch, stride=stride) if stride != 1 or in_ch != out_ch else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.gdn(self.conv2(self.act(self.conv1(x))))
        shortcut = x if self.skip is None else self.skip(x)
        out += shortcut
        return out


class ResidualBlockUpsample(nn.Module):
    """Sub-pixel conv - GELU - 3x3 conv - IGDN, plus a sub-pixel shortcut."""

    def __init__(self, in_ch: int, out_ch: int, upsample: int = 2) -> None:
        super().__init__()
        self.subpel_conv = subpel_conv3x3(in_ch, out_ch, upsample)
        self.act = nn.GELU()
        self.conv = conv3x3(out_ch, out_ch)
        self.igdn = GDN(out_ch, inverse=True)
        self.upsample = subpel_conv3x3(in_ch, out_ch, upsample)

    def forward(self, x: Tensor) -> Tensor:
        out = self.igdn(self.conv(self.act(self.subpel_conv(x))))
        out += self.upsample(x)
        return out


class ResidualBlock(nn.Module):
    """Two 3x3 convs, each followed by a GELU, plus a shortcut (1x1 when the width changes)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch)
        self.act = nn.GELU()
        self.conv2 = conv3x3(out_ch, out_ch)
        self.skip = conv1x1(in_ch, out_ch) if in_ch != out_ch else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.conv2(self.act(self.conv1(x))))
        shortcut = x if self.skip is None else self.skip(x)
        return out + shortcut


class AnalysisTransform(nn.Module):
    """``analysis_transform``: three strided residual blocks, each followed by a residual block,
    then a strided 3x3 conv to ``M`` channels (/16 in all)."""

    def __init__(self, N: int, M: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [ResidualBlockWithStride(3 if i == 0 else N, N, stride=2), ResidualBlock(N, N)]
        layers.append(conv3x3(N, M, stride=2))
        self.analysis_transform = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.analysis_transform(x)


class SynthesisTransform(nn.Module):
    """``synthesis_transform``: a residual block at ``M`` channels, three upsampling residual
    blocks each followed by a residual block, then a sub-pixel conv to RGB (x16 in all)."""

    def __init__(self, N: int, M: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [ResidualBlock(M, M)]
        for i in range(3):
            layers += [ResidualBlockUpsample(M if i == 0 else N, N, 2), ResidualBlock(N, N)]
        layers.append(subpel_conv3x3(N, 3, 2))
        self.synthesis_transform = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.synthesis_transform(x)


class HyperAnalysis(nn.Module):
    """``reduction``: five 3x3 convs with GELUs between them, the 3rd and 5th strided (/4)."""

    def __init__(self, M: int = 192, N: int = 192) -> None:
        super().__init__()
        self.M, self.N = M, N
        strides = (1, 1, 2, 1, 2)
        layers: list[nn.Module] = []
        for i, stride in enumerate(strides):
            if i:
                layers.append(nn.GELU())
            layers.append(conv3x3(M if i == 0 else N, N, stride=stride))
        self.reduction = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.reduction(x)


class HyperSynthesis(nn.Module):
    """``increase``: ``N -> M``, x2 sub-pixel, ``M -> 3M/2``, x2 sub-pixel, ``3M/2 -> 2M`` (GELUs
    between). The ``2M`` output channels are the scales first, then the means."""

    def __init__(self, M: int = 192, N: int = 192) -> None:
        super().__init__()
        self.M, self.N = M, N
        wide = M * 3 // 2
        self.increase = nn.Sequential(
            conv3x3(N, M), nn.GELU(),
            subpel_conv3x3(M, M, 2), nn.GELU(),
            conv3x3(M, wide), nn.GELU(),
            subpel_conv3x3(wide, wide, 2), nn.GELU(),
            conv3x3(wide, M * 2),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.increase(x)


# --------------------------------------------------------------------------- entropy model parts


class Mlp(nn.Module):
    """``fc1 - GELU - fc2`` on channels-last tokens."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def window_position_index(window: int) -> Tensor:
    """Index into the ``(2w-1)^2`` relative-position table for every pair of positions in a w x w window."""
    grid = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    offsets = (grid[:, :, None] - grid[:, None, :]).permute(1, 2, 0).contiguous()
    offsets[:, :, 0] += window - 1
    offsets[:, :, 1] += window - 1
    offsets[:, :, 0] *= 2 * window - 1
    return offsets.sum(-1)


class LocalContext(nn.Module):
    """Spatial context of the non-anchors: attention inside a ``window x window`` neighbourhood of
    every position, where only anchor positions may attend to anchor positions.

    Output: ``2 * dim`` channels per position (a conv over each attended window, ``proj``, then a
    pre-norm MLP with a residual).
    """

    def __init__(self, dim: int = 32, window_size: int = 5, mlp_ratio: float = 2.0, num_heads: int = 2) -> None:
        super().__init__()
        self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.relative_position_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", window_position_index(window_size))
        self.qkv_proj = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim * 2, dim * 2)
        self.mlp = Mlp(dim * 2, int(dim * 2 * mlp_ratio), dim * 2)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim * 2)
        self.fusion = nn.Conv2d(dim, dim * 2, kernel_size=window_size)
        self._masks: dict[tuple[int, int, torch.device], Tensor] = {}

    def _windows(self, x: Tensor) -> Tensor:
        pad = (self.window_size - 1) // 2
        return F.unfold(x, kernel_size=self.window_size, padding=pad, stride=1)

    def attention_mask(self, height: int, width: int, device: torch.device) -> Tensor:
        """``[L, w*w, w*w]``: 0 where both positions of a window are anchors inside the map, else
        -100 (upstream quirk reproduced: a large finite penalty, not -inf). Cached per size."""
        key = (height, width, device)
        if key not in self._masks:
            board = torch.zeros((1, 2, height, width))
            board[:, :, 0::2, 1::2] = 1
            board[:, :, 1::2, 0::2] = 1
            w = self.window_size
            windows = self._windows(board).permute(0, 2, 1)
            windows = windows.view(1, height * width, 2, 1, w, w).permute(2, 0, 1, 3, 4, 5)
            q = windows[0].reshape(1, height * width, 1, w * w).permute(0, 1, 3, 2)
            k = windows[1].reshape(1, height * width, 1, w * w).permute(0, 1, 3, 2)
            both = q @ k.transpose(-2, -1)
            mask = both.masked_fill(both == 0.0, -100.0).masked_fill(both == 1, 0.0)
            self._masks[key] = mask[0].to(device)
        return self._masks[key]

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        n, win, heads, hd = h * w, self.window_size, self.num_heads, self.head_dim
        tokens = self.norm1(x.reshape(b, c, n).permute(0, 2, 1))
        qkv = self.qkv_proj(tokens).reshape(b, h, w, 3, c).permute(3, 0, 4, 1, 2)
        stacked = torch.cat([qkv[0], qkv[1], qkv[2]], dim=1)
        windows = self._windows(stacked).permute(0, 2, 1)
        windows = windows.view(b, n, 3, c, win, win).permute(2, 0, 1, 3, 4, 5)

        def heads_of(t: Tensor) -> Tensor:  # [B, L, heads, w*w, head_dim]
            return t.reshape(b, n, hd, heads, win * win).permute(0, 1, 3, 4, 2)

        q, k, v = heads_of(windows[0]), heads_of(windows[1]), heads_of(windows[2])
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        bias = self.relative_position_table[self.relative_position_index.view(-1)].view(win * win, win * win, -1)
        attn = attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0).unsqueeze(1)
        attn = attn + self.attention_mask(h, w, x.device).unsqueeze(0).unsqueeze(2)
        attn = attn.softmax(dim=-1)
        out = (attn @ v).reshape(b, n, heads, win, win, hd).permute(0, 1, 3, 4, 2, 5)
        out = out.reshape(b * n, win, win, c).permute(0, 3, 1, 2)
        out = self.proj(self.fusion(out).reshape(b, n, c * 2))
        out = out + self.mlp(self.norm2(out))
        return out.permute(0, 2, 1).reshape(b, c * 2, h, w)


class ChannelContext(nn.Module):
    """``fushion`` (upstream's spelling): 3x3 convs ``in -> 192 -> 128 -> 4 * out`` with GELUs."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fushion = nn.Sequential(
            conv3x3(in_dim, 192), nn.GELU(),
            conv3x3(192, 128), nn.GELU(),
            conv3x3(128, out_dim * 4),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.fushion(x)


def _pointwise_depthwise(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(dim, dim, kernel_size=1), nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim))


def _linear_attention(keys: Tensor, queries: Tensor, values: Tensor, heads: int, embed=None) -> Tensor:
    """Per head: softmax of the keys over positions and of the queries over channels, then
    ``(K V^T)^T Q``. ``embed(key, value, query)`` may re-lay the flattened maps first."""
    b, dim = keys.shape[:2]
    head_dim = dim // heads
    out = []
    for i in range(heads):
        part = slice(i * head_dim, (i + 1) * head_dim)
        key = F.softmax(keys[:, part, :], dim=2)
        query = F.softmax(queries[:, part, :], dim=1)
        value = values[:, part, :]
        if embed is not None:
            key, value, query = embed(key, value, query)
        context = key @ value.transpose(1, 2)
        out.append(context.transpose(1, 2) @ query)
    return out


class LinearGlobalInterContext(nn.Module):
    """Global context from the earlier slices: linear attention, a 5x5 reprojection to ``3/2 out``,
    then ``skip(a) + mlp(a)``."""

    def __init__(self, dim: int = 32, out_dim: int = 64, num_heads: int = 2) -> None:
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.keys = _pointwise_depthwise(dim)
        self.queries = _pointwise_depthwise(dim)
        self.values = _pointwise_depthwise(dim)
        wide = out_dim * 3 // 2
        self.reprojection = nn.Conv2d(dim, wide, kernel_size=5, padding=2)
        self.mlp = nn.Sequential(
            nn.Conv2d(wide, out_dim * 2, kernel_size=1), nn.GELU(),
            nn.Conv2d(out_dim * 2, out_dim * 2, kernel_size=3, padding=1, groups=out_dim * 2), nn.GELU(),
            nn.Conv2d(out_dim * 2, out_dim, kernel_size=1),
        )
        self.skip = nn.Conv2d(wide, out_dim, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        flat = (b, self.dim, h * w)
        parts = _linear_attention(self.keys(x).reshape(flat), self.queries(x).reshape(flat),
                                  self.values(x).reshape(flat), self.num_heads)
        attention = self.reprojection(torch.cat([p.reshape(b, -1, h, w) for p in parts], dim=1))
        return self.skip(attention) + self.mlp(attention)


class LinearGlobalIntraContext(nn.Module):
    """Global context inside a slice: the previous slice's anchors are the keys and its
    non-anchors the queries (squeezed layout), the current slice's decoded anchors the values."""

    def __init__(self, dim: int = 32, num_heads: int = 2) -> None:
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.keys = _pointwise_depthwise(dim)
        self.queries = _pointwise_depthwise(dim)
        self.values = _pointwise_depthwise(dim)
        self.reprojection = nn.Conv2d(dim, dim * 2, kernel_size=5, padding=2)
        self.mlp = nn.Sequential(
            nn.Conv2d(dim * 2, dim * 4, kernel_size=1), nn.GELU(),
            nn.Conv2d(dim * 4, dim * 4, kernel_size=3, padding=1, groups=dim * 4), nn.GELU(),
            nn.Conv2d(dim * 4, dim * 2, kernel_size=1),
        )

    def forward(self, previous: Tensor, anchors: Tensor) -> Tensor:
        b, _, h, w = previous.shape
        half = (b, self.dim, h * w // 2)
        queries = squeeze_nonanchor(self.queries(nonanchor_part(previous))).reshape(half)
        keys = squeeze_anchor(self.keys(anchor_part(previous))).reshape(half)
        values = squeeze_anchor(self.values(anchors)).reshape(half)

        def embed(key: Tensor, value: Tensor, query: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            shape = (b, key.shape[1], h, w // 2)
            full = (b, key.shape[1], h * w)
            return (unsqueeze_anchor(key.reshape(shape)).reshape(full),
                    unsqueeze_anchor(value.reshape(shape)).reshape(full),
                    unsqueeze_nonanchor(query.reshape(shape)).reshape(full))

        parts = _linear_attention(keys, queries, values, self.num_heads, embed)
        attention = self.reprojection(torch.cat([p.reshape(b, -1, h, w) for p in parts], dim=1))
        return attention + self.mlp(attention)


class EntropyParameters(nn.Module):
    """``fusion``: 1x1 convs ``in -> 320 -> 256 -> 128 -> out`` with GELUs (output: scales, means)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fusion = nn.Sequential(
            nn.Conv2d(in_dim, 320, kernel_size=1), nn.GELU(),
            nn.Conv2d(320, 256, kernel_size=1), nn.GELU(),
            nn.Conv2d(256, 128, kernel_size=1), nn.GELU(),
            nn.Conv2d(128, out_dim, kernel_size=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.fusion(x)


class LatentResidualPrediction(nn.Module):
    """``0.5 * tanh(lrp_transform(x))`` with the 3x3 stack ``in -> 224 -> 128 -> out``."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.lrp_transform = SliceTransform(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * torch.tanh(self.lrp_transform(x))
