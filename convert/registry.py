"""The family registry: what every part of the toolkit knows about a family comes from its YAML file.

``mappings/<family>.yaml`` declares the family's names, paper, the authors' repository and class,
our reference class (``upstream.ours``), our CompressAI-layout class (``target.ours``), CompressAI
master's class (``target.compressai_class``) and the published configurations (``variants``, each
with a shipped layout and optional aliases).  Builders, the installed-class lookup, the model card,
the demo, the help texts, the benchmarks and the tests ask here; none of them spells a family name.

A *configuration* is one variant that ships a layout (named after its layout folder): the unit the demo,
the golden fixtures and the conformance tests are parametrized over.  Importing this module does not
import torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from .detect import mapping_for, shipped_mappings
from .errors import LicError
from .rules import Mapping_, Variant

__all__ = [
    "Configuration", "configuration", "configuration_names", "configurations", "families", "family",
    "family_names", "import_class", "smallest_configuration",
]


@dataclass(frozen=True)
class Configuration:
    """One published configuration: a family's variant with a shipped layout."""

    name: str  # the name of its layout folder under mappings/layouts
    family: Mapping_
    variant: Variant

    @property
    def aliases(self) -> tuple[str, ...]:
        return self.variant.aliases

    @property
    def upstream_kwargs(self) -> dict[str, Any]:
        return dict(self.variant.upstream_kwargs)

    @property
    def target_kwargs(self) -> dict[str, Any]:
        return dict(self.variant.target_kwargs)

    def describe(self) -> str:
        return f"{self.family.name} {self.variant.name}"

    @property
    def input_multiple(self) -> int:
        """The authors' model needs image sides that are multiples of this (mapping ``input.multiple``)."""
        return int(self.family.extra["input"]["multiple"])

    @property
    def input_minimum(self) -> int:
        """... and at least this large (mapping ``input.minimum``)."""
        return int(self.family.extra["input"]["minimum"])

    def upstream_bytes(self) -> int:
        """The size of the tensors of an upstream checkpoint of this configuration (from its layout)."""
        import math

        from . import dtypes, layouts

        entries = layouts.load(self.name, "upstream").entries
        return sum(math.prod(e.shape or ()) * dtypes.get(e.dtype).itemsize for e in entries)


def families() -> tuple[Mapping_, ...]:
    """Every shipped family, in file-name order."""
    return shipped_mappings()


def family_names() -> list[str]:
    return [m.family for m in families()]


def family(name: str) -> Mapping_:
    """The family called ``name``; an unknown name is a one-line error listing the known ones."""
    return mapping_for(name)


def configurations() -> tuple[Configuration, ...]:
    """Every published configuration of every family, in family then variant order."""
    return tuple(
        Configuration(v.layout, m, v) for m in families() for v in m.variants if v.layout is not None
    )


def configuration_names() -> list[str]:
    return [c.name for c in configurations()]


def smallest_configuration() -> Configuration:
    """The configuration with the smallest checkpoint: the cheapest one for plumbing tests and demos."""
    return min(configurations(), key=Configuration.upstream_bytes)


def configuration(name: str) -> Configuration:
    """A configuration by its name or one of its aliases (a variant's ``aliases`` in its mapping file)."""
    for c in configurations():
        if name == c.name or name in c.aliases:
            return c
    raise LicError(f"no configuration called {name!r}; choose one of {', '.join(configuration_names())}")


def import_class(spec: str) -> type:
    """Import ``"package.module:Class"`` (or the dotted ``"package.module.Class"``)."""
    module_name, sep, class_name = spec.partition(":")
    if not sep:
        module_name, _, class_name = spec.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise LicError(f"cannot import {module_name}.{class_name}: {error}") from error
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise LicError(f"cannot import {module_name}.{class_name}: the module has no class {class_name}")
    return cls
