"""``CCAModel`` in CompressAI master's layout, computing like the authors' CCA (LabShuHangGU/CCA).

Keys, shapes, registration order and constructor are those of master's
``compressai.models.cca.CCAModel`` with ``cca_training=False`` (the inference model; see
``tests/data/targets/cca.json``). The entropy stack is :func:`.latent_codecs.build_slice_hyperprior`
with uneven slice widths; each slice's context head runs the two NAF support transforms and hands
the post-NAF mean support to the LRP, as upstream.

Where master computes differently: its NAF blocks normalise with timm's ``LayerNorm2d``
(``F.layer_norm``); ours use CCA's explicit mean/variance arithmetic (:mod:`..blocks.naf`), so the
reconstruction agrees with upstream bit for bit instead of to ~1e-6. Master's ``decompress`` does not
clamp; upstream's (and ours) clamps to [0, 1].
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from compressai.models import CompressionModel
from torch import Tensor, nn

from ..blocks.naf import NAFAnalysis, NAFBlockBase, NAFSynthesis, NAFTransformBase, hyper_analysis, hyper_synthesis
from ..blocks.slice_transforms import SliceTransform
from ..upstream.base import check_upstream_input_size
from ..upstream.cca import HYPER_STRIDE, INPUT_MINIMUM, INPUT_MULTIPLE, slice_sizes
from .compat import FromStateDict, IncompatibleStateDictError, key_shape
from .latent_codecs import SliceHyperpriorCodec, build_slice_hyperprior, compressed

__all__ = ["CCAModel", "CCASliceContext"]

DEFAULT_SLICES = (8, 28, 56, 92, 136)
DEFAULT_ENCODER_DIMS = (192, 224, 256)
DEFAULT_ENCODER_LAYERS = (4, 4, 4)


class NAFBlock(NAFBlockBase):
    """A NAF block with master's attribute names and key order."""

    NAMES = {"norm1": "norm1", "pointwise_depthwise": "pointwise_depthwise", "gate": "gate",
             "channel_attention": "channel_attention", "project": "project", "norm2": "norm2",
             "feed_forward": "feed_forward"}


class NAFTransform(NAFTransformBase):
    """A slice's support transform with master's names (``input_projection``, ``blocks``, ``output_projection``)."""

    NAMES = {"input": "input_projection", "blocks": "blocks", "output": "output_projection"}
    block_type = NAFBlock


class CCASliceContext(nn.Module):
    """Context head of one slice.

    Input ``cat(latent_means, latent_scales, *support)``; the mean and the scale support each go
    through their own NAF transform and a 3x3 head. Output ``cat(scales, means, mean_support)`` with
    the *post*-NAF mean support, which the LRP sees (upstream and master agree on that here).
    """

    def __init__(self, latent_channels: int, support_channels: int, slice_channels: int, width: int,
                 layers: int) -> None:
        super().__init__()
        channels = latent_channels + support_channels
        self.latent_channels = latent_channels
        self.mean_cc = SliceTransform(channels, slice_channels)
        self.scale_cc = SliceTransform(channels, slice_channels)
        self.mean_support_transform = NAFTransform(channels, channels, layers, width)
        self.scale_support_transform = NAFTransform(channels, channels, layers, width)

    @property
    def mean_support_channels(self) -> int:
        return self.mean_cc[0].in_channels

    def forward(self, x: Tensor) -> Tensor:
        m = self.latent_channels
        latent_means, latent_scales, support = x[:, :m], x[:, m : 2 * m], x[:, 2 * m :]
        mean_support = self.mean_support_transform(torch.cat([latent_means, support], dim=1))
        means = self.mean_cc(mean_support)
        scales = self.scale_cc(self.scale_support_transform(torch.cat([latent_scales, support], dim=1)))
        return torch.cat([scales, means, mean_support], dim=1)


