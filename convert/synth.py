"""Synthesize upstream-format checkpoints with the ``lic-fixture-v1`` recipe.

The recipe turns a state-dict manifest (ordered ``[key, shape, dtype, kind]`` rows) plus the values of
its constant buffers into the exact tensors the golden fixtures were produced with: every parameter is
drawn from a NumPy ``RandomState`` seeded by the CRC32 of its key, scaled by a fan-in rule; buffers keep
the values of a freshly built model.  The demo and the tests use it, so neither needs a downloaded
checkpoint.
"""

from __future__ import annotations

import json
import math
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

RECIPE_NAME = "lic-fixture-v1"

_LEGACY_EB_NAMES = {"matrices": "_matrix", "biases": "_bias", "factors": "_factor"}


def recipe_tensor(
    key: str,
    shape: list[int] | tuple[int, ...],
    *,
    seed: int = 0,
    gain: float = 1.0,
    matrix_scale: float = 0.5,
    vector_scale: float = 0.2,
) -> torch.Tensor:
    """The recipe value of one parameter: float32, bit-exact on every platform (CPU arithmetic)."""
    shape = tuple(int(s) for s in shape)
    state = np.random.RandomState((zlib.crc32(key.encode("utf-8")) ^ seed) & 0xFFFFFFFF)
    draws = state.standard_normal(shape).astype(np.float32)
    if len(shape) >= 2:
        fan = int(np.prod(shape[1:]))
        values = (draws * np.float32(matrix_scale * gain)) / np.float32(math.sqrt(fan))
    else:
        values = draws * np.float32(vector_scale * gain)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(shape))


def is_recipe_param(key: str, kind: str) -> bool:
    """Parameters are drawn from the recipe, except the entropy bottleneck's quantiles (kept as built)."""
    return kind == "param" and not key.endswith("entropy_bottleneck.quantiles")


def state_dict_from_manifest(
    manifest: Mapping[str, Any],
    constants: Mapping[str, torch.Tensor],
    *,
    seed: int | None = None,
    gain: float | None = None,
) -> "OrderedDict[str, torch.Tensor]":
    """Rebuild the upstream ``state_dict()`` (before ``update()``) in manifest order."""
    recipe = manifest["recipe"]
    seed = recipe["seed"] if seed is None else seed
    gain = recipe["gain"] if gain is None else gain
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, shape, dtype, kind in manifest["state_dict"]:
        if is_recipe_param(key, kind):
            out[key] = recipe_tensor(
                key,
                shape,
                seed=seed,
                gain=gain,
                matrix_scale=recipe["matrix_scale"],
                vector_scale=recipe["vector_scale"],
            )
        elif key in constants:
            out[key] = constants[key].clone()
        else:
            out[key] = torch.empty(tuple(shape), dtype=getattr(torch, dtype))
    return out


def legacy_entropy_bottleneck_name(key: str) -> str:
    """``entropy_bottleneck.matrices.0`` -> ``entropy_bottleneck._matrix0`` (compressai <= 1.2.6), for
    every module whose name ends in ``entropy_bottleneck`` (e.g. ``z_entropy_bottleneck``)."""
    parts = key.split(".")
    if len(parts) >= 3 and parts[-3].endswith("entropy_bottleneck") and parts[-2] in _LEGACY_EB_NAMES:
        return ".".join(parts[:-2] + [_LEGACY_EB_NAMES[parts[-2]] + parts[-1]])
    return key


def checkpoint_container(
    state_dict: Mapping[str, torch.Tensor],
    top_level_keys: list[str],
    *,
    key_prefix: str = "",
    legacy_entropy_bottleneck: bool = False,
) -> dict[str, Any]:
    """Wrap a state dict the way an upstream training script saves it."""
    renamed: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, value in state_dict.items():
        if legacy_entropy_bottleneck:
            key = legacy_entropy_bottleneck_name(key)
        renamed[key_prefix + key] = value
    container: dict[str, Any] = {}
    for top in top_level_keys:
        if top == "state_dict":
            container[top] = renamed
        elif top == "epoch":
            container[top] = 0
        elif top == "loss":
            container[top] = torch.tensor(0.0)
        else:
            container[top] = {}
    return container


def checkpoint_from_manifest(
    manifest: Mapping[str, Any],
    constants: Mapping[str, torch.Tensor],
    **recipe_overrides: Any,
) -> dict[str, Any]:
    """The checkpoint the upstream training script would have saved, per the manifest's harness."""
    state_dict = state_dict_from_manifest(manifest, constants, **recipe_overrides)
    harness = manifest.get("harness", {})
    return checkpoint_container(
        state_dict,
        manifest["checkpoint_container"]["top_level_keys"],
        key_prefix=harness.get("key_prefix", ""),
        legacy_entropy_bottleneck=bool(harness.get("rename_entropy_bottleneck_to_legacy", False)),
    )


def load_manifest_dir(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read ``manifest.json`` and ``constants.safetensors`` from a fixture-style folder."""
    from safetensors.torch import load_file

    directory = Path(directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    constants = load_file(str(directory / "constants.safetensors"))
    return manifest, constants
