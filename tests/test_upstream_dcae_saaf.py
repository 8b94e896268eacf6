"""Our DCAE / SAAF re-implementations against the golden fixtures made with the upstream code."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from compressai.models.base import get_scale_table

from conftest import FORWARD_TOL, assert_forward_matches_fixture, ENTROPY_TABLES, fixture_expected, fixture_input, fixture_manifest, upstream_state_dict
from lic_checkpoints.verify.models.upstream.dcae import DCAE
from lic_checkpoints.verify.models.upstream.saaf import SAAF

MODELS = {"dcae": DCAE, "saaf": SAAF}


@dataclass
class Run:
    """One model built from a fixture, with everything the tests compare, computed once."""

    name: str
    model: torch.nn.Module
    fresh_layout: list = field(default_factory=list)
    fresh_tensors: dict = field(default_factory=dict)
    load_result: object = None
    forward: dict = field(default_factory=dict)
    encoded: dict = field(default_factory=dict)
    decoded_upstream: torch.Tensor | None = None


@pytest.fixture(scope="module", params=sorted(MODELS))
def run(request) -> Run:
    torch.set_num_threads(2)  # the fixtures were generated with 2 threads
    name = request.param
    model = MODELS[name]().eval()
    result = Run(name, model)
    sd = model.state_dict()
    result.fresh_layout = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in sd.items()]
    manifest, _ = fixture_manifest(name)
    constant_keys = set(manifest["constants_keys"]) | set(manifest["zero_element_keys"])
    result.fresh_tensors = {k: v.clone() for k, v in sd.items() if k in constant_keys}

    result.load_result = model.load_state_dict(upstream_state_dict(name), strict=True)
    x = fixture_input(name)
    with torch.no_grad():
        result.forward = model(x)
        model.update(force=True)
        result.encoded = model.compress(x)
        expected = fixture_expected(name)
        upstream_strings = [[expected["strings_y_0"].numpy().tobytes()], [expected["strings_z_0"].numpy().tobytes()]]
        shape = tuple(expected["compress_shape"].tolist())
        result.decoded_upstream = model.decompress(upstream_strings, shape)["x_hat"]
    return result


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_state_dict_layout_matches_manifest(run: Run) -> None:
    manifest, _ = fixture_manifest(run.name)
    expected_layout = [row[:3] for row in manifest["state_dict"]]
    assert run.fresh_layout == expected_layout  # same keys, shapes, dtypes, same order

    params = dict(run.model.named_parameters())
    buffers = dict(run.model.named_buffers())
    param_rows = [row for row in manifest["state_dict"] if row[3] == "param"]
    assert sorted(params) == sorted(row[0] for row in param_rows)
    assert len(params) == manifest["num_params"]
    assert len(buffers) == manifest["num_buffers"]
    manifest_numel = sum(torch.Size(row[1]).numel() for row in param_rows)
    assert sum(p.numel() for p in params.values()) == manifest_numel


def test_fresh_constants_equal_fixture_constants(run: Run) -> None:
    manifest, constants = fixture_manifest(run.name)
    assert sorted(constants) == sorted(manifest["constants_keys"])
    for key, value in constants.items():
        ours = run.fresh_tensors[key]
        assert ours.dtype == value.dtype and ours.shape == value.shape, key
        assert torch.equal(ours, value), key
    for key in manifest["zero_element_keys"]:
        assert run.fresh_tensors[key].numel() == 0, key


def test_upstream_state_dict_loads_strictly(run: Run) -> None:
    assert not run.load_result.missing_keys and not run.load_result.unexpected_keys
    reference = upstream_state_dict(run.name)
    loaded = run.model.state_dict()
    for key, value in reference.items():
        if value.numel():  # entropy tables were refilled by update()
            assert torch.equal(loaded[key], value), key


def test_forward_matches_upstream(run: Run) -> None:
    expected = fixture_expected(run.name)
    out = run.forward
    diffs = assert_forward_matches_fixture(run.name, out)
    print(f"{run.name} forward max|diff|: {diffs}")
    if run.name == "saaf":
        loss = out["diffusion_loss"]
        assert loss.dim() == 0 and torch.equal(loss, expected["diffusion_loss"])


def test_discrete_decisions_match_upstream(run: Run) -> None:
    """Rounding of y around its means and the scale-table index of every element, as upstream."""
    expected = fixture_expected(run.name)
    para = run.forward["para"]
    ours_symbols = torch.round(para["y"] - para["means"])
    upstream_symbols = torch.round(expected["y"] - expected["means"])
    gc = run.model.gaussian_conditional
    ours_index = gc.build_indexes(para["scales"])
    upstream_index = gc.build_indexes(expected["scales"])
    assert torch.equal(ours_symbols, upstream_symbols), int((ours_symbols != upstream_symbols).sum())
    assert torch.equal(ours_index, upstream_index), int((ours_index != upstream_index).sum())


def test_entropy_tables_match_after_update(run: Run) -> None:
    expected = fixture_expected(run.name)
    state = run.model.state_dict()
    for key in ENTROPY_TABLES:
        assert state[key].dtype == expected[key].dtype, key
        assert torch.equal(state[key], expected[key]), key
    assert torch.equal(state["gaussian_conditional.scale_table"], get_scale_table())


def test_compress_bytes_match_upstream(run: Run) -> None:
    expected = fixture_expected(run.name)
    y_strings, z_strings = run.encoded["strings"]
    assert len(y_strings) == 1 and len(z_strings) == 1  # one y stream for the whole batch
    assert len(y_strings[0]) == int(expected["string_nbytes_y"][0])
    assert len(z_strings[0]) == int(expected["string_nbytes_z"][0])
    assert y_strings[0] == expected["strings_y_0"].numpy().tobytes()
    assert z_strings[0] == expected["strings_z_0"].numpy().tobytes()
    assert list(run.encoded["shape"]) == expected["compress_shape"].tolist()


def test_decompress_reproduces_upstream(run: Run) -> None:
    expected = fixture_expected(run.name)
    decoded = run.decoded_upstream
    assert torch.allclose(decoded, expected["decoded_x_hat"], **FORWARD_TOL), _max_abs(decoded, expected["decoded_x_hat"])
    # Own round trip is exact, as upstream: decoded == forward x_hat clamped.
    assert _max_abs(decoded, run.forward["x_hat"].clamp(0, 1)) == 0.0
    print(f"{run.name} decoded max|diff| vs upstream: {_max_abs(decoded, expected['decoded_x_hat'])}")


@pytest.mark.parametrize("size", [(128, 256), (256, 320), (192, 192)])
def test_unsupported_input_sizes_raise_value_error(run: Run, size: tuple[int, int]) -> None:
    x = torch.zeros(1, 3, *size)
    with pytest.raises(ValueError, match="multiples of 128"):
        run.model(x)
    with pytest.raises(ValueError, match="multiples of 128"):
        run.model.compress(x)
