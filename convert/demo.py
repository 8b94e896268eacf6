"""Embedded demo checkpoints: upstream-format files synthesized from the shipped layouts.

``lic-convert --demo NAME`` needs no download: the upstream layout and constant buffers of every
published configuration ship with the package, and the ``lic-fixture-v1`` recipe fills the
parameters with deterministic values (the same ones the golden fixtures were computed with).
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import layouts, registry, synth
from .writer import atomic_path


def demo_names() -> list[str]:
    """Every published configuration (its aliases work too, e.g. a family's name for its main one)."""
    return registry.configuration_names()


def resolve(name: str) -> str:
    """The configuration ``name`` stands for (itself or an alias); a one-line error if none."""
    return registry.configuration(name).name


def demo_checkpoint(name: str, path: Path, *, seed: int = 0) -> Path:
    """Write the synthetic upstream checkpoint of configuration ``name`` to ``path`` (a .pth.tar)."""
    name = resolve(name)
    layout = layouts.load(name, "upstream")
    manifest = {
        "recipe": layout.meta["recipe"],
        "state_dict": [[e.key, list(e.shape), e.dtype, e.kind] for e in layout.entries],
    }
    state_dict = synth.state_dict_from_manifest(manifest, layouts.upstream_constants(name), seed=seed)
    # the key spelling the authors' training script writes (e.g. compressai <= 1.2.6 bottleneck names)
    spelling = layout.meta.get("checkpoint_spelling", {})
    container = synth.checkpoint_container(state_dict, layout.meta["checkpoint_container"]["top_level_keys"],
                                           key_prefix=spelling.get("key_prefix", ""),
                                           legacy_entropy_bottleneck=spelling.get("legacy_entropy_bottleneck", False))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(container, tmp)
    return path
