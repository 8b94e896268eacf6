"""``TCM`` (LIC_TCM, and TCM+AuxT with ``use_auxt=True``) in CompressAI master's layout.

Keys, shapes and registration order are those of master's ``compressai.models.tcm.TCM`` (latest
AuxT wrapper layout ``g_a.transform.*`` / ``g_a.auxiliary_layers.*``); the computation is the
authors' (LIC_TCM ``TCM``, AuxT ``TCM_AUXT``). Where master computes something else, the spot
says so. The entropy stack is :func:`~.latent_codecs.build_slice_hyperprior`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from compressai.layers import ResidualBlockUpsample, ResidualBlockWithStride, conv3x3, subpel_conv3x3
from compressai.models import CompressionModel
from torch import Tensor, nn

from ..blocks.slice_transforms import SliceTransform
from ..upstream.base import check_upstream_input_size
from .compat import FromStateDict, IncompatibleStateDictError, key_shape
from .latent_codecs import SliceHyperpriorCodec, build_slice_hyperprior, compressed, leading_support
from .tcm_blocks import WLS, AuxTTransform, ConvTransBlock, SWAtten, iWLS

__all__ = ["TCM", "TCMSliceContext"]

DEFAULT_CONFIG = (2, 2, 2, 2, 2, 2)
DEFAULT_HEAD_DIM = (8, 16, 32, 32, 16, 8)
#: SWAtten of the slice heads: fixed in LIC_TCM, AuxT and master.
SLICE_ATTENTION_HEAD_DIM = 16
SLICE_ATTENTION_WIDTH = 128


def _stage(depth: int, dim: int, head_dim: int, window_size: int, drop_paths: Sequence[float]) -> list[nn.Module]:
    """``depth`` ConvTransBlocks at half-width ``dim``, alternating W / SW windows."""
    return [
        ConvTransBlock(dim, head_dim, window_size, drop_paths[i], "W" if i % 2 == 0 else "SW")
        for i in range(depth)
    ]


def analysis_merge_positions(config: Sequence[int]) -> tuple[int, ...]:
    """g_a indices after which the AuxT analysis stages are added: the strided layers and the last conv."""
    c0, c1, c2 = config[:3]
    return (0, c0 + 1, c0 + c1 + 2, c0 + c1 + c2 + 3)


def synthesis_merge_positions(config: Sequence[int]) -> tuple[int, ...]:
    """g_s indices after which the AuxT synthesis stages are added: the end of each mixed stage.

    Upstream AuxT (commit 11f9c9e) and master agree on these.
    """
    c3, c4, c5 = config[3:]
    return (c3, c3 + c4 + 1, c3 + c4 + c5 + 2, c3 + c4 + c5 + 3)


class TCMSliceContext(nn.Module):
    """Context head of one slice: SWAtten over each support, then the cc transforms.

    Input ``cat(latent_means, latent_scales, *support)`` (``M + M + S`` channels); output
    ``cat(scales, means, mean_support)`` where ``mean_support`` is the SWAtten *output* on the mean
    side, which LIC_TCM/AuxT feed to LRP. Master hands LRP the SWAtten *input* instead.
    """

    def __init__(self, latent_channels: int, support_channels: int, slice_channels: int, window_size: int) -> None:
        super().__init__()
        width = latent_channels + support_channels
        self.latent_channels = latent_channels
        self.mean_cc = SliceTransform(width, slice_channels)
        self.scale_cc = SliceTransform(width, slice_channels)
        self.mean_support_transform = SWAtten(width, SLICE_ATTENTION_HEAD_DIM, window_size, 0.0, SLICE_ATTENTION_WIDTH)
        self.scale_support_transform = SWAtten(width, SLICE_ATTENTION_HEAD_DIM, window_size, 0.0, SLICE_ATTENTION_WIDTH)

    @property
    def mean_support_channels(self) -> int:
        return self.mean_cc[0].in_channels

    def forward(self, x: Tensor) -> Tensor:
        m = self.latent_channels
        latent_means, latent_scales, support = x[:, :m], x[:, m : 2 * m], x[:, 2 * m :]
        mean_support = self.mean_support_transform(torch.cat([latent_means, support], dim=1))
        means = self.mean_cc(mean_support)
        scales = self.scale_cc(self.scale_support_transform(torch.cat([latent_scales, support], dim=1)))
        # master feeds LRP the pre-SWAtten cat(latent_means, support); upstream (and we) the post-SWAtten tensor
        return torch.cat([scales, means, mean_support], dim=1)


class TCM(FromStateDict, CompressionModel):
    """Mixed transformer-CNN image codec (Liu et al., CVPR 2023), optionally with AuxT branches.

    Constructor signature and defaults are master's. ``N`` is half the transform width, ``M`` the
    latent channels; ``config`` holds the depths of the six mixed stages (g_a 1-3, g_s 1-3; h_a
    reuses ``config[0]``, the hyper syntheses ``config[3]``).
    """

    #: Family name in error messages (as :func:`.compat.guess_layout` spells it).
    family = "TCM"
    latent_codec: SliceHyperpriorCodec

    def __init__(
        self,
        config: Sequence[int] | None = None,
        head_dim: Sequence[int] | None = None,
        drop_path_rate: float = 0.0,
        N: int = 128,
        M: int = 320,
        hyper_channels: int = 192,
        num_slices: int = 5,
        max_support_slices: int = 5,
        window_size: int = 8,
        hyper_window_size: int = 4,
        hyper_head_dim: int = 32,
        use_auxt: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        config = tuple(int(c) for c in (DEFAULT_CONFIG if config is None else config))
        head_dim = tuple(int(h) for h in (DEFAULT_HEAD_DIM if head_dim is None else head_dim))
        if len(config) != 6 or any(c < 0 for c in config):
            raise ValueError(f"config needs 6 non-negative stage depths, got {config}")
        if len(head_dim) != 6:
            raise ValueError(f"head_dim needs 6 entries, got {head_dim}")
        if num_slices < 1 or M % num_slices:
            raise ValueError(f"M={M} is not divisible into num_slices={num_slices} slices")
        for hd in (*head_dim, hyper_head_dim):
            if hd < 1 or N % hd:
                raise ValueError(f"head_dim {hd} does not divide N={N}")
        self.config = config
        self.head_dim = head_dim
        self.drop_path_rate = float(drop_path_rate)
        self.N, self.M = int(N), int(M)
        self.hyper_channels = int(hyper_channels)
        self.num_slices = int(num_slices)
        self.max_support_slices = int(max_support_slices)
        self.window_size = int(window_size)
        self.hyper_window_size = int(hyper_window_size)
        self.hyper_head_dim = int(hyper_head_dim)
        self.use_auxt = bool(use_auxt)

        g_a, g_s = self._main_transforms()
        if self.use_auxt:
            width = 2 * N
            g_a = AuxTTransform(
                g_a,
                [WLS(3, width), WLS(width, width), WLS(width, width), WLS(width, M)],
                analysis_merge_positions(config),
            )
            g_s = AuxTTransform(
                g_s,
                [iWLS(M, width), iWLS(width, width), iWLS(width, width), iWLS(width, 3)],
                synthesis_merge_positions(config),
            )
        self.g_a = g_a
        self.g_s = g_s
        self.latent_codec = self._entropy_stack()

    def _main_transforms(self) -> tuple[nn.Sequential, nn.Sequential]:
        N, M, c, hd, w = self.N, self.M, self.config, self.head_dim, self.window_size
        width = 2 * N
        rates = torch.linspace(0, self.drop_path_rate, max(sum(c), 1), device="cpu").tolist()  # also under a meta device
        # upstream quirk reproduced on purpose (training only): all g_s stages restart at the same
        # drop-path offset; master continues the schedule across them
        offsets = (0, c[0], c[0] + c[1], *(3 * [c[0] + c[1] + c[2]]))
        layers: list[list[nn.Module]] = [_stage(c[k], N, hd[k], w, rates[offsets[k] :]) for k in range(6)]
        g_a = nn.Sequential(
            ResidualBlockWithStride(3, width, stride=2),
            *layers[0],
            ResidualBlockWithStride(width, width, stride=2),
            *layers[1],
            ResidualBlockWithStride(width, width, stride=2),
            *layers[2],
            conv3x3(width, M, stride=2),
        )
        g_s = nn.Sequential(
            ResidualBlockUpsample(M, width, 2),
            *layers[3],
            ResidualBlockUpsample(width, width, 2),
            *layers[4],
            ResidualBlockUpsample(width, width, 2),
            *layers[5],
            subpel_conv3x3(width, 3, 2),
        )
        return g_a, g_s

    def _hyper_stage(self, depth: int) -> list[nn.Module]:
        no_drop = [0.0] * depth
        return _stage(depth, self.N, self.hyper_head_dim, self.hyper_window_size, no_drop)

    def _entropy_stack(self) -> SliceHyperpriorCodec:
        N, M, hc = self.N, self.M, self.hyper_channels
        width = 2 * N
        slice_channels = M // self.num_slices
        supports = [len(s) * slice_channels for s in leading_support(self.num_slices, self.max_support_slices)]
        heads = [TCMSliceContext(M, s, slice_channels, self.window_size) for s in supports]

        def hyper_synthesis() -> nn.Sequential:
            return nn.Sequential(
                ResidualBlockUpsample(hc, width, 2),
                *self._hyper_stage(self.config[3]),
                subpel_conv3x3(width, M, 2),
            )

        return build_slice_hyperprior(
            h_a=nn.Sequential(
                ResidualBlockWithStride(M, width, stride=2),
                *self._hyper_stage(self.config[0]),
                conv3x3(width, hc, stride=2),
            ),
            h_mean_s=hyper_synthesis(),
            h_scale_s=hyper_synthesis(),
            hyper_channels=hc,
            context_heads=heads,
            lrp_transforms=[SliceTransform(h.mean_support_channels + slice_channels, slice_channels) for h in heads],
            mean_support_channels=[h.mean_support_channels for h in heads],
            slice_channels=[slice_channels] * self.num_slices,
            max_support_slices=self.max_support_slices,
        )

    # ------------------------------------------------------------------ configuration

    def config_kwargs(self) -> dict[str, Any]:
        """The resolved constructor arguments (tuples as lists)."""
        return {
            "config": list(self.config),
            "head_dim": list(self.head_dim),
            "N": self.N,
            "M": self.M,
            "hyper_channels": self.hyper_channels,
            "num_slices": self.num_slices,
            "max_support_slices": self.max_support_slices,
            "window_size": self.window_size,
            "hyper_window_size": self.hyper_window_size,
            "hyper_head_dim": self.hyper_head_dim,
            "use_auxt": self.use_auxt,
            "drop_path_rate": self.drop_path_rate,
        }

    def describe(self) -> str:
        """Short ``TCM(N=.., M=.., ...)`` form of the configuration, for messages."""
        shown = ("N", "M", "num_slices", "config", "use_auxt")
        return "TCM(" + ", ".join(f"{k}={getattr(self, k)}" for k in shown) + ")"

    # ------------------------------------------------------------------ CompressAI API

    def check_input_size(self, x: Tensor) -> None:
        """Refuse sizes LIC_TCM cannot process (its windows need sides that are multiples of 128,
        at least 256); master pads inside its attention instead."""
        check_upstream_input_size(x)

    def forward(self, x: Tensor, return_params: bool = False) -> dict[str, Any]:
        """``{"x_hat", "likelihoods": {"y", "z"}}``; ``return_params`` adds upstream's
        ``"para": {"means", "scales", "y"}`` (slice order)."""
        self.check_input_size(x)
        y = self.g_a(x)
        coded = self.latent_codec(y, return_params=return_params)
        out: dict[str, Any] = {"x_hat": self.g_s(coded["y_hat"]), "likelihoods": coded["likelihoods"]}
        if return_params:
            out["para"] = {**coded["params"], "y": y}
        return out

    def compress(self, x: Tensor, return_symbols: bool = False) -> dict[str, Any]:
        """Master's bitstream: ``strings = [y0, ..., y{K-1}, z]`` (one list per slice, one ``bytes``
        per image each), ``shape = {"y": (M, H, W), "z": (H_z, W_z)}``. ``return_symbols`` adds the
        coded integers (``symbols: {"y": per slice, "z"}``) and the scale indexes."""
        self.check_input_size(x)
        return compressed(self.latent_codec.compress(self.g_a(x), return_symbols=return_symbols),
                          return_symbols)

    def decompress(
        self, strings: Sequence[Sequence[bytes]], shape: Mapping[str, Sequence[int]], **kwargs: Any
    ) -> dict[str, Tensor]:
        """Inverse of :meth:`compress`; the reconstruction is clamped to [0, 1]."""
        y_hat = self.latent_codec.decompress(strings, shape)["y_hat"]
        return {"x_hat": self.g_s(y_hat).clamp_(0, 1)}

    def update(self, scale_table: Tensor | None = None, force: bool = False, **kwargs: Any) -> bool:
        """Fill the CDF tables of every slice's GaussianConditional and of the bottleneck."""
        return super().update(scale_table=scale_table, force=force, **kwargs)

    # ------------------------------------------------------------------ loading

    @classmethod
    def layout_names(cls) -> tuple[str, ...]:
        return ("TCM", "TCM+AuxT")

    def layout_name(self) -> str:
        """``"TCM"`` or ``"TCM+AuxT"`` (the names :func:`.compat.guess_layout` gives)."""
        return "TCM+AuxT" if self.use_auxt else "TCM"

    @staticmethod
    def derived_constant(key: str) -> bool:
        """Buffers the constructor rebuilds identically (master's loader tolerates their absence):
        ``relative_position_index`` and the wavelet filters."""
        return key.endswith("relative_position_index") or bool(_WAVELET_BUFFER.match(key))

    @classmethod
    def infer_kwargs(cls, state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
        """Constructor arguments read off keys and shapes with master's rules (a K=5 model gets
        ``max_support_slices=4``, the same model as 5). Unlike master, the window sizes are read
        from the bias tables rather than assumed."""
        shape = key_shape(state_dict, cls.family)

        keys = list(state_dict)
        g_a = "g_a.transform" if any(k.startswith("g_a.transform.") for k in keys) else "g_a"
        g_s = "g_s.transform" if any(k.startswith("g_s.transform.") for k in keys) else "g_s"
        N = shape(f"{g_a}.0.conv1.weight")[0] // 2
        M = shape("latent_codec.h_a.0.conv1.weight")[1]
        runs = [(g_a, r) for r in _block_runs(keys, g_a)] + [(g_s, r) for r in _block_runs(keys, g_s)]
        config, head_dim, window_size = list(DEFAULT_CONFIG), list(DEFAULT_HEAD_DIM), 8
        if len(runs) == 6:
            tables = [shape(f"{p}.{r[0]}.trans_block.msa.attn.relative_position_bias_table") for p, r in runs]
            config = [len(r) for _, r in runs]
            head_dim = [N // t[1] for t in tables]
            window_size = _window_of(tables[0])
        slices = sorted({int(m[1]) for k in keys if (m := _SLICE_HEAD.fullmatch(k))})
        if not slices:
            raise IncompatibleStateDictError("cannot infer the TCM configuration: no slice heads found")
        num_slices = len(slices) if slices[0] == 0 else len(slices) + 1
        widest = max(shape(f"latent_codec.y.channel_context.y{k}.mean_cc.0.weight")[1] for k in slices)
        hyper_head_dim, hyper_window = 32, 4
        for hyper in ("latent_codec.h_a.1", "latent_codec.h_s.h_mean_s.1"):
            table = state_dict.get(f"{hyper}.trans_block.msa.attn.relative_position_bias_table")
            if table is not None:
                hyper_head_dim, hyper_window = N // table.shape[1], _window_of(tuple(table.shape))
                break
        return {
            "config": config,
            "head_dim": head_dim,
            "N": N,
            "M": M,
            "hyper_channels": shape("latent_codec.z.entropy_bottleneck.quantiles")[0],
            "num_slices": num_slices,
            "max_support_slices": max(0, (widest - M) // (M // num_slices)),
            "window_size": window_size,
            "hyper_window_size": hyper_window,
            "hyper_head_dim": hyper_head_dim,
            "use_auxt": any(k.startswith(("g_a.auxiliary_layers.", "g_s.auxiliary_layers.")) for k in keys),
            "drop_path_rate": 0.0,
        }



_SLICE_HEAD = re.compile(r"latent_codec\.y\.channel_context\.y(\d+)\.mean_cc\.0\.weight")
_WAVELET_BUFFER = re.compile(
    r"^g_a\.auxiliary_layers\.\d+\.dwt\.transform\.|^g_s\.auxiliary_layers\.\d+\.idwt\.inverse\."
)


def _block_runs(keys: Sequence[str], prefix: str) -> list[list[int]]:
    """Consecutive runs of Sequential indices holding a ConvTransBlock under ``prefix``."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.conv1_1\.weight$")
    indices = sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _window_of(table_shape: Sequence[int]) -> int:
    """Window size from the shape ``[(2w-1)^2, heads]`` of a bias table."""
    rows = table_shape[0]
    side = round(rows**0.5)
    if side * side != rows or side % 2 == 0:
        raise IncompatibleStateDictError(f"a relative-position table with {rows} rows is not (2w-1)^2")
    return (side + 1) // 2
