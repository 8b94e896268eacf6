"""lic-convert on the five golden fixtures: layout, constants, coverage, tensor ops, round trip."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import FIXTURE_NAMES, TARGETS_DIR, upstream_checkpoint, upstream_state_dict
from lic_checkpoints.convert import api

M = 320  # every published configuration has 320 latent channels (asserted below from the config)


@pytest.fixture(scope="module", params=FIXTURE_NAMES)
def converted(request, tmp_path_factory):
    name = request.param
    work = tmp_path_factory.mktemp(name)
    src = work / "checkpoint_best.pth.tar"
    torch.save(upstream_checkpoint(name), src)
    result = api.convert_checkpoint(src, work / "out")
    tensors = load_file(str(work / "out" / api.MODEL_FILE))
    return name, work, src, result, tensors


def test_output_layout_equals_compressai_master(converted):
    name, work, _, result, tensors = converted
    target = json.loads((TARGETS_DIR / f"{name}.json").read_text())
    expected = [(k, list(shape), dtype) for k, shape, dtype, _ in target["state_dict"]]
    with safe_open(str(work / "out" / api.MODEL_FILE), framework="pt") as fh:
        got = [(k, list(fh.get_slice(k).get_shape()), str(tensors[k].dtype).replace("torch.", "")) for k in fh.keys()]
    assert sorted(got) == sorted(expected)
    assert len(tensors) == target["num_state_dict_entries"]


def test_synthesized_buffers_equal_master_constants(converted):
    name, _, _, _, tensors = converted
    constants = load_file(str(TARGETS_DIR / f"{name}.constants.safetensors"))
    for key, value in constants.items():
        assert tensors[key].dtype == value.dtype, key
        assert torch.equal(tensors[key], value), key


def test_coverage_is_clean(converted):
    name, _, _, result, _ = converted
    plan = result.plan
    assert plan.ok, plan.problems()
    assert not plan.unexpected and not plan.missing and not plan.mismatched and not plan.collisions
    source_keys = set(upstream_state_dict(name))
    used = {s for step in plan.steps for s in step.sources} | {k for k, _ in plan.dropped}
    assert used == source_keys


def test_renamed_tensors_are_bit_identical(converted):
    name, _, _, result, tensors = converted
    source = upstream_state_dict(name)
    renamed = [s for s in result.plan.steps if s.action in ("rename", "fan_out")]
    assert len(renamed) > 1000
    for step in renamed:
        assert torch.equal(tensors[step.target], source[step.sources[0]]), step.target


def test_means_scales_block_swap(converted):
    name, _, _, result, tensors = converted
    source = upstream_state_dict(name)
    swapped = {
        "dt_cross_attention.{k}.x_trans.weight": "latent_codec.y.channel_context.y{k}.cross_attention.x_trans.weight",
        "cc_mean_transforms.{k}.0.weight": "latent_codec.y.channel_context.y{k}.mean_cc.0.weight",
        "cc_scale_transforms.{k}.0.weight": "latent_codec.y.channel_context.y{k}.scale_cc.0.weight",
        "lrp_transforms.{k}.0.weight": "latent_codec.y.latent_codec.y{k}.lrp_transform.0.weight",
    }
    transformed = {s.target for s in result.plan.steps if s.action == "transform"}
    if name not in ("dcae", "saaf"):
        # TCM has no channel swap: its first conv weights are plain renames
        for k in range(5):
            key = f"latent_codec.y.channel_context.y{k}.mean_cc.0.weight"
            assert torch.equal(tensors[key], source[f"cc_mean_transforms.{k}.0.weight"])
        return
    assert result.config["variables"]["M"] == M
    expected_targets = set()
    for k in range(5):
        for up, target in swapped.items():
            w = source[up.format(k=k)]
            manual = torch.cat([w[:, M : 2 * M], w[:, :M], w[:, 2 * M :]], dim=1)
            assert torch.equal(tensors[target.format(k=k)], manual), target.format(k=k)
            assert not torch.equal(tensors[target.format(k=k)], w)
            expected_targets.add(target.format(k=k))
        bias = f"latent_codec.y.channel_context.y{k}.mean_cc.0.bias"
        assert torch.equal(tensors[bias], source[f"cc_mean_transforms.{k}.0.bias"])
    assert transformed == expected_targets  # exactly the four weights per slice


def test_gaussian_conditional_fan_out(converted):
    name, _, _, result, tensors = converted
    source = upstream_state_dict(name)
    copies = [f"latent_codec.y.latent_codec.y{k}.gaussian_conditional.scale_bound" for k in range(5)]
    for key in copies:
        assert torch.equal(tensors[key], source["gaussian_conditional.scale_bound"])
    # in memory each copy owns its storage
    state, _ = api.convert_in_memory(converted[2])
    pointers = {state[k].untyped_storage().data_ptr() for k in copies}
    assert len(pointers) == len(copies)


def test_tcm_relative_position_table(converted):
    name, _, _, result, tensors = converted
    source = upstream_state_dict(name)
    if not name.startswith("tcm"):
        # DCAE keeps upstream's window attention in CompressAI master: its tables pass through unchanged
        tables = [k for k in source if k.endswith(".msa.relative_position_params")]
        assert len(tables) == (33 if name == "dcae" else 0)
        kept = [k for k in tables if k.startswith(("g_a.", "g_s."))]
        assert len(kept) == (30 if name == "dcae" else 0)
        assert all(torch.equal(tensors[k], source[k]) for k in kept)
        return
    prefix = "g_a.transform." if "auxt" in name else "g_a."
    checked = 0
    for key, value in source.items():
        if not key.endswith(".msa.relative_position_params"):
            continue
        base = key[: -len("msa.relative_position_params")]
        target = base + "msa.attn.relative_position_bias_table"
        if target.startswith("g_a."):
            target = prefix + target[len("g_a.") :]
        if target not in tensors:
            continue
        heads, side, _ = value.shape
        table = tensors[target]
        assert table.shape == (side * side, heads)
        # table row i*side + j, column h holds params[h, i, j]
        for h in range(heads):
            for i in (0, side // 2, side - 1):
                for j in (0, side - 1):
                    assert table[i * side + j, h] == value[h, i, j]
        checked += 1
    assert checked >= 6


def test_round_trip_is_bit_exact(converted, tmp_path):
    name, work, _, _, _ = converted
    restored, _ = api.restore_checkpoint(work / "out", tmp_path / "upstream.pth.tar")
    source = upstream_state_dict(name)
    assert list(restored) == list(source)  # upstream key order too
    for key, value in source.items():
        assert restored[key].dtype == value.dtype, key
        assert torch.equal(restored[key], value), key
    reloaded = torch.load(tmp_path / "upstream.pth.tar", weights_only=True)["state_dict"]
    assert torch.equal(reloaded[next(iter(source))], next(iter(source.values())))


def test_metadata_and_config(converted):
    name, work, src, result, _ = converted
    with safe_open(str(work / "out" / api.MODEL_FILE), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == "pt"
    assert meta["lic.family"] == result.family
    assert meta["lic.source_sha256"] == result.source.sha256
    config = json.loads((work / "out" / api.CONFIG_FILE).read_text())
    assert config["family"] == result.family and config["variant"] == result.variant
    assert config["source"]["ignored_entries"] == [k for k in upstream_checkpoint(name) if k != "state_dict"]
    assert config["upstream"]["class"] in ("TCM", "TCM_AUXT", "DCAE", "SAAF")
