"""Shared test helpers: the golden fixtures in ``../shared/fixtures`` and checkpoints rebuilt from them."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from lic_checkpoints.convert import synth

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LIC_SHARED_DIR", REPO_ROOT.parent / "shared"))
FIXTURES_DIR = SHARED / "fixtures"
TARGETS_DIR = SHARED / "targets"
FIXTURE_NAMES = ("tcm_n64", "tcm_n128", "tcm_auxt_n64", "dcae", "saaf")


def fixture_dir(name: str) -> Path:
    path = FIXTURES_DIR / name
    if not path.is_dir():
        pytest.fail(f"golden fixture {path} is missing: the tests need ../shared/fixtures beside the repo")
    return path


@lru_cache(maxsize=None)
def fixture_manifest(name: str):
    return synth.load_manifest_dir(fixture_dir(name))


@lru_cache(maxsize=2)
def _upstream_state_dict_cached(name: str):
    manifest, constants = fixture_manifest(name)
    return synth.state_dict_from_manifest(manifest, constants)


def upstream_state_dict(name: str):
    """A fresh dict (tensors shared with a small cache) of the rebuilt upstream state dict."""
    return dict(_upstream_state_dict_cached(name))


def upstream_checkpoint(name: str, **harness):
    """The upstream training-script checkpoint, with optional harness overrides (prefix, legacy names)."""
    manifest, _ = fixture_manifest(name)
    h = dict(manifest.get("harness", {}))
    return synth.checkpoint_container(
        _upstream_state_dict_cached(name),
        manifest["checkpoint_container"]["top_level_keys"],
        key_prefix=harness.get("key_prefix", h.get("key_prefix", "")),
        legacy_entropy_bottleneck=harness.get(
            "legacy_entropy_bottleneck", bool(h.get("rename_entropy_bottleneck_to_legacy", False))
        ),
    )


def fixture_input(name: str) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(fixture_dir(name) / "input.safetensors"))["x"]


def fixture_expected(name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(fixture_dir(name) / "expected.safetensors"))


def fixture_expected_json(name: str) -> dict:
    import json

    return json.loads((fixture_dir(name) / "expected.json").read_text())


@pytest.fixture(params=FIXTURE_NAMES)
def fixture_name(request):
    return request.param

MAPPINGS_DIR = REPO_ROOT / "mappings"

#: the entropy tables that update(force=True) fills (upstream names), as stored in expected.safetensors
ENTROPY_TABLES = (
    "entropy_bottleneck._quantized_cdf",
    "entropy_bottleneck._offset",
    "entropy_bottleneck._cdf_length",
    "gaussian_conditional._quantized_cdf",
    "gaussian_conditional._offset",
    "gaussian_conditional._cdf_length",
    "gaussian_conditional.scale_table",
)

#: fixtures/README.md section 6: the forward tolerances recorded with the golden data
FORWARD_TOL = dict(rtol=1e-4, atol=1e-4)
LIKELIHOOD_TOL = dict(rtol=0.0, atol=1e-5)


def assert_forward_matches_fixture(name: str, out: dict) -> dict[str, float]:
    """Compare a forward output (upstream's dict shape, with ``para``) with the fixture; max |diff| per tensor."""
    expected = fixture_expected(name)
    produced = {
        "x_hat": out["x_hat"],
        "y": out["para"]["y"],
        "means": out["para"]["means"],
        "scales": out["para"]["scales"],
        "likelihoods_y": out["likelihoods"]["y"],
        "likelihoods_z": out["likelihoods"]["z"],
    }
    diffs = {}
    for key, value in produced.items():
        assert value.shape == expected[key].shape, key
        tol = LIKELIHOOD_TOL if key.startswith("likelihoods") else FORWARD_TOL
        diffs[key] = (value - expected[key]).abs().max().item()
        assert torch.allclose(value, expected[key], **tol), (key, diffs[key])
    return diffs
