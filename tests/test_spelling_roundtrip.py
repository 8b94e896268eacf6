"""The way back gives the source's own key spelling (issue 12, point 2).

A checkpoint saved from a DataParallel model (``module.`` prefixes) and/or with compressai <= 1.2.6
entropy-bottleneck names converts; ``lic-convert --inverse`` must then give back the same keys, in the
same order, in the same container entry, with bit-identical tensors; ``--canonical`` upstream's plain
names; and T0's inverse round trip must pass against the source as it was.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import fixture_dir, upstream_checkpoint, upstream_state_dict
from lic_checkpoints.convert import api, engine, layouts, registry
from lic_checkpoints.convert.cli import main
from lic_checkpoints.convert.errors import LicError
from lic_checkpoints.verify.api import verify_checkpoint

CONFIGURATIONS = registry.configuration_names()
#: how the source spells its keys: (key prefix, compressai <= 1.2.6 entropy-bottleneck names)
SPELLINGS = {"prefix": ("module.", False), "legacy": ("", True), "prefix+legacy": ("module.", True)}


#: the configuration with the smallest checkpoint: the one verified on every tier
SMALLEST = registry.smallest_configuration().name


def run(args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


class Case:
    """One synthesized upstream checkpoint, saved and converted once for all the tests on it."""

    def __init__(self, name: str, spelling: str, folder: Path):
        self.name, self.spelling, self.folder = name, spelling, folder
        self.prefix, self.legacy = SPELLINGS[spelling]
        checkpoint = upstream_checkpoint(name, key_prefix=self.prefix, legacy_entropy_bottleneck=self.legacy)
        # the entry the training script put the state dict in (the only one holding tensors by name)
        self.entry = next(k for k, v in checkpoint.items() if isinstance(v, dict) and v
                          and all(isinstance(t, torch.Tensor) for t in v.values()))
        self.state = checkpoint[self.entry]
        self.src = folder / "checkpoint_best.pth.tar"
        torch.save(checkpoint, self.src)
        self.out = folder / "converted"
        result = api.convert_checkpoint(self.src, self.out)
        # keys a rule dropped with no way back (a training-only branch) are not given back; the way
        # back must be asked to leave them out
        lost = {self.prefix + key for key, rule in result.plan.dropped if rule.restore_value is None}
        self.kept = {k: v for k, v in self.state.items() if k not in lost}
        self.flag = ["--without-dropped"] if lost else []
        conf = registry.configuration(name)
        self.plain_lost = set(engine.restorable_layout(layouts.load(conf.name, "upstream"), conf.family.rules)[1])

    def assert_is_source(self, path: Path) -> None:
        """The file at ``path`` holds the source's state dict as it was: entry, keys, order, tensors."""
        back = torch.load(path, weights_only=True)
        assert list(back) == [self.entry]
        restored = back[self.entry]
        assert list(restored) == list(self.kept)
        for key, value in self.kept.items():
            assert restored[key].dtype == value.dtype, key
            assert torch.equal(restored[key], value), key


def _cases() -> list[tuple[str, str]]:
    """Every spelling on the smallest configuration; both spellings at once on the smallest
    configuration of every other family (the checks are about key names, not model sizes)."""
    per_family: dict[str, str] = {}
    for c in sorted(registry.configurations(), key=registry.Configuration.upstream_bytes):
        per_family.setdefault(c.family.family, c.name)
    return [(SMALLEST, s) for s in SPELLINGS] + [(n, "prefix+legacy") for n in per_family.values() if n != SMALLEST]


@pytest.fixture(scope="module", params=_cases(), ids=lambda p: f"{p[0]}-{p[1]}")
def case(request, tmp_path_factory):
    # module scope with one parameter at a time: pytest finishes every test of one case before it
    # builds the next, so only one case's files exist at once; they are removed right after
    name, spelling = request.param
    folder = tmp_path_factory.mktemp(f"{name}-{spelling}")
    try:
        yield Case(name, spelling, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def scratch(tmp_path):
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)  # restored files are as big as the checkpoint


