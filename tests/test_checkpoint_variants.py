"""Checkpoints as they really come verify: float16 and bfloat16 files, entropy tables filled by
``update(force=True)``, and training containers with an optimizer state, on every family.

The smallest registered configuration goes through every variant on every tier; the smallest
configuration of each other family through a float16 file with filled tables (every tier) and a
bfloat16 file (T0 and T1: the dtype only changes the weights the models are built with). Each one
image, through ``lic-convert`` and ``lic-verify``. (``module.`` prefixes and legacy names on every
family: ``tests/test_spelling_roundtrip.py``.)
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from conftest import checkpoint_bytes, upstream_checkpoint
from lic_checkpoints.convert import engine, layouts, registry
from lic_checkpoints.convert.cli import main as convert_main
from lic_checkpoints.verify.api import verify_checkpoint
from lic_checkpoints.verify.builders import build_upstream

CONFIGURATION = registry.smallest_configuration()
VARIANTS = ("float16", "bfloat16", "filled-tables", "adam-container")
ALL_TIERS = ("T0", "T1", "T2", "T3")


def _per_family() -> list[registry.Configuration]:
    """The smallest configuration of each family but the smallest one's."""
    smallest: dict[str, registry.Configuration] = {}
    for conf in sorted(registry.configurations(), key=lambda c: checkpoint_bytes(c.name)):
        smallest.setdefault(conf.family.family, conf)
    return [c for c in smallest.values() if c.family.family != CONFIGURATION.family.family]


CASES = ([(CONFIGURATION, kind, ALL_TIERS) for kind in VARIANTS]
         + [case for conf in _per_family()
            for case in ((conf, "float16+filled-tables", ALL_TIERS), (conf, "bfloat16", ("T0", "T1")))])


def _variant(conf: registry.Configuration, kind: str) -> dict:
    checkpoint = upstream_checkpoint(conf.name)
    entry = next(k for k, v in checkpoint.items() if isinstance(v, dict) and v)
    state = dict(checkpoint[entry])
    for dtype in ("float16", "bfloat16"):
        if dtype in kind.split("+"):
            state = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in state.items()}
    if "filled-tables" in kind.split("+"):
        # what an eval-ready file holds after the authors' update(force=True): the tables come from the
        # weights as loaded (cast into float32 parameters), the weights stay as stored
        model = build_upstream(conf.family.family, conf.upstream_kwargs, state)
        model.update(force=True)
        filled = model.state_dict()
        state = {k: state[k] if k in state and state[k].numel() else filled[k].detach().clone() for k in filled}
    if kind == "adam-container":  # a training container: the optimizer's moments for every parameter
        params = [v for v in state.values() if v.is_floating_point()]
        checkpoint["optimizer"] = {
            "state": {i: {"step": torch.tensor(7.0), "exp_avg": torch.full_like(p, 0.25),
                          "exp_avg_sq": torch.full_like(p, 0.5)} for i, p in enumerate(params)},
            "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                              "amsgrad": False, "params": list(range(len(params)))}],
        }
    checkpoint[entry] = state
    return checkpoint


@pytest.mark.parametrize(("conf", "kind", "tiers"), CASES, ids=lambda v: v.name if hasattr(v, "name") else
                         v if isinstance(v, str) else "".join(t[1] for t in v))
def test_variant_converts_and_verifies(conf, kind, tiers, one_image, tmp_path):
    src, out = tmp_path / "checkpoint_best.pth.tar", tmp_path / "converted"
    checkpoint = _variant(conf, kind)
    torch.save(checkpoint, src)
    try:
        result = CliRunner().invoke(convert_main, [str(src), "-o", str(out)])
        assert result.exit_code == 0, result.output
        report = verify_checkpoint(src, out, images=one_image, tiers=tiers)
        assert [t.tier for t in report.tiers if not t.skipped] == list(tiers)
        assert report.passed, report.first_failure()
        if "T2" in tiers:
            (tables,) = [c for c in report.tiers[2].checks if c.name == "entropy tables"]
            if "filled-tables" in kind:
                assert tables.values == {"stored": "filled", "used": "rebuilt", "differing": []}
            else:
                assert tables.values["stored"] == "empty"
        dtype = next((d for d in ("float16", "bfloat16") if d in kind.split("+")), None)
        if dtype:
            assert dtype in report.source["dtypes"]
            assert any(dtype in note for note in report.notes)
            # the way back gives the file's tensors back in its dtype, regenerated buffers included
            back = tmp_path / "back.pth.tar"
            # keys a rule dropped with no way back (a training-only branch) are left out on request
            lost = set(engine.restorable_layout(layouts.load(conf.name, "upstream"), conf.family.rules)[1])
            flag = ["--without-dropped"] if lost else []
            result = CliRunner().invoke(convert_main, [str(out), "--inverse", "-o", str(back), *flag])
            assert result.exit_code == 0, result.output
            entry = next(k for k, v in checkpoint.items() if isinstance(v, dict) and v)
            restored = torch.load(back, weights_only=True)[entry]
            expected = {k: v for k, v in checkpoint[entry].items() if k not in lost}
            assert list(restored) == list(expected)
            for key, value in expected.items():
                assert restored[key].dtype == value.dtype and torch.equal(restored[key], value), key
        if kind == "adam-container":
            config = json.loads((out / "config.json").read_text())
            assert "optimizer" in config["source"]["ignored_entries"]
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_stale_stored_tables_are_reported_and_the_rebuilt_ones_used(one_image, tmp_path):
    """A file whose stored tables do not come from its weights (saved before the last step)."""
    checkpoint = _variant(CONFIGURATION, "filled-tables")
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
