"""Our CompressAI-layout DCAE / SAAF: master's layout, upstream's numbers.

Per fixture: the rebuilt upstream checkpoint goes through the converter into our target class
(constructor with the recorded kwargs + strict load, and ``from_state_dict``); the layout is
checked against ``targets/<name>.json`` and the outputs against what the real upstream code
produced (``fixtures/<name>/expected.safetensors``), with the tolerances of fixtures/README.md §6.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from conftest import FORWARD_TOL, assert_forward_matches_fixture, TARGETS_DIR, fixture_expected, fixture_input, fixture_manifest, upstream_checkpoint
from lic_checkpoints.convert import api
from lic_checkpoints.verify.models.compressai.compat import IncompatibleStateDictError
from lic_checkpoints.verify.models.compressai.dcae import DCAE
from lic_checkpoints.verify.models.compressai.installed import target_class
from lic_checkpoints.verify.models.compressai.saaf import SAAF

FAMILIES = ("dcae", "saaf")
TABLES = ("_quantized_cdf", "_offset", "_cdf_length")
#: How far our total string size may drift from upstream's: master writes one rANS stream per
#: slice where upstream writes one for all slices, a few bytes of flush overhead each.
BYTES_REL_TOL = 0.005


def target_manifest(name: str) -> dict[str, Any]:
    return json.loads((TARGETS_DIR / f"{name}.json").read_text())


def meta_state_dict(rows: list) -> dict[str, torch.Tensor]:
    """Shape-only tensors for a ``[key, shape, dtype, ...]`` listing (no memory, no values)."""
    return {key: torch.empty(shape, dtype=getattr(torch, dtype), device="meta") for key, shape, dtype, *_ in rows}


@dataclass
class Run:
    """One family's target models and every result the tests compare, computed once."""

    name: str
    cls: type
    recorded_kwargs: dict
    fresh_layout: list
    fresh_params: list
    fresh_buffers: list
    converted: dict
    model: DCAE  # constructor(recorded kwargs) + strict load: runs forward
    loaded: DCAE  # from_state_dict: runs update / compress / decompress
    load_result: Any = None
    forward: dict = field(default_factory=dict)
    encoded: dict = field(default_factory=dict)
    decoded: torch.Tensor | None = None


@pytest.fixture(scope="module", params=FAMILIES)
def run(request, tmp_path_factory) -> Run:
    torch.set_num_threads(2)  # the fixtures were generated with 2 threads
    name = request.param
    checkpoint = tmp_path_factory.mktemp(name) / "ckpt.pth.tar"
    torch.save(upstream_checkpoint(name), checkpoint)
    converted, result = api.convert_in_memory(checkpoint)
    checkpoint.unlink()
    kwargs = dict(result.config["target"]["kwargs"])
    cls = target_class(name)

    model = cls(**kwargs).eval()
    sd = model.state_dict()
    fresh_layout = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in sd.items()]
    fresh_params = [k for k, _ in model.named_parameters()]
    fresh_buffers = [k for k, _ in model.named_buffers()]
    del sd
    run = Run(name, cls, kwargs, fresh_layout, fresh_params, fresh_buffers, converted,
              model=model, loaded=cls.from_state_dict(converted).eval())
    run.load_result = model.load_state_dict(converted, strict=True)

    x = fixture_input(name)
    with torch.no_grad():
        run.forward = model(x, return_params=True)
        run.loaded.update(force=True)
        run.encoded = run.loaded.compress(x, return_symbols=True)
        run.decoded = run.loaded.decompress(run.encoded["strings"], run.encoded["shape"])["x_hat"]
    return run


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------- layout and loading


def test_fresh_state_dict_matches_target_layout(run: Run) -> None:
    target = target_manifest(run.name)
    assert run.fresh_layout == [row[:3] for row in target["state_dict"]]  # keys, shapes, dtypes, order
    kinds = {row[0]: row[3] for row in target["state_dict"]}
    assert sorted(run.fresh_params) == sorted(k for k, kind in kinds.items() if kind == "param")
    persistent = [k for k in run.fresh_buffers if k in kinds]
    assert sorted(persistent) == sorted(k for k, kind in kinds.items() if kind == "persistent-buffer")
    non_persistent = sorted(k for k in run.fresh_buffers if k not in kinds)
    assert non_persistent == sorted(row[0] for row in target["non_persistent_buffers"])


def test_converted_checkpoint_loads_strictly_with_recorded_kwargs(run: Run) -> None:
    assert not run.load_result.missing_keys and not run.load_result.unexpected_keys
    assert run.model.config() == target_manifest(run.name)["resolved_kwargs"]
    state = run.model.state_dict()
    assert list(state) == list(run.converted)
    for key, value in run.converted.items():
        assert torch.equal(state[key], value), key


