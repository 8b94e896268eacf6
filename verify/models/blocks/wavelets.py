"""TCM+AuxT's auxiliary wavelet branch: Haar DWT / IDWT, WLS / iWLS and the OLP projection.

The Haar filters are built from PyWavelets' float64 coefficients converted to float32 and
multiplied in float32, exactly as the AuxT code does, so the taps are +-0.49999997 (not 0.5) and
equal the checkpoint buffers ``dwt.w_ll|w_lh|w_hl|w_hh`` and ``idwt.filters``.

Band layout: the DWT returns band-major channels ``[LL | LH | HL | HH]`` (each ``C`` wide), where
LH is high-pass along H and HL high-pass along W; the IDWT expects the same layout.
"""

from __future__ import annotations

import pywt
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["HaarDWT", "HaarIDWT", "OLP", "WLS", "iWLS", "haar_analysis_taps", "haar_synthesis_taps"]


def _outer(rows: Tensor, cols: Tensor) -> Tensor:
    """2-D separable kernel ``k[i, j] = rows[i] * cols[j]`` computed in the inputs' dtype."""
    return cols.unsqueeze(0) * rows.unsqueeze(1)


def haar_analysis_taps(wavelet: str = "haar") -> dict[str, Tensor]:
    """Four 2x2 analysis kernels (float32), keyed ``ll``/``lh``/``hl``/``hh`` (row band first)."""
    w = pywt.Wavelet(wavelet)
    # correlation with the time-reversed decomposition filters = convolution with the filters
    low = torch.tensor(w.dec_lo[::-1], dtype=torch.float32)
    high = torch.tensor(w.dec_hi[::-1], dtype=torch.float32)
    return {"ll": _outer(low, low), "lh": _outer(high, low), "hl": _outer(low, high), "hh": _outer(high, high)}


def haar_synthesis_taps(wavelet: str = "haar") -> Tensor:
    """Stacked 2x2 synthesis kernels ``[4, 1, 2, 2]`` (float32) in band order LL, LH, HL, HH."""
    w = pywt.Wavelet(wavelet)
    low = torch.tensor(w.rec_lo, dtype=torch.float32)
    high = torch.tensor(w.rec_hi, dtype=torch.float32)
    bands = (_outer(low, low), _outer(high, low), _outer(low, high), _outer(high, high))
    return torch.stack(bands).unsqueeze(1)


class HaarDWT(nn.Module):
    """One-level 2-D DWT, ``[B, C, H, W] -> [B, 4C, H/2, W/2]`` (band-major)."""

    def __init__(self, wave: str = "haar") -> None:
        super().__init__()
        for band, taps in haar_analysis_taps(wave).items():
            self.register_buffer(f"w_{band}", taps[None, None])

    def forward(self, x: Tensor) -> Tensor:
        x = x.contiguous()
        channels = x.shape[1]
        pad = self.w_ll.shape[-1] // 4
        bands = [
            F.conv2d(x, taps.expand(channels, -1, -1, -1), stride=2, groups=channels, padding=pad)
            for taps in (self.w_ll, self.w_lh, self.w_hl, self.w_hh)
        ]
        return torch.cat(bands, dim=1)


class HaarIDWT(nn.Module):
    """Inverse of :class:`HaarDWT`, ``[B, 4C, H, W] -> [B, C, 2H, 2W]``."""

    def __init__(self, wave: str = "haar") -> None:
        super().__init__()
        self.register_buffer("filters", haar_synthesis_taps(wave))

    def forward(self, x: Tensor) -> Tensor:
        batch, _, height, width = x.shape
        # band-major -> channel-major so that each group of 4 inputs is one channel's 4 bands
        x = x.view(batch, 4, -1, height, width).transpose(1, 2)
        channels = x.shape[1]
        x = x.reshape(batch, -1, height, width)
        return F.conv_transpose2d(x, self.filters.repeat(channels, 1, 1, 1), stride=2, groups=channels)


class OLP(nn.Module):
    """Token-wise linear projection (trained with an orthogonality penalty, see :meth:`ortho_loss`)."""

    def __init__(self, in_features: int, out_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_dim, bias=bias)
        self.in_dim = in_features
        self.out_dim = out_dim

    def ortho_loss(self) -> Tensor:
        """MSE between the smaller Gram matrix of the weight and the identity (training only)."""
        weight = self.linear.weight
        gram = weight @ weight.t() if self.in_dim > self.out_dim else weight.t() @ weight
        return F.mse_loss(gram, torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


def _band_scaling(channels: int) -> nn.Parameter:
    """Initial per-band log-scales ``[1, 1, 4C]``: 0.5 for LL, LH, HL and 0 for HH."""
    init = torch.cat([torch.full((1, 1, channels), 0.5)] * 3 + [torch.zeros(1, 1, channels)], dim=2)
    return nn.Parameter(init)


class WLS(nn.Module):
    """Wavelet-linear-scaling down step: DWT, per-band ``exp`` scaling, then an OLP over channels."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.dwt = HaarDWT("haar")
        self.OLP = OLP(in_dim * 4, out_dim)
        self.scaling_factors = _band_scaling(in_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.dwt(x)
        batch, _, height, width = x.shape
        tokens = x.view(batch, -1, height * width).permute(0, 2, 1)
        tokens = self.OLP(tokens * torch.exp(self.scaling_factors))
        return tokens.view(batch, height, width, -1).permute(0, 3, 1, 2)


class iWLS(nn.Module):
    """Inverse step: OLP over channels, undo the per-band scaling, then IDWT (doubles H and W)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.idwt = HaarIDWT("haar")
        self.OLP = OLP(in_dim, out_dim * 4)
        self.scaling_factors = _band_scaling(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, _, height, width = x.shape
        tokens = x.view(batch, -1, height * width).permute(0, 2, 1)
        tokens = self.OLP(tokens) / torch.exp(self.scaling_factors)
        return self.idwt(tokens.view(batch, height, width, -1).permute(0, 3, 1, 2))