def test_conversion_records_the_spelling(case):
    config = json.loads((case.out / api.CONFIG_FILE).read_text())
    recorded = config["source"]["spelling"]
    assert recorded["key_prefix"] == case.prefix
    assert recorded["container_entry"] == case.entry
    assert recorded["other_entries"] == [k for k in upstream_checkpoint(case.name) if k != case.entry]
    # uniform spellings need no key named one by one, and the order is upstream's own
    assert recorded["renamed_keys"] == {} and recorded["key_order"] is None
    # legacy names are a non-first alternative of some rule; current names the first of every rule
    assert recorded["alternatives"], "the mapping has rules with alternatives; the conversion must record them"
    assert any(recorded["alternatives"].values()) == case.legacy
    from safetensors import safe_open

    with safe_open(str(case.out / api.MODEL_FILE), framework="pt") as fh:
        assert json.loads(fh.metadata()["lic.spelling"]) == recorded


def test_cli_inverse_gives_back_the_source(case, scratch):
    code, stdout, stderr = run(["--inverse", case.out, "-o", scratch / "back.pth.tar", *case.flag])
    assert code == 0, stderr
    assert "the source's spelling" in stdout
    case.assert_is_source(scratch / "back.pth.tar")


def test_api_inverse_gives_back_the_source(case, scratch):
    result = api.restore_checkpoint(case.out, scratch / "back.pth.tar", without_dropped=bool(case.flag))
    assert result.recorded and result.out_file == scratch / "back.pth.tar"
    assert list(result.state_dict) == list(case.kept)
    state, plan = result  # the former (state_dict, plan) return still unpacks
    assert state is result.state_dict and plan.ok
    case.assert_is_source(scratch / "back.pth.tar")


def test_bare_safetensors_keeps_the_spelling(case, scratch):
    """Without config.json the spelling comes from the file's metadata."""
    alone = scratch / "alone.safetensors"
    os.link(case.out / api.MODEL_FILE, alone)  # the same file, with no config.json beside it (no copy on disk)
    result = api.restore_checkpoint(alone, scratch / "back.pth.tar", without_dropped=bool(case.flag))
    assert result.recorded
    alone.unlink()
    case.assert_is_source(scratch / "back.pth.tar")


def test_canonical_gives_plain_names(case, scratch):
    code, stdout, stderr = run(["--inverse", "--canonical", case.out, "-o", scratch / "plain.pth.tar", *case.flag])
    assert code == 0, stderr
    back = torch.load(scratch / "plain.pth.tar", weights_only=True)
    assert list(back) == ["state_dict"]
    plain = upstream_state_dict(case.name)  # the fixture's own names: no prefix, current compressai names
    plain = {k: v for k, v in plain.items() if k not in case.plain_lost}
    assert list(back["state_dict"]) == list(plain)
    assert all(torch.equal(back["state_dict"][k], v) for k, v in plain.items())


def test_verify_passes_against_the_source_as_it_was(case):
    """T0 on every case; every tier on every family's case with both spellings at once (on the golden
    input, one image)."""
    every_tier = case.spelling == "prefix+legacy"
    torch.set_num_threads(2)
    options = {"images": fixture_dir(case.name) / "input.safetensors"} if every_tier else {"tiers": ["T0"]}
    report = verify_checkpoint(case.src, case.out, **options)
    (t0,) = [t for t in report.tiers if t.tier == "T0"]
    assert t0.passed, t0.first_failure()
    (round_trip,) = [c for c in t0.checks if c.name == "inverse round trip"]
    assert round_trip.values["restored"] == len(case.kept)
    # compared in the source's own spelling, not a canonical copy
    assert round_trip.values["key_prefix"] == case.prefix
    assert bool(round_trip.values["alternatives"]) == case.legacy
    if every_tier:
        assert [t.tier for t in report.tiers] == ["T0", "T1", "T2", "T3"]
        assert all(t.passed for t in report.tiers), report.first_failure()
        assert report.passed


