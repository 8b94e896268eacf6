"""DCAE's transformer stage: res-scaled attention + convolutional-GLU layers and a conv shortcut.

The generic pieces (:class:`GatedAttentionLayer`, :class:`AttentionStage`) are shared with SAAF,
which swaps the attention module; the DCAE-specific ones use the relative-position window
attention of :mod:`.window_attention`, alternating plain ("W") and shifted ("SW") windows.
Attribute names (``ln1``, ``msa``, ``ln2``, ``mlp``, ``res_scale_1/2``, ``layers``, ``conv``) are the
upstream checkpoint layout.
"""

from __future__ import annotations

from torch import Tensor, nn

from compressai.models.utils import conv

from .dictionary import ConvolutionalGLU, Scale
from .window_attention import WindowMultiHeadAttention

MLP_RATIO = 4


class GatedAttentionLayer(nn.Module):
    """Pre-norm attention and convolutional-GLU sub-layers, each shortcut multiplied by a learned scale.

    Channels-last in and out. Drop-path is omitted: every upstream model builds it with rate 0.
    """

    def __init__(self, dim: int, attention: nn.Module) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.msa = attention
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = ConvolutionalGLU(dim, MLP_RATIO * dim)
        self.res_scale_1 = Scale(dim)
        self.res_scale_2 = Scale(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.res_scale_1(x) + self.msa(self.ln1(x))
        return self.res_scale_2(x) + self.mlp(self.ln2(x))


class AttentionStage(nn.Module):
    """``depth`` gated layers on a channels-last view of an NCHW map, a 3x3 conv, plus the input.

    Subclasses choose the attention of each layer in :meth:`make_attention`. Upstream pads maps
    that are not larger than the window and then fails inside the window partition; here such
    maps are refused with a ``ValueError`` instead.
    """

    def __init__(self, dim: int, head_dim: int, window_size: int, depth: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.layers = nn.ModuleList(
            GatedAttentionLayer(dim, self.make_attention(dim, head_dim, window_size, i)) for i in range(depth)
        )
        self.conv = conv(dim, dim, kernel_size=3, stride=1)

    def make_attention(self, dim: int, head_dim: int, window_size: int, layer_index: int) -> nn.Module:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        p = self.window_size
        if height <= p or width <= p or height % p or width % p:
            raise ValueError(
                f"attention stage with window {p} needs H and W to be multiples of {p} larger than {p}, "
                f"got {height}x{width} (upstream pads this case and then crashes)"
            )
        tokens = x.permute(0, 2, 3, 1)
        for layer in self.layers:
            tokens = layer(tokens)
        return self.conv(tokens.permute(0, 3, 1, 2)) + x


class SwinBlockWithConvMulti(AttentionStage):
    """DCAE's stage: layers alternate plain ("W") and shifted ("SW") window attention, plain first."""

    def make_attention(self, dim: int, head_dim: int, window_size: int, layer_index: int) -> nn.Module:
        return WindowMultiHeadAttention(dim, dim, head_dim, window_size, "W" if layer_index % 2 == 0 else "SW")
