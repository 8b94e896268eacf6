"""SAAF (huidong-ma/SAAF ``models/saaf.py``) re-implemented on the DCAE skeleton.

Differences from DCAE: every Swin stage becomes a sparse-window-attention stage with global
tokens; parallel adaptive-frequency branches (``aux_enc`` / ``aux_dec``) are added into the
main path at four points of g_a and g_s; and a training-only ``diffusion_prior`` is registered
(its keys are in the checkpoint; in eval ``diffusion_loss`` is 0). State-dict keys, shapes and
order equal an upstream ``SAAF()`` checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..blocks.saaf_blocks import (
    OLP,
    AdaptiveFrequencyBlock,
    DenoisingAsRegularizer,
    InverseAdaptiveFrequencyBlock,
    SpatialAttentionBlock,
)
from .dcae import FEATURE_DIMS, IMAGE_CHANNELS, DCAE

#: ``g_a`` / ``g_s`` index ranges after which the auxiliary branch is merged into the main path.
MERGE_SEGMENTS = ((0, 1), (1, 3), (3, 5), (5, 7))


def _merge(main: Tensor, aux: Tensor) -> tuple[Tensor, Tensor]:
    """Resize ``aux`` bilinearly to ``main``'s size when they differ; return (main + aux, aux).

    Upstream quirk reproduced on purpose: the resized aux map replaces the aux stream, so the
    next aux block runs at the main path's resolution of this merge point.
    """
    if aux.shape[2:] != main.shape[2:]:
        aux = F.interpolate(aux, size=main.shape[2:], mode="bilinear", align_corners=False)
    return main + aux, aux


def run_with_aux(main_layers: nn.Sequential, aux_blocks: nn.ModuleList, x: Tensor) -> Tensor:
    """Run ``main_layers`` segment by segment, adding the chained aux branch after each segment."""
    main, aux = x, x
    for (start, stop), aux_block in zip(MERGE_SEGMENTS, aux_blocks):
        for layer in main_layers[start:stop]:
            main = layer(main)
        main, aux = _merge(main, aux_block(aux))
    return main


class SAAF(DCAE):
    """Upstream ``SAAF`` with its constructor signature (defaults as upstream)."""

    stage_type = SpatialAttentionBlock
    dictionary_support_cap = 5
    slice_transform_latent = None  # SAAF sizes its cc/lrp transforms from M

    def _register_dictionary(self, M: int) -> None:
        super()._register_dictionary(M)
        self.diffusion_prior = DenoisingAsRegularizer(latent_dim=M)

    def _aux_widths(self, M: int) -> tuple[int, ...]:
        return (IMAGE_CHANNELS,) + FEATURE_DIMS + (M,)

    def _register_analysis(self, M: int) -> None:
        super()._register_analysis(M)
        widths = self._aux_widths(M)
        self.aux_enc = nn.ModuleList(
            AdaptiveFrequencyBlock(widths[i], widths[i + 1]) for i in range(len(MERGE_SEGMENTS))
        )

    def _register_synthesis(self, M: int) -> None:
        super()._register_synthesis(M)
        widths = tuple(reversed(self._aux_widths(M)))
        self.aux_dec = nn.ModuleList(
            InverseAdaptiveFrequencyBlock(widths[i], widths[i + 1]) for i in range(len(MERGE_SEGMENTS))
        )

    def analysis(self, x: Tensor) -> Tensor:
        return run_with_aux(self.g_a, self.aux_enc, x)

    def synthesis(self, y_hat: Tensor) -> Tensor:
        return run_with_aux(self.g_s, self.aux_dec, y_hat)

    def extra_forward_outputs(self, x: Tensor, y: Tensor, z_hat: Tensor) -> dict[str, Any]:
        if self.training:
            return {"diffusion_loss": self.diffusion_prior(y, z_hat)}
        return {"diffusion_loss": torch.tensor(0.0, device=x.device)}

    def ortho_loss(self) -> Tensor:
        """Sum of the OLP orthogonality penalties while training, 0 in eval (as upstream)."""
        if not self.training:
            return torch.tensor(0.0)
        return sum(m.loss() for m in self.modules() if isinstance(m, OLP))
