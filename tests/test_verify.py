"""lic-verify on the five fixtures, on a deliberately wrong mapping, and against a baseline."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import FIXTURE_NAMES, MAPPINGS_DIR, fixture_dir, fixture_expected, upstream_checkpoint
from lic_checkpoints.convert import api
from lic_checkpoints.verify.cli import main
from lic_checkpoints.verify.report import schema

# fixtures/README.md §6: forward tolerances recorded with the golden data
FORWARD = {"x_hat": 1e-4, "y": 1e-4, "means": 1e-4, "scales": 1e-4}
LIKELIHOODS = {"likelihoods_y": 1e-5, "likelihoods_z": 1e-5}


def run(args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made = {}

    def make(name):
        if name not in made:
            path = tmp_path_factory.mktemp(name) / "checkpoint_best.pth.tar"
            torch.save(upstream_checkpoint(name), path)
            made[name] = path
        return made[name]

    return make


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_every_tier_passes_and_reference_is_the_real_thing(name, checkpoints, tmp_path):
    torch.set_num_threads(2)
    src = checkpoints(name)
    out = tmp_path / "converted"
    api.convert_checkpoint(src, out)
    code, stdout, stderr = run([src, out, "--images", fixture_dir(name) / "input.safetensors",
                                "--save-outputs", tmp_path / "outputs"])
    assert code == 0, stdout + stderr
    report = json.loads((out / "parity_report.json").read_text())
    jsonschema.validate(report, schema())
    assert report["passed"] is True
    assert set(report["tiers"]) == {"T0", "T1", "T2", "T3"}
    assert all(t["passed"] and t["skipped"] is None for t in report["tiers"].values())
    # the reference side reproduces the authors' code (the golden fixture) within the recorded bounds
    reference = load_file(str(tmp_path / "outputs" / "reference.safetensors"))
    expected = fixture_expected(name)
    for key, tol in {**FORWARD, **LIKELIHOODS}.items():
        assert torch.allclose(reference[key], expected[key], rtol=tol, atol=tol), key
    assert torch.allclose(reference["decoded_x_hat"], expected["decoded_x_hat"], rtol=1e-4, atol=1e-4)
    target = load_file(str(tmp_path / "outputs" / "target.safetensors"))
    assert set(target) >= {"x_hat", "likelihoods_y", "likelihoods_z", "decoded_x_hat"}
    # T3 is in CompressAI's eval_model schema
    for side in report["eval_model"].values():
        assert side["description"] == "Inference (ans)"
        assert set(side["results"]) >= {"psnr-rgb", "ms-ssim-rgb", "bpp"}
    markdown = (out / "parity_report.md").read_text()
    assert "| Tier | Check | Result | Details |" in markdown and "|---|---|---|---|" in markdown


def test_wrong_mapping_fails_at_forward_and_points_at_the_first_divergence(checkpoints, tmp_path):
    """Dropping the means/scales swap of the mean head makes the means diverge first."""
    text = (MAPPINGS_DIR / "dcae.yaml").read_text()
    broken = re.sub(
        r'(  - name: mean head first conv \(means/scales order\)\n(?:    .*\n)*?)    ops: \[\{swap_blocks: \{dim: 1, sizes: \[M, M\]\}\}\]\n',
        r"\1", text, count=1)
    assert broken != text
    mapping = tmp_path / "dcae_broken.yaml"
    mapping.write_text(broken)
    code, stdout, stderr = run([checkpoints("dcae"), "--mapping", mapping, "--tiers", "T0,T1",
                                "--images", fixture_dir("dcae") / "input.safetensors", "--json", tmp_path / "r.json"])
    assert code == 1, stdout + stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["tiers"]["T0"]["passed"] is True  # the file follows its (wrong) rules exactly
    assert report["tiers"]["T1"]["passed"] is False
    first = next(c for c in report["tiers"]["T1"]["checks"] if not c["passed"])
    assert first["name"].endswith(": means"), first
    assert "first failure: T1" in stdout and ": means" in stdout


def test_baseline_passes_on_same_code_and_fails_on_perturbed_numbers(checkpoints, tmp_path):
    src = checkpoints("tcm_n64")
    args = [src, "--tiers", "T0,T1", "--images", fixture_dir("tcm_n64") / "input.safetensors"]
    code, _, _ = run(args + ["--json", tmp_path / "base.json"])
    assert code == 0
    baseline = json.loads((tmp_path / "base.json").read_text())
    jsonschema.validate(baseline, schema())

    code, _, stderr = run(args + ["--baseline", tmp_path / "base.json"])
    assert code == 0, stderr
    assert "no regression" in stderr

    check = next(c for c in baseline["tiers"]["T1"]["checks"] if c["name"].endswith("x_hat"))
    check["values"]["max_abs"] = check["values"]["max_abs"] + 1e-3
    (tmp_path / "perturbed.json").write_text(json.dumps(baseline))
    code, _, stderr = run(args + ["--baseline", tmp_path / "perturbed.json"])
    assert code == 1
    assert "REGRESSION" in stderr and "max_abs" in stderr


def test_usage_errors_exit_2(tmp_path):
    code, _, stderr = run([tmp_path / "absent.pth.tar"])
    assert code == 2 and stderr.startswith("lic-verify: error:") and "no such file" in stderr
    code, _, stderr = run([tmp_path / "absent.pth.tar", "--tiers", "T9"])
    assert code == 2 and "unknown tier" in stderr


def test_builtin_images_are_deterministic_and_match_the_fixture_formula():
    from lic_checkpoints.verify import images

    first = images.builtin()
    assert [i.name for i in first] == ["synthetic-0", "synthetic-1"]
    assert all(torch.equal(a.x, b.x) for a, b in zip(first, images.builtin()))
    stored = load_file(str(fixture_dir("dcae") / "input.safetensors"))["x"]
    assert torch.equal(first[0].x, stored)


def test_user_images_are_padded_like_upstream_eval(tmp_path):
    from PIL import Image

    from lic_checkpoints.verify import images

    rgb = (torch.rand(100, 300, 3) * 255).to(torch.uint8).numpy()
    Image.fromarray(rgb).save(tmp_path / "a.png")
    (img,) = images.load(tmp_path)
    assert img.x.shape == (1, 3, 256, 384)
    top, left, h, w = img.crop
    assert (h, w) == (100, 300) and top == 78 and left == 42
    assert torch.equal(img.unpad(img.x), torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255)


def test_upstream_repo_reference_runs_in_its_own_process(checkpoints, tmp_path):
    """--upstream-repo imports `models.<module>` from a clone in a child process.

    The clone here is a stand-in whose `models/tcm.py` re-exports our re-implementation (the tests have
    no network to fetch the authors' repository); it proves the plumbing: the child process, the
    authors'-style loading, and that its results flow into every tier.
    """
    clone = tmp_path / "LIC_TCM"
    (clone / "models").mkdir(parents=True)
    (clone / "models" / "__init__.py").write_text("")
    (clone / "models" / "tcm.py").write_text(
        "import os\n"
        "from lic_checkpoints.verify.models.upstream.tcm import TCM\n"
        "open(os.path.join(os.path.dirname(__file__), 'imported'), 'w').close()\n"
    )
    code, stdout, stderr = run([checkpoints("tcm_n64"), "--upstream-repo", clone, "--json", tmp_path / "r.json",
                                "--images", fixture_dir("tcm_n64") / "input.safetensors"])
    assert code == 0, stdout + stderr
    assert (clone / "models" / "imported").exists()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["reference"].startswith("the authors' TCM from")
    assert all(t["passed"] for t in report["tiers"].values())
    bytes_check = next(c for c in report["tiers"]["T2"]["checks"] if c["name"].endswith("bytes"))
    assert bytes_check["values"]["reference_streams"] == 2  # upstream: one y stream and one z stream


def test_upstream_repo_without_models_package_is_a_usage_error(checkpoints, tmp_path):
    code, _, stderr = run([checkpoints("tcm_n64"), "--upstream-repo", tmp_path, "--tiers", "T0,T1"])
    assert code == 2 and "no 'models' package" in stderr


def test_models_built_for_loading_run_no_parameter_initialiser():
    """Structural (not timed): inside ``parameters_on_meta`` nn.init leaves parameters alone."""
    from torch import nn

    from lic_checkpoints.verify import builders

    before = {n: getattr(nn.init, n) for n in builders.INITIALISERS if hasattr(nn.init, n)}
    param, plain = nn.Parameter(torch.zeros(3, 4)), torch.zeros(3, 4)
    with builders.parameters_on_meta():
        nn.init.kaiming_uniform_(param)
        nn.init.uniform_(plain, 1.0, 2.0)
        conv = nn.Conv2d(256, 256, 3)
    assert bool((param == 0).all())  # a parameter: skipped
    assert bool((plain >= 1).all())  # a plain tensor (buffers are built this way): initialised
    assert conv.weight.is_meta
    assert {n: getattr(nn.init, n) for n in before} == before  # restored on leaving
