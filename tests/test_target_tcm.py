"""Our CompressAI-layout ``TCM`` (plain and AuxT) against master's layout and the authors' numbers.

Per fixture, once: rebuild the upstream checkpoint, convert it, load it into ``TCM`` built with
the recorded kwargs (and through ``TCM.from_state_dict``), then run forward, ``update``,
``compress`` and ``decompress`` on CPU with 2 threads. The expected values come from the
fixtures (the authors' code) and from our upstream reference models, never from this model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from conftest import (
    TARGETS_DIR,
    fixture_expected,
    fixture_input,
    fixture_manifest,
    upstream_checkpoint,
    upstream_state_dict,
)
from safetensors.torch import load_file

from lic_checkpoints.convert import api
from lic_checkpoints.verify.models.blocks.wavelets import HaarDWT, HaarIDWT
from lic_checkpoints.verify.models.compressai.compat import IncompatibleStateDictError
from lic_checkpoints.verify.models.compressai.installed import target_class
from lic_checkpoints.verify.models.compressai.tcm import TCM
from lic_checkpoints.verify.models.compressai.tcm_blocks import WLS, iWLS
from lic_checkpoints.verify.models.upstream import tcm as upstream_tcm

NAMES = ("tcm_n64", "tcm_n128", "tcm_auxt_n64")
UPSTREAM_CLASSES = {"tcm_n64": upstream_tcm.TCM, "tcm_n128": upstream_tcm.TCM, "tcm_auxt_n64": upstream_tcm.TCMAuxT}
ALL_TARGETS = ("tcm_n64", "tcm_n128", "tcm_auxt_n64", "dcae", "saaf")

# fixtures/README.md section 6
RTOL = 1e-4
ATOL = {"x_hat": 1e-4, "y": 1e-4, "means": 1e-4, "scales": 1e-4, "likelihoods_y": 1e-5, "likelihoods_z": 1e-5}
GAUSSIAN_TABLES = ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")
BOTTLENECK_TABLES = ("_quantized_cdf", "_offset", "_cdf_length")
#: master's per-slice streams cost a few bytes each; fixtures/README.md section 6 allows 0.5 %.
MAX_RELATIVE_BYTES = 0.005


@dataclass
class Run:
    """One fixture: the converted model and everything computed with it (and with upstream)."""

    name: str
    kwargs: dict[str, Any]
    fresh_layout: list[list[Any]]
    fresh_buffers: dict[str, torch.Tensor]
    model: TCM
    load_result: Any
    not_loaded_bitwise: list[str]
    inferred_kwargs: dict[str, Any]
    inferred_config: dict[str, Any]
    inferred_not_equal: list[str]
    derived_keys_dropped: int
    forward: dict[str, torch.Tensor] = field(default_factory=dict)
    tables: dict[str, torch.Tensor] = field(default_factory=dict)
    encoded: dict[str, Any] = field(default_factory=dict)
    decoded: torch.Tensor | None = None
    upstream_symbols: dict[str, Any] = field(default_factory=dict)


def _target(name: str) -> dict[str, Any]:
    return json.loads((TARGETS_DIR / f"{name}.json").read_text())


def _meta_state_dict(rows: list[list[Any]]) -> dict[str, torch.Tensor]:
    """Storage-free tensors with the keys and shapes of a manifest (for refusal tests)."""
    return {k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta") for k, shape, dtype, *_ in rows}


def _upstream_symbols(name: str, x: torch.Tensor) -> dict[str, Any]:
    """Coded integers as our upstream reference model determines them (y, z, scale indexes)."""
    manifest, _ = fixture_manifest(name)
    net = UPSTREAM_CLASSES[name](**manifest["constructor_kwargs"]).eval()
    net.load_state_dict(upstream_state_dict(name))
    net.update(force=True)
    with torch.no_grad():
        para = net(x)["para"]
        z = net.hyper_analysis(para["y"])
    eb, gc = net.entropy_bottleneck, net.gaussian_conditional
    medians = eb._get_medians()
    k = net.num_slices
    slices = {key: para[key].chunk(k, dim=1) for key in ("y", "means", "scales")}
    return {
        "y": [torch.round(y - m).to(torch.int32) for y, m in zip(slices["y"], slices["means"])],
        "y_offsets": [y - m for y, m in zip(slices["y"], slices["means"])],
        "indexes": [gc.build_indexes(s) for s in slices["scales"]],
        "scales": list(slices["scales"]),
        "scale_table": gc.scale_table.clone(),
        "z": torch.round(z - medians).to(torch.int32),
        "z_offsets": z - medians,
    }


@pytest.fixture(scope="module", params=NAMES)
def run(request, tmp_path_factory) -> Run:
    name = request.param
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        path = tmp_path_factory.mktemp(name) / "ckpt.pth.tar"
        torch.save(upstream_checkpoint(name), path)
        state, result = api.convert_in_memory(path)
        kwargs = result.config["target"]["kwargs"]

        model = TCM(**kwargs).eval()
        fresh = model.state_dict()
        layout = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in fresh.items()]
        params = {k for k, _ in model.named_parameters()}
        buffers = {k: v.clone() for k, v in fresh.items() if k not in params}
        load_result = model.load_state_dict(state, strict=True)
        loaded = model.state_dict()
        not_bitwise = [k for k, v in state.items() if not torch.equal(loaded[k], v)]

        # master's loader tolerates absent derived constants: drop them, the constructor rebuilds them
        derived = [k for k in state if TCM.derived_constant(k)]
        inferred = TCM.from_state_dict({k: v for k, v in state.items() if k not in derived})
        inferred_state = inferred.state_dict()
        inferred_not_equal = [k for k, v in loaded.items() if not torch.equal(inferred_state[k], v)]
        outcome = Run(name, kwargs, layout, buffers, model, load_result, not_bitwise, TCM.infer_kwargs(state),
                      inferred.config_kwargs(), inferred_not_equal, len(derived))
        del inferred, inferred_state, state

        x = fixture_input(name)
        with torch.no_grad():
            out = model(x, return_params=True)
            outcome.forward = {
                "x_hat": out["x_hat"],
                "likelihoods_y": out["likelihoods"]["y"],
                "likelihoods_z": out["likelihoods"]["z"],
                **out["para"],
            }
            model.update(force=True)
            outcome.tables = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(GAUSSIAN_TABLES)}
            outcome.encoded = model.compress(x, return_symbols=True)
            outcome.decoded = model.decompress(outcome.encoded["strings"], outcome.encoded["shape"])["x_hat"]
        outcome.upstream_symbols = _upstream_symbols(name, x)
        yield outcome
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- layout and loading


def test_fresh_state_dict_is_masters_layout(run: Run) -> None:
    target = _target(run.name)
    assert run.fresh_layout == [row[:3] for row in target["state_dict"]]
    buffer_keys = [row[0] for row in target["state_dict"] if row[3] == "persistent-buffer"]
    assert sorted(run.fresh_buffers) == sorted(buffer_keys)
    if run.model.use_auxt:
        merges = {"g_a": list(run.model.g_a.merge_positions), "g_s": list(run.model.g_s.merge_positions)}
        assert merges == target["auxt_merge_positions"]


def test_fresh_constant_buffers_equal_masters(run: Run) -> None:
    constants = load_file(str(TARGETS_DIR / f"{run.name}.constants.safetensors"))
    assert constants, "no constants recorded"
    for key, value in constants.items():
        assert run.fresh_buffers[key].dtype == value.dtype, key
        assert torch.equal(run.fresh_buffers[key], value), key


def test_target_class_is_this_one() -> None:
    assert target_class("tcm") is TCM and target_class("tcm_auxt") is TCM


def test_converted_checkpoint_loads_strictly_and_bitwise(run: Run) -> None:
    assert not run.load_result.missing_keys and not run.load_result.unexpected_keys
    assert run.not_loaded_bitwise == []


def test_from_state_dict_infers_the_variant(run: Run) -> None:
    assert run.inferred_kwargs == _target(run.name)["from_state_dict_roundtrip"]["inferred_kwargs"]
    # max_support_slices 4 and 5 build the same model for K=5 (every slice sees at most 4)
    assert run.inferred_config == {**run.model.config_kwargs(), "max_support_slices": 4}
    assert run.derived_keys_dropped > 0
    assert run.kwargs.items() <= run.model.config_kwargs().items()
    assert run.inferred_not_equal == []


# ----------------------------------------------------------------------------- numerics


def test_forward_matches_upstream(run: Run) -> None:
    expected = fixture_expected(run.name)
    diffs = {k: (run.forward[k] - expected[k]).abs().max().item() for k in ATOL}
    print(f"\n{run.name} forward max|diff| vs upstream: {diffs}")
    for key, atol in ATOL.items():
        assert run.forward[key].shape == expected[key].shape, key
        assert torch.allclose(run.forward[key], expected[key], rtol=RTOL, atol=atol), (key, diffs[key])


def test_entropy_tables_equal_upstream(run: Run) -> None:
    expected = fixture_expected(run.name)
    for k in range(run.model.num_slices):
        for table in GAUSSIAN_TABLES:
            got = run.tables[f"latent_codec.y.latent_codec.y{k}.gaussian_conditional.{table}"]
            assert torch.equal(got, expected[f"gaussian_conditional.{table}"]), (k, table)
    for table in BOTTLENECK_TABLES:
        got = run.tables[f"latent_codec.z.entropy_bottleneck.{table}"]
        assert torch.equal(got, expected[f"entropy_bottleneck.{table}"]), table


def _flips(ours: torch.Tensor, theirs: torch.Tensor, margin: torch.Tensor, what: str) -> str:
    """Describe the positions where two integer tensors differ, with the upstream margin there."""
    where = (ours != theirs).nonzero().tolist()
    shown = [f"{tuple(i)}: ours {ours[tuple(i)].item()} upstream {theirs[tuple(i)].item()} "
             f"margin {margin[tuple(i)].item():.2e}" for i in where[:5]]
    return f"{what}: {len(where)} flipped ({'; '.join(shown)})"


def test_coded_symbols_equal_upstream(run: Run) -> None:
    up = run.upstream_symbols
    problems = []
    for k, (ours, theirs) in enumerate(zip(run.encoded["symbols"]["y"], up["y"])):
        if not torch.equal(ours.to(torch.int32), theirs):
            margin = 0.5 - (up["y_offsets"][k] - up["y_offsets"][k].round()).abs()
            problems.append(_flips(ours.to(torch.int32), theirs, margin, f"y slice {k}"))
    for k, (ours, theirs) in enumerate(zip(run.encoded["indexes"]["y"], up["indexes"])):
        if not torch.equal(ours, theirs):
            distance = (up["scales"][k].unsqueeze(-1) - up["scale_table"]).abs().amin(-1)
            problems.append(_flips(ours, theirs, distance, f"scale indexes slice {k}"))
    z_ours = run.encoded["symbols"]["z"].to(torch.int32)
    if not torch.equal(z_ours, up["z"]):
        margin = 0.5 - (up["z_offsets"] - up["z_offsets"].round()).abs()
        problems.append(_flips(z_ours, up["z"], margin, "z"))
    assert not problems, "; ".join(problems)


def test_strings_and_round_trip(run: Run) -> None:
    expected = fixture_expected(run.name)
    strings = run.encoded["strings"]
    assert len(strings) == run.model.num_slices + 1 and all(len(s) == 1 for s in strings)
    ours = sum(len(s[0]) for s in strings)
    upstream = int(expected["string_nbytes_y"][0]) + int(expected["string_nbytes_z"][0])
    print(f"\n{run.name} bytes: ours {ours} (per-slice streams) vs upstream {upstream} (one y stream): "
          f"{ours - upstream:+d}")
    assert abs(ours - upstream) <= MAX_RELATIVE_BYTES * upstream
    # same z symbols and tables -> the z stream is the authors' byte for byte
    assert strings[-1][0] == expected["strings_z_0"].numpy().tobytes()
    assert run.encoded["shape"] == {"y": tuple(expected["y"].shape[1:]), "z": tuple(expected["compress_shape"].tolist())}

    diff = (run.decoded - expected["decoded_x_hat"]).abs().max().item()
    print(f"{run.name} decoded max|diff| vs upstream: {diff}")
    assert torch.allclose(run.decoded, expected["decoded_x_hat"], rtol=RTOL, atol=ATOL["x_hat"])
    assert torch.equal(run.decoded, run.forward["x_hat"].clamp(0, 1))


# ----------------------------------------------------------------------------- refusals


def test_other_layouts_are_refused_with_a_clear_message(run: Run) -> None:
    for other in ALL_TARGETS:
        if other == run.name:
            continue
        foreign = _meta_state_dict(_target(other)["state_dict"])
        with pytest.raises(IncompatibleStateDictError) as error:
            run.model.load_state_dict(foreign)
        message = str(error.value)
        assert message.startswith("TCM(") and "\n" not in message, other
        assert any(p in message for p in ("missing keys", "unexpected keys", "shape mismatches")), other
        if not other.startswith("tcm"):
            assert f"it looks like {other.upper()}, not TCM" in message, other
            with pytest.raises(IncompatibleStateDictError, match=f"holds {other.upper()}, not a CompressAI-layout TCM"):
                TCM.from_state_dict(foreign)


#: per fixture: (layout of another variant, what the one-line message must say about it)
WRONG_VARIANTS = {
    "tcm_n64": [
        ("tcm_n128", r"shape mismatches \(g_a\.0\.conv1\.weight: state dict \[256, 3, 3, 3\] vs model \[128, 3, 3, 3\]"),
        ("tcm_auxt_n64", r"unexpected keys \(g_a\.transform\..*it looks like TCM\+AuxT, not TCM$"),
    ],
    "tcm_n128": [
        ("tcm_n64", r"shape mismatches \(g_a\.0\.conv1\.weight: state dict \[128, 3, 3, 3\] vs model \[256, 3, 3, 3\]"),
    ],
    "tcm_auxt_n64": [
        ("tcm_n64", r"missing keys \(g_a\.transform\..*it looks like TCM, not TCM\+AuxT$"),
    ],
}


def test_wrong_variant_names_the_difference(run: Run) -> None:
    for other, message in WRONG_VARIANTS[run.name]:
        with pytest.raises(IncompatibleStateDictError, match=message):
            run.model.load_state_dict(_meta_state_dict(_target(other)["state_dict"]))


def test_unconverted_upstream_checkpoint_is_refused(run: Run) -> None:
    manifest, _ = fixture_manifest(run.name)
    upstream = _meta_state_dict(manifest["state_dict"])
    with pytest.raises(IncompatibleStateDictError, match="upstream .*convert it first with lic-convert"):
        TCM.from_state_dict(upstream)


def test_unsupported_input_size_is_a_clear_error(run: Run) -> None:
    with pytest.raises(ValueError, match="multiples of 128"):
        run.model(torch.zeros(1, 3, 128, 256))
    with pytest.raises(ValueError, match="multiples of 128"):
        run.model.compress(torch.zeros(1, 3, 256, 320))


# ----------------------------------------------------------------------------- AuxT wavelets


def test_separable_haar_equals_upstream_2d_kernels_up_to_rounding() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, 24)
    ours, theirs = WLS(5, 4).dwt(x), HaarDWT()(x)
    dwt_diff = (ours - theirs).abs().max().item()
    inv_ours, inv_theirs = iWLS(4, 5).idwt(theirs), HaarIDWT()(theirs)
    idwt_diff = (inv_ours - inv_theirs).abs().max().item()
    print(f"\nseparable vs 2-D Haar max|diff|: DWT {dwt_diff:.2e}, IDWT {idwt_diff:.2e} (inputs ~N(0,1))")
    # a few float32 ulps of values of order 1; not bit-exact (1-D taps 0.70710677 vs 2-D taps 0.49999997)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-6)
    assert torch.allclose(inv_ours, inv_theirs, rtol=0, atol=1e-6)
    assert torch.allclose(iWLS(4, 5).idwt(ours), x, rtol=0, atol=1e-6)
