"""The small per-slice convolution stack used for mean / scale / LRP prediction.

Every upstream slice model (TCM, TCM+AuxT, DCAE, SAAF) maps its support tensor to one latent
slice with three 3x3 convolutions (``in -> 224 -> 128 -> out``) separated by GELUs. The
checkpoint keys are ``.0``, ``.2`` and ``.4`` of an ``nn.Sequential``.
"""

from __future__ import annotations

from torch import nn

__all__ = ["HIDDEN_WIDTHS", "SliceTransform"]

HIDDEN_WIDTHS = (224, 128)


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)


class SliceTransform(nn.Sequential):
    """``conv3x3(in, 224) - GELU - conv3x3(224, 128) - GELU - conv3x3(128, out)``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        first, second = HIDDEN_WIDTHS
        super().__init__(
            _conv3x3(in_channels, first),
            nn.GELU(),
            _conv3x3(first, second),
            nn.GELU(),
            _conv3x3(second, out_channels),
        )

