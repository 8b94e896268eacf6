"""Which family a state dict belongs to, and which published variant.

Each mapping's ``detect`` section lists key patterns that must all be present (``all``) and ones that
must be absent (``none``).  Exactly one family must match.  Its ``variables`` are then read off the
keys and shapes (M, N, K, ...), and the first ``variants`` entry whose ``when`` values agree names the
variant and the layout its output must have.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, Iterable, Mapping

from . import expr
from .errors import DetectionError
from .rules import Mapping_, Variant, load_mapping


@lru_cache(maxsize=None)
def shipped_mappings() -> tuple[Mapping_, ...]:
    root = resources.files("lic_checkpoints.mappings")
    files = sorted(p for p in root.iterdir() if p.name.endswith(".yaml"))
    return tuple(load_mapping(p) for p in files)


def mapping_for(family: str) -> Mapping_:
    for m in shipped_mappings():
        if m.family == family:
            return m
    known = ", ".join(m.family for m in shipped_mappings())
    raise DetectionError(f"unknown family {family!r}; known families: {known}")


def _any_match(pattern, keys: Iterable[str]) -> bool:
    return any(pattern.match(k) is not None for k in keys)


def matches(mapping: Mapping_, keys: list[str]) -> bool:
    return all(_any_match(p, keys) for p in mapping.detect_all) and not any(
        _any_match(p, keys) for p in mapping.detect_none
    )


def detect_family(keys: list[str], mappings: Iterable[Mapping_] | None = None) -> Mapping_:
    mappings = tuple(mappings or shipped_mappings())
    found = [m for m in mappings if matches(m, keys)]
    if len(found) == 1:
        return found[0]
    if not found:
        known = ", ".join(m.family for m in mappings)
        raise DetectionError(
            f"the checkpoint matches no known model family ({known}); "
            f"first keys: {', '.join(keys[:3])}; pass --family if you know which it is"
        )
    raise DetectionError(
        f"the checkpoint matches several families ({', '.join(m.family for m in found)}); "
        "it may mix two models' keys; pass --family to choose one"
    )


def read_variables(mapping: Mapping_, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """Evaluate the mapping's variables on a state dict given as ``key -> shape``."""
    values: dict[str, Any] = {}
    for var in mapping.variables:
        if var.kind == "shape":
            hits = [k for k in shapes if var.pattern.match(k) is not None]
            if not hits:
                raise DetectionError(
                    f"cannot read {var.name}: no key matches {var.pattern.text!r}; the checkpoint is incomplete"
                )
            shape = shapes[hits[0]]
            if var.dim >= len(shape):
                raise DetectionError(f"cannot read {var.name}: {hits[0]} has shape {list(shape)}")
            values[var.name] = int(shape[var.dim])
        elif var.kind == "count":
            seen = {var.pattern.match(k)[var.capture] for k in shapes if var.pattern.match(k) is not None}
            values[var.name] = len(seen)
        elif var.kind == "exists":
            values[var.name] = any(var.pattern.match(k) is not None for k in shapes)
        else:
            try:
                values[var.name] = expr.evaluate(var.expression, values)
            except expr.ExprError as exc:
                raise DetectionError(f"cannot compute {var.name}: {exc}") from None
    return values


@dataclass(frozen=True)
class Detection:
    mapping: Mapping_
    variables: dict[str, Any]
    variant: Variant

    @property
    def family(self) -> str:
        return self.mapping.family

    def describe(self) -> str:
        values = ", ".join(f"{k}={v}" for k, v in self.variables.items())
        return f"{self.mapping.family} / {self.variant.name} ({values})"


def pick_variant(mapping: Mapping_, variables: Mapping[str, Any]) -> Variant:
    for variant in mapping.variants:
        if all(variables.get(k) == v for k, v in variant.when):
            return variant
    supported = "; ".join(
        f"{v.name} ({', '.join(f'{k}={x}' for k, x in v.when)})" for v in mapping.variants
    )
    found = ", ".join(f"{k}={v}" for k, v in variables.items())
    raise DetectionError(
        f"{mapping.family} checkpoint with {found} is not a supported variant; supported: {supported}"
    )


def detect(shapes: Mapping[str, tuple[int, ...]], family: str | None = None,
           mappings: Iterable[Mapping_] | None = None) -> Detection:
    keys = list(shapes)
    mappings = tuple(mappings) if mappings is not None else None
    if family:
        mapping = next((m for m in mappings if m.family == family), None) if mappings else mapping_for(family)
        if mapping is None:
            raise DetectionError(f"the given mapping is for another family than {family!r}")
    else:
        mapping = detect_family(keys, mappings)
    if family and not matches(mapping, keys):
        raise DetectionError(
            f"the checkpoint does not look like {family}: "
            + _first_detect_failure(mapping, keys)
        )
    variables = read_variables(mapping, shapes)
    return Detection(mapping, variables, pick_variant(mapping, variables))


def _first_detect_failure(mapping: Mapping_, keys: list[str]) -> str:
    for p in mapping.detect_all:
        if not _any_match(p, keys):
            return f"no key matches {p.text!r}"
    for p in mapping.detect_none:
        hit = next(k for k in keys if p.match(k) is not None) if _any_match(p, keys) else None
        if hit:
            return f"it has {hit!r}, which {mapping.family} checkpoints never have"
    return "detection failed"
