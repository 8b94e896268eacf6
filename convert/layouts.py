"""The state-dict layouts the package ships: what a converted file must hold, and what upstream held.

Each published configuration has a folder ``mappings/layouts/<name>/`` (see ``tools/extract_layouts.py``).
A layout is an ordered ``key -> (shape, dtype, kind)`` table; a shape of ``None`` means "any size"
(entropy tables, empty before ``update()`` and filled after).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

LAYOUT_PACKAGE = "lic_checkpoints.mappings"


@dataclass(frozen=True)
class LayoutEntry:
    key: str
    shape: tuple[int, ...] | None
    dtype: str
    kind: str

    def accepts(self, shape: tuple[int, ...]) -> bool:
        """Whether a tensor of ``shape`` fits this entry.

        ``None`` fits any size; an empty buffer (an entropy table as a model is built, before
        ``update()`` fills it) also fits the filled table a checkpoint saved after ``update()`` holds.
        """
        if self.shape is None or tuple(shape) == self.shape:
            return True
        return self.kind != "param" and 0 in self.shape


@dataclass(frozen=True)
class Layout:
    name: str
    side: str  # "target" | "upstream"
    entries: tuple[LayoutEntry, ...]
    meta: dict[str, Any]

    def __post_init__(self):
        object.__setattr__(self, "_index", {e.key: e for e in self.entries})

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __getitem__(self, key: str) -> LayoutEntry:
        return self._index[key]

    def keys(self) -> list[str]:
        return [e.key for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)


def _folder(name: str):
    folder = resources.files(LAYOUT_PACKAGE) / "layouts" / name
    if not folder.is_dir():
        raise KeyError(name)
    return folder


def available() -> list[str]:
    root = resources.files(LAYOUT_PACKAGE) / "layouts"
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


@lru_cache(maxsize=None)
def load(name: str, side: str) -> Layout:
    """``side`` is ``"target"`` (CompressAI layout) or ``"upstream"``."""
    data = json.loads((_folder(name) / f"{side}.json").read_text())
    entries = tuple(
        LayoutEntry(key, None if shape is None else tuple(shape), dtype, kind)
        for key, shape, dtype, kind in data.pop("state_dict")
    )
    return Layout(name, side, entries, data)


def upstream_constants(name: str) -> dict:
    """Values of the upstream constant buffers (GDN pedestals, Haar filters, position indices, ...)."""
    from safetensors.torch import load

    return load((_folder(name) / "upstream_constants.safetensors").read_bytes())
