"""STF's ``SymmetricalTransFormer`` and ``WACNN`` in CompressAI master's layout, computing like upstream.

Keys, shapes and order are those of master's ``compressai.models.stf.SymmetricalTransFormer`` and
``compressai.models.stf.WACNN`` (``shared/targets/{stf,wacnn}.json``); the numbers are those of
Googolxx/STF, whose blocks are reused from :mod:`..blocks.stf_blocks`. The entropy stack is
:func:`~.latent_codecs.build_slice_hyperprior` with a context head that hands LRP the *mean*
support (upstream and master agree there).

Master's ports compute what upstream computes except for three things, where we follow upstream
and say so at the spot: the z likelihood formula (compressai 1.1's sign trick), the clamp in
``decompress``, and the bitstream (master's one stream per slice is kept: strings are comparable with
master's, not with upstream's single stream).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from compressai.layers import GDN
from compressai.models import CompressionModel
from compressai.models.utils import conv, deconv
from torch import Tensor, nn

from ..blocks.legacy_bottleneck import SignTrickEntropyBottleneck
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
from ..upstream.stf import (
    SLICE_CHANNELS,
    STF_HYPER_ANALYSIS,
    STF_HYPER_SYNTHESIS,
    WACNN_HEADS,
    WACNN_HYPER_ANALYSIS,
    WACNN_HYPER_SYNTHESIS,
    check_input_size,
)
from .compat import FromStateDict, IncompatibleStateDictError, require_key
from .latent_codecs import SliceHyperpriorCodec, build_slice_hyperprior, compressed, leading_support

__all__ = ["SupportContextHead", "SymmetricalTransFormer", "WACNN"]

HYPER_CHANNELS = 192
_SLICE_HEAD = re.compile(r"latent_codec\.y\.channel_context\.y(\d+)\.mean_cc\.0\.weight")


class SupportContextHead(nn.Module):
    """Context head of one slice: the mean and scale heads on ``cat(latent, *support)``.

    Input ``cat(latent_means, latent_scales, *support)``; output ``cat(scales, means, mean_support)``
    with ``mean_support = cat(latent_means, *support)``, what upstream feeds to LRP.
    """

    def __init__(self, latent_channels: int, support_channels: int, slice_channels: int) -> None:
        super().__init__()
        self.latent_channels = latent_channels
        self.mean_cc = DeepSliceTransform(latent_channels + support_channels, slice_channels)
        self.scale_cc = DeepSliceTransform(latent_channels + support_channels, slice_channels)

    @property
    def mean_support_channels(self) -> int:
        return self.mean_cc[0].in_channels

    def forward(self, x: Tensor) -> Tensor:
        m = self.latent_channels
        latent_means, latent_scales, support = x[:, :m], x[:, m:2 * m], x[:, 2 * m:]
        mean_support = torch.cat([latent_means, support], dim=1)
        means = self.mean_cc(mean_support)
        scales = self.scale_cc(torch.cat([latent_scales, support], dim=1))
        return torch.cat([scales, means, mean_support], dim=1)


def _slice_hyperprior(latent: int, num_slices: int, max_support_slices: int, analysis: Sequence[int],
                      synthesis: Sequence[int]) -> SliceHyperpriorCodec:
    supports = [len(s) * SLICE_CHANNELS for s in leading_support(num_slices, max_support_slices)]
    heads = [SupportContextHead(latent, s, SLICE_CHANNELS) for s in supports]
    codec = build_slice_hyperprior(
        h_a=hyper_analysis(analysis),
        h_mean_s=hyper_synthesis(synthesis),
        h_scale_s=hyper_synthesis(synthesis),
        hyper_channels=HYPER_CHANNELS,
        context_heads=heads,
        lrp_transforms=[DeepSliceTransform(h.mean_support_channels + SLICE_CHANNELS, SLICE_CHANNELS) for h in heads],
        mean_support_channels=[h.mean_support_channels for h in heads],
        slice_channels=[SLICE_CHANNELS] * num_slices,
        max_support_slices=max_support_slices,
    )
    # upstream quirk reproduced on purpose: the z likelihood uses compressai 1.1's sign trick (master:
    # sigmoid(upper) - sigmoid(lower), up to 1.2e-7 apart); same keys, same place in the state dict
    codec.z.entropy_bottleneck = SignTrickEntropyBottleneck(HYPER_CHANNELS)
    return codec


class _STFFamilyModel(FromStateDict, CompressionModel):
    """What both models share: the CompressAI API around ``analysis`` / ``synthesis`` and loading."""

    #: display name (as :func:`.compat.guess_layout` names the layout)
    family: str
    latent_codec: SliceHyperpriorCodec

    def analysis(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def synthesis(self, y_hat: Tensor) -> Tensor:
        raise NotImplementedError

    def config_kwargs(self) -> dict[str, Any]:
        raise NotImplementedError

    def describe(self) -> str:
        """Short ``Class(key=value, ...)`` form of the configuration, for messages."""
        return f"{type(self).__name__}(" + ", ".join(f"{k}={v}" for k, v in self.config_kwargs().items()
                                                      if k in self.described) + ")"

    described: tuple[str, ...] = ()

    def check_input_size(self, x: Tensor) -> None:
        """Refuse sizes upstream cannot process (H, W multiples of 64)."""
        check_input_size(x)

    def forward(self, x: Tensor, return_params: bool = False) -> dict[str, Any]:
        """``{"x_hat", "likelihoods": {"y", "z"}}``; ``return_params`` adds upstream's
        ``"para": {"means", "scales", "y"}`` (slice order)."""
        self.check_input_size(x)
        y = self.analysis(x)
        coded = self.latent_codec(y, return_params=return_params)
        out: dict[str, Any] = {"x_hat": self.synthesis(coded["y_hat"]), "likelihoods": coded["likelihoods"]}
        if return_params:
            out["para"] = {**coded["params"], "y": y}
        return out

    def compress(self, x: Tensor, return_symbols: bool = False) -> dict[str, Any]:
        """Master's bitstream: ``strings = [y0, ..., y{K-1}, z]``; ``return_symbols`` adds the coded
        integers and scale indexes."""
        self.check_input_size(x)
        return compressed(self.latent_codec.compress(self.analysis(x), return_symbols=return_symbols),
                          return_symbols)

    def decompress(self, strings: Sequence[Sequence[bytes]], shape: Mapping[str, Sequence[int]],
                   **kwargs: Any) -> dict[str, Tensor]:
        y_hat = self.latent_codec.decompress(strings, shape)["y_hat"]
        # upstream quirk reproduced on purpose: the reconstruction is clamped to [0, 1] (master's is not)
        return {"x_hat": self.synthesis(y_hat).clamp_(0, 1)}

    @staticmethod
    def slice_geometry(state_dict: Mapping[str, Tensor], latent: int, family: str) -> tuple[int, int]:
        """``(num_slices, max_support_slices)`` read off the slice heads, as master infers them."""
        slices = sorted({int(m[1]) for k in state_dict if (m := _SLICE_HEAD.fullmatch(k))})
        if not slices:
            raise IncompatibleStateDictError(f"cannot infer the {family} configuration: no slice heads found")
        widest = max(require_key(state_dict, f"latent_codec.y.channel_context.y{k}.mean_cc.0.weight", family).shape[1]
                     for k in slices)
        return len(slices), (widest - latent) // SLICE_CHANNELS


class SymmetricalTransFormer(SwinTransforms, _STFFamilyModel):
    """STF (symmetrical Swin transformer codec) with master's constructor and layout."""

    family = "STF"
    described = ("embed_dim", "depths", "num_heads", "window_size", "num_slices")

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
        max_support_slices: int | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        patch_norm: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {list(depths)} and num_heads {list(num_heads)} differ in length")
        if norm_layer is not nn.LayerNorm or drop_rate or attn_drop_rate:
            raise ValueError("only LayerNorm and no dropout are supported (the published configuration)")
        self.pretrain_img_size, self.patch_size, self.in_chans = pretrain_img_size, patch_size, in_chans
        self.embed_dim, self.depths, self.num_heads = embed_dim, tuple(depths), tuple(num_heads)
        self.window_size, self.num_slices = window_size, num_slices
        self.max_support_slices = num_slices // 2 if max_support_slices is None else max_support_slices
        self.mlp_ratio, self.qkv_bias, self.qk_scale = float(mlp_ratio), qkv_bias, qk_scale
        self.drop_rate, self.attn_drop_rate, self.drop_path_rate = float(drop_rate), float(attn_drop_rate), float(drop_path_rate)
        self.norm_layer, self.patch_norm = norm_layer, patch_norm
        layers = len(depths)
        self.latent_channels = embed_dim * 2 ** (layers - 1)

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm=patch_norm)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # also under a meta device
        starts = [sum(depths[:i]) for i in range(layers + 1)]
        self.layers = nn.ModuleList(
            SwinStage(embed_dim * 2**i, depths[i], num_heads[i], window_size, mlp_ratio, qkv_bias, qk_scale,
                      rates[starts[i]:starts[i + 1]], PatchMerging if i < layers - 1 else None)
            for i in range(layers)
        )
        # upstream quirk reproduced on purpose (training only): the synthesis cuts the drop-path
        # schedule with the reversed depths
        up_depths, up_heads = self.depths[::-1], self.num_heads[::-1]
        up_starts = [sum(up_depths[:i]) for i in range(layers + 1)]
        self.syn_layers = nn.ModuleList(
            SwinStage(embed_dim * 2 ** (layers - 1 - i), up_depths[i], up_heads[i], window_size, mlp_ratio, qkv_bias,
                      qk_scale, rates[up_starts[i]:up_starts[i + 1]], PatchSplit if i < layers - 1 else None)
            for i in range(layers)
        )
        self.end_conv = nn.Sequential(
            nn.Conv2d(embed_dim, embed_dim * patch_size**2, kernel_size=5, stride=1, padding=2),
            nn.PixelShuffle(patch_size),
            nn.Conv2d(embed_dim, in_chans, kernel_size=3, stride=1, padding=1),
        )
        self.latent_codec = _slice_hyperprior(self.latent_channels, num_slices, self.max_support_slices,
                                              STF_HYPER_ANALYSIS, STF_HYPER_SYNTHESIS)

    def config_kwargs(self) -> dict[str, Any]:
        """The resolved constructor arguments, as master reports them."""
        return {
            "pretrain_img_size": self.pretrain_img_size, "patch_size": self.patch_size, "in_chans": self.in_chans,
            "embed_dim": self.embed_dim, "depths": list(self.depths), "num_heads": list(self.num_heads),
            "window_size": self.window_size, "num_slices": self.num_slices,
            "max_support_slices": self.max_support_slices, "mlp_ratio": self.mlp_ratio, "qkv_bias": self.qkv_bias,
            "qk_scale": self.qk_scale, "drop_rate": self.drop_rate, "attn_drop_rate": self.attn_drop_rate,
            "drop_path_rate": self.drop_path_rate,
            "norm_layer": f"{self.norm_layer.__module__}.{self.norm_layer.__qualname__}",
            "patch_norm": self.patch_norm,
        }


    @classmethod
    def infer_kwargs(cls, state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
        """The kwargs master's ``from_state_dict`` infers, read off keys and shapes."""
        family = cls.family
        patch = require_key(state_dict, "patch_embed.proj.weight", family)
        embed_dim, patch_size = int(patch.shape[0]), int(patch.shape[-1])
        stages = sorted({int(m[1]) for k in state_dict if (m := re.match(r"layers\.(\d+)\.blocks\.0\.", k))})
        depths, num_heads = [], []
        for i in stages:
            depths.append(len({m[1] for k in state_dict if (m := re.match(rf"layers\.{i}\.blocks\.(\d+)\.", k))}))
            table = require_key(state_dict, f"layers.{i}.blocks.0.attn.relative_position_bias_table", family)
            num_heads.append(int(table.shape[1]))
        table = require_key(state_dict, "layers.0.blocks.0.attn.relative_position_bias_table", family)
        window_size = (round(table.shape[0] ** 0.5) + 1) // 2
        num_slices, max_support = cls.slice_geometry(state_dict, embed_dim * 2 ** (len(stages) - 1), family)
        return {"patch_size": patch_size, "embed_dim": embed_dim, "depths": depths, "num_heads": num_heads,
                "window_size": window_size, "num_slices": num_slices, "max_support_slices": max_support}


class WACNN(_STFFamilyModel):
    """WACNN (window-attention CNN) with master's constructor and layout."""

    family = "WACNN"
    described = ("N", "M", "num_slices", "max_support_slices")

    def __init__(self, N: int = 192, M: int = 320, num_slices: int = 10, max_support_slices: int = 5,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_slices * SLICE_CHANNELS != M:
            raise ValueError(f"M={M} must be num_slices={num_slices} slices of {SLICE_CHANNELS} channels")
        self.N, self.M, self.num_slices, self.max_support_slices = N, M, num_slices, max_support_slices
        # upstream quirk reproduced on purpose: upstream's "Win_noShift_Attention" shifts its windows
        # (by half a window); master's port does the same and holds the attention one level deeper
        self.g_a = nn.Sequential(
            conv(3, N, kernel_size=5, stride=2),
            GDN(N),
            conv(N, N, kernel_size=5, stride=2),
            GDN(N),
            WindowAttentionModule(N, WACNN_HEADS, window_size=8, shift_size=4, wrapped=True),
            conv(N, N, kernel_size=5, stride=2),
            GDN(N),
            conv(N, M, kernel_size=5, stride=2),
            WindowAttentionModule(M, WACNN_HEADS, window_size=4, shift_size=2, wrapped=True),
        )
        self.g_s = nn.Sequential(
            WindowAttentionModule(M, WACNN_HEADS, window_size=4, shift_size=2, wrapped=True),
            deconv(M, N, kernel_size=5, stride=2),
            GDN(N, inverse=True),
            deconv(N, N, kernel_size=5, stride=2),
            GDN(N, inverse=True),
            WindowAttentionModule(N, WACNN_HEADS, window_size=8, shift_size=4, wrapped=True),
            deconv(N, N, kernel_size=5, stride=2),
            GDN(N, inverse=True),
            deconv(N, 3, kernel_size=5, stride=2),
        )
        self.latent_codec = _slice_hyperprior(M, num_slices, max_support_slices, WACNN_HYPER_ANALYSIS,
                                              WACNN_HYPER_SYNTHESIS)

    def config_kwargs(self) -> dict[str, Any]:
        return {"N": self.N, "M": self.M, "num_slices": self.num_slices, "max_support_slices": self.max_support_slices}

    def analysis(self, x: Tensor) -> Tensor:
        return self.g_a(x)

    def synthesis(self, y_hat: Tensor) -> Tensor:
        return self.g_s(y_hat)

    @classmethod
    def infer_kwargs(cls, state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
        """The kwargs master's ``from_state_dict`` infers, read off keys and shapes."""
        N = int(require_key(state_dict, "g_a.0.weight", cls.family).shape[0])
        M = int(require_key(state_dict, "latent_codec.h_a.0.weight", cls.family).shape[1])
        num_slices, max_support = cls.slice_geometry(state_dict, M, cls.family)
        return {"N": N, "M": M, "num_slices": num_slices, "max_support_slices": max_support}
