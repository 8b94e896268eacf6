"""DCAE (LabShuHangGU/DCAE): what only this family does, beyond the conformance suite.

SAAF builds on DCAE's entropy model (its mapping extends ``dcae.yaml``), so the checks of that
shared part run on both families' configurations; what only SAAF does is in ``test_saaf.py``.

Upstream feeds ``cat(scales, means, ...)`` to each slice's heads and names the scale
hyper-synthesis ``h_z_s1`` and the mean one ``h_z_s2``; CompressAI master feeds
``cat(means, scales, ...)``, so the converter exchanges the two M-channel input blocks of four
weights per slice.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner

from conftest import CONFIGURATIONS, MAPPINGS_DIR, fixture_dir, target_manifest
from lic_checkpoints.convert import registry
from lic_checkpoints.verify.cli import main as verify_main
from lic_checkpoints.verify.models.compressai.compat import IncompatibleStateDictError
from lic_checkpoints.verify.models.compressai.dcae import DCAE

FAMILIES = ("dcae", "saaf")
DICTIONARY = [c for c in CONFIGURATIONS if c.family.family in FAMILIES]
ids = [c.name for c in DICTIONARY]

#: upstream weight -> CompressAI key of the four per-slice weights whose input blocks are exchanged
SWAPPED = {
    "dt_cross_attention.{k}.x_trans.weight": "latent_codec.y.channel_context.y{k}.cross_attention.x_trans.weight",
    "cc_mean_transforms.{k}.0.weight": "latent_codec.y.channel_context.y{k}.mean_cc.0.weight",
    "cc_scale_transforms.{k}.0.weight": "latent_codec.y.channel_context.y{k}.scale_cc.0.weight",
    "lrp_transforms.{k}.0.weight": "latent_codec.y.latent_codec.y{k}.lrp_transform.0.weight",
}


# --------------------------------------------------------------------------- the mapping


@pytest.mark.parametrize("conf", DICTIONARY, ids=ids)
def test_means_scales_block_swap(conf, converted):
    state, result = converted(conf.name)
    source = result.source.state_dict
    M = result.config["variables"]["M"]
    assert M == 320  # every published configuration has 320 latent channels
    transformed = {s.target for s in result.plan.steps if s.action == "transform"}
    expected_targets = set()
    for k in range(result.config["variables"]["K"]):
        for up, target in SWAPPED.items():
            w = source[up.format(k=k)]
            manual = torch.cat([w[:, M: 2 * M], w[:, :M], w[:, 2 * M:]], dim=1)
            assert torch.equal(state[target.format(k=k)], manual), target.format(k=k)
            assert not torch.equal(state[target.format(k=k)], w)
            expected_targets.add(target.format(k=k))
        bias = f"latent_codec.y.channel_context.y{k}.mean_cc.0.bias"
        assert torch.equal(state[bias], source[f"cc_mean_transforms.{k}.0.bias"])
    assert transformed == expected_targets  # exactly the four weights per slice


@pytest.mark.parametrize("conf", DICTIONARY, ids=ids)
def test_hyper_synthesis_names_scales_1_and_means_2(conf, converted):
    state, result = converted(conf.name)
    source = result.source.state_dict
    pairs = {"h_z_s1.": "latent_codec.h_s.h_scale_s.", "h_z_s2.": "latent_codec.h_s.h_mean_s."}
    checked = 0
    for key, value in source.items():
        for upstream, ours in pairs.items():
            if key.startswith(upstream):
                assert torch.equal(state[ours + key[len(upstream):]], value), key
                checked += 1
    assert checked > 2


@pytest.mark.parametrize("conf", [c for c in DICTIONARY if c.family.family == "dcae"], ids=lambda c: c.name)
def test_window_attention_tables_pass_through_unchanged(conf, converted):
    """DCAE keeps upstream's window attention in CompressAI master: its tables are plain renames."""
    state, result = converted(conf.name)
    source = result.source.state_dict
    tables = [k for k in source if k.endswith(".msa.relative_position_params")]
    assert len(tables) == 33
    kept = [k for k in tables if k.startswith(("g_a.", "g_s."))]
    assert len(kept) == 30
    assert all(torch.equal(state[k], source[k]) for k in kept)


