"""CCA (LabShuHangGU/CCA): what only this family does, beyond the conformance suite.

CCA's ``train.py`` always builds the model with the auxiliary entropy model of the CCA loss
(``cca_training=True``), so its checkpoints hold 865 ``aux_entropymodel.*`` entries that the
inference model (upstream ``eval.py``, CompressAI master's ``CCAModel()``) has no place for. The
mapping drops them by a named rule without a way back: the report names them, ``config.json``
records them, and ``lic-convert --inverse`` refuses (one line) unless ``--without-dropped`` asks for
the inference checkpoint. The slices are uneven (8/28/56/92/136) and the hyper-latent bottleneck is
called ``z_entropy_bottleneck`` (legacy ``_matrix{i}`` names apply to it too).
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from conftest import CONFIGURATIONS, upstream_checkpoint
from lic_checkpoints.convert import api, report
from lic_checkpoints.convert.cli import main as convert_main
from lic_checkpoints.verify.models.upstream.cca import LICAutoencoder, slice_sizes

CCA = [c for c in CONFIGURATIONS if c.family.family == "cca"]
ids = [c.name for c in CCA]
AUX_PREFIX = "aux_entropymodel."
DROP_RULE = "auxiliary entropy model (training only)"


def _cli(args):
    result = CliRunner().invoke(convert_main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("conf", CCA, ids=ids)
def test_training_branch_is_dropped_by_its_rule_and_reported(conf, converted):
    state, result = converted(conf.name)
    aux = [k for k in result.source.state_dict if k.startswith(AUX_PREFIX)]
    assert len(aux) == 865
    dropped = {key: rule for key, rule in result.plan.dropped}
    assert set(dropped) == set(aux) and {r.name for r in dropped.values()} == {DROP_RULE}
    assert not any(k.startswith(("aux_", "aux_entropy_model.")) for k in state)
    rows = [r for r in report.rows(result.plan) if r["status"] == "DROPPED"]
    assert sum(r["count"] for r in rows) == 865 and {r["rule"] for r in rows} == {DROP_RULE}
    assert all(r["keys"].startswith(AUX_PREFIX) and "training-only" in r["detail"] for r in rows)
    assert result.config["source"]["dropped"] == [
        {"rule": DROP_RULE, "count": 865, "restorable": False, "reason": dropped[aux[0]].reason}]


@pytest.mark.parametrize("conf", CCA, ids=ids)
def test_inverse_refuses_in_one_line_then_writes_the_inference_checkpoint(conf, checkpoints, tmp_path):
    out = tmp_path / "converted"
    api.convert_checkpoint(checkpoints.path(conf.name), out)
    back = tmp_path / "upstream.pth.tar"
    code, stdout, stderr = _cli(["--inverse", out, "-o", back])
    assert code == 2 and not back.exists()
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "865" in lines[0] and DROP_RULE in lines[0] and "--without-dropped" in lines[0]
    # a bare model.safetensors knows it too (its metadata)
    code, _, stderr = _cli(["--inverse", out / api.MODEL_FILE, "-o", back])
    assert code == 2 and "--without-dropped" in stderr and len(stderr.strip().splitlines()) == 1
    code, stdout, stderr = _cli(["--inverse", out, "-o", back, "--without-dropped"])
    assert code == 0, stdout + stderr
    restored = torch.load(back, weights_only=True)["state_dict"]
    source = upstream_checkpoint(conf.name)["state_dict"]
    inference = {k: v for k, v in source.items() if not k.startswith(AUX_PREFIX)}
    assert list(restored) == list(inference) and len(restored) == 1451
    assert all(torch.equal(restored[k], v) for k, v in inference.items())
    # what upstream eval.py builds loads it strictly
    kwargs = {**conf.upstream_kwargs, "cca_training": False}
    result = LICAutoencoder(**kwargs).load_state_dict(restored, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize("conf", CCA, ids=ids)
def test_inference_checkpoint_round_trips_without_the_flag(conf, tmp_path):
    """A source without the training branch has nothing that cannot come back."""
    container = upstream_checkpoint(conf.name, key_prefix="module.", legacy_entropy_bottleneck=True)
    container["state_dict"] = {k: v for k, v in container["state_dict"].items() if not k.startswith("module." + AUX_PREFIX)}
    assert "module.z_entropy_bottleneck._matrix0" in container["state_dict"]
    src = tmp_path / "inference.pth.tar"
    torch.save(container, src)
    result = api.convert_checkpoint(src, tmp_path / "converted")
    assert result.config["source"]["dropped"] == []
    assert result.spelling.key_prefix == "module."
    assert {name for name, index in result.spelling.alternatives.items() if index} == {
        "entropy bottleneck matrices", "entropy bottleneck biases", "entropy bottleneck factors"}
    back = tmp_path / "back.pth.tar"
    code, stdout, stderr = _cli(["--inverse", tmp_path / "converted", "-o", back])
    assert code == 0, stdout + stderr
    restored = torch.load(back, weights_only=True)["state_dict"]
    assert list(restored) == list(container["state_dict"])
    assert all(torch.equal(restored[k], v) for k, v in container["state_dict"].items())


@pytest.mark.parametrize("conf", CCA, ids=ids)
def test_uneven_slices(conf, converted):
    state, result = converted(conf.name)
    sizes = slice_sizes(conf.upstream_kwargs["M"], conf.upstream_kwargs["prop_slices"])
    assert sizes == [8, 28, 56, 92, 136] == conf.target_kwargs["slice_proportions"]
    for k, width in enumerate(sizes):
        assert state[f"latent_codec.y.channel_context.y{k}.mean_cc.4.weight"].shape[0] == width
        # the LRP sees the post-NAF mean support (M + earlier slices) and the slice
        assert state[f"latent_codec.y.latent_codec.y{k}.lrp_transform.0.weight"].shape[1] == 320 + sum(sizes[: k + 1])
    assert json.loads(json.dumps(result.config["variables"])) == {"M": 320, "K": 5, "first": 8, "hyper": 192, "em": 224}
