"""Reference re-implementations of the STF repository's ``SymmetricalTransFormer`` and ``WACNN``.

Googolxx/STF (CVPR 2022) ships a modified compressai 1.1.6dev0 with both models. These classes are
key-identical to its checkpoints (names in compressai 1.2.8 spelling, shapes, dtypes and state-dict
order) and follow its op order; the entropy-coding loop is :class:`~.base.UpstreamSliceModel`,
which already matches upstream's: the first ``j`` decoded slices as support, LRP on the *mean*
support, all slices in one rANS stream, a clamped batch-1 ``decompress``.

Upstream details kept on purpose:

* the entropy bottleneck computes the z likelihood with compressai 1.1's sign trick and lists its
  parameters interleaved before ``quantiles`` (:class:`~..blocks.legacy_bottleneck.InterleavedEntropyBottleneck`);
* WACNN's attention modules are named ``Win_noShift_Attention`` upstream but do shift their
  windows (by 4 at N channels, 2 at M channels), with the -100 mask;
* STF's hyperprior widths (384 ... 192) are hard-coded upstream, i.e. only consistent for
  ``embed_dim=48``; WACNN hard-codes 10 slices of 32 channels (only consistent for ``M=320``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from compressai.entropy_models import GaussianConditional
from compressai.layers import GDN
from compressai.models.utils import conv, deconv
from torch import Tensor, nn

from ..blocks.legacy_bottleneck import InterleavedEntropyBottleneck
from ..blocks.stf_blocks import (
    DeepSliceTransform,
    PatchEmbed,
    PatchMerging,
    PatchSplit,
    SwinStage,
    SwinTransforms,
    WindowAttentionModule,
    hyper_analysis,
    hyper_synthesis,
)
from .base import UpstreamSliceModel

__all__ = ["INPUT_MINIMUM", "INPUT_MULTIPLE", "SymmetricalTransFormer", "WACNN", "check_input_size"]

#: Both models need H and W to be multiples of 64 (z lives at 1/64 and ``decompress`` rebuilds y's
#: size as 4x z's; WACNN's window attention does not pad).
INPUT_MULTIPLE = 64
INPUT_MINIMUM = 64
SLICE_CHANNELS = 32
HYPER_CHANNELS = 192
#: hyper analysis / synthesis widths upstream hard-codes
STF_HYPER_ANALYSIS = (384, 384, 336, 288, 240, 192)
STF_HYPER_SYNTHESIS = (192, 240, 288, 336, 384, 384)
WACNN_HYPER_ANALYSIS = (320, 320, 288, 256, 224, 192)
WACNN_HYPER_SYNTHESIS = (192, 192, 224, 256, 288, 320)
WACNN_HEADS = 8


def check_input_size(x: Tensor) -> None:
    """Raise ``ValueError`` unless ``x`` is ``[B, C, H, W]`` with H, W multiples of 64 (upstream crashes)."""
    if x.dim() != 4:
        raise ValueError(f"expected an image batch [B, C, H, W], got shape {tuple(x.shape)}")
    for name, size in zip(("height", "width"), x.shape[-2:]):
        if size < INPUT_MINIMUM or size % INPUT_MULTIPLE:
            raise ValueError(
                f"input {name} {size} is not supported by the upstream model: height and width must be "
                f"multiples of {INPUT_MULTIPLE} and at least {INPUT_MINIMUM} (pad the image first, as the "
                f"upstream eval script does)"
            )


class _STFSliceModel(UpstreamSliceModel):
    """The hyperprior and slice heads both models share (widths differ)."""

    def _register_entropy_stack(self, latent: int, analysis: Sequence[int], synthesis: Sequence[int]) -> None:
        self.h_a = hyper_analysis(analysis)
        self.h_mean_s = hyper_synthesis(synthesis)
        self.h_scale_s = hyper_synthesis(synthesis)
        k, support = self.num_slices, self.max_support_slices
        self.cc_mean_transforms = nn.ModuleList(
            DeepSliceTransform(latent + SLICE_CHANNELS * min(i, support), SLICE_CHANNELS) for i in range(k))
        self.cc_scale_transforms = nn.ModuleList(
            DeepSliceTransform(latent + SLICE_CHANNELS * min(i, support), SLICE_CHANNELS) for i in range(k))
        self.lrp_transforms = nn.ModuleList(
            DeepSliceTransform(latent + SLICE_CHANNELS * min(i + 1, support + 1), SLICE_CHANNELS) for i in range(k))
        self.entropy_bottleneck = InterleavedEntropyBottleneck(HYPER_CHANNELS)
        self.gaussian_conditional = GaussianConditional(None)

    def check_input_size(self, x: Tensor) -> None:
        check_input_size(x)

    def hyper_synthesis(self, z_hat: Tensor) -> tuple[Tensor, Tensor]:
        latent_scales = self.h_scale_s(z_hat)
        latent_means = self.h_mean_s(z_hat)
        return latent_means, latent_scales

    def slice_parameters(
        self, index: int, latent_means: Tensor, latent_scales: Tensor, support_slices: list[Tensor]
    ) -> tuple[Tensor, Tensor, Tensor]:
        # upstream quirk reproduced on purpose: the LRP input is built on the *mean* support
        mean_support = torch.cat([latent_means, *support_slices], dim=1)
        mu = self.cc_mean_transforms[index](mean_support)
        scale = self.cc_scale_transforms[index](torch.cat([latent_scales, *support_slices], dim=1))
        return mu, scale, mean_support


class SymmetricalTransFormer(SwinTransforms, _STFSliceModel):
    """STF: Swin analysis and synthesis around the channel-slice entropy model (upstream signature)."""

    def __init__(
        self,
        pretrain_img_size: int = 256,
        patch_size: int = 2,
        in_chans: int = 3,
        embed_dim: int = 48,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 4,
        num_slices: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        patch_norm: bool = True,
        frozen_stages: int = -1,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if norm_layer is not nn.LayerNorm or drop_rate or attn_drop_rate:
            raise ValueError("only LayerNorm and no dropout are supported (the published configuration)")
        self.embed_dim, self.patch_size = embed_dim, patch_size
        self.num_layers = len(depths)
        self.num_slices = num_slices
        self.max_support_slices = num_slices // 2
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm=patch_norm)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # also under a meta device
        starts = [sum(depths[:i]) for i in range(self.num_layers + 1)]
        last = self.num_layers - 1
        self.layers = nn.ModuleList(
            SwinStage(embed_dim * 2**i, depths[i], num_heads[i], window_size, mlp_ratio, qkv_bias, qk_scale,
                      rates[starts[i]:starts[i + 1]], PatchMerging if i < last else None)
            for i in range(self.num_layers)
        )
        # the synthesis mirrors the analysis; its drop-path schedule is cut with the reversed depths
        up_depths, up_heads = list(depths)[::-1], list(num_heads)[::-1]
        up_starts = [sum(up_depths[:i]) for i in range(self.num_layers + 1)]
        self.syn_layers = nn.ModuleList(
            SwinStage(embed_dim * 2 ** (last - i), up_depths[i], up_heads[i], window_size, mlp_ratio, qkv_bias,
                      qk_scale, rates[up_starts[i]:up_starts[i + 1]], PatchSplit if i < last else None)
            for i in range(self.num_layers)
        )
        self.end_conv = nn.Sequential(
            nn.Conv2d(embed_dim, embed_dim * patch_size**2, kernel_size=5, stride=1, padding=2),
            nn.PixelShuffle(patch_size),
            nn.Conv2d(embed_dim, 3, kernel_size=3, stride=1, padding=1),
        )
        self.latent_channels = embed_dim * 2**last
        self._register_entropy_stack(self.latent_channels, STF_HYPER_ANALYSIS, STF_HYPER_SYNTHESIS)



class WACNN(_STFSliceModel):
    """WACNN: GDN convolutions with window-attention modules around the same entropy model."""

    def __init__(self, N: int = 192, M: int = 320, **kwargs) -> None:
        super().__init__()
        self.num_slices = 10
        self.max_support_slices = 5
        self.N, self.M = N, M
        # upstream quirk reproduced on purpose: "Win_noShift_Attention" is given a shift and uses it
        self.g_a = nn.Sequential(
            conv(3, N, kernel_size=5, stride=2),
            GDN(N),
            conv(N, N, kernel_size=5, stride=2),
            GDN(N),
            WindowAttentionModule(N, WACNN_HEADS, window_size=8, shift_size=4),
            conv(N, N, kernel_size=5, stride=2),
            GDN(N),
            conv(N, M, kernel_size=5, stride=2),
            WindowAttentionModule(M, WACNN_HEADS, window_size=4, shift_size=2),
        )
        self.g_s = nn.Sequential(
            WindowAttentionModule(M, WACNN_HEADS, window_size=4, shift_size=2),
            deconv(M, N, kernel_size=5, stride=2),
            GDN(N, inverse=True),
            deconv(N, N, kernel_size=5, stride=2),
            GDN(N, inverse=True),
            WindowAttentionModule(N, WACNN_HEADS, window_size=8, shift_size=4),
            deconv(N, N, kernel_size=5, stride=2),
            GDN(N, inverse=True),
            deconv(N, 3, kernel_size=5, stride=2),
        )
        self._register_entropy_stack(M, WACNN_HYPER_ANALYSIS, WACNN_HYPER_SYNTHESIS)
