"""Checks shared by the CompressAI-layout models when a state dict is loaded or inspected.

A state dict of the wrong family or configuration is refused with one line that names what is
missing, unexpected or of the wrong shape, and which family the keys look like.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from lic_checkpoints.convert.errors import LicError

__all__ = ["FromStateDict", "IncompatibleStateDictError", "describe_mismatch", "guess_layout", "require_key"]

#: Entropy-model buffers whose size follows ``update()``; CompressionModel resizes them on load.
_TABLE_BUFFER = re.compile(r"(gaussian_conditional|entropy_bottleneck)\.(_quantized_cdf|_offset|_cdf_length|scale_table)$")
#: compressai <= 1.2.6 names of the bottleneck parameters, remapped by CompressionModel on load.
_LEGACY_BOTTLENECK = re.compile(r"entropy_bottleneck\._(matrix|bias|factor)(\d+)$")
_LEGACY_PLURAL = {"matrix": "matrices", "bias": "biases", "factor": "factors"}


class IncompatibleStateDictError(LicError, ValueError):
    """A state dict does not belong to this model family or configuration."""


def guess_layout(state_dict: Mapping[str, Any]) -> str:
    """Name the model family whose CompressAI-layout keys ``state_dict`` holds (best effort)."""
    keys = list(state_dict)

    def has(prefix: str = "", infix: str = "") -> bool:
        return any(k.startswith(prefix) and infix in k for k in keys)

    if has(infix="dt_cross_attention.") or has(infix="cc_mean_transforms.") or has(infix="mean_NAF_transforms."):
        return "an upstream (unconverted) checkpoint"
    if has("global_intra_context.") or has("local_context."):  # MLIC++'s per-slice contexts at the root
        return "an upstream (unconverted) checkpoint"
    if has(infix=".spatial_context_nonanchor."):  # a multi-context checkerboard leaf per slice
        return "MLIC++"
    if has("patch_embed.") and has("syn_layers."):
        return "STF"
    if has(infix=".conv_b.0.attn.attn."):  # window attention inside master's WMSA wrapper
        return "WACNN"
    if has("g_a.auxiliary_layers.") or has("AuxT_enc."):
        return "TCM+AuxT"
    if has(infix=".mean_support_transform.input_projection."):  # NAF support transforms (TCM's are SWAtten)
        return "CCA"
    if has(infix=".mean_support_transform."):
        return "TCM"
    if has("aux_enc."):
        return "SAAF"
    if "shared_dictionary.dt" in state_dict:
        return "DCAE"
    return "an unknown model"


def _normalised_key(key: str) -> str:
    """Spell legacy ``entropy_bottleneck._matrix0``-style keys the way the model names them."""
    match = _LEGACY_BOTTLENECK.search(key)
    if not match:
        return key
    return key[: match.start()] + f"entropy_bottleneck.{_LEGACY_PLURAL[match[1]]}.{match[2]}"


def _examples(keys: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (", ..." if len(keys) > limit else "")


def describe_mismatch(model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool) -> str:
    """One line listing missing / unexpected keys and shape mismatches; empty when it fits."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {_normalised_key(k): tuple(v.shape) for k, v in state_dict.items()}
    problems = []
    if strict:
        missing = [k for k in own if k not in given]
        unexpected = [k for k in given if k not in own]
        if missing:
            problems.append(f"{len(missing)} missing keys ({_examples(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys ({_examples(unexpected)})")
    reshaped = [
        f"{k}: state dict {list(shape)} vs model {list(own[k])}"
        for k, shape in given.items()
        if k in own and shape != own[k] and not _TABLE_BUFFER.search(k)
    ]
    if reshaped:
        problems.append(f"{len(reshaped)} shape mismatches ({_examples(reshaped)})")
    return "; ".join(problems)


def require_key(state_dict: Mapping[str, Tensor], key: str, family: str) -> Tensor:
    try:
        return state_dict[key]
    except KeyError:
        raise IncompatibleStateDictError(
            f"cannot infer the {family} configuration: the state dict has no {key!r}"
        ) from None


class FromStateDict:
    """``from_state_dict`` for a model class that defines ``check_family`` and ``infer_kwargs``."""

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Tensor]):
        """Build the model a CompressAI-layout state dict describes and load it strictly."""
        cls.check_family(state_dict)
        model = cls(**cls.infer_kwargs(state_dict))
        model.load_state_dict(state_dict, strict=True)
        return model
