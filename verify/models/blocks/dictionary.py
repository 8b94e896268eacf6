"""Multi-scale dictionary cross-attention shared by DCAE and SAAF, with its small layers.

Each latent slice builds a query from the hyperprior and the decoded slices, aggregates it
locally (dense depthwise stack gated by a spatial attention map) and attends over a learned
dictionary of 128 entries shared by all slices. Class attribute names follow the upstream
checkpoint layout (``x_trans``, ``msa.s``, ``msa.dense.conv_layers.{i}.1``, ``dict_ln`` ...).

Tensor layout follows upstream op for op (channels-last inside, permuted views rather than
copies) so that results match bit for bit, not just approximately.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

DICTIONARY_ENTRIES = 128
DICTIONARY_HEAD_DIM = 32


class Scale(nn.Module):
    """Learned per-channel multiplier (channels-last input)."""

    def __init__(self, dim: int, init_value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class DWConv(nn.Module):
    """3x3 depthwise convolution applied to a channels-last tensor."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.dwconv(x.permute(0, 3, 1, 2))
        return x.permute(0, 2, 3, 1)


class ConvolutionalGLU(nn.Module):
    """Gated MLP: half of ``fc1`` goes through depthwise conv + GELU and gates the other half.

    ``hidden_features`` counts both halves, so each half is ``hidden_features // 2`` wide.
    """

    def __init__(self, in_features: int, hidden_features: int | None = None,
                 out_features: int | None = None) -> None:
        super().__init__()
        half = (hidden_features or in_features) // 2
        self.fc1 = nn.Linear(in_features, 2 * half)
        self.dwconv = DWConv(half)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(half, out_features or in_features)

    def forward(self, x: Tensor) -> Tensor:
        gate_input, value = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(self.act(self.dwconv(gate_input)) * value)


class SpatialAttentionModule(nn.Module):
    """Sigmoid map from a 7x7 conv over the channel mean and channel max (NCHW)."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        mean_map = x.mean(dim=1, keepdim=True)
        max_map = x.max(dim=1, keepdim=True).values
        return torch.sigmoid(self.conv1(torch.cat([mean_map, max_map], dim=1)))


class ConvWithDW(nn.Module):
    """1x1 conv, GELU, 3x3 depthwise conv, GELU, 1x1 conv (NCHW)."""

    def __init__(self, input_dim: int, output_dim: int) -> None:
        super().__init__()
        self.in_trans = nn.Conv2d(input_dim, output_dim, kernel_size=1)
        self.dw_conv = nn.Conv2d(output_dim, output_dim, kernel_size=3, padding=1, groups=output_dim)
        self.out_trans = nn.Conv2d(output_dim, output_dim, kernel_size=1)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.in_trans(x))
        x = self.act(self.dw_conv(x))
        return self.out_trans(x)


class DenseBlock(nn.Module):
    """Chain of GELU + :class:`ConvWithDW` steps whose outputs are all concatenated and fused."""

    def __init__(self, dim: int, depth: int = 3) -> None:
        super().__init__()
        # Index 0 of each step is the parameter-free GELU, so weights live under ``.1``.
        self.conv_layers = nn.ModuleList(
            nn.Sequential(nn.GELU(), ConvWithDW(dim, dim)) for _ in range(depth)
        )
        self.proj = nn.Conv2d(dim * (depth + 1), dim, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for step in self.conv_layers:
            features.append(step(features[-1]))
        return self.proj(torch.cat(features, dim=1))


class MultiScaleAggregation(nn.Module):
    """1x1 conv, dense block, spatial gating; channels-last in and out."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.s = nn.Conv2d(dim, dim, kernel_size=1)
        self.spatial_atte = SpatialAttentionModule()
        self.dense = DenseBlock(dim)

    def forward(self, x: Tensor) -> Tensor:
        dense = self.dense(self.s(x.permute(0, 3, 1, 2)))
        gated = dense * self.spatial_atte(dense)
        return gated.permute(0, 2, 3, 1)