# --- spellings that are not uniform, and spellings that do not fit ---------------------------------


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """The smallest configuration as a bare state dict, 'module.' on only some keys (twice on one), one
    legacy entropy-bottleneck name among current ones, and the keys in another order than upstream's."""
    folder = tmp_path_factory.mktemp("mixed")
    legacy = upstream_checkpoint(SMALLEST, legacy_entropy_bottleneck=True)
    current = upstream_checkpoint(SMALLEST)
    entry = next(k for k, v in current.items() if isinstance(v, dict) and v)
    old_keys, new_keys = list(legacy[entry]), list(current[entry])
    changed = [i for i, (a, b) in enumerate(zip(old_keys, new_keys)) if a != b]
    assert changed, "the legacy spelling renames some keys"
    order = list(range(len(new_keys)))
    order = order[len(order) // 2:] + order[: len(order) // 2]  # the second half first
    state = {}
    for rank, i in enumerate(order):
        key = old_keys[i] if i == changed[0] else new_keys[i]
        prefix = "module.module." if rank == 1 else "module." if rank % 3 or i == changed[0] else ""
        state[prefix + key] = current[entry][new_keys[i]]
    src = folder / "mixed.pth"
    torch.save(state, src)
    out = folder / "converted"
    result = api.convert_checkpoint(src, out)
    try:
        yield src, out, state, result.spelling, old_keys[changed[0]]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_mixed_spelling_is_recorded_and_given_back(mixed, scratch):
    src, out, state, spelling, _ = mixed
    assert spelling.key_prefix == "module." and spelling.container_entry is None
    assert spelling.renamed_keys and spelling.key_order is not None
    code, _, stderr = run(["--inverse", out, "-o", scratch / "back.pth"])
    assert code == 0, stderr
    back = torch.load(scratch / "back.pth", weights_only=True)
    assert list(back) == list(state)  # a bare state dict, as the source was
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in state.items())
    report = verify_checkpoint(src, out, tiers=["T0"])
    assert report.tiers[0].passed, report.tiers[0].first_failure()


def test_a_spelling_that_does_not_fit_is_one_clear_line(mixed, scratch):
    _, out, _, _, _ = mixed
    folder = scratch / "edited"
    folder.mkdir()
    (folder / api.MODEL_FILE).symlink_to(out / api.MODEL_FILE)
    config = json.loads((out / api.CONFIG_FILE).read_text())
    rule = next(iter(config["source"]["spelling"]["alternatives"]))
    config["source"]["spelling"]["alternatives"][rule] = 7
    (folder / api.CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(LicError, match="--canonical"):
        api.restore_checkpoint(folder, scratch / "back.pth")
    code, _, stderr = run(["--inverse", folder, "-o", scratch / "back.pth"])
    assert code == 2 and "Traceback" not in stderr
    (line,) = [x for x in stderr.strip().splitlines() if x.startswith("lic-convert:")]
    assert rule in line and "--canonical" in line
    assert not (scratch / "back.pth").exists()
    # the canonical way back does not use the recorded spelling, so it still works
    assert run(["--inverse", "--canonical", folder, "-o", scratch / "back.pth"])[0] == 0


def test_t0_round_trip_compares_the_source_as_stored(mixed):
    """A changed bit in the tensor of a legacy-named, prefixed key fails the round trip under that name."""
    from lic_checkpoints.convert.checkpoint import read_checkpoint
    from lic_checkpoints.verify.tiers import tier0

    src, out, _, _, legacy_key = mixed
    source = read_checkpoint(src)
    detection, plan = api.plan_conversion(source)
    converted = dict(read_checkpoint(out / api.MODEL_FILE).state_dict)
    upstream = layouts.load(detection.variant.layout, "upstream")
    good = tier0(plan, source.state_dict, converted, detection, upstream, source.stored_as)
    assert good.passed, good.first_failure()
    (target,) = [s.target for s in plan.steps if s.sources[:1] == (legacy_key,)]
    flipped = converted[target].clone()
    flipped.view(-1)[0] = torch.nextafter(flipped.view(-1)[0], torch.tensor(math.inf))
    bad = tier0(plan, source.state_dict, {**converted, target: flipped}, detection, upstream, source.stored_as)
    (round_trip,) = [c for c in bad.checks if c.name == "inverse round trip"]
    assert not round_trip.passed
    assert round_trip.detail.startswith(source.stored_key(legacy_key) + ": ")
    assert source.stored_key(legacy_key) != legacy_key  # the name as stored, not as read


def test_canonical_needs_inverse():
    code, _, stderr = run(["--canonical", "whatever.pth.tar"])
    assert code == 2 and "--canonical" in stderr and "--inverse" in stderr
