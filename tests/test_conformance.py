"""Conformance: every configuration of the registry goes through the same checks.

``registry.configurations()`` lists every published configuration (a family's variant with a
shipped layout); each one is tested here the same way, against its golden data in ``tests/data``:

- the registry describes the model the golden data was made with;
- ``lic-convert``: the output has exactly the target layout of CompressAI master (keys, order,
  shapes, dtypes), its synthesized buffers are master's constants, every source tensor is used,
  renamed tensors are bit-identical, ``lic-convert --inverse`` gives the source back bit for bit,
  and the demo checkpoint is the golden one;
- our CompressAI-layout class: master's layout and constants when freshly built, a strict load of
  the converted file with the recorded kwargs, ``from_state_dict``, clear refusals of other layouts,
  and forward / update / compress / decompress against what the authors' code produced;
- our re-implementation of the authors' class (the reference side of ``lic-verify``): the upstream
  layout and constants, strict loading, and forward / update / compress / decompress against the
  golden data (byte-identical strings);
- ``lic-verify`` passes every tier and its reference side reproduces the golden data.

Checks that hold for one family only live in ``tests/quirks/test_<family>.py``.  The golden data
and its tolerances are described in ``tests/data/README.md``.
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path

import jsonschema
import pytest
import torch
from click.testing import CliRunner
from compressai.models.base import get_scale_table
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import (
    CONFIGURATIONS,
    FORWARD_OUTPUTS,
    FORWARD_TOL,
    assert_forward_matches_fixture,
    entropy_table_keys,
    fixture_dir,
    fixture_expected,
    fixture_expected_json,
    fixture_input,
    fixture_manifest,
    meta_state_dict,
    remove_tree,
    target_constants,
    target_manifest,
    tolerance,
    upstream_checkpoint,
    upstream_state_dict,
)
from lic_checkpoints.convert import api, demo, registry
from lic_checkpoints.convert.cli import main as convert_main
from lic_checkpoints.verify.cli import main as verify_main
from lic_checkpoints.verify.loading import load_converted, read_config
from lic_checkpoints.verify.models.compressai.compat import IncompatibleStateDictError
from lic_checkpoints.verify.models.compressai.installed import target_class
from lic_checkpoints.verify.report import schema

#: the entropy tables after ``update(force=True)``, by module
BOTTLENECK_TABLES = ("_quantized_cdf", "_offset", "_cdf_length")
GAUSSIAN_TABLES = (*BOTTLENECK_TABLES, "scale_table")
#: CompressAI's layout codes each slice as its own rANS stream where upstream codes all in one: a
#: few bytes of flush per stream (tests/data/README.md allows 0.5 %)
BYTES_REL_TOL = 0.005
#: how many input sizes the upstream model cannot process each configuration is tried with
UNSUPPORTED_SIZE_CASES = range(5)


def unsupported_size(conf: registry.Configuration, case: int) -> tuple[int, int]:
    """Input sizes the authors' model cannot process (sides must be multiples of ``input.multiple`` of
    its mapping, at least ``input.minimum``); for 128 / 256: (128, 256), (256, 320), (192, 192),
    (256, 192), (320, 256)."""
    multiple, minimum = conf.input_multiple, conf.input_minimum
    side, half = max(multiple, minimum), multiple // 2
    small = minimum - multiple if minimum > multiple else half
    return [(small, side), (side, side + half), (side - half, side - half), (side, side - half),
            (side + half, side)][case]


def _gaussian(leaf: torch.nn.Module):
    """The GaussianConditional of a slice's leaf codec (wherever the leaf keeps it)."""
    from compressai.entropy_models import GaussianConditional

    return next(m for m in leaf.modules() if isinstance(m, GaussianConditional))


def _source_of(subject, target_key: str) -> str:
    """The upstream key the conversion took ``target_key`` from."""
    return subject.result.plan.by_target()[target_key].sources[0]


def _layout(state: dict) -> list[list]:
    return [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in state.items()]


def _resolved_kwargs(model) -> dict:
    """The resolved constructor arguments our CompressAI-layout model reports."""
    method = getattr(model, "config_kwargs", None)
    return method() if callable(method) else model.config()


def _fingerprint(model) -> list[tuple[str, float]]:
    """Every state-dict entry's name and sum (in float64): enough to notice a tensor replaced or changed."""
    return [(k, float(v.double().sum())) for k, v in model.state_dict().items()]


