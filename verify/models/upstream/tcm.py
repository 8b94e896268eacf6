"""Reference re-implementations of LIC_TCM's ``TCM`` and AuxT's ``TCM_AUXT``.

Key-identical to the upstream checkpoints (names, shapes, dtypes and state-dict order) and
following the upstream op order, so that a rebuilt upstream checkpoint gives the authors' outputs
and bitstreams. The entropy-coding loop lives in :class:`~.base.UpstreamSliceModel`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.layers import ResidualBlockUpsample, ResidualBlockWithStride, conv3x3, subpel_conv3x3
from torch import Tensor, nn

from ..blocks.slice_transforms import SliceTransform
from ..blocks.tcm_blocks import ConvTransBlock, SWAtten
from ..blocks.wavelets import WLS, iWLS
from .base import UpstreamSliceModel

__all__ = ["TCM", "TCMAuxT"]

#: Channel count the TCM code hard-codes for the latent in the hyper and slice paths (not ``M``).
LATENT_CHANNELS = 320
HYPER_CHANNELS = 192
HYPER_HEAD_DIM = 32
HYPER_WINDOW = 4
SLICE_ATTENTION_HEAD_DIM = 16
SLICE_ATTENTION_WIDTH = 128


def _alternating_blocks(
    count: int, half_width: int, head_dim: int, window_size: int, drop_paths: Sequence[float]
) -> list[nn.Module]:
    """``count`` ConvTransBlocks alternating W / SW windows."""
    return [
        ConvTransBlock(half_width, half_width, head_dim, window_size, drop_paths[i], "W" if i % 2 == 0 else "SW")
        for i in range(count)
    ]


class TCM(UpstreamSliceModel):
    """LIC_TCM's mixed transformer-CNN model (same signature and defaults as upstream)."""

    #: LIC_TCM passes ``entropy_bottleneck_channels`` to compressai, which registers the bottleneck
    #: before everything else; AuxT's copy of TCM does not (see :class:`TCMAuxT`).
    entropy_bottleneck_first = True

    def __init__(
        self,
        config: Sequence[int] = (2, 2, 2, 2, 2, 2),
        head_dim: Sequence[int] = (8, 16, 32, 32, 16, 8),
        drop_path_rate: float = 0,
        N: int = 128,
        M: int = 320,
        num_slices: int = 5,
        max_support_slices: int = 5,
        **kwargs,
    ) -> None:
        super().__init__()
        if self.entropy_bottleneck_first:
            self.entropy_bottleneck = EntropyBottleneck(HYPER_CHANNELS)
        self.config = list(config)
        self.head_dim = list(head_dim)
        self.window_size = 8
        self.num_slices = num_slices
        self.max_support_slices = max_support_slices
        self.M = M
        width = 2 * N
        rates = torch.linspace(0, drop_path_rate, sum(config), device="cpu").tolist()  # also under a meta device
        down_offsets = [sum(config[:k]) for k in range(3)]
        # upstream quirk reproduced on purpose: all three decoder stages reuse the same drop-path offset
        up_offset = sum(config[:3])

        def stage(k: int, offset: int) -> list[nn.Module]:
            return _alternating_blocks(config[k], N, self.head_dim[k], self.window_size, rates[offset:])

        self.g_a = nn.Sequential(
            ResidualBlockWithStride(3, width, 2),
            *stage(0, down_offsets[0]),
            ResidualBlockWithStride(width, width, stride=2),
            *stage(1, down_offsets[1]),
            ResidualBlockWithStride(width, width, stride=2),
            *stage(2, down_offsets[2]),
            conv3x3(width, M, stride=2),
        )
        self.g_s = nn.Sequential(
            ResidualBlockUpsample(M, width, 2),
            *stage(3, up_offset),
            ResidualBlockUpsample(width, width, 2),
            *stage(4, up_offset),
            ResidualBlockUpsample(width, width, 2),
            *stage(5, up_offset),
            subpel_conv3x3(width, 3, 2),
        )
        no_drop = [0.0] * max(config)
        self.h_a = nn.Sequential(
            ResidualBlockWithStride(LATENT_CHANNELS, width, 2),
            *_alternating_blocks(config[0], N, HYPER_HEAD_DIM, HYPER_WINDOW, no_drop),
            conv3x3(width, HYPER_CHANNELS, stride=2),
        )
        self.h_mean_s = self._hyper_synthesis_stack(N, config[3], no_drop)
        self.h_scale_s = self._hyper_synthesis_stack(N, config[3], no_drop)

        slice_width = LATENT_CHANNELS // num_slices
        support_width = [LATENT_CHANNELS + slice_width * min(i, 5) for i in range(num_slices)]
        lrp_width = [LATENT_CHANNELS + slice_width * min(i + 1, 6) for i in range(num_slices)]
        self.atten_mean = nn.ModuleList(self._slice_attention(c) for c in support_width)
        self.atten_scale = nn.ModuleList(self._slice_attention(c) for c in support_width)
        self.cc_mean_transforms = nn.ModuleList(SliceTransform(c, slice_width) for c in support_width)
        self.cc_scale_transforms = nn.ModuleList(SliceTransform(c, slice_width) for c in support_width)
        self.lrp_transforms = nn.ModuleList(SliceTransform(c, slice_width) for c in lrp_width)

        if not self.entropy_bottleneck_first:
            self.entropy_bottleneck = EntropyBottleneck(HYPER_CHANNELS)
        self.gaussian_conditional = GaussianConditional(None)

    @staticmethod
    def _hyper_synthesis_stack(N: int, blocks: int, drop_paths: Sequence[float]) -> nn.Sequential:
        return nn.Sequential(
            ResidualBlockUpsample(HYPER_CHANNELS, 2 * N, 2),
            *_alternating_blocks(blocks, N, HYPER_HEAD_DIM, HYPER_WINDOW, drop_paths),
            subpel_conv3x3(2 * N, LATENT_CHANNELS, 2),
        )

    def _slice_attention(self, channels: int) -> nn.Sequential:
        attention = SWAtten(
            channels, channels, SLICE_ATTENTION_HEAD_DIM, self.window_size, 0, inter_dim=SLICE_ATTENTION_WIDTH
        )
        return nn.Sequential(attention)

    # ------------------------------------------------------------------ slice-model interface

    def hyper_synthesis(self, z_hat: Tensor) -> tuple[Tensor, Tensor]:
        latent_scales = self.h_scale_s(z_hat)
        latent_means = self.h_mean_s(z_hat)
        return latent_means, latent_scales

    def slice_parameters(
        self, index: int, latent_means: Tensor, latent_scales: Tensor, support_slices: list[Tensor]
    ) -> tuple[Tensor, Tensor, Tensor]:
        mean_support = self.atten_mean[index](torch.cat([latent_means, *support_slices], dim=1))
        mu = self.cc_mean_transforms[index](mean_support)
        scale_support = self.atten_scale[index](torch.cat([latent_scales, *support_slices], dim=1))
        scale = self.cc_scale_transforms[index](scale_support)
        return mu, scale, mean_support