class DictionaryCrossAttention(nn.Module):
    """Cross-attention from a per-slice query map (NCHW) onto the shared dictionary.

    ``forward(query, dictionary)`` takes ``dictionary`` already repeated over the batch
    (``[B, entries, heads * 32]``) and returns ``[B, output_dim, H, W]``. Upstream name:
    ``MutiScaleDictionaryCrossAttentionGLU``.
    """

    def __init__(self, input_dim: int, output_dim: int, mlp_rate: int = 4, head_num: int = 20,
                 qkv_bias: bool = True) -> None:
        super().__init__()
        width = DICTIONARY_HEAD_DIM * head_num
        self.head_num = head_num
        self.scale = nn.Parameter(torch.ones(head_num, 1, 1))
        self.x_trans = nn.Linear(input_dim, width, bias=qkv_bias)
        self.ln_scale = nn.LayerNorm(width)
        self.msa = MultiScaleAggregation(width)
        self.lnx = nn.LayerNorm(width)
        self.q_trans = nn.Linear(width, width, bias=qkv_bias)
        self.dict_ln = nn.LayerNorm(width)
        self.k = nn.Linear(width, width, bias=qkv_bias)
        self.linear = nn.Linear(width, width, bias=qkv_bias)
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp = ConvolutionalGLU(width, mlp_rate * width)
        self.output_trans = nn.Sequential(nn.Linear(width, output_dim))
        self.res_scale_1 = Scale(width)
        self.res_scale_2 = Scale(width)
        self.res_scale_3 = Scale(width)

    def _split_heads(self, tokens: Tensor) -> Tensor:
        """``[B, N, heads * d]`` -> ``[B, heads, N, d]``."""
        return rearrange(tokens, "batch n (head d) -> batch head n d", head=self.head_num)

    def forward(self, query: Tensor, dictionary: Tensor) -> Tensor:
        height, width = query.shape[-2:]
        x = self.x_trans(query.permute(0, 2, 3, 1))
        x = self.msa(self.ln_scale(x)) + self.res_scale_1(x)
        shortcut = x

        q = self.q_trans(self.lnx(x)).permute(0, 3, 1, 2)
        q = rearrange(q, "batch (head d) h w -> batch head (h w) d", head=self.head_num)
        entries = self.dict_ln(dictionary)
        keys = self._split_heads(self.k(entries))
        values = self._split_heads(entries)  # the normalised entries themselves are the values

        logits = torch.einsum("bhqd,bhkd->bhqk", q, keys) * self.scale
        weights = torch.softmax(logits, dim=-1)
        attended = torch.einsum("bhqk,bhkd->bhqd", weights, values)
        attended = rearrange(attended, "batch head (h w) d -> batch h w (head d)", h=height, w=width)

        x = self.linear(attended) + self.res_scale_2(shortcut)
        x = self.mlp(self.ln_mlp(x)) + self.res_scale_3(x)
        return self.output_trans(x).permute(0, 3, 1, 2)


def dictionary_attention_list(latent_channels: int, num_slices: int, support_cap: int | None,
                              head_num: int = 20, mlp_rate: int = 4) -> nn.ModuleList:
    """One :class:`DictionaryCrossAttention` per slice.

    Slice ``i`` reads ``2M + k * M/num_slices`` channels with ``k = i``, or ``min(i, support_cap)``
    when the family caps it (the caps only differ from ``i`` beyond six slices).
    """
    slice_channels = latent_channels // num_slices

    def support(i: int) -> int:
        return i if support_cap is None else min(i, support_cap)

    return nn.ModuleList(
        DictionaryCrossAttention(2 * latent_channels + slice_channels * support(i), latent_channels,
                                 mlp_rate=mlp_rate, head_num=head_num)
        for i in range(num_slices)
    )