def _display(name: str) -> str:
    """A family display name as a pattern that ignores spacing (``A + B`` matches ``A+B``)."""
    return r"\s*".join(re.escape(part) for part in name.split())


def _as_decoded(subject, x_hat: torch.Tensor) -> torch.Tensor:
    """A forward reconstruction as the authors' decompress returns it: clamped to [0, 1] unless the
    golden data records that upstream's decompress does not clamp."""
    clamps = fixture_expected_json(subject.name).get("decompress_clamps_output", True)
    return x_hat.clamp(0, 1) if clamps else x_hat


def _bytes(t: torch.Tensor) -> bytes:
    return t.numpy().tobytes()


def _convert_cli(args):
    result = CliRunner().invoke(convert_main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


# --------------------------------------------------------------------------- one configuration


class Subject:
    """One configuration and everything the tests compare, each computed once, on first use."""

    def __init__(self, conf: registry.Configuration, checkpoints, work: Path) -> None:
        self.conf, self.name, self.family = conf, conf.name, conf.family
        self._checkpoints, self.work = checkpoints, work
        self.target_cls = registry.import_class(self.family.target["ours"])
        self.upstream_cls = registry.import_class(self.family.upstream["ours"])

    @property
    def checkpoint(self) -> Path:
        """The golden upstream checkpoint file (shared by the module's tests; do not modify)."""
        return self._checkpoints.path(self.name)

    @cached_property
    def x(self) -> torch.Tensor:
        return fixture_input(self.name)

    @cached_property
    def expected(self) -> dict[str, torch.Tensor]:
        return fixture_expected(self.name)

    @cached_property
    def source(self) -> dict[str, torch.Tensor]:
        """The state dict as the golden checkpoint file holds it (the fixture's harness spelling,
        e.g. compressai <= 1.2.6 entropy-bottleneck names): what lic-convert reads and restores."""
        return dict(upstream_checkpoint(self.name)["state_dict"])

    @cached_property
    def plain_source(self) -> dict[str, torch.Tensor]:
        """The same tensors under the fixture manifest's names (compressai 1.2.8 spelling): what the
        upstream model's ``state_dict()`` lists."""
        return upstream_state_dict(self.name)

    # ------------------------------------------------------------- conversion

    @cached_property
    def out_dir(self) -> Path:
        return self.result.out_dir

    @cached_property
    def result(self) -> api.ConversionResult:
        return api.convert_checkpoint(self.checkpoint, self.work / "converted")

    def converted_file(self, keys=None) -> dict[str, torch.Tensor]:
        """Tensors of the written ``model.safetensors`` (``keys``, or all), read on each call."""
        with safe_open(str(self.out_dir / api.MODEL_FILE), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in (fh.keys() if keys is None else keys)}

    @cached_property
    def in_memory(self):
        """``(tensors, result)`` of ``convert_in_memory``: renamed tensors map the checkpoint file."""
        return api.convert_in_memory(self.checkpoint)

    @property
    def converted(self) -> dict[str, torch.Tensor]:
        return self.in_memory[0]

    @property
    def num_slices(self) -> int:
        return int(self.result.config["variables"]["K"])

    # ------------------------------------------------------------- our CompressAI-layout model

    @cached_property
    def fresh_target(self) -> dict:
        """Facts about our CompressAI-layout class freshly built with the recorded kwargs (nothing
        loaded): its layout, parameter and buffer names, buffer values and resolved kwargs."""
        model = self.target_cls(**self.result.config["target"]["kwargs"]).eval()
        state = model.state_dict()
        params = [k for k, _ in model.named_parameters()]
        return {
            "layout": _layout(state),
            "params": params,
            "buffers": [k for k, _ in model.named_buffers()],
            "buffer_values": {k: v.clone() for k, v in state.items() if k not in set(params)},
            "resolved": _resolved_kwargs(model),
            "support_slices": model.latent_codec.y.support_slices,
        }

    @cached_property
    def target(self) -> torch.nn.Module:
        """The converted folder loaded the way a user does: recorded kwargs, strict load, update()."""
        return load_converted(self.out_dir)

    @cached_property
    def target_forward(self) -> dict:
        with torch.no_grad():
            return self.target(self.x, return_params=True)

    @cached_property
    def target_coded(self) -> tuple[dict, torch.Tensor]:
        """``compress(x, return_symbols=True)`` and the ``decompress`` of its strings."""
        with torch.no_grad():
            encoded = self.target.compress(self.x, return_symbols=True)
            decoded = self.target.decompress(encoded["strings"], encoded["shape"])["x_hat"]
        return encoded, decoded

    # ------------------------------------------------------------- our re-implementation of upstream

    @cached_property
    def fresh_reference(self) -> dict:
        """Facts about our upstream class freshly built with the recorded kwargs: its layout and
        the values of its buffers (the model itself becomes :attr:`reference`)."""
        model = self.upstream_cls(**self.conf.upstream_kwargs)
        self.reference_model = model.eval()
        state = model.state_dict()
        params = dict(model.named_parameters())
        return {
            "layout": _layout(state),
            "params": list(params),
            "numel": sum(p.numel() for p in params.values()),
            "buffers": {k for k, _ in model.named_buffers()},
            # the recipe keeps these as built: every buffer, and the bottleneck's quantiles (a parameter)
            "constants": {k: v.detach().clone() for k, v in state.items()
                          if k not in params or k.endswith("entropy_bottleneck.quantiles")},
        }

    @cached_property
    def reference(self) -> torch.nn.Module:
        """Our upstream class with the rebuilt upstream state dict loaded (after scrambling its parameters)."""
        self.fresh_reference  # noqa: B018 - builds the model and keeps its fresh state
        model = self.reference_model
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.fill_(float("nan"))
        self.reference_load = model.load_state_dict(self.plain_source)
        return model

    @cached_property
    def reference_outputs(self) -> dict:
        model, expected = self.reference, self.expected
        with torch.no_grad():
            forward = model(self.x)
            model.update(force=True)
            tables = {k: model.state_dict()[k].clone() for k in entropy_table_keys(self.name)}
            encoded = model.compress(self.x)
            upstream = [[_bytes(expected["strings_y_0"])], [_bytes(expected["strings_z_0"])]]
            decoded = model.decompress(upstream, expected["compress_shape"].tolist())["x_hat"]
        return {"forward": forward, "tables": tables, "encoded": encoded, "decoded_upstream": decoded}


@pytest.fixture(scope="module", params=CONFIGURATIONS, ids=lambda c: c.name)
def subject(request, checkpoints, tmp_path_factory):
    # module scope, one configuration at a time: pytest runs every test of one configuration before
    # it builds the next, and the converted folder and models go when the configuration is done
    work = tmp_path_factory.mktemp(request.param.name)
    item = Subject(request.param, checkpoints, work)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the golden data was made with 2 threads
    try:
        yield item
    finally:
        torch.set_num_threads(threads)
        item.__dict__.clear()
        remove_tree(work)


# --------------------------------------------------------------------------- registry vs golden data


def test_registry_describes_the_golden_model(subject):
    manifest, _ = fixture_manifest(subject.name)
    upstream, target = subject.family.upstream, target_manifest(subject.name)
    assert subject.conf.upstream_kwargs == manifest["constructor_kwargs"]
    assert upstream["class"] == manifest["upstream"]["class"]
    assert upstream["commit"] == manifest["upstream"]["commit"]
    assert upstream["repo"].rstrip("/") == manifest["upstream"]["repo_url"].rstrip("/")
    assert subject.family.target["compressai_class"] == target["class"]
    assert target["constructor_kwargs"].items() <= subject.conf.target_kwargs.items()
    for alias in subject.conf.aliases:
        assert registry.configuration(alias).name == subject.name


# --------------------------------------------------------------------------- lic-convert


def test_converted_layout_equals_target_layout(subject):
    target = target_manifest(subject.name)
    expected = [row[:3] for row in target["state_dict"]]
    with safe_open(str(subject.out_dir / api.MODEL_FILE), framework="pt") as fh:
        in_file = [[k, list(fh.get_slice(k).get_shape()), fh.get_slice(k).get_dtype()] for k in fh.keys()]
    dtype_names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I32": "int32", "I64": "int64"}
    in_file = [[k, shape, dtype_names.get(dtype, dtype)] for k, shape, dtype in in_file]
    assert sorted(in_file) == sorted(expected)  # a safetensors file keeps no order
    assert len(in_file) == target["num_state_dict_entries"]
    assert _layout(subject.converted) == expected  # keys, order, shapes, dtypes


def test_synthesized_buffers_equal_target_constants(subject):
    constants = target_constants(subject.name)
    assert constants
    written = subject.converted_file(list(constants))
    for key, value in constants.items():
        assert written[key].dtype == value.dtype, key
        assert torch.equal(written[key], value), key


def test_every_source_tensor_is_used(subject):
    plan = subject.result.plan
    assert plan.ok, plan.problems()
    assert not plan.unexpected and not plan.missing and not plan.mismatched and not plan.collisions
    used = {s for step in plan.steps for s in step.sources} | {k for k, _ in plan.dropped}
    assert used == set(subject.source)


def test_renamed_tensors_are_bit_identical(subject):
    renamed = [s for s in subject.result.plan.steps if s.action in ("rename", "fan_out")]
    assert len(renamed) > len(subject.result.plan.steps) // 2
    written = subject.converted_file()
    for step in renamed:
        assert torch.equal(written[step.target], subject.source[step.sources[0]]), step.target


def test_fanned_out_copies_are_equal_and_own_their_storage(subject):
    steps = [s for s in subject.result.plan.steps if s.action == "fan_out"]
    # one copy per slice, wherever the slice's leaf keeps its Gaussian (master's layout decides)
    target_keys = [row[0] for row in target_manifest(subject.name)["state_dict"]]
    copies = [next(key for key in target_keys if key.startswith(f"latent_codec.y.latent_codec.y{k}.")
                   and key.endswith(".gaussian_conditional.scale_bound")) for k in range(subject.num_slices)]
    assert set(copies) <= {s.target for s in steps}
    written = subject.converted_file([s.target for s in steps])
    for step in steps:
        assert torch.equal(written[step.target], subject.source[step.sources[0]]), step.target
    # in memory each copy owns its storage (a later in-place change to one cannot reach another)
    filled = [s.target for s in steps if subject.converted[s.target].numel()]  # empty tables have no storage
    assert set(copies) <= set(filled)
    pointers = {subject.converted[key].untyped_storage().data_ptr() for key in filled}
    assert len(pointers) == len(filled)


def test_metadata_and_config(subject):
    result = subject.result
    with safe_open(str(subject.out_dir / api.MODEL_FILE), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == "pt"
    assert meta["lic.family"] == result.family == subject.family.family
    assert meta["lic.source_sha256"] == result.source.sha256
    config = read_config(subject.out_dir)
    assert config["family"] == subject.family.family and config["variant"] == subject.conf.variant.name
    assert config["source"]["ignored_entries"] == [k for k in upstream_checkpoint(subject.name) if k != "state_dict"]
    assert config["upstream"]["class"] == subject.family.upstream["class"]
    assert config["target"]["kwargs"] == subject.conf.target_kwargs


def test_inverse_gives_the_source_back_bit_identical(subject, tmp_path):
    back = tmp_path / "upstream.pth.tar"
    # keys a rule dropped with no way back (a training-only branch): refused unless asked to leave them out
    lost = {key for key, rule in subject.result.plan.dropped if rule.restore_value is None}
    if lost:
        code, stdout, stderr = _convert_cli(["--inverse", subject.out_dir, "-o", back])
        assert code == 2 and not back.exists(), stdout + stderr
        assert len(stderr.strip().splitlines()) == 1 and "--without-dropped" in stderr, stderr
    code, stdout, stderr = _convert_cli(["--inverse", subject.out_dir, "-o", back]
                                        + (["--without-dropped"] if lost else []))
    assert code == 0, stdout + stderr
    restored = torch.load(back, weights_only=True, mmap=True)
    assert list(restored) == ["state_dict"]
    restored = restored["state_dict"]
    expected = {k: v for k, v in subject.source.items() if k not in lost}
    assert list(restored) == list(expected)  # upstream's key order too
    for key, value in expected.items():
        assert restored[key].dtype == value.dtype, key
        assert torch.equal(restored[key], value), key


def test_demo_checkpoint_is_the_golden_checkpoint(subject, tmp_path):
    for alias in subject.conf.aliases:
        assert demo.resolve(alias) == subject.name
    assert subject.name in demo.demo_names()
    path = demo.demo_checkpoint(subject.name, tmp_path / "demo.pth.tar")
    written = torch.load(path, weights_only=True, mmap=True)
    golden = upstream_checkpoint(subject.name)
    assert list(written) == list(golden)
    state = written["state_dict"]
    assert list(state) == list(golden["state_dict"])
    for key, value in golden["state_dict"].items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key


# --------------------------------------------------------------------------- our CompressAI-layout class


def test_target_class_is_the_registry_one(subject):
    assert target_class(subject.family.family) is subject.target_cls
    assert type(subject.target) is subject.target_cls


def test_fresh_target_model_has_the_target_layout(subject):
    target = target_manifest(subject.name)
    fresh = subject.fresh_target
    assert fresh["layout"] == [row[:3] for row in target["state_dict"]]  # keys, shapes, dtypes, order
    kinds = {row[0]: row[3] for row in target["state_dict"]}
    assert sorted(fresh["params"]) == sorted(k for k, kind in kinds.items() if kind == "param")
    buffers = fresh["buffers"]
    persistent = sorted(k for k in buffers if k in kinds)
    assert persistent == sorted(k for k, kind in kinds.items() if kind == "persistent-buffer")
    # buffers that never reach a state dict: ours may derive some on the fly where master keeps a copy
    non_persistent = {k for k in buffers if k not in kinds}
    assert non_persistent <= {row[0] for row in target["non_persistent_buffers"]}
    assert fresh["resolved"] == target["resolved_kwargs"]


def test_fresh_target_buffers_equal_target_constants(subject):
    constants = target_constants(subject.name)
    state = subject.fresh_target["buffer_values"]
    for key, value in constants.items():
        assert state[key].dtype == value.dtype, key
        assert torch.equal(state[key], value), key


def test_converted_file_loads_strictly_with_the_recorded_kwargs(subject):
    """``load_converted``: the recorded kwargs, ``load_state_dict(strict=True)``, ``update(force=True)``."""
    model = subject.target
    assert not model.training
    assert read_config(subject.out_dir)["target"]["kwargs"] == subject.conf.target_kwargs
    assert _resolved_kwargs(model) == target_manifest(subject.name)["resolved_kwargs"]
    state = model.state_dict()
    assert list(state) == list(subject.converted)  # the target layout's order
    tables = [k for k in state if k.endswith(GAUSSIAN_TABLES)]
    for key, value in subject.converted_file().items():
        if key not in tables:  # update() filled the tables
            assert torch.equal(state[key], value), key
    assert all(state[k].numel() > 0 for k in tables)


def _build(cls, kwargs):
    try:
        with torch.device("meta"):  # cheap where the model allows it
            return cls(**kwargs)
    except (NotImplementedError, RuntimeError):  # a model that needs real tensors to be built
        return cls(**kwargs)


def test_recorded_and_inferred_kwargs_build_the_same_layout(subject):
    """The kwargs lic-convert records and the ones ``infer_kwargs`` reads off the tensors agree."""
    cls, state = subject.target_cls, subject.converted
    from_config = _build(cls, subject.result.config["target"]["kwargs"])
    inferred = _build(cls, cls.infer_kwargs(state))
    assert _layout(from_config.state_dict()) == _layout(inferred.state_dict())
    assert [k for k in from_config.state_dict()] == list(state)


def test_from_state_dict_builds_the_same_variant(subject):
    target = target_manifest(subject.name)
    assert subject.target_cls.infer_kwargs(subject.converted) == target["from_state_dict_roundtrip"]["inferred_kwargs"]
    inferred, fresh = subject.target_cls.from_state_dict(subject.converted).eval(), subject.fresh_target
    # master infers max_support_slices=4 for a 5-slice model: every slice still sees the same support
    ours, ctor = _resolved_kwargs(inferred), fresh["resolved"]
    assert {k: v for k, v in ours.items() if k != "max_support_slices"} == {
        k: v for k, v in ctor.items() if k != "max_support_slices"}
    assert inferred.latent_codec.y.support_slices == fresh["support_slices"]
    loaded = inferred.state_dict()
    assert list(loaded) == list(subject.converted)
    assert [k for k, v in subject.converted.items() if not torch.equal(loaded[k], v)] == []


def test_other_layouts_are_refused_in_one_line(subject):
    model, cls = subject.target, subject.target_cls
    before = _fingerprint(model)
    for other in CONFIGURATIONS:
        if other.name == subject.name:
            continue
        foreign = meta_state_dict(target_manifest(other.name)["state_dict"])
        with pytest.raises(IncompatibleStateDictError) as error:
            model.load_state_dict(foreign)
        message = str(error.value)
        assert "\n" not in message and message.startswith(f"{cls.__name__}("), message
        assert any(p in message for p in ("missing keys", "unexpected keys", "shape mismatches")), message
        if other.family.family != subject.family.family:
            assert re.search(rf"looks like {_display(other.family.name)}, not {_display(subject.family.name)}",
                             message), message
        else:
            assert "looks like" not in message, message  # the right family, another configuration
        if registry.import_class(other.family.target["ours"]) is not cls:
            with pytest.raises(IncompatibleStateDictError,
                               match=rf"holds {_display(other.family.name)}, not a CompressAI-layout {cls.__name__}"):
                cls.from_state_dict(foreign)
    assert _fingerprint(model) == before  # refused before anything was copied


def test_unconverted_upstream_state_dict_is_refused(subject):
    manifest, _ = fixture_manifest(subject.name)
    with pytest.raises(IncompatibleStateDictError, match="upstream .*convert it first with lic-convert"):
        subject.target_cls.from_state_dict(meta_state_dict(manifest["state_dict"]))


def test_target_forward_matches_upstream(subject):
    out = subject.target_forward
    diffs = assert_forward_matches_fixture(subject.name, out)
    print(f"\n{subject.name} target forward max|ours - upstream|: {diffs}")
    if "diffusion_loss" in subject.expected:  # a training-only prior, 0 in eval
        assert torch.equal(out["diffusion_loss"], subject.expected["diffusion_loss"])
    else:
        assert "diffusion_loss" not in out


def test_target_entropy_tables_equal_upstream(subject):
    codec, expected = subject.target.latent_codec, subject.expected
    bottleneck = codec.z.entropy_bottleneck
    for table in BOTTLENECK_TABLES:
        upstream = _source_of(subject, f"latent_codec.z.entropy_bottleneck.{table}")
        assert torch.equal(getattr(bottleneck, table), expected[upstream]), table
    for k in range(subject.num_slices):
        leaf = codec.y.latent_codec[f"y{k}"]
        gaussian = _gaussian(leaf)
        prefix = next(n for n, m in leaf.named_modules() if m is gaussian)
        for table in GAUSSIAN_TABLES:
            upstream = _source_of(subject, f"latent_codec.y.latent_codec.y{k}.{prefix}.{table}")
            assert torch.equal(getattr(gaussian, table), expected[upstream]), (k, table)


def _flips(ours: torch.Tensor, reference: torch.Tensor, margin: torch.Tensor) -> str:
    """Where two integer maps differ, with the distance of each decision to its boundary."""
    where = (ours != reference).nonzero().tolist()[:10]
    return f"{int((ours != reference).sum())} flips; first (index, ours, upstream, margin): " + ", ".join(
        f"({tuple(i)}, {int(ours[tuple(i)])}, {int(reference[tuple(i)])}, {float(margin[tuple(i)]):.2e})"
        for i in where
    )


def test_target_coded_symbols_equal_upstream_decisions(subject):
    """Every coded y symbol, scale index and z symbol is the authors' code's decision: ``round(y -
    means)`` and the scale-table lookup on the stored upstream forward, z from upstream's z string."""
    expected, codec = subject.expected, subject.target.latent_codec
    encoded, _ = subject.target_coded
    groups = list(codec.y.groups)  # slice widths (may be uneven)
    offsets = (expected["y"] - expected["means"]).split(groups, dim=1)
    scales = expected["scales"].split(groups, dim=1)
    for k, (y_sym, idx) in enumerate(zip(encoded["symbols"]["y"], encoded["indexes"]["y"])):
        gaussian = _gaussian(codec.y.latent_codec[f"y{k}"])
        upstream_sym = torch.round(offsets[k]).int()
        margin = ((offsets[k] - offsets[k].floor()) - 0.5).abs()
        assert torch.equal(y_sym.int(), upstream_sym), f"slice {k} y: " + _flips(y_sym.int(), upstream_sym, margin)
        upstream_idx = gaussian.build_indexes(scales[k])
        bounded = gaussian.lower_bound_scale(scales[k])
        table_margin = (bounded.unsqueeze(-1) - gaussian.scale_table).abs().min(dim=-1).values
        assert torch.equal(idx, upstream_idx), f"slice {k} scale index: " + _flips(idx, upstream_idx, table_margin)
    bottleneck = codec.z.entropy_bottleneck
    z_shape = tuple(expected["compress_shape"].tolist())
    upstream_z_hat = bottleneck.decompress([_bytes(expected["strings_z_0"])], z_shape)
    upstream_z = torch.round(upstream_z_hat - bottleneck._get_medians().detach()).int()
    assert torch.equal(encoded["symbols"]["z"].int(), upstream_z)


def test_target_strings_and_round_trip(subject):
    expected = subject.expected
    encoded, decoded = subject.target_coded
    strings = encoded["strings"]
    # one stream per slice, or per coding pass of a slice (a checkerboard's anchors and non-anchors)
    passes = (len(strings) - 1) // subject.num_slices
    assert passes >= 1 and len(strings) == passes * subject.num_slices + 1 and all(len(s) == 1 for s in strings)
    assert encoded["shape"] == {"y": tuple(expected["y"].shape[1:]), "z": tuple(expected["compress_shape"].tolist())}
    # same z symbols and tables: the z stream is the authors' byte for byte
    assert strings[-1][0] == _bytes(expected["strings_z_0"])
    ours = sum(len(s[0]) for s in strings)
    upstream = int(expected["string_nbytes_y"][0]) + int(expected["string_nbytes_z"][0])
    print(f"\n{subject.name} bytes: ours {ours} (per-slice streams) vs upstream {upstream}: {ours - upstream:+d}")
    assert abs(ours - upstream) <= BYTES_REL_TOL * upstream
    diff = (decoded - expected["decoded_x_hat"]).abs().max().item()
    assert torch.allclose(decoded, expected["decoded_x_hat"], **FORWARD_TOL), diff
    # the own round trip is exact, as upstream's: decoded == forward x_hat (clamped to [0, 1] where upstream clamps)
    assert torch.equal(decoded, _as_decoded(subject, subject.target_forward["x_hat"]))


# --------------------------------------------------------------------------- our re-implementation of upstream


def test_reference_layout_matches_the_upstream_manifest(subject):
    manifest, _ = fixture_manifest(subject.name)
    fresh = subject.fresh_reference
    assert fresh["layout"] == [row[:3] for row in manifest["state_dict"]]
    param_rows = [row for row in manifest["state_dict"] if row[3] == "param"]
    assert fresh["params"] == [row[0] for row in param_rows]
    assert len(fresh["params"]) == manifest["num_params"]
    assert fresh["numel"] == sum(torch.Size(row[1]).numel() for row in param_rows)
    assert fresh["buffers"] == {row[0] for row in manifest["state_dict"] if row[3] == "buffer"}
    assert len(fresh["buffers"]) == manifest["num_buffers"]


def test_reference_constants_equal_fixture_constants(subject):
    manifest, constants = fixture_manifest(subject.name)
    fresh = subject.fresh_reference["constants"]
    assert sorted(constants) == sorted(manifest["constants_keys"])
    for key, value in constants.items():
        assert fresh[key].dtype == value.dtype and fresh[key].shape == value.shape, key
        assert torch.equal(fresh[key], value), key
    for key in manifest["zero_element_keys"]:
        assert fresh[key].numel() == 0, key


def test_reference_loads_the_upstream_state_dict_strictly(subject):
    model = subject.reference
    assert not subject.reference_load.missing_keys and not subject.reference_load.unexpected_keys
    loaded = model.state_dict()
    assert [k for k, v in subject.plain_source.items() if not torch.equal(loaded[k], v)] == []


def test_reference_loads_prefixed_legacy_names_like_upstream_eval(subject):
    """Published files may come from compressai <= 1.2.6 (``_matrix{i}`` names) and DataParallel."""
    checkpoint = upstream_checkpoint(subject.name, key_prefix="module.", legacy_entropy_bottleneck=True)
    legacy = {k.replace("module.", ""): v for k, v in checkpoint["state_dict"].items()}  # as upstream eval.py
    assert any(k.endswith("entropy_bottleneck._matrix0") for k in legacy)
    model = subject.upstream_cls(**subject.conf.upstream_kwargs)
    result = model.load_state_dict(legacy)
    assert not result.missing_keys and not result.unexpected_keys
    loaded = model.state_dict()
    assert [k for k, v in subject.plain_source.items() if not torch.equal(loaded[k], v)] == []


def test_reference_refuses_a_state_dict_without_gaussian_tables(subject):
    partial = upstream_state_dict(subject.name)
    del partial["gaussian_conditional.scale_table"]
    with pytest.raises(KeyError, match="scale_table"):
        subject.reference.load_state_dict(partial)


def test_reference_forward_matches_upstream(subject):
    out = subject.reference_outputs["forward"]
    diffs = assert_forward_matches_fixture(subject.name, out)
    print(f"\n{subject.name} reference forward max|ours - upstream|: {diffs}")
    if "diffusion_loss" in subject.expected:
        loss = out["diffusion_loss"]
        assert loss.dim() == 0 and torch.equal(loss, subject.expected["diffusion_loss"])


def test_reference_discrete_decisions_match_upstream(subject):
    """Rounding of y around its means and the scale-table index of every element, as upstream."""
    expected, para = subject.expected, subject.reference_outputs["forward"]["para"]
    ours = torch.round(para["y"] - para["means"])
    theirs = torch.round(expected["y"] - expected["means"])
    gc = subject.reference.gaussian_conditional
    ours_index, upstream_index = gc.build_indexes(para["scales"]), gc.build_indexes(expected["scales"])
    assert torch.equal(ours, theirs), int((ours != theirs).sum())
    assert torch.equal(ours_index, upstream_index), int((ours_index != upstream_index).sum())


def test_reference_entropy_tables_match_exactly(subject):
    tables = subject.reference_outputs["tables"]
    for key in entropy_table_keys(subject.name):
        assert tables[key].dtype == subject.expected[key].dtype, key
        assert torch.equal(tables[key], subject.expected[key]), key
    assert torch.equal(tables["gaussian_conditional.scale_table"], get_scale_table())


def test_reference_compress_is_byte_identical(subject):
    expected = subject.expected
    encoded = subject.reference_outputs["encoded"]
    y_strings, z_strings = encoded["strings"]
    assert len(y_strings) == 1 and len(z_strings) == 1  # one y stream for all slices
    assert len(y_strings[0]) == int(expected["string_nbytes_y"][0])
    assert len(z_strings[0]) == int(expected["string_nbytes_z"][0])
    assert y_strings[0] == _bytes(expected["strings_y_0"])
    assert z_strings[0] == _bytes(expected["strings_z_0"])
    assert list(encoded["shape"]) == expected["compress_shape"].tolist()


def test_reference_decodes_the_upstream_strings(subject):
    decoded = subject.reference_outputs["decoded_upstream"]
    expected = subject.expected["decoded_x_hat"]
    diff = (decoded - expected).abs().max().item()
    print(f"\n{subject.name} reference decoded max|diff|: {diff}")
    assert torch.allclose(decoded, expected, **FORWARD_TOL), diff
    # as upstream: the codec round trip equals the (clamped where upstream clamps) forward reconstruction exactly
    assert torch.equal(decoded, _as_decoded(subject, subject.reference_outputs["forward"]["x_hat"]))


@pytest.mark.parametrize("case", UNSUPPORTED_SIZE_CASES)
def test_reference_refuses_unsupported_input_sizes(subject, case):
    x = torch.zeros(1, 3, *unsupported_size(subject.conf, case))
    model = subject.reference
    message = f"multiples of {subject.conf.input_multiple}"
    with pytest.raises(ValueError, match=message):
        model(x)
    with pytest.raises(ValueError, match=message):
        model.compress(x)


# --------------------------------------------------------------------------- lic-verify


def test_lic_verify_passes_every_tier(subject, tmp_path):
    """lic-verify on the golden input: every tier passes, and both sides reproduce the golden data."""
    result = CliRunner().invoke(verify_main, [str(a) for a in (
        subject.checkpoint, subject.out_dir, "--images", fixture_dir(subject.name) / "input.safetensors",
        "--save-outputs", tmp_path / "outputs")])
    assert result.exit_code == 0, result.stdout + result.stderr
    report = json.loads((subject.out_dir / "parity_report.json").read_text())  # written into the folder
    jsonschema.validate(report, schema())
    assert report["passed"] is True
    assert report["family"] == subject.family.family and report["variant"] == subject.conf.variant.name
    assert set(report["tiers"]) == {"T0", "T1", "T2", "T3"}
    assert all(t["passed"] and t["skipped"] is None for t in report["tiers"].values())
    expected = subject.expected
    for side in ("reference", "target"):
        saved = load_file(str(tmp_path / "outputs" / f"{side}.safetensors"))
        for key in FORWARD_OUTPUTS:
            assert torch.allclose(saved[key], expected[key], **tolerance(key)), (side, key)
        assert torch.allclose(saved["decoded_x_hat"], expected["decoded_x_hat"], **FORWARD_TOL), side
    for side in report["eval_model"].values():  # T3 in CompressAI's eval_model schema
        assert side["description"] == "Inference (ans)"
        assert set(side["results"]) >= {"psnr-rgb", "ms-ssim-rgb", "bpp"}
    markdown = (subject.out_dir / "parity_report.md").read_text()
    assert "| Tier | Check | Result | Details |" in markdown and "|---|---|---|---|" in markdown
