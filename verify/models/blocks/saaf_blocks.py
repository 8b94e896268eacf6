"""SAAF's building blocks: sparse window attention with global tokens, adaptive-frequency
branches and the training-only denoising prior.

Attribute and buffer names are the upstream checkpoint layout (``global_tokens``,
``relative_position_bias_table``, ``relative_position_index``, ``global_alpha``, ``global_kv``,
``olp.identity_matrix``, ``freq_attn``, ``freq_weights``, ``time_embed`` ...). Shapes and op order
follow huidong-ma/SAAF so that outputs match it bit for bit on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dcae_blocks import AttentionStage
from .residual_bottleneck import ResidualBottleneckBlock
from .window_attention import relative_position_lookup

GLOBAL_ALPHA = 0.25
FREQUENCY_BANDS = 4  # LL, LH, HL, HH
INITIAL_BAND_WEIGHTS = (1.0, 0.8, 0.8, 0.6)


def relative_position_index(window_size: int) -> Tensor:
    """Flat index into a ``(2w-1)^2``-row bias table for every (query, key) pair of a window."""
    row_offset, col_offset = relative_position_lookup(window_size)
    return row_offset * (2 * window_size - 1) + col_offset


class CrossSparseWindowAttention(nn.Module):
    """Window self-attention blended with attention onto a few learned global tokens.

    The global tokens are shifted by the mean of each window, projected to keys/values by
    ``global_kv``, and the two attention outputs are mixed as ``(1-a)*local + a*global`` with the
    constant buffer ``a = global_alpha``. Channels-last input, sides multiple of the window.
    """

    def __init__(self, input_dim: int, output_dim: int, head_dim: int, window_size: int,
                 num_global_tokens: int = 2) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.head_dim = head_dim
        self.n_heads = input_dim // head_dim
        self.window_size = window_size
        self.num_global_tokens = num_global_tokens
        self.scale = head_dim ** -0.5
        self.embedding_layer = nn.Linear(input_dim, 3 * input_dim)
        self.global_tokens = nn.Parameter(torch.zeros(1, num_global_tokens, input_dim))
        self.global_kv = nn.Linear(input_dim, 2 * input_dim, bias=False)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, self.n_heads)
        )
        nn.init.trunc_normal_(self.global_tokens, std=0.02)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.linear = nn.Linear(input_dim, output_dim)
        self.register_buffer("global_alpha", torch.tensor(GLOBAL_ALPHA))

    def relative_bias(self) -> Tensor:
        """Per-head bias ``[heads, P, P]`` for the ``P = w*w`` positions of a window."""
        pixels = self.window_size ** 2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(pixels, pixels, -1).permute(2, 0, 1).contiguous()

    def _heads(self, projected: Tensor, parts: int) -> Tensor:
        """``[windows, tokens, parts*C]`` -> ``[parts, windows, heads, tokens, head_dim]``."""
        windows, tokens, _ = projected.shape
        return projected.reshape(windows, tokens, parts, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, channels = x.shape
        p = self.window_size
        rows, cols = height // p, width // p
        windows = x.reshape(batch, rows, p, cols, p, channels).permute(0, 1, 3, 2, 4, 5).contiguous()
        windows = windows.view(batch * rows * cols, p * p, channels)
        count = windows.shape[0]

        q, k, v = self._heads(self.embedding_layer(windows), 3)
        local = F.scaled_dot_product_attention(
            q, k, v, attn_mask=self.relative_bias().unsqueeze(0).expand(count, -1, -1, -1),
            dropout_p=0.0, scale=self.scale,
        )

        anchors = self.global_tokens.expand(count, -1, -1) + windows.mean(dim=1, keepdim=True)
        global_k, global_v = self._heads(self.global_kv(anchors), 2)
        # Upstream quirk reproduced on purpose: on the SDPA path q is never scaled, so the
        # global-token logits use the raw q (no head_dim ** -0.5 factor).
        global_weights = torch.einsum("bhqc,bhgc->bhqg", q, global_k).softmax(dim=-1)
        global_out = torch.einsum("bhqg,bhgc->bhqc", global_weights, global_v)

        mixed = (1 - self.global_alpha) * local + self.global_alpha * global_out
        out = self.linear(mixed.transpose(1, 2).reshape(count, p * p, channels))
        out = out.view(batch, rows, cols, p, p, -1).permute(0, 1, 3, 2, 4, 5).contiguous()
        return out.view(batch, height, width, -1)


class SpatialAttentionBlock(AttentionStage):
    """SAAF's stage: every layer uses :class:`CrossSparseWindowAttention` (no shifted windows)."""

    def make_attention(self, dim: int, head_dim: int, window_size: int, layer_index: int) -> nn.Module:
        return CrossSparseWindowAttention(dim, dim, head_dim, window_size)


