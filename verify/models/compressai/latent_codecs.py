"""Entropy containers laid out like CompressAI master's, computing like the upstream authors' code.

Design note
-----------
CompressAI master (after PRs #355/#356) stores DCAE, SAAF and TCM with one shared entropy
stack, and PyPI compressai 1.2.8 cannot hold it: its hyperprior codec has no ``h_a``/``h_s``,
its channel-groups codec knows nothing of support slices, and there is no per-slice LRP leaf.
The classes here rebuild that stack on 1.2.8's primitives (``EntropyBottleneck``,
``GaussianConditional``, ``GaussianConditionalLatentCodec``, ``quantize_ste``) so that a model
holding :class:`SliceHyperpriorCodec` as ``latent_codec`` has master's state-dict keys::

    latent_codec.h_a.*                                   hyper analysis
    latent_codec.h_s.h_mean_s.* / .h_s.h_scale_s.*       dual hyper synthesis (means first)
    latent_codec.y.channel_context.y{k}.*                per-slice context heads
    latent_codec.y.latent_codec.y{k}.gaussian_conditional.*  one GaussianConditional per slice
    latent_codec.y.latent_codec.y{k}.lrp_transform.*     per-slice latent residual prediction
    latent_codec.z.entropy_bottleneck.*                  factorized prior of the hyper-latent

Where master's computation differs from the authors' code we follow the authors:

* the hyper-latent is always rounded around the entropy bottleneck's medians with a
  straight-through estimator (``ste_round(z - medians) + medians``), as all four upstream
  codebases do; master's DCAE/SAAF use the bottleneck's noisy output in training;
* the LRP leaf refines a slice with whatever ``mean_support`` its context head hands over. For
  TCM that is the tensor *after* the SWAtten block (upstream LIC_TCM/AuxT); master feeds the
  tensor before it. The head decides, the leaf just consumes the trailing channels.

The bitstream layout is master's: one rANS stream per slice plus one for ``z`` (upstream packs
all slices into a single stream), so strings are comparable with master, not with upstream; the
symbols and scale-table indices behind them are exposed for comparisons with upstream instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.latent_codecs import (
    ChannelGroupsLatentCodec,
    EntropyBottleneckLatentCodec,
    GaussianConditionalLatentCodec,
    LatentCodec,
)
from compressai.ops import quantize_ste
from torch import Tensor, nn

__all__ = [
    "DualHyperSynthesis",
    "LrpGaussianSliceCodec",
    "SideContextSliceCodec",
    "SliceHyperpriorCodec",
    "SteBottleneckLatentCodec",
    "build_slice_hyperprior",
    "compressed",
    "leading_support",
]

#: Weight of the tanh-bounded latent residual prediction, the same in every upstream model.
LRP_SCALE = 0.5


def leading_support(num_slices: int, max_support_slices: int) -> list[tuple[int, ...]]:
    """Slices each slice may condition on: the first ``min(k, max_support_slices)`` decoded ones.

    A negative ``max_support_slices`` means "every earlier slice", as upstream.
    """
    if num_slices < 1:
        raise ValueError(f"num_slices must be at least 1, got {num_slices}")
    limit = num_slices if max_support_slices < 0 else max_support_slices
    return [tuple(range(min(k, limit))) for k in range(num_slices)]


def compressed(coded: Mapping[str, Any], return_symbols: bool) -> dict[str, Any]:
    """A model's ``compress`` result from its latent codec's: master's ``strings`` and ``shape``, and
    with ``return_symbols`` the coded integers and scale indexes."""
    out: dict[str, Any] = {"strings": coded["strings"], "shape": coded["shape"]}
    if return_symbols:
        out["symbols"], out["indexes"] = coded["symbols"], coded["indexes"]
    return out


class DualHyperSynthesis(nn.Module):
    """Two hyper-synthesis branches whose outputs are stacked as ``cat(means, scales)``."""

    def __init__(self, h_mean_s: nn.Module, h_scale_s: nn.Module) -> None:
        super().__init__()
        self.h_mean_s = h_mean_s
        self.h_scale_s = h_scale_s

    def forward(self, z_hat: Tensor) -> Tensor:
        return torch.cat([self.h_mean_s(z_hat), self.h_scale_s(z_hat)], dim=1)


class SteBottleneckLatentCodec(EntropyBottleneckLatentCodec):
    """Hyper-latent codec: factorized prior, rounding around the medians with a straight-through
    gradient (upstream behaviour in training and eval); coding is compressai's."""

    def forward(self, z: Tensor) -> dict[str, Any]:
        # Upstream quirk reproduced on purpose: the bottleneck's own (noisy) output is discarded.
        _, likelihoods = self.entropy_bottleneck(z)
        medians = self.entropy_bottleneck._get_medians()
        z_hat = quantize_ste(z - medians) + medians
        return {"likelihoods": {"y": likelihoods}, "y_hat": z_hat}

    def symbols(self, z: Tensor) -> Tensor:
        """The integers ``round(z - medians)`` that :meth:`compress` entropy-codes."""
        medians = self.entropy_bottleneck._get_medians().detach()
        return self.entropy_bottleneck.quantize(z, "symbols", medians)


