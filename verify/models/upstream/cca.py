"""CCA (LabShuHangGU/CCA ``models/vae.py: LICAutoencoder``, ``models/aux_em.py``) re-implemented.

Channel-slice entropy model with *uneven* slices (``floor(M * p / sum(p))``, the remainder added to
the last slice: 8/28/56/92/136 for the published configuration). Slice ``k`` is predicted from
``cat(latent_means, y_hat_0 .. y_hat_{k-1})`` and ``cat(latent_scales, ...)``, each through its own
NAF transform and then a 3x3 head; the latent residual prediction sees the NAF transform's output
(not the raw concatenation). With ``cca_training=True`` (what ``train.py`` always builds, hence
what checkpoints hold) the model also carries the auxiliary entropy model of the CCA loss; it never
changes ``x_hat`` or the main likelihoods.

State-dict keys, shapes and order equal an upstream ``LICAutoencoder(...)`` checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from compressai.ans import BufferedRansEncoder, RansDecoder
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.models import CompressionModel
from compressai.models.base import get_scale_table
from compressai.models.utils import update_registered_buffers
from torch import Tensor, nn

from ..blocks.naf import NAFAnalysis, NAFBlockBase, NAFSynthesis, NAFTransformBase, hyper_analysis, hyper_synthesis
from ..blocks.slice_transforms import SliceTransform
from .base import GAUSSIAN_TABLE_BUFFERS, check_upstream_input_size, ste_round

__all__ = ["AuxEntropyModel", "LICAutoencoder", "slice_sizes"]

#: hard-coded upstream: the hyper-latent width, and the hyper transforms' width is ae_dim[2]
HYPER_CHANNELS = 192
INPUT_MULTIPLE = 64
INPUT_MINIMUM = 64
#: y is 4x the hyper-latent in each direction (decompress assumes it)
HYPER_STRIDE = 4


def slice_sizes(M: int, prop_slices: Sequence[float]) -> list[int]:
    """Upstream's slice widths: a single entry ``[n]`` means n equal parts; otherwise
    ``floor(M * p / sum(p))`` per entry, the remainder added to the last slice."""
    if len(prop_slices) == 1:
        prop_slices = [1] * int(prop_slices[0])
    total = sum(prop_slices)
    sizes = [math.floor(1.0 * M / total * p) for p in prop_slices]
    sizes[-1] += M - sum(sizes)
    return sizes


class NAFBlock(NAFBlockBase):
    """Upstream ``NAFBlock`` (without ``inter_dim``: its in/out convs are identities, no keys)."""

    NAMES = {"pointwise_depthwise": "dwconv", "gate": "sg", "channel_attention": "sca",
             "feed_forward": "FFN", "norm1": "norm1", "norm2": "norm2", "project": "conv1"}


class NAFTransform(NAFTransformBase):
    """Upstream ``blocks`` (the support transform of one slice)."""

    NAMES = {"blocks": "blocks", "input": "in_conv", "output": "out_conv"}
    block_type = NAFBlock


class _SlicePredictors(nn.Module):
    """The per-slice modules both entropy models register, in upstream's order."""

    mean_NAF_transforms: nn.ModuleList
    scale_NAF_transforms: nn.ModuleList
    mean_cc_transforms: nn.ModuleList
    scale_cc_transforms: nn.ModuleList

    def _register_predictors(self, M: int, sizes: Sequence[int], support: Sequence[int],
                             em_dim: int, em_layers: int) -> None:
        widths = [M + s for s in support]
        self.mean_NAF_transforms = nn.ModuleList(NAFTransform(w, w, em_layers, em_dim) for w in widths)
        self.scale_NAF_transforms = nn.ModuleList(NAFTransform(w, w, em_layers, em_dim) for w in widths)
        self.mean_cc_transforms = nn.ModuleList(SliceTransform(w, n) for w, n in zip(widths, sizes))
        self.scale_cc_transforms = nn.ModuleList(SliceTransform(w, n) for w, n in zip(widths, sizes))

    def _predict(self, k: int, latent_means: Tensor, latent_scales: Tensor,
                 support: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """``(mu, scale, mean_support)`` of slice ``k``; ``mean_support`` is after the NAF transform."""
        mean_support = self.mean_NAF_transforms[k](torch.cat([latent_means, *support], dim=1))
        mu = self.mean_cc_transforms[k](mean_support)
        scale_support = self.scale_NAF_transforms[k](torch.cat([latent_scales, *support], dim=1))
        scale = self.scale_cc_transforms[k](scale_support)
        return mu, scale, mean_support

    def _refine(self, k: int, mean_support: Tensor, y_hat_slice: Tensor) -> Tensor:
        lrp = self.lrp_transforms[k](torch.cat([mean_support, y_hat_slice], dim=1))
        return y_hat_slice + 0.5 * torch.tanh(lrp)


class AuxEntropyModel(_SlicePredictors):
    """The training-only auxiliary entropy model of the CCA loss (``models/aux_em.py``).

    Upstream quirk reproduced on purpose: slice ``k`` sees only slices ``0 .. k-2`` ("skip the most
    recent one"), and only slices ``0 .. K-3`` get an LRP (their refined values are all a later
    slice can see).
    """

    def __init__(self, M: int = 320, prop_slices: Sequence[float] = (1, 1, 1, 1, 1), em_dim: int = 224,
                 em_layers: int = 4) -> None:
        super().__init__()
        self.size_slices = slice_sizes(M, prop_slices)
        self.num_slices = len(self.size_slices)
        visible = [sum(self.size_slices[: max(k - 1, 0)]) for k in range(self.num_slices)]
        self._register_predictors(M, self.size_slices, visible, em_dim, em_layers)
        if self.num_slices > 2:
            self.lrp_transforms = nn.ModuleList(
                SliceTransform(M + visible[k] + self.size_slices[k], self.size_slices[k])
                for k in range(self.num_slices - 2)
            )
        self.y_entropy_bottleneck = EntropyBottleneck(M)
        self.gaussian_conditional = GaussianConditional(None)

    def forward(self, y: Tensor, latent_scales: Tensor, latent_means: Tensor) -> tuple[Tensor, Tensor]:
        """``(likelihoods of y under a factorized prior, likelihoods of y under the skip-one model)``."""
        _, aux_likelihoods = self.y_entropy_bottleneck(y)
        refined: list[Tensor] = []
        likelihoods = []
        for k, y_slice in enumerate(y.split(self.size_slices, dim=1)):
            mu, scale, mean_support = self._predict(k, latent_means, latent_scales, refined[: max(k - 1, 0)])
            likelihoods.append(self.gaussian_conditional(y_slice, scale, mu)[1])
            if k < self.num_slices - 2:
                refined.append(self._refine(k, mean_support, ste_round(y_slice - mu) + mu))
        return aux_likelihoods, torch.cat(likelihoods, dim=1)


class LICAutoencoder(_SlicePredictors, CompressionModel):
    """Upstream ``LICAutoencoder`` with its constructor signature and defaults."""

    def __init__(self, M: int = 320, prop_slices: Sequence[float] = (1, 1, 1, 1, 1),
                 ae_dim: Sequence[int] = (192, 224, 256), em_dim: int = 224,
                 ae_layers: Sequence[int] = (4, 4, 4), em_layers: int = 4, cca_training: bool = False) -> None:
        super().__init__()
        self.size_slices = slice_sizes(M, prop_slices)
        self.num_slices = len(self.size_slices)
        self.cca_training = bool(cca_training)
        self.M = M
        width = ae_dim[2]
        self.g_a = NAFAnalysis(NAFBlock, M, ae_dim, ae_layers)
        self.g_s = NAFSynthesis(NAFBlock, M, ae_dim, ae_layers)
        self.h_a = hyper_analysis(M, width, HYPER_CHANNELS)
        self.h_mean_s = hyper_synthesis(M, width, HYPER_CHANNELS)
        self.h_scale_s = hyper_synthesis(M, width, HYPER_CHANNELS)
        support = [sum(self.size_slices[:k]) for k in range(self.num_slices)]
        self._register_predictors(M, self.size_slices, support, em_dim, em_layers)
        self.lrp_transforms = nn.ModuleList(
            SliceTransform(M + support[k] + n, n) for k, n in enumerate(self.size_slices))
        if self.cca_training:
            self.aux_entropymodel = AuxEntropyModel(M, prop_slices, em_dim, em_layers)
        self.z_entropy_bottleneck = EntropyBottleneck(HYPER_CHANNELS)
        self.gaussian_conditional = GaussianConditional(None)

    # ------------------------------------------------------------------ what the verifier reads

    @property
    def entropy_bottleneck(self) -> EntropyBottleneck:
        """The hyper-latent bottleneck (upstream calls it ``z_entropy_bottleneck``)."""
        return self.z_entropy_bottleneck

    @property
    def groups(self) -> list[int]:
        """The slice widths."""
        return list(self.size_slices)

    def hyper_analysis(self, y: Tensor) -> Tensor:
        return self.h_a(y)

    def check_input_size(self, x: Tensor) -> None:
        """Refuse sizes upstream cannot process: y must be exactly 4x the hyper-latent."""
        check_upstream_input_size(x, multiple=INPUT_MULTIPLE, minimum=INPUT_MINIMUM)

    # ------------------------------------------------------------------ the slice loop

    def _slices(self, y_slices: Sequence[Tensor] | None, latent_means: Tensor, latent_scales: Tensor,
                code) -> list[Tensor]:
        """Run the slice loop; ``code(k, mu, scale)`` returns the rounded slice ``k``."""
        refined: list[Tensor] = []
        for k in range(self.num_slices):
            mu, scale, mean_support = self._predict(k, latent_means, latent_scales, refined)
            refined.append(self._refine(k, mean_support, code(k, mu, scale)))
        return refined

    def forward(self, x: Tensor, return_latents: bool = False) -> dict[str, Any]:
        """Upstream's outputs plus ``para`` (``means``, ``scales``, ``y`` in slice order);
        ``return_latents`` adds ``{"y_hat", "z_hat"}`` (for the verifier)."""
        self.check_input_size(x)
        y = self.g_a(x)
        z = self.h_a(y)
        _, z_likelihoods = self.z_entropy_bottleneck(z)
        # Upstream quirk reproduced on purpose: the bottleneck's own output is discarded and z is
        # rounded around its medians with a straight-through estimator.
        medians = self.z_entropy_bottleneck._get_medians()
        z_hat = ste_round(z - medians) + medians
        latent_scales = self.h_scale_s(z_hat)
        latent_means = self.h_mean_s(z_hat)
        y_slices = y.split(self.size_slices, dim=1)
        means, scales, likelihoods = [], [], []

        def code(k: int, mu: Tensor, scale: Tensor) -> Tensor:
            means.append(mu)
            scales.append(scale)
            likelihoods.append(self.gaussian_conditional(y_slices[k], scale, mu)[1])
            return ste_round(y_slices[k] - mu) + mu

        y_hat = torch.cat(self._slices(y_slices, latent_means, latent_scales, code), dim=1)
        out: dict[str, Any] = {
            "y": y,
            "x_hat": self.g_s(y_hat),
            "likelihoods": {"y": torch.cat(likelihoods, dim=1), "z": z_likelihoods},
            "aux_likelihoods": None,
            "para": {"means": torch.cat(means, dim=1), "scales": torch.cat(scales, dim=1), "y": y},
        }
        if self.cca_training:
            aux, cca = self.aux_entropymodel(y, latent_scales, latent_means)
            out["aux_likelihoods"] = {"y_aux": aux, "y_cca": cca}
        if return_latents:
            out["latents"] = {"y_hat": y_hat, "z_hat": z_hat}
        return out

    def _tables(self) -> tuple[list, list, list]:
        gc = self.gaussian_conditional
        return gc.quantized_cdf.tolist(), gc.cdf_length.reshape(-1).int().tolist(), gc.offset.reshape(-1).int().tolist()

    def compress(self, x: Tensor) -> dict[str, Any]:
        """One string per image for z and ONE rANS stream for all slices of y."""
        self.check_input_size(x)
        y = self.g_a(x)
        z = self.h_a(y)
        z_strings = self.z_entropy_bottleneck.compress(z)
        z_hat = self.z_entropy_bottleneck.decompress(z_strings, z.size()[-2:])
        y_slices = y.split(self.size_slices, dim=1)
        symbols: list[int] = []
        indexes: list[int] = []

        def code(k: int, mu: Tensor, scale: Tensor) -> Tensor:
            gc = self.gaussian_conditional
            slice_symbols = gc.quantize(y_slices[k], "symbols", mu)
            symbols.extend(slice_symbols.reshape(-1).tolist())
            indexes.extend(gc.build_indexes(scale).reshape(-1).tolist())
            return slice_symbols + mu

        self._slices(y_slices, self.h_mean_s(z_hat), self.h_scale_s(z_hat), code)
        encoder = BufferedRansEncoder()
        encoder.encode_with_indexes(symbols, indexes, *self._tables())
        return {"strings": [[encoder.flush()], z_strings], "shape": z.size()[-2:]}

    def decompress(self, strings: Sequence[Sequence[bytes]], shape: Sequence[int]) -> dict[str, Tensor]:
        """Decode one image (upstream supports batch 1 only) and clamp it to [0, 1]."""
        z_hat = self.z_entropy_bottleneck.decompress(strings[1], shape)
        latent_size = (z_hat.shape[2] * HYPER_STRIDE, z_hat.shape[3] * HYPER_STRIDE)
        tables = self._tables()
        decoder = RansDecoder()
        decoder.set_stream(strings[0][0])

        def code(k: int, mu: Tensor, scale: Tensor) -> Tensor:
            gc = self.gaussian_conditional
            values = decoder.decode_stream(gc.build_indexes(scale).reshape(-1).tolist(), *tables)
            return gc.dequantize(torch.Tensor(values).reshape(1, -1, *latent_size), mu)

        y_hat = torch.cat(self._slices(None, self.h_mean_s(z_hat), self.h_scale_s(z_hat), code), dim=1)
        return {"x_hat": self.g_s(y_hat).clamp_(0, 1)}

    # ------------------------------------------------------------------ tables and loading

    def update(self, scale_table: Tensor | None = None, force: bool = False) -> bool:
        """As upstream: the main Gaussian's table first, then every entropy model's CDFs (the
        auxiliary model's included) with compressai's default table."""
        if scale_table is None:
            scale_table = get_scale_table()
        updated = self.gaussian_conditional.update_scale_table(scale_table, force=force)
        updated |= super().update(force=force)
        return updated

    def load_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = False):
        """Upstream's loader (non-strict by default, as its override); the main Gaussian's four
        table entries must be present, possibly empty. Returns the missing/unexpected keys."""
        missing = [f"gaussian_conditional.{n}" for n in GAUSSIAN_TABLE_BUFFERS
                   if f"gaussian_conditional.{n}" not in state_dict]
        if missing:
            raise KeyError(f"state dict lacks the GaussianConditional table entries {missing}")
        update_registered_buffers(self.gaussian_conditional, "gaussian_conditional",
                                  list(GAUSSIAN_TABLE_BUFFERS), state_dict)
        return super().load_state_dict(state_dict, strict=strict)
