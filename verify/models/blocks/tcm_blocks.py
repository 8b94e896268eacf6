"""Building blocks of LIC_TCM's transformer-CNN mixture (also used unchanged by TCM+AuxT).

* :class:`SwinTransformerBlock`: pre-norm window attention + 4x MLP, both residual (``Block`` upstream).
* :class:`ConvTransBlock`: splits channels into a residual-conv half and a Swin half, mixes with 1x1s.
* :class:`SwinPair`: a W block followed by an SW block on channels-first maps (``SwinBlock`` upstream).
* :class:`SWAtten`: compressai's attention block whose non-local branch is a :class:`SwinPair`,
  wrapped in 1x1 projections to and from a narrower width.

Attribute names are the checkpoint's (``trans_block``, ``conv1_1``, ``msa``, ``non_local_block`` ...).
"""

from __future__ import annotations

import torch
from compressai.layers import AttentionBlock, ResidualBlock
from torch import Tensor, nn

from .window_attention import WindowMultiHeadAttention, WindowType

__all__ = ["ConvTransBlock", "SWAtten", "SwinPair", "SwinTransformerBlock", "drop_path_or_identity"]


def drop_path_or_identity(rate: float) -> nn.Module:
    """Stochastic depth when ``rate > 0`` (training only; no parameters), identity otherwise."""
    if rate > 0:
        from timm.layers import DropPath

        return DropPath(rate)
    return nn.Identity()


def to_channels_last(x: Tensor) -> Tensor:
    return x.permute(0, 2, 3, 1)


def to_channels_first(x: Tensor) -> Tensor:
    return x.permute(0, 3, 1, 2)


class SwinTransformerBlock(nn.Module):
    """Channels-last transformer block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        head_dim: int,
        window_size: int,
        drop_path: float,
        type: WindowType = "W",
    ) -> None:
        super().__init__()
        self.type = type
        self.ln1 = nn.LayerNorm(input_dim)
        self.msa = WindowMultiHeadAttention(input_dim, input_dim, head_dim, window_size, type)
        self.drop_path = drop_path_or_identity(drop_path)
        self.ln2 = nn.LayerNorm(input_dim)
        self.mlp = nn.Sequential(
            nn.Linear(input_dim, 4 * input_dim),
            nn.GELU(),
            nn.Linear(4 * input_dim, output_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.msa(self.ln1(x)))
        return x + self.drop_path(self.mlp(self.ln2(x)))


class ConvTransBlock(nn.Module):
    """Parallel residual-conv and Swin branches over a channel split, fused by a 1x1 conv.

    Input and output have ``conv_dim + trans_dim`` channels; the whole block is residual.
    """

    def __init__(
        self,
        conv_dim: int,
        trans_dim: int,
        head_dim: int,
        window_size: int,
        drop_path: float,
        type: WindowType = "W",
    ) -> None:
        super().__init__()
        width = conv_dim + trans_dim
        self.conv_dim = conv_dim
        self.trans_dim = trans_dim
        self.trans_block = SwinTransformerBlock(trans_dim, trans_dim, head_dim, window_size, drop_path, type)
        self.conv1_1 = nn.Conv2d(width, width, kernel_size=1, stride=1, padding=0, bias=True)
        self.conv1_2 = nn.Conv2d(width, width, kernel_size=1, stride=1, padding=0, bias=True)
        self.conv_block = ResidualBlock(conv_dim, conv_dim)

    def forward(self, x: Tensor) -> Tensor:
        conv_part, trans_part = torch.split(self.conv1_1(x), (self.conv_dim, self.trans_dim), dim=1)
        # upstream quirk reproduced on purpose: ResidualBlock is already residual, the skip is added twice
        conv_part = self.conv_block(conv_part) + conv_part
        trans_part = to_channels_first(self.trans_block(to_channels_last(trans_part)))
        return x + self.conv1_2(torch.cat((conv_part, trans_part), dim=1))


class SwinPair(nn.Module):
    """A window block then a shifted-window block, on channels-first maps."""

    def __init__(self, input_dim: int, output_dim: int, head_dim: int, window_size: int, drop_path: float) -> None:
        super().__init__()
        self.block_1 = SwinTransformerBlock(input_dim, output_dim, head_dim, window_size, drop_path, type="W")
        self.block_2 = SwinTransformerBlock(input_dim, output_dim, head_dim, window_size, drop_path, type="SW")
        self.window_size = window_size

    def forward(self, x: Tensor) -> Tensor:
        if x.size(-1) <= self.window_size or x.size(-2) <= self.window_size:
            # upstream pads such maps by window+1 and then fails inside attention; refuse clearly
            raise ValueError(
                f"feature map {tuple(x.shape[-2:])} is not larger than the attention window {self.window_size}"
            )
        return to_channels_first(self.block_2(self.block_1(to_channels_last(x))))


class SWAtten(AttentionBlock):
    """compressai ``AttentionBlock`` at width ``inter_dim`` with a Swin non-local branch.

    ``out = out_conv(conv_a(h) * sigmoid(conv_b(swin(h))) + h)`` with ``h = in_conv(x)``.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        head_dim: int,
        window_size: int,
        drop_path: float,
        inter_dim: int | None = 192,
    ) -> None:
        width = input_dim if inter_dim is None else inter_dim
        super().__init__(N=width)
        self.non_local_block = SwinPair(width, width, head_dim, window_size, drop_path)
        if inter_dim is not None:
            self.in_conv = nn.Conv2d(input_dim, inter_dim, kernel_size=1)
            self.out_conv = nn.Conv2d(inter_dim, output_dim, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.in_conv(x)
        gate_logits = self.conv_b(self.non_local_block(x))
        out = self.conv_a(x) * torch.sigmoid(gate_logits)
        return self.out_conv(out + x)
