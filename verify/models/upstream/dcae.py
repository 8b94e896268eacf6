"""DCAE (LabShuHangGU/DCAE ``models/dcae.py``) re-implemented on the shared slice loop.

Dictionary-based cross-attention entropy model: each latent slice is predicted from the two
hyper-synthesis outputs, the decoded slices and a learned dictionary ``dt`` (128 x 640). The
analysis/synthesis transforms interleave residual-bottleneck resampling with Swin-style stages.
State-dict keys, shapes and order equal an upstream ``DCAE()`` checkpoint.

:class:`DCAE` is also the skeleton of SAAF (:mod:`.saaf`), which overrides the ``_register_*``
hooks and :attr:`stage_type`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.models.utils import conv, deconv
from torch import Tensor, nn

from ..blocks.dcae_blocks import AttentionStage, SwinBlockWithConvMulti
from ..blocks.dictionary import DICTIONARY_ENTRIES, DICTIONARY_HEAD_DIM, dictionary_attention_list
from ..blocks.residual_bottleneck import ResidualBottleneckBlockWithStride, ResidualBottleneckBlockWithUpsample
from ..blocks.slice_transforms import SliceTransform
from .base import UpstreamSliceModel

IMAGE_CHANNELS = 3
FEATURE_DIMS = (96, 144, 256)
STAGE_DEPTHS = (1, 2, 12)
WINDOW_SIZE = 8
HYPER_CHANNELS = 192
HYPER_WINDOW = 4
HYPER_HEAD_DIM = 32
DICTIONARY_HEADS = 20


def analysis_layers(stage_type: type[AttentionStage], head_dim: Sequence[int], M: int) -> list[nn.Module]:
    """g_a: three (resample, stage) levels 3 -> 96 -> 144 -> 256, then a 5x5 stride-2 conv to M."""
    layers: list[nn.Module] = []
    widths = (IMAGE_CHANNELS,) + FEATURE_DIMS
    for level in range(3):
        layers.append(ResidualBottleneckBlockWithStride(widths[level], widths[level + 1]))
        layers.append(stage_type(widths[level + 1], head_dim[level], WINDOW_SIZE, STAGE_DEPTHS[level]))
    layers.append(conv(FEATURE_DIMS[2], M, kernel_size=5, stride=2))
    return layers


def synthesis_layers(stage_type: type[AttentionStage], head_dim: Sequence[int], M: int) -> list[nn.Module]:
    """g_s: 5x5 stride-2 deconv M -> 256, then three (stage, upsample) levels 256 -> 144 -> 96 -> 3."""
    layers: list[nn.Module] = [deconv(M, FEATURE_DIMS[2], kernel_size=5, stride=2)]
    widths = tuple(reversed(FEATURE_DIMS)) + (IMAGE_CHANNELS,)
    for level in range(3):
        depth = STAGE_DEPTHS[2 - level]
        layers.append(stage_type(widths[level], head_dim[3 + level], WINDOW_SIZE, depth))
        layers.append(ResidualBottleneckBlockWithUpsample(widths[level], widths[level + 1]))
    return layers


class DCAE(UpstreamSliceModel):
    """Upstream ``DCAE`` with its constructor signature; ``drop_path_rate`` and extra kwargs are
    accepted and unused, as upstream."""

    stage_type: type[AttentionStage] = SwinBlockWithConvMulti
    # Upstream quirk reproduced on purpose: the dictionary input width grows with the slice index
    # without the min(i, 5) cap used by the cc transforms.
    dictionary_support_cap: int | None = None
    # Upstream quirk reproduced on purpose: DCAE's cc/lrp transforms hard-code 320 latent channels.
    slice_transform_latent: int | None = 320

    def __init__(self, head_dim: Sequence[int] = (8, 16, 32, 32, 16, 8), drop_path_rate: float = 0,
                 N: int = 192, M: int = 320, num_slices: int = 5, max_support_slices: int = 5,
                 **kwargs) -> None:
        super().__init__()
        self.head_dim = list(head_dim)
        self.window_size = WINDOW_SIZE
        self.num_slices = num_slices
        self.max_support_slices = max_support_slices
        self.M = M
        self._register_dictionary(M)
        self._register_analysis(M)
        self._register_synthesis(M)
        self._register_hyper_transforms(N, M)
        self._register_slice_transforms(M)
        self.entropy_bottleneck = EntropyBottleneck(HYPER_CHANNELS)
        self.gaussian_conditional = GaussianConditional(None)

    # ------------------------------------------------------------------ construction hooks

    def _register_dictionary(self, M: int) -> None:
        self.dt = nn.Parameter(torch.randn(DICTIONARY_ENTRIES, DICTIONARY_HEAD_DIM * DICTIONARY_HEADS))
        self.dt_cross_attention = dictionary_attention_list(
            M, self.num_slices, self.dictionary_support_cap, head_num=DICTIONARY_HEADS
        )

    def _register_analysis(self, M: int) -> None:
        self.g_a = nn.Sequential(*analysis_layers(self.stage_type, self.head_dim, M))

    def _register_synthesis(self, M: int) -> None:
        self.g_s = nn.Sequential(*synthesis_layers(self.stage_type, self.head_dim, M))

    def _hyper_stage(self, N: int) -> AttentionStage:
        return self.stage_type(N, HYPER_HEAD_DIM, HYPER_WINDOW, 1)

    def _register_hyper_transforms(self, N: int, M: int) -> None:
        self.h_a = nn.Sequential(
            ResidualBottleneckBlockWithStride(M, N),
            self._hyper_stage(N),
            conv(N, HYPER_CHANNELS, kernel_size=3, stride=2),
        )
        # h_z_s1 predicts the scales, h_z_s2 the means.
        self.h_z_s1 = nn.Sequential(
            deconv(HYPER_CHANNELS, N, kernel_size=3, stride=2),
            self._hyper_stage(N),
            ResidualBottleneckBlockWithUpsample(N, M),
        )
        self.h_z_s2 = nn.Sequential(
            deconv(HYPER_CHANNELS, N, kernel_size=3, stride=2),
            self._hyper_stage(N),
            ResidualBottleneckBlockWithUpsample(N, M),
        )

    def _register_slice_transforms(self, M: int) -> None:
        latent = self.slice_transform_latent or M
        slice_width = latent // self.num_slices
        # support = [scales, means, decoded slices (at most 5), dictionary output (M)]
        cc_in = [2 * latent + slice_width * min(i, 5) + M for i in range(self.num_slices)]
        lrp_in = [2 * latent + slice_width * min(i + 1, 6) + M for i in range(self.num_slices)]
        self.cc_mean_transforms = nn.ModuleList(SliceTransform(c, slice_width) for c in cc_in)
        self.cc_scale_transforms = nn.ModuleList(SliceTransform(c, slice_width) for c in cc_in)
        self.lrp_transforms = nn.ModuleList(SliceTransform(c, slice_width) for c in lrp_in)

    # ------------------------------------------------------------------ slice-loop interface

    def hyper_synthesis(self, z_hat: Tensor) -> tuple[Tensor, Tensor]:
        return self.h_z_s2(z_hat), self.h_z_s1(z_hat)

    def slice_parameters(self, index: int, latent_means: Tensor, latent_scales: Tensor,
                         support_slices: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        query = torch.cat([latent_scales, latent_means, *support_slices], dim=1)
        dictionary = self.dt.repeat(query.shape[0], 1, 1)
        support = torch.cat([query, self.dt_cross_attention[index](query, dictionary)], dim=1)
        mu = self.cc_mean_transforms[index](support)
        scale = self.cc_scale_transforms[index](support)
        return mu, scale, support
