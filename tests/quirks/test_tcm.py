"""TCM (jmliu206/LIC_TCM): what only this family does, beyond the conformance suite.

TCM+AuxT builds on TCM (its mapping extends ``tcm.yaml`` and master's class is ``TCM(use_auxt=True)``),
so the checks of TCM's own blocks and rules run on both families' configurations; what only AuxT
does is in ``test_tcm_auxt.py``.
"""

from __future__ import annotations

import re

import pytest
import torch
import yaml

from conftest import CONFIGURATIONS, MAPPINGS_DIR, meta_state_dict, target_manifest
from lic_checkpoints.convert.errors import MappingError
from lic_checkpoints.convert.rules import load_mapping
from lic_checkpoints.verify.models.blocks import tcm_blocks as upstream_blocks
from lic_checkpoints.verify.models.compressai import tcm_blocks as target_blocks
from lic_checkpoints.verify.models.compressai.compat import IncompatibleStateDictError
from lic_checkpoints.verify.models.compressai.installed import target_class
from lic_checkpoints.verify.models.compressai.tcm import TCM

FAMILIES = ("tcm", "tcm_auxt")
TCM_CONFIGURATIONS = [c for c in CONFIGURATIONS if c.family.family in FAMILIES]
PLAIN = [c for c in TCM_CONFIGURATIONS if c.family.family == "tcm"]
ids = [c.name for c in TCM_CONFIGURATIONS]


def test_both_families_load_into_masters_tcm_class():
    assert target_class("tcm") is TCM and target_class("tcm_auxt") is TCM
    assert {c.family.target["compressai_class"] for c in TCM_CONFIGURATIONS} == {"compressai.models.tcm.TCM"}


# --------------------------------------------------------------------------- the mapping


@pytest.mark.parametrize("conf", TCM_CONFIGURATIONS, ids=ids)
def test_no_means_scales_swap_first_convs_are_plain_renames(conf, converted):
    """Unlike DCAE, TCM's slice heads already take cat(means, scales): no channel block is exchanged."""
    state, result = converted(conf.name)
    source = result.source.state_dict
    assert not any(op.name == "swap_blocks" for rule in conf.family.rules for op in rule.ops)
    for k in range(result.detection.variables["K"]):
        key = f"latent_codec.y.channel_context.y{k}.mean_cc.0.weight"
        assert torch.equal(state[key], source[f"cc_mean_transforms.{k}.0.weight"]), key


