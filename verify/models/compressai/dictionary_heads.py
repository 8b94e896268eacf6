"""Per-slice context heads of DCAE and SAAF in CompressAI master's layout.

Both families predict slice ``k`` from the hyperprior, the decoded support slices and one learned
dictionary shared by every slice. In master's layout the dictionary lives once at the model root
(``shared_dictionary.dt``) and each head ``latent_codec.y.channel_context.y{k}`` holds
``cross_attention``, ``mean_cc`` and ``scale_cc``.

Channel order: master's heads read ``cat(means, scales, *support)`` where upstream reads
``cat(scales, means, *support)``; the converter swaps the first two ``M``-blocks of the four
affected input weights, so the computation is the same linear maps on permuted inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..blocks.dictionary import DICTIONARY_HEAD_DIM, DictionaryCrossAttention
from ..blocks.slice_transforms import SliceTransform

__all__ = ["DictionaryContextHead", "SharedDictionary", "dictionary_width"]

#: Hidden width multiplier of the cross-attention's gated MLP (hard-coded in master and upstream).
CROSS_ATTENTION_MLP_RATE = 4


def dictionary_width(dict_head_num: int) -> int:
    """Entry width the dictionary attention block works with: 32 channels per head."""
    return DICTIONARY_HEAD_DIM * dict_head_num


class SharedDictionary(nn.Module):
    """The learned ``(dict_num, dictionary_dim)`` dictionary every slice head attends to."""

    def __init__(self, dict_num: int, dictionary_dim: int) -> None:
        super().__init__()
        self.dt = nn.Parameter(torch.randn(dict_num, dictionary_dim))

    def batched(self, batch: int) -> Tensor:
        """The entries repeated over a batch: ``[batch, dict_num, dictionary_dim]``."""
        return self.dt.repeat(batch, 1, 1)


class DictionaryContextHead(nn.Module):
    """Head ``y{k}``: ``query = cat(means, scales, *support)`` -> ``cat(scales, means, support)``.

    ``support = cat(query, cross_attention(query, dictionary))`` is what both cc transforms read
    and what the slice's LRP transform sees next to the rounded slice. The dictionary is reached
    through ``dictionary`` (a callable returning the batched entries) rather than held as a
    submodule, so its single parameter is not duplicated under every head's keys.
    """

    def __init__(
        self,
        query_channels: int,
        latent_channels: int,
        slice_channels: int,
        dict_head_num: int,
        dictionary: Callable[[int], Tensor],
    ) -> None:
        super().__init__()
        self.cross_attention = DictionaryCrossAttention(
            query_channels,
            latent_channels,
            mlp_rate=CROSS_ATTENTION_MLP_RATE,
            head_num=dict_head_num,
            qkv_bias=True,
        )
        support_channels = query_channels + latent_channels
        self.mean_cc = SliceTransform(support_channels, slice_channels)
        self.scale_cc = SliceTransform(support_channels, slice_channels)
        self.support_channels = support_channels
        self._dictionary = dictionary

    def forward(self, query: Tensor) -> Tensor:
        attended = self.cross_attention(query, self._dictionary(query.shape[0]))
        support = torch.cat([query, attended], dim=1)
        return torch.cat([self.scale_cc(support), self.mean_cc(support), support], dim=1)
