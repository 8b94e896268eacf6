"""DCAE with CompressAI master's constructor and state-dict layout, computing like upstream.

Keys, shapes and order are those of master's ``compressai.models.dcae.DCAE`` (see
``shared/targets/dcae.json``); the numbers are those of LabShuHangGU/DCAE, whose transforms are
reused from :mod:`..blocks`. Master's DCAE port already agrees with upstream to float precision,
so the only layout work here is the container stack of :mod:`.latent_codecs` and the shared
dictionary of :mod:`.dictionary_heads`.

:class:`DCAE` is also the skeleton of :class:`.saaf.SAAF`, which swaps the attention stage,
adds the adaptive-frequency branches and the diffusion prior through the ``_register_*`` hooks.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from compressai.models import CompressionModel
from compressai.models.utils import conv, deconv
from torch import Tensor, nn


from ..blocks.dcae_blocks import AttentionStage, SwinBlockWithConvMulti
from ..blocks.residual_bottleneck import (
    ResidualBottleneckBlockWithStride,
    ResidualBottleneckBlockWithUpsample,
)
from ..blocks.slice_transforms import SliceTransform
from .compat import FromStateDict, IncompatibleStateDictError, key_shape, require_key
from .dictionary_heads import DictionaryContextHead, SharedDictionary, dictionary_width
from .latent_codecs import SliceHyperpriorCodec, build_slice_hyperprior, compressed, leading_support

__all__ = ["DCAE", "analysis_transform", "synthesis_transform"]

IMAGE_CHANNELS = 3
DEFAULT_HEAD_DIM = (8, 16, 32, 32, 16, 8)
DEFAULT_FEATURE_DIMS = (96, 144, 256)
DEFAULT_BLOCK_NUM = (1, 2, 12)
#: Indices of the three attention stages inside g_a (widths fd0, fd1, fd2) and g_s (fd2, fd1, fd0).
STAGE_INDICES = (1, 3, 5)


def analysis_transform(
    stage: type[AttentionStage],
    feature_dims: Sequence[int],
    block_num: Sequence[int],
    head_dims: Sequence[int],
    window_size: int,
    M: int,
) -> nn.Sequential:
    """g_a: three (stride-2 bottleneck block, attention stage) levels, then a 5x5 stride-2 conv."""
    widths = (IMAGE_CHANNELS, *feature_dims)
    layers: list[nn.Module] = []
    for level in range(3):
        layers.append(ResidualBottleneckBlockWithStride(widths[level], widths[level + 1]))
        layers.append(stage(widths[level + 1], head_dims[level], window_size, block_num[level]))
    layers.append(conv(feature_dims[2], M, kernel_size=5, stride=2))
    return nn.Sequential(*layers)


def synthesis_transform(
    stage: type[AttentionStage],
    feature_dims: Sequence[int],
    block_num: Sequence[int],
    head_dims: Sequence[int],
    window_size: int,
    M: int,
) -> nn.Sequential:
    """g_s: a 5x5 stride-2 deconv, then three (attention stage, upsampling block) levels."""
    widths = (*reversed(feature_dims), IMAGE_CHANNELS)
    layers: list[nn.Module] = [deconv(M, feature_dims[2], kernel_size=5, stride=2)]
    for level in range(3):
        layers.append(stage(widths[level], head_dims[level], window_size, block_num[2 - level]))
        layers.append(ResidualBottleneckBlockWithUpsample(widths[level], widths[level + 1]))
    return nn.Sequential(*layers)


class DCAE(FromStateDict, CompressionModel):
    """DCAE (dictionary-based cross-attention entropy model) in CompressAI master's layout.

    ``forward(x, return_params=True)`` adds ``"para": {"means", "scales", "y"}`` (slice order,
    as upstream's ``para``); ``compress(x, return_symbols=True)`` adds the coded symbols and
    scale indexes. Strings are master's: one list per slice, then the ``z`` list.
    """

    #: Family name used in error messages and by :func:`guess_layout`.
    family = "DCAE"
    stage_type: type[AttentionStage] = SwinBlockWithConvMulti

    latent_codec: SliceHyperpriorCodec

    def __init__(
        self,
        head_dim: Sequence[int] | None = None,
        N: int = 192,
        M: int = 320,
        hyper_channels: int = 192,
        num_slices: int = 5,
        max_support_slices: int = 5,
        feature_dims: Sequence[int] | None = None,
        block_num: Sequence[int] | None = None,
        dict_num: int = 128,
        dict_head_num: int = 20,
        dictionary_dim: int | None = None,
        window_size: int = 8,
        hyper_window_size: int = 4,
        hyper_head_dim: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.head_dim = tuple(DEFAULT_HEAD_DIM if head_dim is None else head_dim)
        self.feature_dims = tuple(DEFAULT_FEATURE_DIMS if feature_dims is None else feature_dims)
        self.block_num = tuple(DEFAULT_BLOCK_NUM if block_num is None else block_num)
        self.N, self.M, self.hyper_channels = N, M, hyper_channels
        self.num_slices, self.max_support_slices = num_slices, max_support_slices
        self.dict_num, self.dict_head_num = dict_num, dict_head_num
        self.dictionary_dim = dictionary_width(dict_head_num) if dictionary_dim is None else dictionary_dim
        self.window_size, self.hyper_window_size, self.hyper_head_dim = window_size, hyper_window_size, hyper_head_dim
        self._validate()

        self._register_transforms()
        self._register_priors()
        self.latent_codec = self._build_latent_codec()

    # ------------------------------------------------------------------ configuration

    def config(self) -> dict[str, Any]:
        """The resolved constructor arguments (tuples as lists), master's attribute names."""
        names = ("head_dim", "N", "M", "hyper_channels", "num_slices", "max_support_slices", "feature_dims",
                 "block_num", "dict_num", "dict_head_num", "dictionary_dim", "window_size",
                 "hyper_window_size", "hyper_head_dim")
        return {n: list(v) if isinstance(v, tuple) else v for n, v in ((n, getattr(self, n)) for n in names)}

    def _validate(self) -> None:
        name = type(self).__name__
        for what, value, size in (("head_dim", self.head_dim, 6), ("feature_dims", self.feature_dims, 3),
                                  ("block_num", self.block_num, 3)):
            if len(value) != size:
                raise ValueError(f"{name}: {what} needs {size} entries, got {list(value)}")
        if self.num_slices < 1 or self.M % self.num_slices:
            raise ValueError(f"{name}: M={self.M} is not divisible into num_slices={self.num_slices} slices")
        widths = (*self.feature_dims, *reversed(self.feature_dims), self.N)
        for width, hd in zip(widths, (*self.head_dim, self.hyper_head_dim)):
            if width % hd:
                raise ValueError(f"{name}: attention width {width} is not divisible by head_dim {hd}")
        if self.dictionary_dim != dictionary_width(self.dict_head_num):
            # The shared attention block works with 32 channels per dictionary head (as upstream).
            raise ValueError(
                f"{name}: dictionary_dim={self.dictionary_dim} is not supported; the dictionary attention "
                f"uses 32 channels per head, i.e. dictionary_dim = 32 * dict_head_num = "
                f"{dictionary_width(self.dict_head_num)}"
            )

    def describe(self) -> str:
        """Short ``Family(key=value, ...)`` form of the configuration, for messages."""
        shown = ("N", "M", "num_slices", "max_support_slices", "feature_dims", "block_num")
        return f"{type(self).__name__}(" + ", ".join(f"{k}={getattr(self, k)}" for k in shown) + ")"

    # ------------------------------------------------------------------ construction hooks

    def _register_transforms(self) -> None:
        """Register ``g_a`` then ``g_s`` (SAAF interleaves its auxiliary branches)."""
        self.g_a = self._analysis()
        self.g_s = self._synthesis()

    def _analysis(self) -> nn.Sequential:
        return analysis_transform(self.stage_type, self.feature_dims, self.block_num, self.head_dim[:3],
                                  self.window_size, self.M)

    def _synthesis(self) -> nn.Sequential:
        return synthesis_transform(self.stage_type, self.feature_dims, self.block_num, self.head_dim[3:],
                                   self.window_size, self.M)

    def _register_priors(self) -> None:
        """Register the model-root priors: the shared dictionary (SAAF adds its diffusion prior)."""
        self.shared_dictionary = SharedDictionary(self.dict_num, self.dictionary_dim)

    def _hyper_stage(self) -> AttentionStage:
        return self.stage_type(self.N, self.hyper_head_dim, self.hyper_window_size, 1)

    def _hyper_synthesis(self) -> nn.Sequential:
        return nn.Sequential(
            deconv(self.hyper_channels, self.N, kernel_size=3, stride=2),
            self._hyper_stage(),
            ResidualBottleneckBlockWithUpsample(self.N, self.M),
        )

    def _build_latent_codec(self) -> SliceHyperpriorCodec:
        M, sc = self.M, self.M // self.num_slices
        supports = leading_support(self.num_slices, self.max_support_slices)
        heads = [
            DictionaryContextHead(2 * M + sc * len(support), M, sc, self.dict_head_num,
                                  self.shared_dictionary.batched)
            for support in supports
        ]
        # The shared codec rounds z with a straight-through estimator in training, as upstream;
        # master's DCAE adds uniform noise to z there (eval is identical).
        return build_slice_hyperprior(
            h_a=nn.Sequential(
                ResidualBottleneckBlockWithStride(M, self.N),
                self._hyper_stage(),
                conv(self.N, self.hyper_channels, kernel_size=3, stride=2),
            ),
            h_mean_s=self._hyper_synthesis(),
            h_scale_s=self._hyper_synthesis(),
            hyper_channels=self.hyper_channels,
            context_heads=heads,
            lrp_transforms=[SliceTransform(head.support_channels + sc, sc) for head in heads],
            mean_support_channels=[head.support_channels for head in heads],
            slice_channels=[sc] * self.num_slices,
            max_support_slices=self.max_support_slices,
        )

    # ------------------------------------------------------------------ transforms

    def analysis(self, x: Tensor) -> Tensor:
        """Image -> latent ``y``."""
        return self.g_a(x)

    def synthesis(self, y_hat: Tensor) -> Tensor:
        """Decoded latent -> unclamped reconstruction."""
        return self.g_s(y_hat)

    def extra_forward_outputs(self, y: Tensor) -> dict[str, Tensor]:
        """Family-specific additions to ``forward``'s result (none for DCAE)."""
        return {}

    # ------------------------------------------------------------------ CompressAI API

    def forward(self, x: Tensor, return_params: bool = False) -> dict[str, Any]:
        y = self.analysis(x)
        coded = self.latent_codec(y, return_params=return_params)
        out: dict[str, Any] = {
            "x_hat": self.synthesis(coded["y_hat"]),
            "likelihoods": coded["likelihoods"],
            **self.extra_forward_outputs(y),
        }
        if return_params:
            out["para"] = {**coded["params"], "y": y}
        return out

    def compress(self, x: Tensor, return_symbols: bool = False) -> dict[str, Any]:
        return compressed(self.latent_codec.compress(self.analysis(x), return_symbols=return_symbols),
                          return_symbols)

    def decompress(self, strings: Sequence[Sequence[bytes]], shape: Mapping[str, Sequence[int]],
                   **kwargs: Any) -> dict[str, Tensor]:
        y_hat = self.latent_codec.decompress(strings, shape)["y_hat"]
        return {"x_hat": self.synthesis(y_hat).clamp_(0, 1)}

    # ------------------------------------------------------------------ loading

    @classmethod
    def attention_geometry(cls, state_dict: Mapping[str, Tensor], stage: str, width: int) -> tuple[int, int]:
        """``(head_dim, window_size)`` of the attention stage at key prefix ``stage``."""
        table = require_key(state_dict, f"{stage}.layers.0.msa.relative_position_params", cls.family)
        heads, side = table.shape[0], table.shape[1]
        if side % 2 == 0:
            raise IncompatibleStateDictError(f"{stage}: relative-position table side {side} is not odd")
        return width // heads, (side + 1) // 2

    @classmethod
    def infer_kwargs(cls, state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
        """Constructor arguments read off keys and shapes, with master's rules (a K=5 model gets
        ``max_support_slices=4``, which builds the same model as 5)."""
        family = cls.family
        shape = key_shape(state_dict, family)

        feature_dims = [shape(f"g_a.{i}.conv.weight")[0] for i in (0, 2, 4)]
        N, M = shape("latent_codec.h_a.0.conv.weight")[:2]
        slices = sorted({int(m[1]) for k in state_dict
                         if (m := re.fullmatch(r"latent_codec\.y\.channel_context\.y(\d+)\.mean_cc\.0\.weight", k))})
        if not slices:
            raise IncompatibleStateDictError(f"cannot infer the {family} configuration: no slice heads found")
        num_slices = len(slices) if slices[0] == 0 else len(slices) + 1
        if num_slices > 1:
            widest = max(shape(f"latent_codec.y.channel_context.y{k}.mean_cc.0.weight")[1] for k in slices)
            max_support = max((widest - 3 * M) // (M // num_slices), 1)
        else:
            max_support = 1
        block_num = [
            sum(1 for k in state_dict if k.startswith(f"g_a.{i}.layers.") and k.endswith(".ln1.weight"))
            for i in STAGE_INDICES
        ]
        stage_widths = [(f"g_a.{i}", w) for i, w in zip(STAGE_INDICES, feature_dims)]
        stage_widths += [(f"g_s.{i}", w) for i, w in zip(STAGE_INDICES, reversed(feature_dims))]
        geometry = [cls.attention_geometry(state_dict, stage, width) for stage, width in stage_widths]
        hyper_head_dim, hyper_window = cls.attention_geometry(state_dict, "latent_codec.h_a.1", N)
        dict_num, dictionary_dim = shape("shared_dictionary.dt")
        return {
            "head_dim": [hd for hd, _ in geometry],
            "N": N,
            "M": M,
            "hyper_channels": shape("latent_codec.z.entropy_bottleneck.quantiles")[0],
            "num_slices": num_slices,
            "max_support_slices": max_support,
            "feature_dims": feature_dims,
            "block_num": block_num,
            "dict_num": dict_num,
            "dict_head_num": shape("latent_codec.y.channel_context.y0.cross_attention.scale")[0],
            "dictionary_dim": dictionary_dim,
            "window_size": geometry[0][1],
            "hyper_window_size": hyper_window,
            "hyper_head_dim": hyper_head_dim,
        }
