"""``MLICPlusPlus`` in CompressAI master's layout, computing like the authors' MLIC++ (JiangWeibeta/MLIC).

Keys, shapes, registration order and constructor are those of master's
``compressai.models.mlic.MLICPlusPlus`` (see ``tests/data/targets/mlicpp.json``)::

    latent_codec.h_a.reduction.* / latent_codec.h_s.increase.*     hyper transforms
    latent_codec.y.channel_context.y{k}.channel_part.*              channel context (k >= 1)
    latent_codec.y.channel_context.y{k}.global_inter_part.*         global inter-slice context (k >= 1)
    latent_codec.y.latent_codec.y{k}.entropy_parameters_{anchor,nonanchor}.*
    latent_codec.y.latent_codec.y{k}.spatial_context_nonanchor.*    local window attention
    latent_codec.y.latent_codec.y{k}.intra_channel_context_nonanchor.*  global intra-slice context (k >= 1)
    latent_codec.y.latent_codec.y{k}.lrp_{anchor,nonanchor}.*
    latent_codec.y.latent_codec.y{k}.y.gaussian_conditional.*       one GaussianConditional per slice
    latent_codec.z.entropy_bottleneck.*

The context head ``channel_context.y{k}`` aggregates the prior of slice ``k`` (global inter and
channel context of the earlier slices, then the hyperprior); the leaf ``latent_codec.y{k}`` codes
the anchors, then the non-anchors, each refined by its own LRP, with upstream's arithmetic (the
forward is bitwise upstream's, as master's is).

Bitstream: master's, one rANS stream per checkerboard pass (20 for y, anchors and non-anchors
apart, plus z) where upstream writes one stream for everything. Neither upstream nor master clamps
the decoded image; nor do we.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.latent_codecs import GaussianConditionalLatentCodec, LatentCodec
from compressai.models import CompressionModel
from compressai.ops import quantize_ste
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
from ..upstream.base import check_upstream_input_size
from ..upstream.mlic import HEAD_WIDTH, HYPER_STRIDE, INPUT_MINIMUM, INPUT_MULTIPLE
from .compat import FromStateDict, IncompatibleStateDictError, key_shape
from .latent_codecs import SideContextSliceCodec, SliceHyperpriorCodec, SteBottleneckLatentCodec, compressed

__all__ = ["CheckerboardSliceCodec", "MLICPlusPlus", "MLICPriorAggregation", "MLICSliceCodec", "SliceContext"]

#: the two checkerboard passes: which positions each codes, and how they are packed for coding
PASSES = (
    ("anchor", anchor_part, squeeze_anchor, unsqueeze_anchor),
    ("nonanchor", nonanchor_part, squeeze_nonanchor, unsqueeze_nonanchor),
)


@dataclass
class SliceContext:
    """What the leaf of slice ``k`` is given: the anchors' input (``prior``: global inter and channel
    context, then the hyperprior), the hyperprior's means and the decoded earlier slices."""

    prior: Tensor
    hyper_means: Tensor
    support: list[Tensor]


