"""Shared skeleton of the four upstream channel-slice models (TCM, TCM+AuxT, DCAE, SAAF).

All four reference codebases run the same entropy-coding loop around different transforms:
a hyperprior gives per-pixel means/scales, ``y`` is split into ``num_slices`` channel slices,
every slice is predicted from the hyperprior plus the already decoded slices, rounded around its
predicted mean and then refined by a "latent residual prediction" (LRP) term ``0.5 * tanh(.)``.
:class:`UpstreamSliceModel` owns that loop (``forward``, ``compress``, ``decompress``), the table
update and the checkpoint loading. Subclasses own every module and the transforms around the loop.

The base registers no module, so each subclass decides the registration order and thereby the
``state_dict`` key order of the checkpoints it must load.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from compressai.ans import BufferedRansEncoder, RansDecoder
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.models import CompressionModel
from compressai.models.base import get_scale_table
from compressai.models.utils import update_registered_buffers
from torch import Tensor, nn

__all__ = [
    "GAUSSIAN_TABLE_BUFFERS",
    "UpstreamSliceModel",
    "check_upstream_input_size",
    "ste_round",
]

#: The four GaussianConditional buffers whose size depends on ``update()``.
GAUSSIAN_TABLE_BUFFERS = ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")

#: Window attention at 1/16 (window 8) and 1/32 (window 4) of the input needs sides that are
#: multiples of 128; maps no larger than one window (inputs of 128) take upstream's broken
#: padding path, hence the minimum of 256.
INPUT_MULTIPLE = 128
INPUT_MINIMUM = 256


def ste_round(x: Tensor) -> Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def check_upstream_input_size(x: Tensor, multiple: int = INPUT_MULTIPLE, minimum: int = INPUT_MINIMUM) -> None:
    """Raise ``ValueError`` for image sizes the upstream models cannot process.

    Upstream crashes inside window attention (or silently pads and then fails a reshape) unless
    both H and W are multiples of 128 and at least 256; we refuse such inputs up front.  Models
    without window attention pass their own ``multiple`` and ``minimum``.
    """
    if x.dim() != 4:
        raise ValueError(f"expected an image batch [B, C, H, W], got shape {tuple(x.shape)}")
    height, width = x.shape[-2:]
    for name, size in (("height", height), ("width", width)):
        if size < minimum or size % multiple:
            raise ValueError(
                f"input {name} {size} is not supported by the upstream model: height and width must "
                f"be multiples of {multiple} and at least {minimum} "
                f"(pad the image first, as the upstream eval scripts do)"
            )


class UpstreamSliceModel(CompressionModel):
    """Channel-slice entropy loop shared by the upstream TCM / TCM+AuxT / DCAE / SAAF models.

    Subclasses set ``num_slices`` and ``max_support_slices``, register ``entropy_bottleneck``
    (``EntropyBottleneck``), ``gaussian_conditional`` (``GaussianConditional(None)``),
    ``lrp_transforms`` (``nn.ModuleList``) and their own modules, and implement
    :meth:`analysis`, :meth:`synthesis`, :meth:`hyper_analysis`, :meth:`hyper_synthesis` and
    :meth:`slice_parameters`. :meth:`extra_forward_outputs` may add entries to ``forward``'s
    result.
    """

    num_slices: int
    max_support_slices: int
    entropy_bottleneck: EntropyBottleneck
    gaussian_conditional: GaussianConditional
    lrp_transforms: nn.ModuleList

    def __init__(self) -> None:
        # No entropy_bottleneck_channels: registration order is left entirely to subclasses.
        super().__init__()

    # ----------------------------------------------------------------- subclass interface

    def analysis(self, x: Tensor) -> Tensor:
        """Image -> latent ``y``: ``g_a`` (a subclass adds any auxiliary branch)."""
        return self.g_a(x)

    def synthesis(self, y_hat: Tensor) -> Tensor:
        """Quantised latent -> unclamped reconstruction: ``g_s`` (a subclass adds any auxiliary branch)."""
        return self.g_s(y_hat)

    def hyper_analysis(self, y: Tensor) -> Tensor:
        """Latent ``y`` -> hyper-latent ``z``: ``h_a``."""
        return self.h_a(y)

    def hyper_synthesis(self, z_hat: Tensor) -> tuple[Tensor, Tensor]:
        """Quantised hyper-latent -> ``(latent_means, latent_scales)``."""
        raise NotImplementedError

    def slice_parameters(
        self,
        index: int,
        latent_means: Tensor,
        latent_scales: Tensor,
        support_slices: list[Tensor],
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Predict slice ``index``: returns ``(mu, scale, lrp_support)``.

        ``support_slices`` are the refined slices the prediction may look at (already limited to
        ``max_support_slices``). ``lrp_support`` is the tensor concatenated in front of the
        rounded slice before ``lrp_transforms[index]``. ``mu``/``scale`` may be larger than the
        slice spatially; the loop crops them to the latent size.
        """
        raise NotImplementedError

    def extra_forward_outputs(self, x: Tensor, y: Tensor, z_hat: Tensor) -> dict[str, Any]:
        """Extra entries for ``forward``'s result (none by default; SAAF adds its diffusion loss)."""
        return {}

    def check_input_size(self, x: Tensor) -> None:
        """Refuse inputs upstream cannot process (see :func:`check_upstream_input_size`)."""
        check_upstream_input_size(x)

    # ----------------------------------------------------------------- slice loop pieces

    def _visible_support(self, decoded: list[Tensor]) -> list[Tensor]:
        """The decoded slices a new slice is conditioned on (a negative limit means all)."""
        if self.max_support_slices < 0:
            return list(decoded)
        return decoded[: self.max_support_slices]

    def _predict_slice(
        self,
        index: int,
        latent_means: Tensor,
        latent_scales: Tensor,
        decoded: list[Tensor],
        latent_size: Sequence[int],
    ) -> tuple[Tensor, Tensor, Tensor]:
        mu, scale, lrp_support = self.slice_parameters(
            index, latent_means, latent_scales, self._visible_support(decoded)
        )
        height, width = latent_size
        return mu[:, :, :height, :width], scale[:, :, :height, :width], lrp_support

    def _refine(self, index: int, lrp_support: Tensor, y_hat_slice: Tensor) -> Tensor:
        """Add the latent residual prediction ``0.5 * tanh(lrp)`` to a rounded slice."""
        lrp = self.lrp_transforms[index](torch.cat([lrp_support, y_hat_slice], dim=1))
        return y_hat_slice + 0.5 * torch.tanh(lrp)

    def _gaussian_tables(self) -> tuple[list[list[int]], list[int], list[int]]:
        gc = self.gaussian_conditional
        return (
            gc.quantized_cdf.tolist(),
            gc.cdf_length.reshape(-1).int().tolist(),
            gc.offset.reshape(-1).int().tolist(),
        )

    # ----------------------------------------------------------------- public API

    def forward(self, x: Tensor, return_latents: bool = False) -> dict[str, Any]:
        """Upstream's outputs; ``return_latents`` adds ``{"y_hat", "z_hat"}`` (for the verifier)."""
        self.check_input_size(x)
        y = self.analysis(x)
        z = self.hyper_analysis(y)
        _, z_likelihoods = self.entropy_bottleneck(z)
        # The bottleneck's own noisy/rounded output is discarded: z is rounded around its medians.
        medians = self.entropy_bottleneck._get_medians()
        z_hat = ste_round(z - medians) + medians
        latent_means, latent_scales = self.hyper_synthesis(z_hat)
        extras = self.extra_forward_outputs(x, y, z_hat)

        decoded: list[Tensor] = []
        likelihoods: list[Tensor] = []
        means: list[Tensor] = []
        scales: list[Tensor] = []
        for index, y_slice in enumerate(y.chunk(self.num_slices, dim=1)):
            mu, scale, lrp_support = self._predict_slice(
                index, latent_means, latent_scales, decoded, y.shape[-2:]
            )
            means.append(mu)
            scales.append(scale)
            _, slice_likelihoods = self.gaussian_conditional(y_slice, scale, mu)
            likelihoods.append(slice_likelihoods)
            y_hat_slice = ste_round(y_slice - mu) + mu
            decoded.append(self._refine(index, lrp_support, y_hat_slice))

        x_hat = self.synthesis(torch.cat(decoded, dim=1))
        result: dict[str, Any] = {
            "x_hat": x_hat,
            "likelihoods": {"y": torch.cat(likelihoods, dim=1), "z": z_likelihoods},
            "para": {"means": torch.cat(means, dim=1), "scales": torch.cat(scales, dim=1), "y": y},
        }
        if return_latents:
            result["latents"] = {"y_hat": torch.cat(decoded, dim=1), "z_hat": z_hat}
        result.update(extras)
        return result

    def compress(self, x: Tensor) -> dict[str, Any]:
        """Code a batch: one string per image for ``z``, ONE rANS stream for all of ``y``."""
        self.check_input_size(x)
        y = self.analysis(x)
        z = self.hyper_analysis(y)
        z_strings = self.entropy_bottleneck.compress(z)
        z_hat = self.entropy_bottleneck.decompress(z_strings, z.size()[-2:])
        latent_means, latent_scales = self.hyper_synthesis(z_hat)

        cdfs, cdf_lengths, offsets = self._gaussian_tables()
        symbols: list[int] = []
        indexes: list[int] = []
        decoded: list[Tensor] = []
        for index, y_slice in enumerate(y.chunk(self.num_slices, dim=1)):
            mu, scale, lrp_support = self._predict_slice(
                index, latent_means, latent_scales, decoded, y.shape[-2:]
            )
            scale_indexes = self.gaussian_conditional.build_indexes(scale)
            slice_symbols = self.gaussian_conditional.quantize(y_slice, "symbols", mu)
            symbols.extend(slice_symbols.reshape(-1).tolist())
            indexes.extend(scale_indexes.reshape(-1).tolist())
            decoded.append(self._refine(index, lrp_support, slice_symbols + mu))

        encoder = BufferedRansEncoder()
        encoder.encode_with_indexes(symbols, indexes, cdfs, cdf_lengths, offsets)
        return {"strings": [[encoder.flush()], z_strings], "shape": z.size()[-2:]}

    def decompress(self, strings: Sequence[Sequence[bytes]], shape: Sequence[int]) -> dict[str, Tensor]:
        """Decode one image (upstream supports batch 1 only) and clamp it to [0, 1]."""
        z_hat = self.entropy_bottleneck.decompress(strings[1], shape)
        latent_means, latent_scales = self.hyper_synthesis(z_hat)
        # Upstream assumes y is exactly 4x the hyper-latent size.
        latent_size = (z_hat.shape[2] * 4, z_hat.shape[3] * 4)

        cdfs, cdf_lengths, offsets = self._gaussian_tables()
        decoder = RansDecoder()
        decoder.set_stream(strings[0][0])
        decoded: list[Tensor] = []
        for index in range(self.num_slices):
            mu, scale, lrp_support = self._predict_slice(
                index, latent_means, latent_scales, decoded, latent_size
            )
            scale_indexes = self.gaussian_conditional.build_indexes(scale)
            values = decoder.decode_stream(scale_indexes.reshape(-1).tolist(), cdfs, cdf_lengths, offsets)
            slice_symbols = torch.Tensor(values).reshape(1, -1, *latent_size)
            y_hat_slice = self.gaussian_conditional.dequantize(slice_symbols, mu)
            decoded.append(self._refine(index, lrp_support, y_hat_slice))

        x_hat = self.synthesis(torch.cat(decoded, dim=1)).clamp_(0, 1)
        return {"x_hat": x_hat}

    def update(self, scale_table: Tensor | None = None, force: bool = False) -> bool:
        """Fill the Gaussian scale table, then every entropy model's CDF tables.

        As upstream, the second step is ``CompressionModel.update(force=force)`` without the
        custom table, so with ``force=True`` the default table is what ends up installed.
        """
        if scale_table is None:
            scale_table = get_scale_table()
        updated = self.gaussian_conditional.update_scale_table(scale_table, force=force)
        updated |= super().update(force=force)
        return updated

    def load_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True):
        """Load an upstream state dict, resizing the size-varying entropy tables first.

        Like upstream, the four ``gaussian_conditional`` table entries must be present (possibly
        empty); compressai then resizes the bottleneck tables and maps legacy ``_matrix{i}`` names.
        """
        missing = [f"gaussian_conditional.{n}" for n in GAUSSIAN_TABLE_BUFFERS
                   if f"gaussian_conditional.{n}" not in state_dict]
        if missing:
            raise KeyError(f"state dict lacks the GaussianConditional table entries {missing}")
        update_registered_buffers(
            self.gaussian_conditional, "gaussian_conditional", list(GAUSSIAN_TABLE_BUFFERS), state_dict
        )
        return super().load_state_dict(state_dict, strict=strict)

