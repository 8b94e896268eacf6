"""Embedded demo checkpoints: upstream-format files synthesized from the shipped layouts.

``lic-convert --demo dcae`` needs no download: the upstream layout and constant buffers of every
published configuration ship with the package, and the ``lic-fixture-v1`` recipe fills the
parameters with deterministic values (the same ones the golden fixtures were computed with).
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import layouts, synth
from .errors import LicError
from .writer import atomic_path

ALIASES = {"tcm": "tcm_n128", "tcm_auxt": "tcm_auxt_n64", "auxt": "tcm_auxt_n64"}


def demo_names() -> list[str]:
    return layouts.available()


def resolve(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in layouts.available():
        raise LicError(f"no demo called {name!r}; choose one of {', '.join(layouts.available())}")
    return name


def demo_checkpoint(name: str, path: Path, *, seed: int = 0) -> Path:
    """Write the synthetic upstream checkpoint of configuration ``name`` to ``path`` (a .pth.tar)."""
    name = resolve(name)
    layout = layouts.load(name, "upstream")
    manifest = {
        "recipe": layout.meta["recipe"],
        "state_dict": [[e.key, list(e.shape), e.dtype, e.kind] for e in layout.entries],
    }
    state_dict = synth.state_dict_from_manifest(manifest, layouts.upstream_constants(name), seed=seed)
    container = synth.checkpoint_container(state_dict, layout.meta["checkpoint_container"]["top_level_keys"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(container, tmp)
    return path