# --------------------------------------------------------------------------- the CompressAI-layout class


@pytest.mark.parametrize("conf", DICTIONARY, ids=ids)
def test_non_persistent_buffers_are_masters(conf):
    cls = registry.import_class(conf.family.target["ours"])
    with torch.device("meta"):
        model = cls(**conf.target_kwargs)
    target = target_manifest(conf.name)
    persistent = {row[0] for row in target["state_dict"]}
    non_persistent = sorted(k for k, _ in model.named_buffers() if k not in persistent)
    assert non_persistent == sorted(row[0] for row in target["non_persistent_buffers"])


@pytest.mark.parametrize("conf", DICTIONARY, ids=ids)
def test_wrong_variant_is_refused_with_a_clear_message(conf, converted):
    state, _ = converted(conf.name)
    model = registry.import_class(conf.family.target["ours"])(**conf.target_kwargs)
    model.load_state_dict(state)
    variant = {k: v for k, v in state.items() if ".y4." not in k}  # a 4-slice model ...
    variant["shared_dictionary.dt"] = torch.zeros(64, 640)  # ... with a smaller dictionary
    before = model.shared_dictionary.dt.detach().clone()
    with pytest.raises(IncompatibleStateDictError) as error:
        model.load_state_dict(variant)
    message = str(error.value)
    assert "\n" not in message
    assert "missing keys (latent_codec.y.channel_context.y4." in message
    assert "shared_dictionary.dt: state dict [64, 640] vs model [128, 640]" in message
    assert "looks like" not in message  # right family, wrong configuration
    assert torch.equal(model.shared_dictionary.dt, before)  # refused before anything was copied


SMALL = dict(N=64, M=96, hyper_channels=48, num_slices=3, max_support_slices=1, feature_dims=(32, 48, 64),
             block_num=(1, 1, 2), head_dim=(8, 16, 16, 32, 16, 8), dict_num=16, dict_head_num=4,
             window_size=4, hyper_window_size=2, hyper_head_dim=16)


def test_from_state_dict_infers_a_non_default_config():
    with torch.device("meta"):
        model = DCAE(**SMALL)
    assert DCAE.infer_kwargs(model.state_dict()) == model.config()
    assert model.config()["dictionary_dim"] == 32 * SMALL["dict_head_num"]


# --------------------------------------------------------------------------- lic-verify on a broken mapping


@pytest.mark.parametrize("conf", [c for c in DICTIONARY if c.family.family == "dcae"], ids=lambda c: c.name)
def test_wrong_mapping_fails_at_forward_and_points_at_the_first_divergence(conf, checkpoints, tmp_path):
    """Dropping the means/scales swap of the mean head makes the means diverge first."""
    text = (MAPPINGS_DIR / "dcae.yaml").read_text()
    broken = re.sub(
        r'(  - name: mean head first conv \(means/scales order\)\n(?:    .*\n)*?)    ops: \[\{swap_blocks: \{dim: 1, sizes: \[M, M\]\}\}\]\n',
        r"\1", text, count=1)
    assert broken != text
    mapping = tmp_path / "dcae_broken.yaml"
    mapping.write_text(broken)
    result = CliRunner().invoke(verify_main, [str(a) for a in (
        checkpoints.path(conf.name), "--mapping", mapping, "--tiers", "T0,T1",
        "--images", fixture_dir(conf.name) / "input.safetensors", "--json", tmp_path / "r.json")])
    assert result.exit_code == 1, result.stdout + result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["tiers"]["T0"]["passed"] is True  # the file follows its (wrong) rules exactly
    assert report["tiers"]["T1"]["passed"] is False
    first = next(c for c in report["tiers"]["T1"]["checks"] if not c["passed"])
    assert first["name"].endswith(": means"), first
    assert "first failure: T1" in result.stdout and ": means" in result.stdout
