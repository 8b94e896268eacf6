"""Checkpoints as they really come verify on every tier: float16 and bfloat16 files, entropy tables
filled by ``update(force=True)``, and training containers with an optimizer state.

Run on the smallest registered configuration and one image (the checks are about reading and
building, which every family shares); each variant goes through ``lic-convert`` and ``lic-verify``.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from conftest import upstream_checkpoint
from lic_checkpoints.convert import registry
from lic_checkpoints.convert.cli import main as convert_main
from lic_checkpoints.verify import images as images_mod
from lic_checkpoints.verify.api import verify_checkpoint
from lic_checkpoints.verify.builders import build_upstream

CONFIGURATION = registry.smallest_configuration()
VARIANTS = ("float16", "bfloat16", "filled-tables", "adam-container")


def _variant(kind: str) -> dict:
    checkpoint = upstream_checkpoint(CONFIGURATION.name)
    entry = next(k for k, v in checkpoint.items() if isinstance(v, dict) and v)
    state = dict(checkpoint[entry])
    if kind in ("float16", "bfloat16"):
        dtype = getattr(torch, kind)
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    elif kind == "filled-tables":  # what an eval-ready file holds after the authors' update(force=True)
        model = build_upstream(CONFIGURATION.family.family, CONFIGURATION.upstream_kwargs, state)
        model.update(force=True)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    elif kind == "adam-container":  # a training container: the optimizer's moments for every parameter
        params = [v for v in state.values() if v.is_floating_point()]
        checkpoint["optimizer"] = {
            "state": {i: {"step": torch.tensor(7.0), "exp_avg": torch.full_like(p, 0.25),
                          "exp_avg_sq": torch.full_like(p, 0.5)} for i, p in enumerate(params)},
            "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                              "amsgrad": False, "params": list(range(len(params)))}],
        }
    checkpoint[entry] = state
    return checkpoint


@pytest.fixture(scope="module")
def one_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("image") / "image.safetensors"
    save_file({"x": images_mod.builtin(1)[0].x.contiguous()}, str(path))
    return path


@pytest.mark.parametrize("kind", VARIANTS)
def test_variant_converts_and_verifies_on_every_tier(kind, one_image, tmp_path):
    src, out = tmp_path / "checkpoint_best.pth.tar", tmp_path / "converted"
    checkpoint = _variant(kind)
    torch.save(checkpoint, src)
    try:
        result = CliRunner().invoke(convert_main, [str(src), "-o", str(out)])
        assert result.exit_code == 0, result.output
        report = verify_checkpoint(src, out, images=one_image)
        assert [t.tier for t in report.tiers] == ["T0", "T1", "T2", "T3"]
        assert report.passed, report.first_failure()
        (tables,) = [c for c in report.tiers[2].checks if c.name == "entropy tables"]
        if kind == "filled-tables":
            assert tables.values == {"stored": "filled", "used": "rebuilt", "differing": []}
        else:
            assert tables.values["stored"] == "empty"
        if kind in ("float16", "bfloat16"):
            assert kind in report.source["dtypes"] and "float32" not in report.source["dtypes"]
            assert any(kind in note for note in report.notes)
        if kind == "adam-container":
            config = json.loads((out / "config.json").read_text())
            assert "optimizer" in config["source"]["ignored_entries"]
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_stale_stored_tables_are_reported_and_the_rebuilt_ones_used(one_image, tmp_path):
    """A file whose stored tables do not come from its weights (saved before the last step)."""
    checkpoint = _variant("filled-tables")
    entry = next(k for k, v in checkpoint.items() if isinstance(v, dict) and v)
    stale = next(k for k, v in checkpoint[entry].items() if k.endswith("_quantized_cdf") and v.numel())
    checkpoint[entry][stale] = checkpoint[entry][stale].clone()
    checkpoint[entry][stale].view(-1)[5] += 1
    src = tmp_path / "checkpoint_best.pth.tar"
    torch.save(checkpoint, src)
    try:
        report = verify_checkpoint(src, images=one_image, tiers=["T2"])
        (tables,) = [c for c in report.tiers[0].checks if c.name == "entropy tables"]
        assert tables.values["differing"] == [stale]
        assert "differ from the rebuilt ones" in tables.detail
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
