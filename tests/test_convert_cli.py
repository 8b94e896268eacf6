"""lic-convert as users call it: input variations that must work, bad inputs that must fail cleanly."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import (
    CONFIGURATIONS,
    SMALL,
    checkpoint_bytes,
    configuration,
    fixture_expected,
    fixture_manifest,
    remove_tree,
    target_manifest,
    upstream_checkpoint,
    upstream_state_dict,
)
from lic_checkpoints.convert import api, detect, registry
from lic_checkpoints.convert.cli import main

NAME = SMALL  # the smallest published configuration keeps these tests quick
CONF = configuration(NAME)


def run(args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def assert_clean_failure(code, stderr, out_dir: Path, needle: str):
    assert code == 2, stderr
    lines = [line for line in stderr.strip().splitlines() if line.startswith("lic-convert:")]
    assert len(lines) == 1 and lines[0].startswith("lic-convert: error:"), stderr
    assert "Traceback" not in stderr
    assert needle.lower() in lines[0].lower(), lines[0]
    assert not (out_dir / api.MODEL_FILE).exists()
    assert not out_dir.exists() or not any(out_dir.iterdir()), list(out_dir.iterdir())


@pytest.fixture(scope="module")
def checkpoint_file(checkpoints):
    return checkpoints.path(NAME)  # shared by the session: read it, never modify it


@pytest.fixture(scope="module")
def plan(checkpoint_file):
    return api.convert_in_memory(checkpoint_file)[1].plan


@pytest.fixture(scope="module")
def reference(tmp_path_factory, checkpoint_file):
    out = tmp_path_factory.mktemp("ref")
    api.convert_checkpoint(checkpoint_file, out)
    tensors = {k: v.clone() for k, v in load_file(str(out / api.MODEL_FILE)).items()}
    remove_tree(out)
    return tensors


def _renames(plan, **where):
    """Plain rename steps of one source tensor each (optionally with a source of ``ndim`` dimensions)."""
    state = upstream_state_dict(NAME)
    used = {}
    for step in plan.steps:
        for src in step.sources:
            used[src] = used.get(src, 0) + 1
    return [s for s in plan.steps if s.action == "rename" and used[s.sources[0]] == 1
            and ("ndim" not in where or state[s.sources[0]].dim() == where["ndim"])]


def assert_same_as_reference(out: Path, reference):
    got = load_file(str(out / api.MODEL_FILE))
    assert sorted(got) == sorted(reference)
    for key, value in reference.items():
        assert torch.equal(got[key], value), key


def test_cli_converts_and_reports(checkpoint_file, tmp_path):
    code, stdout, stderr = run([checkpoint_file, "-o", tmp_path / "out"])
    assert code == 0, stderr
    assert f"{CONF.family.family} / {CONF.variant.name}" in stdout
    manifest, _ = fixture_manifest(NAME)
    ignored = [k for k in manifest["checkpoint_container"]["top_level_keys"] if k != "state_dict"]
    if ignored:
        assert f"ignored container entries: {', '.join(ignored)}" in stdout
    assert (tmp_path / "out" / api.MODEL_FILE).is_file() and (tmp_path / "out" / api.CONFIG_FILE).is_file()
    assert not list((tmp_path / "out").glob(".*tmp"))


def test_cli_json_summary(checkpoint_file, plan, tmp_path):
    code, stdout, _ = run([checkpoint_file, "-o", tmp_path / "out", "--json"])
    assert code == 0
    summary = json.loads(stdout)
    assert summary["family"] == CONF.family.family and summary["variant"] == CONF.variant.name
    synthesized = sum(s.action == "synthesize" for s in plan.steps)  # quirks/ pins the counts per family
    assert summary["report"].get("SYNTHESIZED", 0) == synthesized
    assert sum(summary["report"].values()) >= len(plan.steps)
    assert "MISSING" not in summary["report"] and "UNEXPECTED" not in summary["report"]


def test_module_prefix_and_legacy_entropy_bottleneck_names(tmp_path, reference):
    src = tmp_path / "ddp.pth.tar"
    torch.save(upstream_checkpoint(NAME, key_prefix="module.", legacy_entropy_bottleneck=True), src)
    keys = list(torch.load(src, weights_only=True)["state_dict"])
    assert all(k.startswith("module.") for k in keys)
    assert "module.entropy_bottleneck._matrix0" in keys
    code, stdout, stderr = run([src, "-o", tmp_path / "out"])
    assert code == 0, stderr
    assert "removed 'module.'" in stdout
    assert_same_as_reference(tmp_path / "out", reference)


def test_bare_state_dict_and_legacy_format(tmp_path, reference):
    src = tmp_path / "bare.pth"
    torch.save(upstream_state_dict(NAME), src, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(src)
    code, _, stderr = run([src, "-o", tmp_path / "out"])
    assert code == 0, stderr
    assert_same_as_reference(tmp_path / "out", reference)


@pytest.mark.parametrize("entry", ["model", "net", "network", "model_state_dict"])
def test_other_container_entries(tmp_path, reference, entry):
    src = tmp_path / "c.pt"
    torch.save({entry: upstream_state_dict(NAME), "epoch": 3}, src)
    code, _, stderr = run([src, "-o", tmp_path / "out"])
    assert code == 0, stderr
    assert_same_as_reference(tmp_path / "out", reference)


def test_filled_entropy_tables(tmp_path):
    """A checkpoint saved after update(): the filled tables are carried (each slice gets the GC tables)."""
    state = upstream_state_dict(NAME)
    expected = fixture_expected(NAME)
    tables = [k for k in expected if k.startswith(("entropy_bottleneck.", "gaussian_conditional."))]
    assert len(tables) == 7
    for key in tables:
        state[key] = expected[key]
    src = tmp_path / "updated.pth.tar"
    torch.save({"state_dict": state}, src)
    code, _, stderr = run([src, "-o", tmp_path / "out"])
    assert code == 0, stderr
    got = load_file(str(tmp_path / "out" / api.MODEL_FILE))
    assert torch.equal(got["latent_codec.z.entropy_bottleneck._quantized_cdf"], expected["entropy_bottleneck._quantized_cdf"])
    slices = [k for k, *_ in target_manifest(NAME)["state_dict"] if k.endswith(".gaussian_conditional._quantized_cdf")]
    assert len(slices) > 1
    for key in slices:
        assert got[key].shape == expected["gaussian_conditional._quantized_cdf"].shape
        assert torch.equal(got[key], expected["gaussian_conditional._quantized_cdf"])


def test_several_inputs_one_folder_each(checkpoint_file, tmp_path):
    other = tmp_path / "second.pth.tar"
    other.write_bytes(checkpoint_file.read_bytes())
    code, _, stderr = run([checkpoint_file, other, "-o", tmp_path / "out"])
    assert code == 0, stderr
    assert (tmp_path / "out" / "checkpoint_best" / api.MODEL_FILE).is_file()
    assert (tmp_path / "out" / "second" / api.MODEL_FILE).is_file()


# lic-convert --inverse on every configuration: test_conformance.py


def test_pth_output_format(checkpoint_file, tmp_path, reference):
    code, _, stderr = run([checkpoint_file, "-o", tmp_path / "out", "--format", "pth"])
    assert code == 0, stderr
    state = torch.load(tmp_path / "out" / "model.pth", weights_only=True)
    assert sorted(state) == sorted(reference)
    assert all(torch.equal(state[k], v) for k, v in reference.items())


# --- bad input: one clear line, exit 2, nothing written ------------------------------------------


def test_missing_file(tmp_path):
    code, _, stderr = run([tmp_path / "nope.pth.tar", "-o", tmp_path / "out"])
    assert_clean_failure(code, stderr, tmp_path / "out", "no such file")


def test_directory_instead_of_file(tmp_path):
    code, _, stderr = run([tmp_path, "-o", tmp_path / "out"])
    assert_clean_failure(code, stderr, tmp_path / "out", "is a directory")


def test_empty_file(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    code, _, stderr = run([tmp_path / "empty.pth", "-o", tmp_path / "out"])
    assert_clean_failure(code, stderr, tmp_path / "out", "empty")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.pth.tar").write_text("these are not weights\n" * 20)
    code, _, stderr = run([tmp_path / "notes.pth.tar", "-o", tmp_path / "out"])
    assert_clean_failure(code, stderr, tmp_path / "out", "not a PyTorch checkpoint")


def test_truncated_zip(checkpoint_file, tmp_path):
    data = checkpoint_file.read_bytes()
    (tmp_path / "cut.pth.tar").write_bytes(data[: len(data) // 2])
    code, _, stderr = run([tmp_path / "cut.pth.tar", "-o", tmp_path / "out"])
    assert_clean_failure(code, stderr, tmp_path / "out", "download")


def test_truncated_legacy_pickle(tmp_path):
    buf = io.BytesIO()
    torch.save({"state_dict": {"a": torch.zeros(1000)}}, buf, _use_new_zipfile_serialization=False)
    (tmp_path / "cut.pth").write_bytes(buf.getvalue()[:500])
    code, _, stderr = run([tmp_path / "cut.pth", "-o", tmp_path / "out"])
    assert_clean_failure(code, stderr, tmp_path / "out", "truncated")


def test_unknown_model(tmp_path):
    torch.save({"state_dict": {"encoder.0.weight": torch.zeros(3, 3), "decoder.bias": torch.zeros(3)}},
               tmp_path / "other.pth.tar")
    code, _, stderr = run([tmp_path / "other.pth.tar", "-o", tmp_path / "out"])
    assert_clean_failure(code, stderr, tmp_path / "out", "matches no known model family")


def test_one_key_removed(tmp_path, plan):
    step = _renames(plan, ndim=4)[len(_renames(plan, ndim=4)) // 2]  # a convolution weight mid-network
    state = upstream_state_dict(NAME)
    del state[step.sources[0]]
    torch.save({"state_dict": state}, tmp_path / "missing.pth.tar")
    code, _, stderr = run([tmp_path / "missing.pth.tar", "-o", tmp_path / "out"])
    assert_clean_failure(code, stderr, tmp_path / "out", f"1 missing target key(s), e.g. '{step.target}'")


def test_one_tensor_of_the_wrong_shape(tmp_path, plan):
    step = _renames(plan, ndim=4)[-1]
    state = upstream_state_dict(NAME)
    shape = list(state[step.sources[0]].shape)
    state[step.sources[0]] = torch.zeros(3, 3)
    torch.save({"state_dict": state}, tmp_path / "shape.pth.tar")
    code, _, stderr = run([tmp_path / "shape.pth.tar", "-o", tmp_path / "out"])
    assert_clean_failure(code, stderr, tmp_path / "out", step.target)
    assert f"expected shape {shape}, got [3, 3]" in stderr


def test_extra_unknown_key(tmp_path):
    state = upstream_state_dict(NAME)
    state["g_a.0.extra_scale"] = torch.ones(1)
    state["surprise.weight"] = torch.ones(1)
    torch.save({"state_dict": state}, tmp_path / "extra.pth.tar")
    code, _, stderr = run([tmp_path / "extra.pth.tar", "-o", tmp_path / "out"])
    assert_clean_failure(code, stderr, tmp_path / "out", "unexpected")


def test_non_tensor_value(tmp_path):
    state = upstream_state_dict(NAME)
    state[next(iter(state))] = [1.0, 2.0]
    torch.save({"state_dict": state}, tmp_path / "list.pth.tar")
    code, _, stderr = run([tmp_path / "list.pth.tar", "-o", tmp_path / "out"])
    assert_clean_failure(code, stderr, tmp_path / "out", "not a tensor")


def _keys(name: str) -> list[str]:
    return [row[0] for row in fixture_manifest(name)[0]["state_dict"]]


def test_mixed_families_are_ambiguous(tmp_path):
    """Two families' keys in one file: the smallest other configuration whose keys, together with
    ours, satisfy the detection rules of two families."""
    others = sorted((c for c in CONFIGURATIONS if c.family.family != CONF.family.family),
                    key=lambda c: checkpoint_bytes(c.name))
    families = registry.families()
    other = next(c for c in others
                 if sum(detect.matches(m, _keys(NAME) + _keys(c.name)) for m in families) >= 2)
    state = upstream_state_dict(NAME)
    state.update(upstream_state_dict(other.name))
    torch.save({"state_dict": state}, tmp_path / "mixed.pth.tar")
    code, _, stderr = run([tmp_path / "mixed.pth.tar", "-o", tmp_path / "out"])
    assert_clean_failure(code, stderr, tmp_path / "out", "several families")


@pytest.mark.parametrize("family", [f for f in registry.family_names() if f != CONF.family.family])
def test_wrong_family_flag(checkpoint_file, tmp_path, family):
    code, _, stderr = run([checkpoint_file, "--family", family, "-o", tmp_path / "out"])
    assert_clean_failure(code, stderr, tmp_path / "out", f"does not look like {family}")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pth.tar", "wb") as fh:
        pickle.dump({"state_dict": {"x": _Payload(marker)}}, fh)
    code, _, stderr = run([tmp_path / "evil.pth.tar", "-o", tmp_path / "out"])
    assert_clean_failure(code, stderr, tmp_path / "out", "unsafe-trust-pickle")
    assert "system" in stderr
    assert not marker.exists()


def test_console_script_end_to_end(checkpoint_file, tmp_path):
    """The installed entry point, in its own process: exit codes and one-line errors."""
    ok = subprocess.run(["lic-convert", str(checkpoint_file), "-o", str(tmp_path / "out")],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(["lic-convert", str(tmp_path / "absent.pth"), "-o", str(tmp_path / "o2")],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "no such file" in bad.stderr
