"""MLIC++ (JiangWeibeta/MLIC, ``MLIC++/models/mlicpp.py: MLICPlusPlus``) re-implemented.

Ten channel slices of ``M / slice_num`` channels, each coded in two checkerboard passes: the
anchors from the hyperprior (slice 0) or from the hyperprior, a global inter-slice context and a
channel context of the earlier slices (slices 1..9); then the non-anchors, which add a local
window-attention context of the decoded anchors and (slices 1..9) a global intra-slice context.
Each pass is refined by its own latent residual prediction.

State-dict keys, shapes and order equal an upstream ``MLICPlusPlus(config)`` checkpoint. The
constructor takes upstream's configuration fields as keywords (``N``, ``M``, ``slice_num``,
``context_window``); ``config`` may be given instead, as an object or a mapping with those fields.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from compressai.ans import BufferedRansEncoder, RansDecoder
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.models import CompressionModel
from compressai.models.base import get_scale_table
from compressai.models.utils import update_registered_buffers
from torch import Tensor, nn

from ..blocks.mlic_blocks import (
    AnalysisTransform,
    ChannelContext,
    EntropyParameters,
    HyperAnalysis,
    HyperSynthesis,
    LatentResidualPrediction,
    LinearGlobalInterContext,
    LinearGlobalIntraContext,
    LocalContext,
    SynthesisTransform,
    anchor_part,
    nonanchor_part,
    squeeze_anchor,
    squeeze_nonanchor,
    unsqueeze_anchor,
    unsqueeze_nonanchor,
)
from .base import GAUSSIAN_TABLE_BUFFERS, check_upstream_input_size, ste_round

__all__ = ["HYPER_STRIDE", "INPUT_MINIMUM", "INPUT_MULTIPLE", "MLICPlusPlus"]

#: /16 analysis and /4 hyper-analysis; the checkerboard needs even latent sizes (test.py pads to 64)
INPUT_MULTIPLE = 64
INPUT_MINIMUM = 64
#: y is 4x the hyper-latent in each direction (decompress assumes it)
HYPER_STRIDE = 4
#: heads of the attention over a 32-channel slice (upstream divides every width by 32)
HEAD_WIDTH = 32


def _config_value(config: Any, name: str) -> Any:
    return config[name] if isinstance(config, Mapping) else getattr(config, name)


class MLICPlusPlus(CompressionModel):
    """Upstream ``MLICPlusPlus`` (N=192, M=320, slice_num=10, context_window=5 as published)."""

    def __init__(self, config: Any = None, *, N: int = 192, M: int = 320, slice_num: int = 10,
                 context_window: int = 5, act: Any = None) -> None:
        super().__init__()
        if config is not None:
            N, M = _config_value(config, "N"), _config_value(config, "M")
            slice_num, context_window = _config_value(config, "slice_num"), _config_value(config, "context_window")
        slice_ch = M // slice_num
        if slice_ch * slice_num != M:
            raise ValueError(f"M={M} is not divisible into {slice_num} slices")
        self.N, self.M, self.slice_num, self.slice_ch = int(N), int(M), int(slice_num), int(slice_ch)
        # Upstream quirks reproduced on purpose: ``act`` is part of the configuration but no module
        # uses it, and ``context_window`` is stored but LocalContext is built with its default window (5).
        self.context_window = int(context_window)
        # registration order = upstream's key order (CompressionModel(N) registers the bottleneck first)
        self.entropy_bottleneck = EntropyBottleneck(N)
        self.g_a = AnalysisTransform(N=N, M=M)
        self.g_s = SynthesisTransform(N=N, M=M)
        self.h_a = HyperAnalysis(M=M, N=N)
        self.h_s = HyperSynthesis(M=M, N=N)
        self.gaussian_conditional = GaussianConditional(None)
        c = slice_ch
        self.local_context = nn.ModuleList(LocalContext(dim=c) for _ in range(slice_num))
        self.channel_context = nn.ModuleList(
            ChannelContext(c * i, c) if i else None for i in range(slice_num))
        self.global_inter_context = nn.ModuleList(
            LinearGlobalInterContext(c * i, c * 2, c * i // HEAD_WIDTH) if i else None for i in range(slice_num))
        self.global_intra_context = nn.ModuleList(
            LinearGlobalIntraContext(c) if i else None for i in range(slice_num))
        self.entropy_parameters_anchor = nn.ModuleList(
            EntropyParameters(M * 2 + (c * 6 if i else 0), c * 2) for i in range(slice_num))
        self.entropy_parameters_nonanchor = nn.ModuleList(
            EntropyParameters(M * 2 + (c * 10 if i else c * 2), c * 2) for i in range(slice_num))
        self.lrp_anchor = nn.ModuleList(
            LatentResidualPrediction(M + (i + 1) * c, c) for i in range(slice_num))
        self.lrp_nonanchor = nn.ModuleList(
            LatentResidualPrediction(M + (i + 1) * c, c) for i in range(slice_num))

    # ------------------------------------------------------------------ what the verifier reads

    def hyper_analysis(self, y: Tensor) -> Tensor:
        return self.h_a(y)

    @property
    def groups(self) -> list[int]:
        """The slice widths."""
        return [self.slice_ch] * self.slice_num

    def check_input_size(self, x: Tensor) -> None:
        """Refuse sizes upstream cannot process (y must be 4x the hyper-latent, with even sides)."""
        check_upstream_input_size(x, multiple=INPUT_MULTIPLE, minimum=INPUT_MINIMUM)

    # ------------------------------------------------------------------ the slice loop

    def _slices(self, hyper_params: Tensor, y_slices: Sequence[Tensor] | None, code_anchor, code_nonanchor,
                record=None) -> list[Tensor]:
        """Both checkerboard passes of every slice. ``code_*(k, y_part, scales, means)`` return the
        rounded pass (at its own positions, zero elsewhere); ``record(k, scales, means)`` sees the
        merged entropy parameters of slice ``k``."""
        _, hyper_means = hyper_params.chunk(2, 1)  # scales first, then means
        decoded: list[Tensor] = []
        for k in range(self.slice_num):
            y_anchor = y_nonanchor = None
            if y_slices is not None:
                y_anchor, y_nonanchor = anchor_part(y_slices[k]), nonanchor_part(y_slices[k])
            if k == 0:
                anchor_input = hyper_params
            else:
                support = torch.cat(decoded, dim=1)
                global_inter = self.global_inter_context[k](support)
                channel = self.channel_context[k](support)
                anchor_input = torch.cat([global_inter, channel, hyper_params], dim=1)
            scales_a, means_a = self.entropy_parameters_anchor[k](anchor_input).chunk(2, 1)
            scales_a, means_a = anchor_part(scales_a), anchor_part(means_a)
            anchor = code_anchor(k, y_anchor, scales_a, means_a)
            lrp = self.lrp_anchor[k](torch.cat([hyper_means, *decoded, anchor], dim=1))
            anchor = anchor + anchor_part(lrp)
            local = self.local_context[k](anchor)
            if k == 0:
                nonanchor_input = torch.cat([local, hyper_params], dim=1)
            else:
                global_intra = self.global_intra_context[k](decoded[-1], anchor)
                nonanchor_input = torch.cat([local, global_intra, global_inter, channel, hyper_params], dim=1)
            scales_n, means_n = self.entropy_parameters_nonanchor[k](nonanchor_input).chunk(2, 1)
            scales_n, means_n = nonanchor_part(scales_n), nonanchor_part(means_n)
            if record is not None:
                record(k, scales_a + scales_n, means_a + means_n)
            nonanchor = code_nonanchor(k, y_nonanchor, scales_n, means_n)
            y_hat = anchor + nonanchor
            lrp = self.lrp_nonanchor[k](torch.cat([hyper_means, *decoded, y_hat], dim=1))
            decoded.append(y_hat + nonanchor_part(lrp))
        return decoded

    def forward(self, x: Tensor, return_latents: bool = False) -> dict[str, Any]:
        """Upstream's outputs (likelihoods named ``y``/``z``) plus ``para`` (``means``, ``scales``, ``y``
        in slice order, each slice's checkerboard merge); ``return_latents`` adds ``{"y_hat", "z_hat"}``."""
        self.check_input_size(x)
        y = self.g_a(x)
        z = self.h_a(y)
        _, z_likelihoods = self.entropy_bottleneck(z)
        # Upstream quirk reproduced on purpose: the bottleneck's own output is discarded and z is
        # rounded around its medians with a straight-through estimator.
        medians = self.entropy_bottleneck._get_medians()
        z_hat = ste_round(z - medians) + medians
        hyper_params = self.h_s(z_hat)
        y_slices = y.chunk(self.slice_num, dim=1)
        means, scales, likelihoods = [], [], []

        def record(k: int, slice_scales: Tensor, slice_means: Tensor) -> None:
            # one Gaussian call per slice with the merged anchor / non-anchor parameters
            means.append(slice_means)
            scales.append(slice_scales)
            likelihoods.append(self.gaussian_conditional(y_slices[k], slice_scales, slice_means)[1])

        def rounded(k: int, y_part: Tensor, _scales: Tensor, mu: Tensor) -> Tensor:
            return ste_round(y_part - mu) + mu

        y_hat = torch.cat(self._slices(hyper_params, y_slices, rounded, rounded, record), dim=1)
        out: dict[str, Any] = {
            "x_hat": self.g_s(y_hat),
            "likelihoods": {"y": torch.cat(likelihoods, dim=1), "z": z_likelihoods},
            "para": {"means": torch.cat(means, dim=1), "scales": torch.cat(scales, dim=1), "y": y},
        }
        if return_latents:
            out["latents"] = {"y_hat": y_hat, "z_hat": z_hat}
        return out

    def _tables(self) -> tuple[list, list, list]:
        gc = self.gaussian_conditional
        return gc.quantized_cdf.tolist(), gc.cdf_length.reshape(-1).int().tolist(), gc.offset.reshape(-1).int().tolist()

    @staticmethod
    def _synchronize() -> None:
        # Upstream quirk: compress/decompress call torch.cuda.synchronize() for their timing, which
        # fails on a machine without CUDA; we only synchronize where there is a device to wait for.
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def compress(self, x: Tensor) -> dict[str, Any]:
        """One string per image for z and ONE rANS stream for all slices of y (per slice: the
        anchors, then the non-anchors, each packed to H x W/2); ``cost_time`` as upstream."""
        self.check_input_size(x)
        self._synchronize()
        start = time.time()
        y = self.g_a(x)
        z = self.h_a(y)
        z_strings = self.entropy_bottleneck.compress(z)
        z_hat = self.entropy_bottleneck.decompress(z_strings, z.size()[-2:])
        symbols: list[int] = []
        indexes: list[int] = []
        gc = self.gaussian_conditional

        def coder(squeeze, unsqueeze):
            def code(k: int, y_part: Tensor, part_scales: Tensor, mu: Tensor) -> Tensor:
                packed_mu = squeeze(mu)
                packed_symbols = gc.quantize(squeeze(y_part), "symbols", packed_mu)
                symbols.extend(packed_symbols.reshape(-1).tolist())
                indexes.extend(gc.build_indexes(squeeze(part_scales)).reshape(-1).tolist())
                return unsqueeze(packed_symbols + packed_mu)
            return code

        self._slices(self.h_s(z_hat), y.chunk(self.slice_num, dim=1),
                     coder(squeeze_anchor, unsqueeze_anchor), coder(squeeze_nonanchor, unsqueeze_nonanchor))
        encoder = BufferedRansEncoder()
        encoder.encode_with_indexes(symbols, indexes, *self._tables())
        y_string = encoder.flush()
        self._synchronize()
        return {"strings": [[y_string], z_strings], "shape": z.size()[-2:], "cost_time": time.time() - start}

    def decompress(self, strings: Sequence[Sequence[bytes]], shape: Sequence[int]) -> dict[str, Any]:
        """Decode one image (upstream supports batch 1 only). Upstream does not clamp, nor do we."""
        self._synchronize()
        start = time.time()
        z_hat = self.entropy_bottleneck.decompress(strings[1], shape)
        tables = self._tables()
        decoder = RansDecoder()
        decoder.set_stream(strings[0][0])
        gc = self.gaussian_conditional

        def decoder_for(squeeze, unsqueeze):
            def code(k: int, _y: Tensor | None, part_scales: Tensor, mu: Tensor) -> Tensor:
                packed_scales, packed_mu = squeeze(part_scales), squeeze(mu)
                values = decoder.decode_stream(gc.build_indexes(packed_scales).reshape(-1).tolist(), *tables)
                packed = torch.Tensor(values).reshape(packed_scales.shape).to(mu.device) + packed_mu
                return unsqueeze(packed)
            return code

        decoded = self._slices(self.h_s(z_hat), None, decoder_for(squeeze_anchor, unsqueeze_anchor),
                               decoder_for(squeeze_nonanchor, unsqueeze_nonanchor))
        x_hat = self.g_s(torch.cat(decoded, dim=1))
        self._synchronize()
        return {"x_hat": x_hat, "cost_time": time.time() - start}

    # ------------------------------------------------------------------ tables and loading

    def update(self, scale_table: Tensor | None = None, force: bool = False) -> bool:
        """As upstream: the Gaussian's table first, then every entropy model's CDFs."""
        if scale_table is None:
            scale_table = get_scale_table()
        updated = self.gaussian_conditional.update_scale_table(scale_table, force=force)
        updated |= super().update(force=force)
        return updated

    def load_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True):
        """Upstream's loader: strict, the Gaussian's four table entries must be present (empty or
        filled, as published files carry them after ``update(force=True)``)."""
        missing = [f"gaussian_conditional.{n}" for n in GAUSSIAN_TABLE_BUFFERS
                   if f"gaussian_conditional.{n}" not in state_dict]
        if missing:
            raise KeyError(f"state dict lacks the GaussianConditional table entries {missing}")
        update_registered_buffers(self.gaussian_conditional, "gaussian_conditional",
                                  list(GAUSSIAN_TABLE_BUFFERS), state_dict)
        return super().load_state_dict(state_dict, strict=strict)
