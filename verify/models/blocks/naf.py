"""NAF blocks (nonlinear-activation-free, SimpleGate) and the NAF transforms built from them (CCA).

Both sides of a CCA parity check compute with these; they differ only in the attribute names
(the checkpoint keys), which each side declares on a subclass:

=====================  ===================  ====================
role                   upstream (CCA)       CompressAI master
=====================  ===================  ====================
1x1 then depthwise 3x3 ``dwconv``           ``pointwise_depthwise``
channel attention      ``sca``              ``channel_attention``
output 1x1             ``conv1``            ``project``
feed-forward           ``FFN``              ``feed_forward``
transform input 1x1    ``in_conv``          ``input_projection``
transform output 1x1   ``out_conv``         ``output_projection``
=====================  ===================  ====================

The layer norm is CCA's own: a per-pixel mean and (biased) variance over channels, then
``(x - mean) / sqrt(var + eps)``. Master uses timm's ``LayerNorm2d`` (``F.layer_norm``), which
gives the same values up to float rounding (about 1e-6 in the reconstruction).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .residual_bottleneck import ResidualBottleneckBlock

__all__ = [
    "BOTTLENECKS_PER_LEVEL", "ChannelLayerNorm", "NAFAnalysis", "NAFBlockBase", "NAFSynthesis",
    "NAFTransformBase", "simple_gate",
]

#: residual bottleneck blocks per level of the CCA analysis / synthesis (hard-coded upstream)
BOTTLENECKS_PER_LEVEL = 3


def simple_gate(x: Tensor) -> Tensor:
    """Split the channels in two halves and multiply them."""
    first, second = x.chunk(2, dim=1)
    return first * second


class _SimpleGate(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return simple_gate(x)


class ChannelLayerNorm(nn.Module):
    """Layer norm over the channels of an NCHW tensor, with CCA's explicit arithmetic."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        channels = x.shape[1]
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        normed = (x - mean) / (var + self.eps).sqrt()
        return self.weight.view(1, channels, 1, 1) * normed + self.bias.view(1, channels, 1, 1)


def _conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1)


class NAFBlockBase(nn.Module):
    """One NAF block of width ``dim``; a subclass names the parts in ``NAMES`` (role -> attribute).

    ``x -> x + beta * project(gate(pw_dw(norm1(x))) * attention(.))``, then
    ``x -> x + gamma * feed_forward(norm2(x))``; ``beta``/``gamma`` are ``[1, dim, 1, 1]``.
    The parts are registered in ``NAMES``' order (the key order of the checkpoints).
    """

    NAMES: dict[str, str] = {}

    def __init__(self, dim: int) -> None:
        super().__init__()
        wide = 2 * dim
        self.beta = nn.Parameter(torch.zeros(1, dim, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, dim, 1, 1))
        parts = {
            "pointwise_depthwise": lambda: nn.Sequential(
                _conv1x1(dim, wide), nn.Conv2d(wide, wide, 3, 1, padding=1, groups=wide)),
            "gate": _SimpleGate,
            "channel_attention": lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1), _conv1x1(dim, dim)),
            "feed_forward": lambda: nn.Sequential(_conv1x1(dim, wide), _SimpleGate(), _conv1x1(dim, dim)),
            "norm1": lambda: ChannelLayerNorm(dim),
            "norm2": lambda: ChannelLayerNorm(dim),
            "project": lambda: _conv1x1(dim, dim),
        }
        for role, attribute in self.NAMES.items():
            setattr(self, attribute, parts[role]())

    def _part(self, role: str) -> nn.Module:
        return getattr(self, self.NAMES[role])

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        h = self._part("pointwise_depthwise")(self._part("norm1")(x))
        h = simple_gate(h)
        h = h * self._part("channel_attention")(h)
        out = identity + self._part("project")(h) * self.beta
        return out + self._part("feed_forward")(self._part("norm2")(out)) * self.gamma