class CCAModel(FromStateDict, CompressionModel):
    """CCA's image codec: NAF analysis/synthesis, a dual hyperprior, uneven channel slices."""

    #: Family name in error messages (as :func:`.compat.guess_layout` spells it).
    family = "CCA"
    latent_codec: SliceHyperpriorCodec

    def __init__(
        self,
        latent_channels: int = 320,
        hyper_channels: int = 192,
        slice_proportions: Sequence[float] | None = None,
        encoder_dims: Sequence[int] | None = None,
        encoder_layers: Sequence[int] | None = None,
        em_hidden_channels: int = 224,
        em_num_layers: int = 4,
        cca_training: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if cca_training:
            raise ValueError(
                "CCAModel(cca_training=True) is not supported: the auxiliary entropy model is a training-only "
                "branch, and master's layout for it cannot hold upstream's (it expects LRP weights for "
                "auxiliary slices upstream never builds); convert to the inference model")
        proportions = list(DEFAULT_SLICES if slice_proportions is None else slice_proportions)
        self.latent_channels, self.hyper_channels = int(latent_channels), int(hyper_channels)
        self.slice_proportions = proportions
        self.encoder_dims = [int(d) for d in (DEFAULT_ENCODER_DIMS if encoder_dims is None else encoder_dims)]
        self.encoder_layers = [int(n) for n in (DEFAULT_ENCODER_LAYERS if encoder_layers is None else encoder_layers)]
        self.em_hidden_channels, self.em_num_layers = int(em_hidden_channels), int(em_num_layers)
        self.cca_training = False
        if len(self.encoder_dims) != 3 or len(self.encoder_layers) != 3:
            raise ValueError(f"encoder_dims and encoder_layers need 3 entries each, got {self.encoder_dims} "
                             f"and {self.encoder_layers}")
        self.groups = slice_sizes(self.latent_channels, proportions)
        if min(self.groups) < 1:
            raise ValueError(f"slice_proportions {proportions} give an empty slice of {self.latent_channels} channels")
        M = self.latent_channels
        self.g_a = NAFAnalysis(NAFBlock, M, self.encoder_dims, self.encoder_layers)
        self.g_s = NAFSynthesis(NAFBlock, M, self.encoder_dims, self.encoder_layers)
        self.latent_codec = self._entropy_stack()

    def _entropy_stack(self) -> SliceHyperpriorCodec:
        M, width = self.latent_channels, self.encoder_dims[2]
        supports = [sum(self.groups[:k]) for k in range(len(self.groups))]
        heads = [CCASliceContext(M, s, n, self.em_hidden_channels, self.em_num_layers)
                 for s, n in zip(supports, self.groups)]
        return build_slice_hyperprior(
            h_a=hyper_analysis(M, width, self.hyper_channels),
            h_mean_s=hyper_synthesis(M, width, self.hyper_channels),
            h_scale_s=hyper_synthesis(M, width, self.hyper_channels),
            hyper_channels=self.hyper_channels,
            context_heads=heads,
            lrp_transforms=[SliceTransform(h.mean_support_channels + n, n) for h, n in zip(heads, self.groups)],
            mean_support_channels=[h.mean_support_channels for h in heads],
            slice_channels=self.groups,
            max_support_slices=-1,
        )

    # ------------------------------------------------------------------ configuration

    def config_kwargs(self) -> dict[str, Any]:
        """The resolved constructor arguments (master's names)."""
        return {
            "latent_channels": self.latent_channels,
            "hyper_channels": self.hyper_channels,
            "slice_proportions": list(self.slice_proportions),
            "encoder_dims": list(self.encoder_dims),
            "encoder_layers": list(self.encoder_layers),
            "em_hidden_channels": self.em_hidden_channels,
            "em_num_layers": self.em_num_layers,
            "cca_training": self.cca_training,
        }

    def describe(self) -> str:
        """Short ``CCAModel(...)`` form of the configuration, for messages."""
        return (f"CCAModel(latent_channels={self.latent_channels}, slices={self.groups}, "
                f"encoder_dims={self.encoder_dims}, em_hidden_channels={self.em_hidden_channels})")

    # ------------------------------------------------------------------ CompressAI API

    def check_input_size(self, x: Tensor) -> None:
        """Refuse sizes the authors' model cannot process (y must be exactly 4x the hyper-latent)."""
        check_upstream_input_size(x, multiple=INPUT_MULTIPLE, minimum=INPUT_MINIMUM)

    def forward(self, x: Tensor, return_params: bool = False) -> dict[str, Any]:
        """``{"x_hat", "likelihoods": {"y", "z"}}``; ``return_params`` adds ``"para": {"means",
        "scales", "y"}`` (slice order)."""
        self.check_input_size(x)
        y = self.g_a(x)
        coded = self.latent_codec(y, return_params=return_params)
        out: dict[str, Any] = {"x_hat": self.g_s(coded["y_hat"]), "likelihoods": coded["likelihoods"]}
        if return_params:
            out["para"] = {**coded["params"], "y": y}
        return out

    def compress(self, x: Tensor, return_symbols: bool = False) -> dict[str, Any]:
        """Master's bitstream: ``strings = [y0, ..., y4, z]``, ``shape = {"y": (M, H, W), "z": (H_z, W_z)}``;
        ``return_symbols`` adds the coded integers and scale indexes."""
        self.check_input_size(x)
        return compressed(self.latent_codec.compress(self.g_a(x), return_symbols=return_symbols),
                          return_symbols)

    def decompress(self, strings: Sequence[Sequence[bytes]], shape: Mapping[str, Sequence[int]],
                   **kwargs: Any) -> dict[str, Tensor]:
        """Inverse of :meth:`compress`; clamped to [0, 1] as upstream (master does not clamp)."""
        z_size = tuple(shape["z"])
        expected = (self.latent_channels, z_size[0] * HYPER_STRIDE, z_size[1] * HYPER_STRIDE)
        if tuple(shape["y"]) != expected:
            raise ValueError(f"shape {dict(shape)} is not CCA's: y must be {HYPER_STRIDE}x the hyper-latent")
        y_hat = self.latent_codec.decompress(strings, shape)["y_hat"]
        return {"x_hat": self.g_s(y_hat).clamp_(0, 1)}

    # ------------------------------------------------------------------ loading

    @classmethod
    def infer_kwargs(cls, state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
        """Constructor arguments read off keys and shapes (slice widths as the proportions)."""
        shape = key_shape(state_dict, cls.family)

        heads = sorted({int(m[1]) for k in state_dict
                        if (m := re.fullmatch(r"latent_codec\.y\.channel_context\.y(\d+)\.mean_cc\.4\.weight", k))})
        if not heads or heads != list(range(len(heads))):
            raise IncompatibleStateDictError(f"cannot infer the {cls.family} configuration: slice heads {heads}")
        prefix = "latent_codec.y.channel_context.y0.mean_support_transform"
        levels = range(len(DEFAULT_ENCODER_DIMS))
        return {
            "latent_channels": shape("g_a.down.3.weight")[0],
            "hyper_channels": shape("latent_codec.z.entropy_bottleneck.quantiles")[0],
            "slice_proportions": [shape(f"latent_codec.y.channel_context.y{k}.mean_cc.4.weight")[0] for k in heads],
            "encoder_dims": [shape(f"g_a.down.{i}.weight")[0] for i in levels],
            "encoder_layers": [sum(1 for k in state_dict if re.fullmatch(rf"g_a\.blocks\.{i}\.\d+\.beta", k))
                               for i in levels],
            "em_hidden_channels": shape(f"{prefix}.input_projection.weight")[0],
            "em_num_layers": sum(1 for k in state_dict if re.fullmatch(rf"{re.escape(prefix)}\.blocks\.\d+\.beta", k)),
            "cca_training": any(k.startswith("aux_entropy_model.") for k in state_dict),
        }