class MLICPriorAggregation(nn.Module):
    """Context head of slice ``k``: ``cat(global_inter(support), channel(support), side_params)``
    (the hyperprior alone for slice 0, which has no support and no modules)."""

    def __init__(self, M: int, slice_ch: int, slice_index: int) -> None:
        super().__init__()
        self.latent_channels = M
        support = slice_ch * slice_index
        self.channel_part = ChannelContext(support, slice_ch) if slice_index else None
        self.global_inter_part = (LinearGlobalInterContext(support, slice_ch * 2, support // HEAD_WIDTH)
                                  if slice_index else None)

    def forward(self, side_params: Tensor, support: Sequence[Tensor]) -> SliceContext:
        # h_s puts the scales first, then the means (upstream's chunk order)
        hyper_means = side_params.chunk(2, 1)[1]
        if self.channel_part is None or not support:
            return SliceContext(side_params, hyper_means, list(support))
        joined = torch.cat(list(support), dim=1)
        prior = torch.cat([self.global_inter_part(joined), self.channel_part(joined), side_params], dim=1)
        return SliceContext(prior, hyper_means, list(support))


class CheckerboardSliceCodec(LatentCodec):
    """One slice in two checkerboard passes with separate heads and LRPs (master's leaf layout).

    Anchors: ``entropy_parameters_anchor(prior)``. Non-anchors: ``entropy_parameters_nonanchor(cat(
    local(anchors), [intra(previous slice, anchors)], prior))``. Each pass rounds around its means
    and adds ``lrp(cat(hyper_means, *support, decoded so far))`` at its own positions.
    """

    def __init__(self, M: int, slice_ch: int, slice_index: int, window: int) -> None:
        super().__init__()
        k, c = slice_index, slice_ch
        self.entropy_parameters_anchor = EntropyParameters(M * 2 + (c * 6 if k else 0), c * 2)
        self.entropy_parameters_nonanchor = EntropyParameters(M * 2 + (c * 10 if k else c * 2), c * 2)
        self.spatial_context_nonanchor = LocalContext(dim=c, window_size=window)
        self.intra_channel_context_nonanchor = LinearGlobalIntraContext(c) if k else None
        self.lrp_anchor = LatentResidualPrediction(M + (k + 1) * c, c)
        self.lrp_nonanchor = LatentResidualPrediction(M + (k + 1) * c, c)
        self.y = GaussianConditionalLatentCodec(gaussian_conditional=GaussianConditional(None), quantizer="ste")

    @property
    def gaussian_conditional(self) -> GaussianConditional:
        """The slice's Gaussian conditional (kept under ``y.``, master's place)."""
        return self.y.gaussian_conditional

    def _passes(self, ctx: SliceContext, code) -> tuple[Tensor, Tensor, Tensor]:
        """Run both passes; ``code(name, mask, squeeze, unsqueeze, scales, means)`` returns the
        rounded pass at its own positions. Returns ``(y_hat, scales, means)`` (merged)."""
        lrp_input = [ctx.hyper_means, *ctx.support]
        (_, a_mask, a_squeeze, a_unsqueeze), (_, n_mask, n_squeeze, n_unsqueeze) = PASSES
        scales_a, means_a = self.entropy_parameters_anchor(ctx.prior).chunk(2, 1)
        scales_a, means_a = a_mask(scales_a), a_mask(means_a)
        anchor = code("anchor", a_mask, a_squeeze, a_unsqueeze, scales_a, means_a)
        anchor = anchor + a_mask(self.lrp_anchor(torch.cat([*lrp_input, anchor], dim=1)))
        parts = [self.spatial_context_nonanchor(anchor)]
        if self.intra_channel_context_nonanchor is not None:
            parts.append(self.intra_channel_context_nonanchor(ctx.support[-1], anchor))
        scales_n, means_n = self.entropy_parameters_nonanchor(torch.cat([*parts, ctx.prior], dim=1)).chunk(2, 1)
        scales_n, means_n = n_mask(scales_n), n_mask(means_n)
        nonanchor = code("nonanchor", n_mask, n_squeeze, n_unsqueeze, scales_n, means_n)
        y_hat = anchor + nonanchor
        y_hat = y_hat + n_mask(self.lrp_nonanchor(torch.cat([*lrp_input, y_hat], dim=1)))
        return y_hat, scales_a + scales_n, means_a + means_n

    def forward(self, y: Tensor, ctx: SliceContext) -> dict[str, Any]:
        def rounded(name, mask, squeeze, unsqueeze, scales, means):
            return quantize_ste(mask(y) - means) + means

        y_hat, scales, means = self._passes(ctx, rounded)
        _, likelihoods = self.gaussian_conditional(y, scales, means=means)
        return {"likelihoods": {"y": likelihoods}, "y_hat": y_hat, "params": {"means": means, "scales": scales}}

    def compress(self, y: Tensor, ctx: SliceContext) -> dict[str, Any]:
        gc = self.gaussian_conditional
        strings, symbols, indexes = [], [], []

        def encode(name, mask, squeeze, unsqueeze, scales, means):
            packed_means, packed_indexes = squeeze(means), gc.build_indexes(squeeze(scales))
            packed_y = squeeze(mask(y))
            pass_strings = gc.compress(packed_y, packed_indexes, packed_means)
            strings.append(pass_strings)
            symbols.append(unsqueeze(gc.quantize(packed_y, "symbols", packed_means)))
            indexes.append(unsqueeze(packed_indexes))
            # decode what was just written, so the encoder's context is the decoder's exactly
            return unsqueeze(gc.decompress(pass_strings, packed_indexes, means=packed_means))

        y_hat, _, _ = self._passes(ctx, encode)
        return {"strings": strings, "shape": tuple(y.shape[1:]), "y_hat": y_hat,
                "symbols": symbols[0] + symbols[1], "indexes": indexes[0] + indexes[1]}

    def decompress(self, strings: Sequence[Sequence[bytes]], shape: Sequence[int], ctx: SliceContext,
                   **kwargs: Any) -> dict[str, Any]:
        if len(strings) != len(PASSES):
            raise ValueError(f"a checkerboard slice needs {len(PASSES)} string lists, got {len(strings)}")
        gc = self.gaussian_conditional
        channels, height, width = shape
        pending = list(strings)

        def decode(name, mask, squeeze, unsqueeze, scales, means):
            packed_indexes = gc.build_indexes(squeeze(scales))
            if tuple(packed_indexes.shape[1:]) != (channels, height, width // 2):
                raise ValueError(f"slice shape {tuple(shape)} does not match its context")
            return unsqueeze(gc.decompress(pending.pop(0), packed_indexes, means=squeeze(means)))

        y_hat, _, _ = self._passes(ctx, decode)
        return {"y_hat": y_hat}


class MLICSliceCodec(SideContextSliceCodec):
    """The slices of MLIC++: head ``y{k}`` gets the hyperprior and the decoded earlier slices
    (not concatenated), leaf ``y{k}`` codes in two passes, so each slice writes two streams."""

    def context_params(self, k: int, side_params: Tensor, decoded: Sequence[Tensor]) -> SliceContext:
        return self.channel_context[f"y{k}"](side_params, [decoded[i] for i in self.support_slices[k]])

    def decompress(self, strings: Sequence[Sequence[bytes]], shape: Sequence[int], side_params: Tensor,
                   **kwargs: Any) -> dict[str, Any]:
        per_slice = len(PASSES)
        if len(strings) != per_slice * self.num_slices:
            raise ValueError(f"expected {per_slice * self.num_slices} string lists (anchors and non-anchors "
                             f"of {self.num_slices} slices), got {len(strings)}")
        channels, *spatial = shape
        if channels != sum(self.groups):
            raise ValueError(f"shape {tuple(shape)} does not match {sum(self.groups)} latent channels")
        results = self._slice_loop(side_params, lambda k, ctx: self.latent_codec[f"y{k}"].decompress(
            strings[per_slice * k: per_slice * (k + 1)], (self.groups[k], *spatial), ctx))
        return {"y_hat": torch.cat([r["y_hat"] for r in results], dim=1)}


class MLICPlusPlus(FromStateDict, CompressionModel):
    """MLIC++'s image codec: GDN residual transforms, a hyperprior with multi-reference checkerboard slices."""

    #: Family name in error messages (as :func:`.compat.guess_layout` spells it).
    family = "MLIC++"
    latent_codec: SliceHyperpriorCodec

    def __init__(self, N: int = 192, M: int = 320, slice_num: int = 10, context_window: int = 5,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if slice_num <= 0 or M % slice_num:
            raise ValueError(f"M={M} is not divisible into {slice_num} slices")
        if context_window % 2 == 0:
            raise ValueError(f"context_window must be odd, got {context_window}")
        self.N, self.M, self.slice_num, self.context_window = int(N), int(M), int(slice_num), int(context_window)
        self.slice_ch = self.M // self.slice_num
        self.g_a = AnalysisTransform(N=self.N, M=self.M)
        self.g_s = SynthesisTransform(N=self.N, M=self.M)
        c = self.slice_ch
        slices = MLICSliceCodec(
            channel_context={f"y{k}": MLICPriorAggregation(self.M, c, k) for k in range(self.slice_num)},
            latent_codec={f"y{k}": CheckerboardSliceCodec(self.M, c, k, self.context_window)
                          for k in range(self.slice_num)},
            groups=[c] * self.slice_num,
        )
        self.latent_codec = SliceHyperpriorCodec(
            h_a=HyperAnalysis(M=self.M, N=self.N),
            h_s=HyperSynthesis(M=self.M, N=self.N),
            y=slices,
            z=SteBottleneckLatentCodec(EntropyBottleneck(self.N)),
        )

    # ------------------------------------------------------------------ configuration

    def config_kwargs(self) -> dict[str, Any]:
        """The resolved constructor arguments (master's names)."""
        return {"N": self.N, "M": self.M, "slice_num": self.slice_num, "context_window": self.context_window}

    def describe(self) -> str:
        """Short ``MLICPlusPlus(...)`` form of the configuration, for messages."""
        return (f"MLICPlusPlus(N={self.N}, M={self.M}, slice_num={self.slice_num}, "
                f"context_window={self.context_window})")

    # ------------------------------------------------------------------ CompressAI API

    def check_input_size(self, x: Tensor) -> None:
        """Refuse sizes the authors' model cannot process (y 4x the hyper-latent, even latent sides)."""
        check_upstream_input_size(x, multiple=INPUT_MULTIPLE, minimum=INPUT_MINIMUM)

    def forward(self, x: Tensor, return_params: bool = False) -> dict[str, Any]:
        """``{"x_hat", "likelihoods": {"y", "z"}}``; ``return_params`` adds ``"para": {"means",
        "scales", "y"}`` (slice order, each slice's anchor / non-anchor parameters merged)."""
        self.check_input_size(x)
        y = self.g_a(x)
        coded = self.latent_codec(y, return_params=return_params)
        out: dict[str, Any] = {"x_hat": self.g_s(coded["y_hat"]), "likelihoods": coded["likelihoods"]}
        if return_params:
            out["para"] = {**coded["params"], "y": y}
        return out

    def compress(self, x: Tensor, return_symbols: bool = False) -> dict[str, Any]:
        """Master's bitstream: ``strings = [y0 anchors, y0 non-anchors, ..., y9 non-anchors, z]``,
        ``shape = {"y": (M, H, W), "z": (H_z, W_z)}``; ``return_symbols`` adds the coded integers
        and scale indexes per slice (both passes in the unpacked layout)."""
        self.check_input_size(x)
        return compressed(self.latent_codec.compress(self.g_a(x), return_symbols=return_symbols),
                          return_symbols)

    def decompress(self, strings: Sequence[Sequence[bytes]], shape: Mapping[str, Sequence[int]],
                   **kwargs: Any) -> dict[str, Tensor]:
        """Inverse of :meth:`compress`; not clamped (neither upstream nor master clamps)."""
        z_size = tuple(shape["z"])
        expected = (self.M, z_size[0] * HYPER_STRIDE, z_size[1] * HYPER_STRIDE)
        if tuple(shape["y"]) != expected:
            raise ValueError(f"shape {dict(shape)} is not MLIC++'s: y must be {HYPER_STRIDE}x the hyper-latent")
        y_hat = self.latent_codec.decompress(strings, shape)["y_hat"]
        return {"x_hat": self.g_s(y_hat)}

    # ------------------------------------------------------------------ loading

    @classmethod
    def infer_kwargs(cls, state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
        """Constructor arguments read off keys and shapes."""
        shape = key_shape(state_dict, cls.family)

        leaves = sorted({int(m[1]) for k in state_dict if (m := re.fullmatch(
            r"latent_codec\.y\.latent_codec\.y(\d+)\.entropy_parameters_anchor\.fusion\.0\.weight", k))})
        if not leaves or leaves != list(range(len(leaves))):
            raise IncompatibleStateDictError(f"cannot infer the {cls.family} configuration: slices {leaves}")
        pairs = shape("latent_codec.y.latent_codec.y0.spatial_context_nonanchor.relative_position_index")[0]
        return {
            "N": shape("g_a.analysis_transform.0.conv1.weight")[0],
            "M": shape("g_a.analysis_transform.6.weight")[0],
            "slice_num": len(leaves),
            "context_window": round(pairs ** 0.5),
        }
