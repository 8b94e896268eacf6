"""Parity of our upstream TCM / TCM+AuxT re-implementations with the golden fixtures.

The fixtures were produced by the authors' code (LIC_TCM, AuxT). Each model is built once per
fixture, loaded with the rebuilt upstream state dict and run once through forward, update,
compress and decompress on CPU with 2 threads (the generator's setting).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
from conftest import ENTROPY_TABLES, fixture_expected, fixture_input, fixture_manifest, upstream_checkpoint, upstream_state_dict

from lic_checkpoints.verify.models.upstream.base import UpstreamSliceModel
from lic_checkpoints.verify.models.upstream.tcm import TCM, TCMAuxT

BUILDERS: dict[str, Callable[..., UpstreamSliceModel]] = {
    "tcm_n64": TCM,
    "tcm_n128": TCM,
    "tcm_auxt_n64": TCMAuxT,
}

# fixtures/README.md section 6
FORWARD_ATOL = {"x_hat": 1e-4, "y": 1e-4, "means": 1e-4, "scales": 1e-4, "likelihoods_y": 1e-5, "likelihoods_z": 1e-5}
FORWARD_RTOL = 1e-4


@dataclass
class Run:
    """One fixture's model and everything it produced."""

    name: str
    model: UpstreamSliceModel
    fresh_state: dict[str, torch.Tensor]
    load_result: Any
    load_mismatches: list[str]
    legacy_load_result: Any
    legacy_load_mismatches: list[str]
    forward: dict[str, torch.Tensor] = field(default_factory=dict)
    tables: dict[str, torch.Tensor] = field(default_factory=dict)
    encoded: dict[str, Any] = field(default_factory=dict)
    decoded_upstream: torch.Tensor | None = None


def _build(name: str) -> UpstreamSliceModel:
    manifest, _ = fixture_manifest(name)
    return BUILDERS[name](**manifest["constructor_kwargs"])


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def run(request) -> Run:
    name = request.param
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = _build(name).eval()
        fresh = {k: v.detach().clone() for k, v in model.state_dict().items()}
        checkpoint = upstream_checkpoint(name, key_prefix="module.", legacy_entropy_bottleneck=True)
        legacy = {k.replace("module.", ""): v for k, v in checkpoint["state_dict"].items()}  # as upstream eval.py
        assert "entropy_bottleneck._matrix0" in legacy
        legacy_load_result = model.load_state_dict(legacy)
        legacy_mismatches = _mismatches(model, name)
        _scramble_parameters(model)
        load_result = model.load_state_dict(upstream_state_dict(name))
        result = Run(name, model, fresh, load_result, _mismatches(model, name), legacy_load_result, legacy_mismatches)
        x = fixture_input(name)
        expected = fixture_expected(name)
        with torch.no_grad():
            out = model(x)
            result.forward = {
                "x_hat": out["x_hat"],
                "likelihoods_y": out["likelihoods"]["y"],
                "likelihoods_z": out["likelihoods"]["z"],
                **out["para"],
            }
            model.update(force=True)
            result.tables = {k: model.state_dict()[k].clone() for k in ENTROPY_TABLES}
            result.encoded = model.compress(x)
            upstream_strings = [[_bytes(expected["strings_y_0"])], [_bytes(expected["strings_z_0"])]]
            shape = expected["compress_shape"].tolist()
            result.decoded_upstream = model.decompress(upstream_strings, shape)["x_hat"]
        yield result
    finally:
        torch.set_num_threads(threads)


def _mismatches(model: UpstreamSliceModel, name: str) -> list[str]:
    """Keys whose loaded tensor is not bitwise equal to the rebuilt upstream tensor."""
    loaded = model.state_dict()
    return [k for k, v in upstream_state_dict(name).items() if not torch.equal(loaded[k], v)]


def _scramble_parameters(model: UpstreamSliceModel) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))


def _bytes(t: torch.Tensor) -> bytes:
    return t.numpy().tobytes()


def test_state_dict_layout_matches_manifest(run: Run) -> None:
    manifest, _ = fixture_manifest(run.name)
    got = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in run.fresh_state.items()]
    assert got == [row[:3] for row in manifest["state_dict"]]

    params = dict(run.model.named_parameters())
    param_rows = [row for row in manifest["state_dict"] if row[3] == "param"]
    assert list(params) == [row[0] for row in param_rows]
    assert len(params) == manifest["num_params"]
    expected_numel = sum(torch.Size(row[1]).numel() for row in param_rows)
    assert sum(p.numel() for p in params.values()) == expected_numel
    buffers = {k for k, _ in run.model.named_buffers()}
    assert buffers == {row[0] for row in manifest["state_dict"] if row[3] == "buffer"}