def test_from_state_dict_builds_the_same_variant(run: Run) -> None:
    target = target_manifest(run.name)
    assert run.cls.infer_kwargs(run.converted) == target["from_state_dict_roundtrip"]["inferred_kwargs"]
    # Master infers max_support_slices=4 for the K=5 model; every slice still sees the same support.
    ours, ctor = run.loaded.config(), run.model.config()
    assert {k: v for k, v in ours.items() if k != "max_support_slices"} == {
        k: v for k, v in ctor.items() if k != "max_support_slices"
    }
    assert run.loaded.latent_codec.y.support_slices == run.model.latent_codec.y.support_slices


def test_wrong_family_is_refused_with_a_clear_message(run: Run) -> None:
    others = {"dcae": "DCAE", "saaf": "SAAF", "tcm_n64": "TCM", "tcm_auxt_n64": "TCM+AuxT"}
    for other, family in others.items():
        if other == run.name:
            continue
        foreign = meta_state_dict(target_manifest(other)["state_dict"])
        with pytest.raises(IncompatibleStateDictError, match=rf"holds {re.escape(family)}, not a CompressAI-layout"):
            run.cls.from_state_dict(foreign)
        with pytest.raises(IncompatibleStateDictError, match=rf"missing keys .*looks like {re.escape(family)}, not"):
            run.model.load_state_dict(foreign)
    manifest, _ = fixture_manifest(run.name)
    unconverted = meta_state_dict(manifest["state_dict"])
    with pytest.raises(IncompatibleStateDictError, match="upstream .*convert it first"):
        run.cls.from_state_dict(unconverted)


def test_wrong_variant_is_refused_with_a_clear_message(run: Run) -> None:
    variant = {k: v for k, v in run.converted.items() if ".y4." not in k}  # a 4-slice model ...
    variant["shared_dictionary.dt"] = torch.zeros(64, 640)  # ... with a smaller dictionary
    before = run.model.shared_dictionary.dt.detach().clone()
    with pytest.raises(IncompatibleStateDictError) as error:
        run.model.load_state_dict(variant)
    message = str(error.value)
    assert "\n" not in message
    assert "missing keys (latent_codec.y.channel_context.y4." in message
    assert "shared_dictionary.dt: state dict [64, 640] vs model [128, 640]" in message
    assert "looks like" not in message  # right family, wrong configuration
    assert torch.equal(run.model.shared_dictionary.dt, before)  # refused before anything was copied


# --------------------------------------------------------------------------- numbers vs upstream


def test_forward_matches_upstream(run: Run) -> None:
    expected = fixture_expected(run.name)
    out = run.forward
    diffs = assert_forward_matches_fixture(run.name, out)
    print(f"\n{run.name} forward max|ours - upstream|: {diffs}")
    if run.name == "saaf":
        assert torch.equal(out["diffusion_loss"], expected["diffusion_loss"])  # 0 in eval
    else:
        assert "diffusion_loss" not in out


def test_entropy_tables_equal_upstream_after_update(run: Run) -> None:
    expected = fixture_expected(run.name)
    codec = run.loaded.latent_codec
    bottleneck = codec.z.entropy_bottleneck
    for name in TABLES:
        assert torch.equal(getattr(bottleneck, name), expected[f"entropy_bottleneck.{name}"]), name
    for k in range(run.loaded.num_slices):
        gaussian = codec.y.latent_codec[f"y{k}"].gaussian_conditional
        for name in (*TABLES, "scale_table"):
            assert torch.equal(getattr(gaussian, name), expected[f"gaussian_conditional.{name}"]), (k, name)


def _flips(ours: torch.Tensor, reference: torch.Tensor, margin: torch.Tensor) -> str:
    """Where two integer maps differ, with the distance of each decision to its boundary."""
    where = (ours != reference).nonzero().tolist()[:10]
    return f"{int((ours != reference).sum())} flips; first (index, ours, upstream, margin): " + ", ".join(
        f"({tuple(i)}, {int(ours[tuple(i)])}, {int(reference[tuple(i)])}, {float(margin[tuple(i)]):.2e})"
        for i in where
    )


