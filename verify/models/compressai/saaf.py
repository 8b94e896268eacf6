"""SAAF with CompressAI master's constructor and state-dict layout, computing like upstream.

Keys, shapes and order are those of master's ``compressai.models.saaf.SAAF``
(``shared/targets/saaf.json``); the numbers are those of huidong-ma/SAAF. Master's port differs
from upstream in two places, and we follow upstream in both:

* master's feature merge resizes a copy of the auxiliary stream only, so its later aux blocks run
  at the input's resolution; upstream replaces the stream with the resized map (we do too, via
  the upstream reference's merge loop);
* master scales the global-token attention logits by ``head_dim ** -0.5``; upstream on torch>=2
  (SDPA path) leaves them unscaled, and so does the shared attention block we reuse.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..blocks.saaf_blocks import (
    OLP,
    AdaptiveFrequencyBlock,
    DenoisingAsRegularizer,
    InverseAdaptiveFrequencyBlock,
    SpatialAttentionBlock,
)
from ..upstream.saaf import run_with_aux
from .compat import IncompatibleStateDictError, require_key
from .dcae import DCAE, IMAGE_CHANNELS

__all__ = ["SAAF"]

#: Group count of the diffusion prior's GroupNorms (upstream hard-codes 8).
DIFFUSION_GROUPS = 8


def _olp_identity_not_saved(branch: nn.Module) -> nn.Module:
    """Keep every OLP's ``identity_matrix`` out of the state dict, as master does (upstream SAAF
    saves it; the converter drops it)."""
    for module in branch.modules():
        if isinstance(module, OLP):
            module.register_buffer("identity_matrix", module.identity_matrix, persistent=False)
    return branch


class SAAF(DCAE):
    """SAAF (sparse attention + adaptive frequency) in CompressAI master's layout.

    Same constructor, defaults and API as :class:`.dcae.DCAE`; ``forward`` also returns
    ``"diffusion_loss"`` (the training-only denoising prior; 0 in eval, as upstream).
    """

    family = "SAAF"
    # Global-token logits left unscaled, as upstream on torch>=2; master multiplies them by head_dim**-0.5.
    stage_type = SpatialAttentionBlock
    # Derived constants master's loader tolerates when absent; our constructor rebuilds them.
    derived_buffer_suffixes = ("relative_position_index", "global_alpha")

    def _validate(self) -> None:
        super()._validate()
        if self.M % DIFFUSION_GROUPS:
            raise ValueError(f"SAAF: M={self.M} must be divisible by {DIFFUSION_GROUPS} (diffusion prior GroupNorm)")

    def _aux_widths(self) -> tuple[int, ...]:
        return (IMAGE_CHANNELS, *self.feature_dims, self.M)

    def _register_transforms(self) -> None:
        widths = self._aux_widths()
        self.g_a = self._analysis()
        self.aux_enc = _olp_identity_not_saved(
            nn.ModuleList(AdaptiveFrequencyBlock(a, b) for a, b in zip(widths, widths[1:]))
        )
        self.g_s = self._synthesis()
        back = widths[::-1]
        self.aux_dec = _olp_identity_not_saved(
            nn.ModuleList(InverseAdaptiveFrequencyBlock(a, b) for a, b in zip(back, back[1:]))
        )

    def _register_priors(self) -> None:
        super()._register_priors()
        self.diffusion_prior = DenoisingAsRegularizer(latent_dim=self.M)
        if (self.hyper_channels, self.M) != (192, 320):
            # Master sizes the condition path from the config; upstream hard-codes 192 -> 256 -> 320.
            self.diffusion_prior.condition_encoder = _condition_encoder(self.hyper_channels, self.M)

    def analysis(self, x: Tensor) -> Tensor:
        # The aux stream continues from its resized map, as upstream; master resizes a copy only.
        return run_with_aux(self.g_a, self.aux_enc, x)

    def synthesis(self, y_hat: Tensor) -> Tensor:
        return run_with_aux(self.g_s, self.aux_dec, y_hat)

    def extra_forward_outputs(self, y: Tensor) -> dict[str, Tensor]:
        if not self.training:
            return {"diffusion_loss": torch.tensor(0.0, device=y.device)}
        # The prior is conditioned on the rounded hyper-latent; recompute it the way the codec does.
        codec = self.latent_codec
        z_hat = codec.z(codec.h_a(y))["y_hat"]
        return {"diffusion_loss": self.diffusion_prior(y, z_hat)}

    @classmethod
    def attention_geometry(cls, state_dict: Mapping[str, Tensor], stage: str, width: int) -> tuple[int, int]:
        table = require_key(state_dict, f"{stage}.layers.0.msa.relative_position_bias_table", cls.family)
        rows, heads = table.shape
        side = math.isqrt(rows)
        if side * side != rows or side % 2 == 0:
            raise IncompatibleStateDictError(
                f"{stage}: relative-position table has {rows} rows, not the square of an odd side"
            )
        return width // heads, (side + 1) // 2


def _largest_group_count(channels: int) -> int:
    return max(g for g in range(1, DIFFUSION_GROUPS + 1) if channels % g == 0)


def _condition_encoder(hyper_channels: int, M: int) -> nn.Sequential:
    """The diffusion prior's ``z_hat`` path with master's widths ``hc -> max(4M/5, 4) -> M``."""
    hidden = max(M * 4 // 5, 4)
    return nn.Sequential(
        nn.Conv2d(hyper_channels, hidden, 1),
        nn.GroupNorm(_largest_group_count(hidden), hidden),
        nn.GELU(),
        nn.Conv2d(hidden, M, 3, padding=1),
        nn.Dropout(0.1),
        nn.GELU(),
    )