class TCMAuxT(TCM):
    """AuxT's ``TCM_AUXT``: TCM plus wavelet auxiliary branches added into g_a and g_s."""

    # upstream quirk reproduced on purpose: AuxT's TCM registers the bottleneck just before
    # gaussian_conditional, so its checkpoints list those keys late
    entropy_bottleneck_first = False

    #: g_a / g_s indices after which the next auxiliary stage's output is added.
    ENCODER_MERGES = (0, 3, 6, 9)
    DECODER_MERGES = (2, 5, 8, 9)

    def __init__(
        self,
        config: Sequence[int] = (2, 2, 2, 2, 2, 2),
        head_dim: Sequence[int] = (8, 16, 32, 32, 16, 8),
        drop_path_rate: float = 0,
        N: int = 64,
        M: int = 320,
        num_slices: int = 5,
        max_support_slices: int = 5,
        **kwargs,
    ) -> None:
        super().__init__(
            config=config,
            head_dim=head_dim,
            drop_path_rate=drop_path_rate,
            N=N,
            M=M,
            num_slices=num_slices,
            max_support_slices=max_support_slices,
            **kwargs,
        )
        width = 2 * N
        self.AuxT_enc = nn.Sequential(WLS(3, width), WLS(width, width), WLS(width, width), WLS(width, M))
        self.AuxT_dec = nn.Sequential(iWLS(M, width), iWLS(width, width), iWLS(width, width), iWLS(width, 3))

    def ortho_loss(self) -> Tensor:
        """Sum of the OLP orthogonality penalties (a training regulariser)."""
        return sum(stage.OLP.ortho_loss() for stage in (*self.AuxT_enc, *self.AuxT_dec))

    @staticmethod
    def _with_auxiliary(x: Tensor, main: nn.Sequential, aux: nn.Sequential, merges: Sequence[int]) -> Tensor:
        """Run ``main`` layer by layer, adding the chained ``aux`` stages after the merge indices."""
        main_path, aux_path = x, x
        stages = iter(aux)
        for index, layer in enumerate(main):
            main_path = layer(main_path)
            if index in merges:
                aux_path = next(stages)(aux_path)
                main_path = main_path + aux_path
        return main_path

    def analysis(self, x: Tensor) -> Tensor:
        return self._with_auxiliary(x, self.g_a, self.AuxT_enc, self.ENCODER_MERGES)

    def synthesis(self, y_hat: Tensor) -> Tensor:
        return self._with_auxiliary(y_hat, self.g_s, self.AuxT_dec, self.DECODER_MERGES)
