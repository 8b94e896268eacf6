"""Checks shared by the CompressAI-layout models when a state dict is loaded or inspected.

A state dict of the wrong family or configuration is refused with one line that names what is
missing, unexpected or of the wrong shape, and which family the keys look like.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from lic_checkpoints.convert.errors import LicError

__all__ = ["FromStateDict", "IncompatibleStateDictError", "describe_mismatch", "guess_layout", "key_shape",
           "require_key"]

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


def key_shape(state_dict: Mapping[str, Tensor], family: str) -> Callable[[str], tuple[int, ...]]:
    """``shape(key)`` of a state dict's tensors, refusing an absent key in one line (for ``infer_kwargs``)."""

    def shape(key: str) -> tuple[int, ...]:
        return tuple(require_key(state_dict, key, family).shape)

    return shape


class FromStateDict:
    """Loading shared by the CompressAI-layout model classes.

    ``from_state_dict`` builds the model a state dict describes (``check_family``, then
    ``infer_kwargs``, then a strict load); ``load_state_dict`` is CompressionModel's loader (tables
    resized, legacy bottleneck names remapped) that first refuses, in one line, a state dict of
    another family or configuration, and keeps the constructor's values of absent derived constants
    (:meth:`derived_constant`), as master's loader allows.
    """

    family: str
    #: key endings of buffers the constructor rebuilds identically (a state dict may leave them out)
    derived_buffer_suffixes: tuple[str, ...] = ()

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Tensor]):
        """Build the model a CompressAI-layout state dict describes and load it strictly."""
        cls.check_family(state_dict)
        model = cls(**cls.infer_kwargs(state_dict))
        model.load_state_dict(state_dict, strict=True)
        return model

    @classmethod
    def layout_names(cls) -> tuple[str, ...]:
        """The names :func:`guess_layout` gives the layouts this class loads."""
        return (cls.family,)

    def layout_name(self) -> str:
        """The name :func:`guess_layout` gives this model's own layout."""
        return self.family

    @classmethod
    def derived_constant(cls, key: str) -> bool:
        return bool(cls.derived_buffer_suffixes) and key.endswith(cls.derived_buffer_suffixes)

    @classmethod
    def check_family(cls, state_dict: Mapping[str, Tensor]) -> None:
        """Raise :class:`IncompatibleStateDictError` unless ``state_dict`` is a CompressAI-layout
        checkpoint this class loads."""
        found = guess_layout(state_dict)
        if found not in cls.layout_names():
            advice = " (convert it first with lic-convert)" if found.startswith("an upstream") else ""
            raise IncompatibleStateDictError(
                f"{cls.__name__}.from_state_dict: the state dict holds {found}{advice}, "
                f"not a CompressAI-layout {cls.__name__}"
            )

    def load_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True):
        found = guess_layout(state_dict)  # before the derived constants are added: they are this model's
        own = self.state_dict()
        filled = {k: v for k, v in own.items() if k not in state_dict and self.derived_constant(k)}
        if filled:
            state_dict = {**state_dict, **filled}
        problems = describe_mismatch(self, state_dict, strict)
        if problems:
            name = self.layout_name()
            hint = "" if found == name else f"; it looks like {found}, not {name}"
            raise IncompatibleStateDictError(f"{self.describe()} cannot load this state dict: {problems}{hint}")
        return super().load_state_dict(state_dict, strict=strict)