class OLP(nn.Module):
    """Per-pixel linear projection with an orthogonality penalty (training only).

    ``identity_matrix`` is a persistent buffer upstream, so it is part of the checkpoint.
    """

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.linear = nn.Linear(in_dim, out_dim, bias=bias)
        self.register_buffer("identity_matrix", torch.eye(min(in_dim, out_dim)))

    def loss(self) -> Tensor:
        """MSE between the weight's Gram matrix (on its smaller side) and the identity."""
        weight = self.linear.weight
        gram = weight @ weight.t() if self.in_dim > self.out_dim else weight.t() @ weight
        return F.mse_loss(gram, self.identity_matrix)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


def _band_attention(in_dim: int) -> nn.Sequential:
    """1x1 conv to ``max(in/4, 4)``, GELU, 1x1 conv to 4 band weights, softmax over bands."""
    hidden = max(in_dim // 4, 4)
    return nn.Sequential(
        nn.Conv2d(in_dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, FREQUENCY_BANDS, 1), nn.Softmax(dim=1)
    )


def _project_pixels(olp: OLP, x: Tensor) -> Tensor:
    """Apply ``olp`` to every pixel of an NCHW map."""
    batch, _, height, width = x.shape
    projected = olp(x.flatten(2).permute(0, 2, 1))
    return projected.permute(0, 2, 1).view(batch, -1, height, width)


class AdaptiveFrequencyBlock(nn.Module):
    """Encoder side branch: reweight the input by 4 softmax band maps times learned band gains
    (``exp(freq_weights)``), sum the bands, then project channels with :class:`OLP`."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.olp = OLP(in_dim, out_dim)
        self.freq_attn = _band_attention(in_dim)
        self.freq_weights = nn.Parameter(torch.tensor(INITIAL_BAND_WEIGHTS))

    def forward(self, x: Tensor) -> Tensor:
        band_maps = self.freq_attn(x)
        band_gains = torch.exp(self.freq_weights).view(1, FREQUENCY_BANDS, 1, 1)
        banded = x.unsqueeze(1) * band_maps.unsqueeze(2) * band_gains.unsqueeze(2)
        return _project_pixels(self.olp, banded.sum(dim=1))


class InverseAdaptiveFrequencyBlock(nn.Module):
    """Decoder side branch: project channels, then add 0.1x the projection gated by the mean band map."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.olp = OLP(in_dim, out_dim)
        self.freq_attn = _band_attention(in_dim)

    def forward(self, x: Tensor) -> Tensor:
        band_maps = self.freq_attn(x)
        projected = _project_pixels(self.olp, x)
        return projected + 0.1 * (projected * band_maps.mean(dim=1, keepdim=True))


class DenoisingAsRegularizer(nn.Module):
    """Training-only regulariser: predicts the noise added to ``y`` from the noisy latent, a time
    embedding and a condition computed from ``z_hat``; returns the MSE of that prediction.

    Upstream hard-codes the condition path as 192 -> 256 -> 320 channels whatever ``latent_dim`` is.
    """

    def __init__(self, latent_dim: int = 320) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.time_embed = nn.Sequential(nn.Linear(1, latent_dim), nn.SiLU(), nn.Linear(latent_dim, latent_dim))
        self.noise_predictor = nn.Sequential(
            nn.Conv2d(latent_dim, latent_dim, 3, padding=1),
            nn.GroupNorm(8, latent_dim),
            nn.SiLU(),
            ResidualBottleneckBlock(latent_dim, latent_dim),
            ResidualBottleneckBlock(latent_dim, latent_dim),
            nn.Conv2d(latent_dim, latent_dim, 3, padding=1),
            nn.GroupNorm(8, latent_dim),
            nn.SiLU(),
            nn.Conv2d(latent_dim, latent_dim, 1),
        )
        self.condition_encoder = nn.Sequential(
            nn.Conv2d(192, 256, 1),
            nn.GroupNorm(8, 256),
            nn.GELU(),
            nn.Conv2d(256, 320, 3, padding=1),
            nn.Dropout(0.1),
            nn.GELU(),
        )

    def forward(self, y: Tensor, z_hat: Tensor) -> Tensor:
        batch, channels, height, width = y.shape
        condition = F.interpolate(self.condition_encoder(z_hat), size=(height, width), mode="bilinear",
                                  align_corners=False)
        t = torch.rand(batch, 1, device=y.device)
        noise = torch.randn_like(y)
        noisy = y + noise * t.view(batch, 1, 1, 1)
        t_embedding = self.time_embed(t).view(batch, channels, 1, 1)
        predicted = self.noise_predictor(noisy + t_embedding + condition)
        return F.mse_loss(predicted, noise)