class LrpGaussianSliceCodec(GaussianConditionalLatentCodec):
    """One channel slice: Gaussian coding around the predicted mean, then LRP refinement.

    The context it receives is ``cat(scales, means, mean_support)``; the last
    ``mean_support_trail_channels`` channels are the support that LRP sees next to the rounded
    slice: ``y_hat += 0.5 * tanh(lrp_transform(cat(mean_support, y_hat)))``.
    """

    gaussian_conditional: GaussianConditional
    lrp_transform: nn.Module

    def __init__(
        self,
        lrp_transform: nn.Module,
        mean_support_trail_channels: int,
        lrp_scale: float = LRP_SCALE,
    ) -> None:
        if mean_support_trail_channels < 1:
            raise ValueError(
                f"mean_support_trail_channels must be positive, got {mean_support_trail_channels}"
            )
        # The parent registers gaussian_conditional (and an Identity entropy_parameters) first,
        # which puts the lrp_transform keys after the Gaussian buffers, as in master.
        super().__init__(
            gaussian_conditional=GaussianConditional(None),
            quantizer="ste",
            chunks=("scales", "means"),
        )
        self.lrp_transform = lrp_transform
        self.mean_support_trail_channels = int(mean_support_trail_channels)
        self.lrp_scale = float(lrp_scale)

    def split_context(self, ctx_params: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``ctx_params`` -> ``(scales, means, mean_support)``."""
        trail = self.mean_support_trail_channels
        if ctx_params.size(1) <= trail:
            raise ValueError(
                f"context has {ctx_params.size(1)} channels, not enough for scales, means and "
                f"{trail} mean-support channels"
            )
        gaussian_params = self.entropy_parameters(ctx_params[:, :-trail])
        scales, means = self._chunk(gaussian_params)
        return scales, means, ctx_params[:, -trail:]

    def refine(self, y_hat: Tensor, mean_support: Tensor) -> Tensor:
        """Add the latent residual prediction to a rounded slice."""
        residual = self.lrp_transform(torch.cat([mean_support, y_hat], dim=1))
        return y_hat + self.lrp_scale * torch.tanh(residual)

    def forward(self, y: Tensor, ctx_params: Tensor) -> dict[str, Any]:
        scales, means, mean_support = self.split_context(ctx_params)
        _, likelihoods = self.gaussian_conditional(y, scales, means=means)
        y_hat = self.refine(quantize_ste(y - means) + means, mean_support)
        return {
            "likelihoods": {"y": likelihoods},
            "y_hat": y_hat,
            "params": {"means": means, "scales": scales},
        }

    def compress(self, y: Tensor, ctx_params: Tensor) -> dict[str, Any]:
        scales, means, mean_support = self.split_context(ctx_params)
        gc = self.gaussian_conditional
        indexes = gc.build_indexes(scales)
        strings = gc.compress(y, indexes, means)
        # Decode what was just written so the encoder's context matches the decoder's exactly.
        y_hat = gc.decompress(strings, indexes, means=means)
        return {
            "strings": [strings],
            "shape": tuple(y.shape[1:]),
            "y_hat": self.refine(y_hat, mean_support),
            "symbols": gc.quantize(y, "symbols", means),
            "indexes": indexes,
        }

    def decompress(
        self,
        strings: Sequence[Sequence[bytes]],
        shape: Sequence[int],
        ctx_params: Tensor,
        **kwargs: Any,
    ) -> dict[str, Any]:
        (slice_strings,) = strings
        scales, means, mean_support = self.split_context(ctx_params)
        gc = self.gaussian_conditional
        indexes = gc.build_indexes(scales)
        y_hat = gc.decompress(slice_strings, indexes, means=means)
        if tuple(y_hat.shape[1:]) != tuple(shape):
            raise ValueError(
                f"decoded slice has shape {tuple(y_hat.shape[1:])}, expected {tuple(shape)}"
            )
        return {"y_hat": self.refine(y_hat, mean_support)}


class SideContextSliceCodec(ChannelGroupsLatentCodec):
    """Channel slices coded in order, each predicted from the hyperprior and earlier slices.

    Head ``y{k}`` sees ``side_params`` alone when slice ``k`` has no support (always for
    ``k = 0``), else ``cat(side_params, *support)``; its output goes to leaf ``y{k}``.
    """

    latent_codec: Mapping[str, LrpGaussianSliceCodec]
    channel_context: Mapping[str, nn.Module]

    def __init__(
        self,
        channel_context: Mapping[str, nn.Module],
        latent_codec: Mapping[str, LrpGaussianSliceCodec],
        *,
        groups: Sequence[int],
        support_slices: Sequence[Sequence[int]] | None = None,
    ) -> None:
        # The parent registers channel_context before latent_codec, master's key order.
        super().__init__(latent_codec=latent_codec, channel_context=channel_context, groups=groups)
        names = [f"y{k}" for k in range(len(self.groups))]
        for what, modules in (
            ("channel_context", self.channel_context),
            ("latent_codec", self.latent_codec),
        ):
            if list(modules.keys()) != names:
                raise ValueError(
                    f"{what} must hold exactly {names} in order, got {list(modules.keys())}"
                )
        if support_slices is None:
            support_slices = leading_support(len(self.groups), -1)
        if len(support_slices) != len(self.groups):
            raise ValueError(
                f"support_slices has {len(support_slices)} entries for {len(self.groups)} slices"
            )
        for k, support in enumerate(support_slices):
            if any(not 0 <= i < k for i in support):
                raise ValueError(
                    f"slice {k} may only use earlier slices as support, got {tuple(support)}"
                )
        self.support_slices = [tuple(int(i) for i in support) for support in support_slices]

    @property
    def num_slices(self) -> int:
        return len(self.groups)

    def context_params(self, k: int, side_params: Tensor, decoded: Sequence[Tensor]) -> Tensor:
        """Run head ``y{k}`` on the hyperprior output and the slices it may see."""
        support = [decoded[i] for i in self.support_slices[k]]
        head_input = torch.cat([side_params, *support], dim=1) if support else side_params
        return self.channel_context[f"y{k}"](head_input)

    def _slice_loop(
        self, side_params: Tensor, code_slice: Callable[[int, Tensor], dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Code slices in order; ``code_slice(k, ctx)`` returns leaf ``y{k}``'s result."""
        results: list[dict[str, Any]] = []
        decoded: list[Tensor] = []
        for k in range(self.num_slices):
            result = code_slice(k, self.context_params(k, side_params, decoded))
            results.append(result)
            decoded.append(result["y_hat"])
        return results

    def forward(
        self, y: Tensor, side_params: Tensor, return_params: bool = False
    ) -> dict[str, Any]:
        y_slices = y.split(self.groups, dim=1)
        results = self._slice_loop(
            side_params, lambda k, ctx: self.latent_codec[f"y{k}"](y_slices[k], ctx)
        )
        out: dict[str, Any] = {
            "likelihoods": {"y": torch.cat([r["likelihoods"]["y"] for r in results], dim=1)},
            "y_hat": torch.cat([r["y_hat"] for r in results], dim=1),
        }
        if return_params:
            out["params"] = {
                name: torch.cat([r["params"][name] for r in results], dim=1)
                for name in ("means", "scales")
            }
        return out

    def compress(
        self, y: Tensor, side_params: Tensor, return_symbols: bool = False
    ) -> dict[str, Any]:
        y_slices = y.split(self.groups, dim=1)
        results = self._slice_loop(
            side_params, lambda k, ctx: self.latent_codec[f"y{k}"].compress(y_slices[k], ctx)
        )
        out: dict[str, Any] = {
            "strings": [strings for r in results for strings in r["strings"]],
            "shape": tuple(y.shape[1:]),
            "y_hat": torch.cat([r["y_hat"] for r in results], dim=1),
        }
        if return_symbols:
            out["symbols"] = [r["symbols"] for r in results]
            out["indexes"] = [r["indexes"] for r in results]
        return out

    def decompress(
        self,
        strings: Sequence[Sequence[bytes]],
        shape: Sequence[int],
        side_params: Tensor,
        **kwargs: Any,
    ) -> dict[str, Any]:
        if len(strings) != self.num_slices:
            raise ValueError(f"expected {self.num_slices} slice string lists, got {len(strings)}")
        channels, *spatial = shape
        if channels != sum(self.groups):
            raise ValueError(
                f"shape {tuple(shape)} does not match {sum(self.groups)} latent channels"
            )
        results = self._slice_loop(
            side_params,
            lambda k, ctx: self.latent_codec[f"y{k}"].decompress(
                [strings[k]], (self.groups[k], *spatial), ctx
            ),
        )
        return {"y_hat": torch.cat([r["y_hat"] for r in results], dim=1)}


class SliceHyperpriorCodec(LatentCodec):
    """Hyperprior around a channel-slice codec: ``z = h_a(y)``, ``side = h_s(z_hat)``.

    Registers ``h_a``, ``h_s``, ``y``, ``z`` in that order (master's key order). Strings are
    ``[y0_list, ..., y{K-1}_list, z_list]``, each list holding one ``bytes`` per batch element.
    """

    def __init__(
        self,
        *,
        h_a: nn.Module,
        h_s: nn.Module,
        y: SideContextSliceCodec,
        z: SteBottleneckLatentCodec,
    ) -> None:
        super().__init__()
        self.h_a = h_a
        self.h_s = h_s
        self.y = y
        self.z = z

    def forward(self, y: Tensor, return_params: bool = False) -> dict[str, Any]:
        z_out = self.z(self.h_a(y))
        y_out = self.y(y, self.h_s(z_out["y_hat"]), return_params=return_params)
        out: dict[str, Any] = {
            "likelihoods": {"y": y_out["likelihoods"]["y"], "z": z_out["likelihoods"]["y"]},
            "y_hat": y_out["y_hat"],
        }
        if return_params:
            out["params"] = y_out["params"]
        return out

    def compress(self, y: Tensor, return_symbols: bool = False) -> dict[str, Any]:
        z = self.h_a(y)
        z_out = self.z.compress(z)
        y_out = self.y.compress(y, self.h_s(z_out["y_hat"]), return_symbols=return_symbols)
        out: dict[str, Any] = {
            "strings": [*y_out["strings"], *z_out["strings"]],
            "shape": {"y": y_out["shape"], "z": tuple(z_out["shape"])},
            "y_hat": y_out["y_hat"],
        }
        if return_symbols:
            out["symbols"] = {"y": y_out["symbols"], "z": self.z.symbols(z)}
            out["indexes"] = {"y": y_out["indexes"]}
        return out

    def decompress(
        self,
        strings: Sequence[Sequence[bytes]],
        shape: Mapping[str, Sequence[int]],
        **kwargs: Any,
    ) -> dict[str, Any]:
        *y_strings, z_strings = strings
        z_hat = self.z.decompress([z_strings], tuple(shape["z"]))["y_hat"]
        y_out = self.y.decompress(y_strings, shape["y"], self.h_s(z_hat))
        return {"y_hat": y_out["y_hat"]}


def build_slice_hyperprior(
    *,
    h_a: nn.Module,
    h_mean_s: nn.Module,
    h_scale_s: nn.Module,
    hyper_channels: int,
    context_heads: Sequence[nn.Module],
    lrp_transforms: Sequence[nn.Module],
    mean_support_channels: Sequence[int],
    slice_channels: Sequence[int],
    max_support_slices: int,
) -> SliceHyperpriorCodec:
    """Assemble the master-layout entropy stack from a family's own modules.

    ``context_heads[k]`` must output ``cat(scales, means, mean_support)`` with
    ``mean_support_channels[k]`` trailing channels for ``lrp_transforms[k]``.
    """
    num_slices = len(slice_channels)
    if not len(context_heads) == len(lrp_transforms) == len(mean_support_channels) == num_slices:
        raise ValueError(
            "context_heads, lrp_transforms, mean_support_channels and slice_channels need one "
            f"entry per slice; got {len(context_heads)}, {len(lrp_transforms)}, "
            f"{len(mean_support_channels)}, {num_slices}"
        )
    slices = SideContextSliceCodec(
        channel_context={f"y{k}": head for k, head in enumerate(context_heads)},
        latent_codec={
            f"y{k}": LrpGaussianSliceCodec(lrp, trail)
            for k, (lrp, trail) in enumerate(zip(lrp_transforms, mean_support_channels))
        },
        groups=slice_channels,
        support_slices=leading_support(num_slices, max_support_slices),
    )
    return SliceHyperpriorCodec(
        h_a=h_a,
        h_s=DualHyperSynthesis(h_mean_s, h_scale_s),
        y=slices,
        z=SteBottleneckLatentCodec(EntropyBottleneck(hyper_channels)),
    )
