"""lic-verify as users call it: against a baseline, on user images, with the authors' code in a child process."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import CONFIGURATION_NAMES, SMALL, configuration, fixture_dir
from lic_checkpoints.convert.errors import LicError
from lic_checkpoints.verify.cli import main
from lic_checkpoints.verify.report import schema

#: the configuration with the smallest checkpoint: plumbing tests use it
CONF = configuration(SMALL)


def run(args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


# Every tier on every configuration, and a deliberately wrong mapping, are in test_conformance.py
# and quirks/ (the per-configuration matrix lives there).


def test_baseline_passes_on_same_code_and_fails_on_perturbed_numbers(checkpoints, tmp_path):
    src = checkpoints.path(SMALL)
    args = [src, "--tiers", "T0,T1", "--images", fixture_dir(SMALL) / "input.safetensors"]
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


@pytest.mark.parametrize("name", CONFIGURATION_NAMES)
def test_builtin_images_are_deterministic_and_match_the_fixture_formula(name):
    from lic_checkpoints.verify import images

    first = images.builtin()
    assert [i.name for i in first] == ["synthetic-0", "synthetic-1"]
    assert all(torch.equal(a.x, b.x) for a, b in zip(first, images.builtin()))
    stored = load_file(str(fixture_dir(name) / "input.safetensors"))["x"]
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


def test_images_follow_the_input_sides_the_mapping_declares(checkpoints, tmp_path):
    """A family whose authors' model takes sides that are multiples of 64 (``input:`` in its mapping)
    is verified on such images: padded to 64 from files, accepted as stored from safetensors."""
    from PIL import Image
    from safetensors.torch import save_file

    from lic_checkpoints.convert import registry
    from lic_checkpoints.verify import images
    from lic_checkpoints.verify.api import verify_checkpoint

    rgb = (torch.rand(100, 300, 3) * 255).to(torch.uint8).numpy()
    Image.fromarray(rgb).save(tmp_path / "a.png")
    (img,) = images.load(tmp_path, multiple=64, minimum=64)
    assert img.x.shape == (1, 3, 128, 320) and img.crop == (14, 10, 100, 300)
    save_file({"x": images.synthetic(0, 192, 320)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(images.LicError, match="multiples of 128, at least 256"):
        images.load(tmp_path / "x.safetensors")
    smaller = [c for c in registry.configurations() if c.input_multiple < 128]
    if not smaller:
        pytest.skip("no registered family takes sides smaller than multiples of 128")
    conf = min(smaller, key=lambda c: c.upstream_bytes())
    report = verify_checkpoint(checkpoints.path(conf.name), images=tmp_path / "x.safetensors", tiers=["T0"])
    assert report.passed and report.inputs[0]["shape"] == [1, 3, 192, 320]


def test_upstream_repo_reference_runs_in_its_own_process(checkpoints, tmp_path):
    """--upstream-repo imports `models.<module>` from a clone in a child process.

    The clone here is a stand-in whose module (the one the mapping names) re-exports our
    re-implementation under the authors' class name (the tests have no network to fetch the authors'
    repository); it proves the plumbing: the child process, the authors'-style loading, and that its
    results flow into every tier.
    """
    upstream = CONF.family.upstream
    package, _, module = upstream["module"].rpartition(".")
    assert package == "models"  # every upstream repository has a top-level package of that name
    ours_module, _, ours_class = upstream["ours"].partition(":")
    clone = tmp_path / "authors_clone"
    (clone / "models").mkdir(parents=True)
    (clone / "models" / "__init__.py").write_text("")
    (clone / "models" / f"{module}.py").write_text(
        "import os\n"
        f"from {ours_module} import {ours_class} as {upstream['class']}\n"
        "open(os.path.join(os.path.dirname(__file__), 'imported'), 'w').close()\n"
    )
    code, stdout, stderr = run([checkpoints.path(SMALL), "--upstream-repo", clone, "--json", tmp_path / "r.json",
                                "--images", fixture_dir(SMALL) / "input.safetensors"])
    assert code == 0, stdout + stderr
    assert (clone / "models" / "imported").exists()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["reference"].startswith(f"the authors' {upstream['class']} from")
    assert all(t["passed"] for t in report["tiers"].values())
    bytes_check = next(c for c in report["tiers"]["T2"]["checks"] if c["name"].endswith("bytes"))
    assert bytes_check["values"]["reference_streams"] == 2  # upstream: one y stream and one z stream


def test_upstream_repo_without_models_package_is_a_usage_error(checkpoints, tmp_path):
    code, _, stderr = run([checkpoints.path(SMALL), "--upstream-repo", tmp_path, "--tiers", "T0,T1"])
    assert code == 2 and "no 'models' package" in stderr


@pytest.mark.parametrize("run, fragment", [
    ({"bogus": 1}, "unknown key 'bogus'"),
    ({"shims": ["monkeypatch_everything"]}, "shims must be a list of names"),
    ({"shims": "ste_round"}, "shims must be a list of names"),
    ({"wrap_kwargs": ["config"]}, "wrap_kwargs must map"),
    ({"likelihoods": "y_likelihoods"}, "may only rename"),
    ({"path": "/etc"}, "path must be a folder inside the clone"),
    ({"path": "../elsewhere"}, "path must be a folder inside the clone"),
    ({"wrap_kwargs": {"config": "NoColon"}}, "wrap_kwargs must map"),
    ({"likelihoods": {"w": "x"}}, "may only rename"),
    ({"entropy_bottleneck": ""}, "non-empty strings"),
])
def test_a_malformed_upstream_run_section_is_one_line(run, fragment):
    from lic_checkpoints.verify.upstream_repo import run_spec

    with pytest.raises(LicError, match=re.escape(fragment)) as error:
        run_spec({"run": run}, "mapping x.yaml")
    assert "\n" not in str(error.value) and str(error.value).startswith("mapping x.yaml: upstream.run")


def test_upstream_run_defaults_fit_the_common_repository_shape():
    from lic_checkpoints.verify.upstream_repo import run_spec

    assert run_spec({}, "m") == {"path": "", "shims": [], "wrap_kwargs": {}, "names": {
        "likelihoods_y": "y", "likelihoods_z": "z", "entropy_bottleneck": "entropy_bottleneck",
        "hyper_analysis": "h_a", "gaussian_conditional": "gaussian_conditional"}}


def test_t3_refuses_images_too_small_for_ms_ssim_in_one_line(checkpoints, tmp_path):
    """MS-SSIM needs more than 160 pixels a side: with T3 asked for, such an image is a usage error
    before any model runs (single and release runs); without T3 the same image is fine."""
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (300, 150), (120, 60, 30)).save(folder / "small.png")
    src = checkpoints.path(SMALL)
    single = [src, "--json", tmp_path / "r.json"]
    release = [src, src.parent / "missing.pth.tar", "--out-dir", tmp_path / "rel"]
    for args in (single, release):
        code, stdout, stderr = run(args + ["--images", folder, "--tiers", "T1,T3"])
        assert code == 2, stdout + stderr
        line = stderr.strip()
        assert "\n" not in line and "image 'small' is 300x150" in line and "more than 160 pixels" in line, line
        assert "Traceback" not in stdout + stderr
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "rel").exists()


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


def test_loading_a_folder_without_config_is_a_clear_error(tmp_path):
    from lic_checkpoints.convert.errors import LicError
    from lic_checkpoints.verify.loading import load_converted

    with pytest.raises(LicError, match="config.json: missing"):
        load_converted(tmp_path)