def test_coded_symbols_equal_upstream_decisions(run: Run) -> None:
    """Every coded y symbol, scale index and z symbol equals upstream's decision.

    Upstream's decisions come from the real upstream forward stored in the fixture (y, means,
    scales: ``round(y - means)`` and the scale-table lookup) and from upstream's own z string.
    """
    expected = fixture_expected(run.name)
    codec = run.loaded.latent_codec
    slices = run.loaded.num_slices
    offsets = expected["y"] - expected["means"]
    for k, (y_sym, idx, offset, scales) in enumerate(
        zip(run.encoded["symbols"]["y"], run.encoded["indexes"]["y"],
            offsets.chunk(slices, dim=1), expected["scales"].chunk(slices, dim=1))
    ):
        gaussian = codec.y.latent_codec[f"y{k}"].gaussian_conditional
        upstream_sym = torch.round(offset).int()
        margin = ((offset - offset.floor()) - 0.5).abs()
        assert torch.equal(y_sym, upstream_sym), f"slice {k} y: " + _flips(y_sym, upstream_sym, margin)
        upstream_idx = gaussian.build_indexes(scales)
        bounded = gaussian.lower_bound_scale(scales)
        table_margin = (bounded.unsqueeze(-1) - gaussian.scale_table).abs().min(dim=-1).values
        assert torch.equal(idx, upstream_idx), f"slice {k} scale index: " + _flips(idx, upstream_idx, table_margin)

    bottleneck = codec.z.entropy_bottleneck
    z_shape = tuple(expected["compress_shape"].tolist())
    upstream_z_hat = bottleneck.decompress([expected["strings_z_0"].numpy().tobytes()], z_shape)
    medians = bottleneck._get_medians().detach()
    upstream_z_sym = torch.round(upstream_z_hat - medians).int()
    assert torch.equal(run.encoded["symbols"]["z"], upstream_z_sym)
    assert run.encoded["strings"][-1][0] == expected["strings_z_0"].numpy().tobytes()


def test_string_sizes_close_to_upstream(run: Run) -> None:
    expected = fixture_expected(run.name)
    strings = run.encoded["strings"]
    assert len(strings) == run.loaded.num_slices + 1 and all(len(s) == 1 for s in strings)
    assert run.encoded["shape"] == {"y": (run.loaded.M, 16, 16), "z": tuple(expected["compress_shape"].tolist())}
    ours = sum(len(s[0]) for s in strings)
    upstream = int(expected["string_nbytes_y"][0]) + int(expected["string_nbytes_z"][0])
    print(f"\n{run.name} string bytes: ours {ours} (per slice {[len(s[0]) for s in strings]}), upstream {upstream}")
    assert abs(ours - upstream) <= BYTES_REL_TOL * upstream


def test_decompress_reproduces_upstream(run: Run) -> None:
    expected = fixture_expected(run.name)
    diff = _max_abs(run.decoded, expected["decoded_x_hat"])
    print(f"\n{run.name} decoded max|ours - upstream|: {diff}")
    assert torch.allclose(run.decoded, expected["decoded_x_hat"], **FORWARD_TOL), diff
    # Own round trip is exact (as upstream's): decoded == forward x_hat clamped to [0, 1].
    assert _max_abs(run.decoded, run.forward["x_hat"].clamp(0, 1)) == 0.0


# --------------------------------------------------------------------------- other configurations

SMALL = dict(N=64, M=96, hyper_channels=48, num_slices=3, max_support_slices=1, feature_dims=(32, 48, 64),
             block_num=(1, 1, 2), head_dim=(8, 16, 16, 32, 16, 8), dict_num=16, dict_head_num=4,
             window_size=4, hyper_window_size=2, hyper_head_dim=16)


@pytest.mark.parametrize("cls", [DCAE, SAAF], ids=["dcae", "saaf"])
def test_from_state_dict_infers_a_non_default_config(cls: type) -> None:
    with torch.device("meta"):
        model = cls(**SMALL)
    assert cls.infer_kwargs(model.state_dict()) == model.config()
    assert model.config()["dictionary_dim"] == 32 * SMALL["dict_head_num"]


def test_small_saaf_round_trip_is_exact() -> None:
    """A non-default SAAF (so also the DCAE skeleton and the shared codec) codes losslessly, with
    slices seeing only one earlier slice."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = SAAF(**SMALL).eval()
    assert model.latent_codec.y.support_slices == [(), (0,), (0,)]
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        out = model(x)
        model.update()
        encoded = model.compress(x)
        decoded = model.decompress(encoded["strings"], encoded["shape"])["x_hat"]
    assert out["likelihoods"]["y"].shape == (1, 96, 8, 8) and out["likelihoods"]["z"].shape == (1, 48, 2, 2)
    assert len(encoded["strings"]) == 4
    assert torch.equal(decoded, out["x_hat"].clamp(0, 1))
    assert out["diffusion_loss"].item() == 0.0  # eval
    with torch.no_grad():
        trained = model.train()(x)["diffusion_loss"]  # the denoising prior only runs in training
    assert trained.dim() == 0 and torch.isfinite(trained) and trained.item() > 0.0
