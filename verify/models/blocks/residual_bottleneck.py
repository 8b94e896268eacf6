"""Residual bottleneck stacks used by DCAE and SAAF for down- and up-sampling.

compressai 1.2.8 ships no ``ResidualBottleneckBlock``, so the block is defined here.
Attribute names (``conv``, ``res1``..``res3``, ``conv1``..``conv3``, ``skip``) are the
upstream checkpoint layout.
"""

from __future__ import annotations

from torch import Tensor, nn

from compressai.layers import conv1x1, conv3x3
from compressai.models.utils import conv, deconv

_STACK_DEPTH = 3


class ResidualBottleneckBlock(nn.Module):
    """1x1 squeeze to half width, 3x3, 1x1 expand, plus an identity or 1x1 shortcut."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        mid_ch = min(in_ch, out_ch) // 2
        self.conv1 = conv1x1(in_ch, mid_ch)
        self.conv2 = conv3x3(mid_ch, mid_ch)
        self.conv3 = conv1x1(mid_ch, out_ch)
        self.skip = nn.Identity() if in_ch == out_ch else conv1x1(in_ch, out_ch)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = self.skip(x)
        h = self.act(self.conv1(x))
        h = self.act(self.conv2(h))
        return self.conv3(h) + shortcut


def _add_bottlenecks(owner: nn.Module, channels: int) -> None:
    """Register ``res1``..``res3`` (width-preserving bottlenecks) on ``owner``."""
    for i in range(1, _STACK_DEPTH + 1):
        setattr(owner, f"res{i}", ResidualBottleneckBlock(channels, channels))


def _run_bottlenecks(owner: nn.Module, x: Tensor) -> Tensor:
    for i in range(1, _STACK_DEPTH + 1):
        x = getattr(owner, f"res{i}")(x)
    return x


class ResidualBottleneckBlockWithStride(nn.Module):
    """5x5 stride-2 convolution followed by three bottleneck blocks."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = conv(in_ch, out_ch, kernel_size=5, stride=2)
        _add_bottlenecks(self, out_ch)

    def forward(self, x: Tensor) -> Tensor:
        return _run_bottlenecks(self, self.conv(x))


class ResidualBottleneckBlockWithUpsample(nn.Module):
    """Three bottleneck blocks followed by a 5x5 stride-2 transposed convolution."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        _add_bottlenecks(self, in_ch)
        self.conv = deconv(in_ch, out_ch, kernel_size=5, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(_run_bottlenecks(self, x))