class NAFTransformBase(nn.Module):
    """``in 1x1 -> NAF blocks -> + (in 1x1 output) -> out 1x1``: one residual around the stack.

    ``NAMES`` maps ``input``/``blocks``/``output`` to attributes, in registration order;
    ``block_type`` is the NAF block class.
    """

    NAMES: dict[str, str] = {}
    block_type: type[NAFBlockBase]

    def __init__(self, in_channels: int, out_channels: int, layers: int, width: int) -> None:
        super().__init__()
        parts = {
            "input": lambda: _conv1x1(in_channels, width),
            "blocks": lambda: nn.ModuleList(self.block_type(width) for _ in range(layers)),
            "output": lambda: _conv1x1(width, out_channels),
        }
        for role, attribute in self.NAMES.items():
            setattr(self, attribute, parts[role]())

    @property
    def in_channels(self) -> int:
        return getattr(self, self.NAMES["input"]).in_channels

    def forward(self, x: Tensor) -> Tensor:
        h = getattr(self, self.NAMES["input"])(x)
        identity = h
        for block in getattr(self, self.NAMES["blocks"]):
            h = block(h)
        return getattr(self, self.NAMES["output"])(h + identity)


def _conv(in_channels: int, out_channels: int, kernel_size: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2)


def _deconv(in_channels: int, out_channels: int, kernel_size: int, stride: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(in_channels, out_channels, kernel_size, stride=stride,
                              output_padding=stride - 1, padding=kernel_size // 2)


class NAFAnalysis(nn.Module):
    """CCA's g_a: ``down[i]`` (5x5 stride 2) then ``blocks[i]`` (3 bottlenecks, then NAF blocks),
    for each level, then ``down[-1]`` to the latent."""

    def __init__(self, block_type: type[NAFBlockBase], latent: int, dims: Sequence[int],
                 layers: Sequence[int], image_channels: int = 3) -> None:
        super().__init__()
        widths = [image_channels, *dims, latent]
        self.down = nn.ModuleList(_conv(widths[i], widths[i + 1], 5, 2) for i in range(len(dims) + 1))
        self.blocks = nn.ModuleList(
            nn.Sequential(*[ResidualBottleneckBlock(d, d) for _ in range(BOTTLENECKS_PER_LEVEL)],
                          *[block_type(d) for _ in range(n)])
            for d, n in zip(dims, layers)
        )

    def forward(self, x: Tensor) -> Tensor:
        for down, blocks in zip(self.down, self.blocks):
            x = blocks(down(x))
        return self.down[-1](x)


class NAFSynthesis(nn.Module):
    """CCA's g_s: ``up[i]`` (5x5 stride-2 deconv) then ``blocks[i]`` (NAF blocks, then 3
    bottlenecks), from the widest level down, then ``up[-1]`` to the image."""

    def __init__(self, block_type: type[NAFBlockBase], latent: int, dims: Sequence[int],
                 layers: Sequence[int], image_channels: int = 3) -> None:
        super().__init__()
        widths = [image_channels, *dims, latent]
        levels = list(reversed(range(len(dims))))
        self.up = nn.ModuleList(_deconv(widths[i + 1], widths[i], 5, 2) for i in [len(dims), *levels])
        self.blocks = nn.ModuleList(
            nn.Sequential(*[block_type(dims[i]) for _ in range(layers[i])],
                          *[ResidualBottleneckBlock(dims[i], dims[i]) for _ in range(BOTTLENECKS_PER_LEVEL)])
            for i in levels
        )

    def forward(self, x: Tensor) -> Tensor:
        for up, blocks in zip(self.up, self.blocks):
            x = blocks(up(x))
        return self.up[-1](x)


def hyper_analysis(latent: int, width: int, hyper: int) -> nn.Sequential:
    """CCA's h_a: 3x3 conv, GELU, 5x5 stride 2, GELU, 5x5 stride 2 to the hyper-latent."""
    return nn.Sequential(_conv(latent, width, 3, 1), nn.GELU(), _conv(width, width, 5, 2), nn.GELU(),
                         _conv(width, hyper, 5, 2))


def hyper_synthesis(latent: int, width: int, hyper: int) -> nn.Sequential:
    """One of CCA's two hyper syntheses: two 5x5 stride-2 deconvs with GELUs, then a 3x3 deconv."""
    return nn.Sequential(_deconv(hyper, width, 5, 2), nn.GELU(), _deconv(width, width, 5, 2), nn.GELU(),
                         _deconv(width, latent, 3, 1))