def test_constant_buffers_equal_fixture_constants(run: Run) -> None:
    manifest, constants = fixture_manifest(run.name)
    assert set(constants) == set(manifest["constants_keys"])
    for key, value in constants.items():
        built = run.fresh_state[key]
        assert built.dtype == value.dtype, key
        assert torch.equal(built, value), key
    for key in manifest["zero_element_keys"]:
        assert run.fresh_state[key].numel() == 0, key


def test_upstream_state_dict_loads_strictly(run: Run) -> None:
    assert not run.load_result.missing_keys and not run.load_result.unexpected_keys
    assert run.load_mismatches == []


def test_missing_gaussian_tables_are_refused(run: Run) -> None:
    partial = upstream_state_dict(run.name)
    del partial["gaussian_conditional.scale_table"]
    with pytest.raises(KeyError, match="scale_table"):
        run.model.load_state_dict(partial)


def test_legacy_named_checkpoint_loads_like_upstream_eval(run: Run) -> None:
    # published TCM/AuxT files come from compressai <= 1.2.6 (``_matrix{i}`` names), maybe DataParallel-saved
    assert not run.legacy_load_result.missing_keys and not run.legacy_load_result.unexpected_keys
    assert run.legacy_load_mismatches == []


def test_forward_matches_upstream(run: Run) -> None:
    expected = fixture_expected(run.name)
    diffs = {k: (run.forward[k] - expected[k]).abs().max().item() for k in FORWARD_ATOL}
    print(f"\n{run.name} forward max|diff|: {diffs}")
    for key, atol in FORWARD_ATOL.items():
        assert run.forward[key].shape == expected[key].shape, key
        assert torch.allclose(run.forward[key], expected[key], rtol=FORWARD_RTOL, atol=atol), (key, diffs[key])


def test_entropy_tables_match_exactly(run: Run) -> None:
    expected = fixture_expected(run.name)
    for key in ENTROPY_TABLES:
        assert run.tables[key].dtype == expected[key].dtype, key
        assert torch.equal(run.tables[key], expected[key]), key


def test_compress_is_byte_identical(run: Run) -> None:
    expected = fixture_expected(run.name)
    y_strings, z_strings = run.encoded["strings"]
    assert len(y_strings) == 1 and len(z_strings) == 1
    assert len(y_strings[0]) == int(expected["string_nbytes_y"][0])
    assert len(z_strings[0]) == int(expected["string_nbytes_z"][0])
    assert y_strings[0] == _bytes(expected["strings_y_0"])
    assert z_strings[0] == _bytes(expected["strings_z_0"])
    assert list(run.encoded["shape"]) == expected["compress_shape"].tolist()


def test_decompress_of_upstream_strings(run: Run) -> None:
    expected = fixture_expected(run.name)
    decoded = run.decoded_upstream
    diff = (decoded - expected["decoded_x_hat"]).abs().max().item()
    print(f"\n{run.name} decoded max|diff|: {diff}")
    assert torch.allclose(decoded, expected["decoded_x_hat"], rtol=FORWARD_RTOL, atol=FORWARD_ATOL["x_hat"])
    # as upstream: the codec round trip equals the clamped forward reconstruction exactly
    assert torch.equal(decoded, run.forward["x_hat"].clamp(0, 1))


@pytest.mark.parametrize("size", [(128, 256), (256, 192), (320, 256)])
def test_unsupported_input_size_is_a_clear_error(run: Run, size: tuple[int, int]) -> None:
    x = torch.zeros(1, 3, *size)
    with pytest.raises(ValueError, match="multiples of 128"):
        run.model(x)
    with pytest.raises(ValueError, match="multiples of 128"):
        run.model.compress(x)


def test_haar_wavelet_pair_reconstructs() -> None:
    from lic_checkpoints.verify.models.blocks.wavelets import HaarDWT, HaarIDWT

    x = fixture_input("tcm_auxt_n64")[:, :, :64, :96]
    bands = HaarDWT()(x)
    assert bands.shape == (1, 12, 32, 48)
    # LL of a constant image is 2x the value (orthonormal Haar), the detail bands vanish
    flat = HaarDWT()(torch.ones(1, 1, 4, 4))
    assert torch.allclose(flat[:, 0], torch.full((1, 2, 2), 2.0), atol=1e-6)
    assert flat[:, 1:].abs().max() < 1e-6
    assert (HaarIDWT()(bands) - x).abs().max() < 1e-6