@pytest.mark.parametrize("conf", TCM_CONFIGURATIONS, ids=ids)
def test_relative_position_tables_are_permuted_into_timm_tables(conf, converted):
    """Upstream holds ``[heads, 2w-1, 2w-1]``; master a timm table ``[(2w-1)^2, heads]``."""
    state, result = converted(conf.name)
    source = result.source.state_dict
    prefix = "g_a.transform." if conf.family.family == "tcm_auxt" else "g_a."  # AuxT's wrapper layout
    checked = 0
    for key, value in source.items():
        if not key.endswith(".msa.relative_position_params"):
            continue
        target = key[: -len("msa.relative_position_params")] + "msa.attn.relative_position_bias_table"
        if target.startswith("g_a."):
            target = prefix + target[len("g_a."):]
        if target not in state:
            continue
        heads, side, _ = value.shape
        table = state[target]
        assert table.shape == (side * side, heads)
        # table row i*side + j, column h holds params[h, i, j]
        for h in range(heads):
            for i in (0, side // 2, side - 1):
                for j in (0, side - 1):
                    assert table[i * side + j, h] == value[h, i, j]
        checked += 1
    assert checked >= 6


@pytest.mark.parametrize("conf", PLAIN, ids=[c.name for c in PLAIN])
def test_synthesized_keys_are_the_attention_constants(conf, converted):
    """114 keys master has and upstream lacks: per Swin block the position index and an identity projection."""
    _, result = converted(conf.name)
    synthesized = [s for s in result.plan.steps if s.action == "synthesize"]
    assert len(synthesized) == 114  # 38 index buffers + 38 identity weights + 38 zero biases
    by_rule = {}
    for step in synthesized:
        by_rule[step.rules[0].name] = by_rule.get(step.rules[0].name, 0) + 1
    assert sorted(by_rule.values()) == [38, 38, 38]


# --------------------------------------------------------------------------- the CompressAI-layout class


@pytest.mark.parametrize("conf", TCM_CONFIGURATIONS, ids=ids)
def test_absent_derived_constants_are_rebuilt_by_the_constructor(conf, converted):
    """Master's loader tolerates absent ``relative_position_index`` / wavelet buffers; so does ours."""
    state, result = converted(conf.name)
    kwargs = result.config["target"]["kwargs"]
    derived = [k for k in state if TCM.derived_constant(k)]
    assert derived
    inferred = TCM.from_state_dict({k: v for k, v in state.items() if k not in derived})
    loaded = inferred.state_dict()
    assert [k for k, v in state.items() if not torch.equal(loaded[k], v)] == []
    model = TCM(**kwargs)
    assert kwargs.items() <= model.config_kwargs().items()
    # max_support_slices 4 and 5 build the same model for K=5 (every slice sees at most 4)
    assert inferred.config_kwargs() == {**model.config_kwargs(), "max_support_slices": 4}


@pytest.mark.parametrize("conf", TCM_CONFIGURATIONS, ids=ids)
def test_target_refuses_input_sizes_upstream_cannot_process(conf):
    model = TCM(**conf.target_kwargs).eval()
    with pytest.raises(ValueError, match="multiples of 128"):
        model(torch.zeros(1, 3, 128, 256))
    with pytest.raises(ValueError, match="multiples of 128"):
        model.compress(torch.zeros(1, 3, 256, 320))


#: per configuration: (layout of another variant, what the one-line message must say about it)
WRONG_VARIANTS = {
    "tcm_n64": [
        ("tcm_n128", r"shape mismatches \(g_a\.0\.conv1\.weight: state dict \[256, 3, 3, 3\] vs model \[128, 3, 3, 3\]"),
        ("tcm_auxt_n64", r"unexpected keys \(g_a\.transform\..*it looks like TCM\+AuxT, not TCM$"),
    ],
    "tcm_n128": [
        ("tcm_n64", r"shape mismatches \(g_a\.0\.conv1\.weight: state dict \[128, 3, 3, 3\] vs model \[256, 3, 3, 3\]"),
    ],
}


@pytest.mark.parametrize("name", sorted(WRONG_VARIANTS))
def test_wrong_variant_names_the_difference(name):
    model = TCM(**next(c for c in PLAIN if c.name == name).target_kwargs)
    for other, message in WRONG_VARIANTS[name]:
        with pytest.raises(IncompatibleStateDictError, match=message):
            model.load_state_dict(meta_state_dict(target_manifest(other)["state_dict"]))


# --------------------------------------------------------------------------- blocks


def _zero(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()


def _identity_1x1(conv: torch.nn.Conv2d) -> None:
    with torch.no_grad():
        conv.weight.copy_(torch.eye(conv.out_channels)[:, :, None, None])
        conv.bias.zero_()


@pytest.mark.parametrize("block", [
    lambda: upstream_blocks.ConvTransBlock(8, 8, 8, 4, 0.0),
    lambda: target_blocks.ConvTransBlock(8, 8, 4, 0.0),
], ids=["upstream", "target"])
def test_conv_trans_block_adds_its_skip_twice(block):
    """LIC_TCM adds the conv branch's input to an already residual ResidualBlock: x -> 2x, not x.

    With 1x1 identities around the block and a ResidualBlock whose convolutions are zero (it then
    returns its input), the conv half of the output is x + 2x = 3x (a single skip would give 2x).
    """
    module = block().eval()
    _identity_1x1(module.conv1_1)
    _identity_1x1(module.conv1_2)
    _zero(module.conv_block)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = module(x)
    assert torch.allclose(out[:, :8], 3 * x[:, :8], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- the rule loader, on tcm.yaml


def _with_rules(file: str, stage: int, extra: list[dict], at: int | None = None) -> str:
    doc = yaml.safe_load((MAPPINGS_DIR / file).read_text())
    rules = doc["stages"][stage]["rules"] if "stages" in doc else doc["rules"]
    rules[len(rules) if at is None else at:len(rules) if at is None else at] = extra
    return yaml.safe_dump(doc, sort_keys=False)


@pytest.mark.parametrize(
    "extra, at, culprit",
    [
        # the same template under other capture names
        ([{"name": "copy of g_a", "from": "ga_old.{tail}", "to": "g_a.{tail}"}], None, "copy of g_a"),
        # a literal target that a later template also produces from another source
        ([{"name": "one key", "from": "legacy.h_a_weight", "to": "latent_codec.h_a.0.weight"}], 0, "hyper analysis"),
        # a template covering a literal written earlier
        ([{"name": "literal first", "from": "legacy_scale", "to": "g_s.9.weight"},
          {"name": "broad", "from": "old_g_s.{r}", "to": "g_s.{r}"}], 0, "broad"),
        # a synthesized key that a rename also writes
        ([{"name": "stray proj", "from": "{p}.msa.proj_legacy.{t:name}", "to": "{p}.msa.attn.proj.{t}"}], 0,
         "identity inner projection weight"),
        # a fan_out rule landing on keys another rule writes
        ([{"name": "per-slice gc", "from": "gc_slices.{k:int}.{rest}",
           "to": "latent_codec.y.latent_codec.y{k}.gaussian_conditional.{rest}"}], None, "per-slice gc"),
    ],
    ids=["same-template", "literal-then-template", "template-after-literal", "synthesize-vs-map", "fan-out"],
)
def test_colliding_rules_are_refused(extra, at, culprit):
    """Rules that would write one target key twice are refused at load time (tcm.yaml as the specimen)."""
    stage = 0 if extra[0]["name"] == "stray proj" else 1
    with pytest.raises(MappingError) as info:
        load_mapping(MAPPINGS_DIR / "tcm.yaml", text=_with_rules("tcm.yaml", stage, extra, at))
    message = str(info.value)
    assert "writes the same target key" in message and f"(rule {culprit!r})" in message, message
    assert re.match(r"tcm\.yaml:\d+ \(rule ", message), message


def test_specific_rule_before_a_catch_all_is_not_a_collision():
    """``entropy_bottleneck.{rest}`` after ``entropy_bottleneck.matrices.{i}``: first match wins, no clash."""
    extra = [{"name": "special g_a conv", "from": "g_a.0.conv1.weight", "to": "g_a.0.conv1.weight"}]
    loaded = load_mapping(MAPPINGS_DIR / "tcm.yaml", text=_with_rules("tcm.yaml", 1, extra, 0))
    assert loaded.rule("special g_a conv").target.text == "g_a.0.conv1.weight"
