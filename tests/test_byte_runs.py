"""Tensors whose ops only move bytes (block swaps, reshapes) are copied file to file in runs.

The runs an op reports must lay out exactly the bytes its numpy evaluation produces, the writer must
copy them in order however they are grouped, and a real conversion must write the same file either way.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

from conftest import CONFIGURATIONS, checkpoint_bytes, step_kinds
from lic_checkpoints.convert import api, engine, writer
from lic_checkpoints.convert.ops import Permute, Reshape, Spec, SwapBlocks


def _step(*ops) -> engine.Step:
    return engine.Step(target="t", rules=(), sources=("s",), transforms=((tuple(ops), {}),))


def _gather(data: bytes, runs) -> bytes:
    return b"".join(data[offset:offset + length] for offset, length in runs)


@st.composite
def swaps(draw):
    shape = draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    dim = draw(st.integers(0, len(shape) - 1))
    shape[dim] = draw(st.integers(2, 7))
    a = draw(st.integers(1, shape[dim] - 1))
    b = draw(st.integers(1, shape[dim] - a))
    dtype = draw(st.sampled_from(["float32", "float16", "float64", "int64"]))
    return tuple(shape), dim, (a, b), dtype


@settings(max_examples=200, derandomize=True, deadline=None)
@given(swaps(), st.booleans())
def test_runs_lay_out_the_bytes_the_ops_compute(case, then_flatten):
    shape, dim, sizes, dtype = case
    value = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
    ops = [SwapBlocks(dim, sizes)]
    if then_flatten:  # a reshape after the swap keeps the swapped bytes in order
        ops.append(Reshape(tuple(f"d{i}" for i in range(len(shape))), ("d0", int(np.prod(shape[1:])))))
    expected = value
    for op in ops:
        expected = op.apply(expected, {})
    runs = engine.byte_runs(_step(*ops), Spec(shape, dtype))
    assert runs is not None
    assert _gather(value.tobytes(), runs) == np.ascontiguousarray(expected).tobytes()
    assert all(length > 0 for _, length in runs)
    assert all(a + n != b for (a, n), (b, _) in zip(runs, runs[1:])), "adjacent runs are merged"


def test_a_reshape_before_the_swap_is_followed_too():
    value = np.arange(2 * 3 * 4, dtype="float32").reshape(2, 12)
    ops = [Reshape(("a", "b"), ("a", 3, 4)), SwapBlocks(1, (1, 2))]
    expected = value
    for op in ops:
        expected = op.apply(expected, {})
    runs = engine.byte_runs(_step(*ops), Spec(value.shape, "float32"))
    assert _gather(value.tobytes(), runs) == np.ascontiguousarray(expected).tobytes()


def test_a_swap_of_many_small_blocks_is_computed_not_copied_run_by_run():
    from lic_checkpoints.convert.ops import MAX_RUNS

    assert engine.byte_runs(_step(SwapBlocks(1, (1, 1))), Spec((MAX_RUNS // 3 + 1, 2), "float32")) is None
    assert engine.byte_runs(_step(SwapBlocks(1, (1, 1))), Spec((MAX_RUNS // 3, 2), "float32")) is not None


def test_an_op_that_computes_has_no_runs():
    assert engine.byte_runs(_step(SwapBlocks(0, (1, 1)), Permute((1, 0))), Spec((2, 3), "float32")) is None


@pytest.mark.parametrize("seed", range(3))
def test_the_writer_copies_runs_in_order_however_they_are_grouped(tmp_path, seed, monkeypatch):
    """Runs out of order, far apart, longer than the copy buffer, and more than one writev holds."""
    monkeypatch.setattr(writer, "_BUFFER_BYTES", 1 << 16)  # small, so every grouping case occurs
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 255, 1 << 20, dtype=np.uint8).tobytes()
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    runs = []
    for _ in range(3000):
        length = int(rng.choice([1, 7, 300, 5000, 70000]))
        offset = int(rng.integers(0, len(data) - length))
        runs.append((offset, length))
    expected = _gather(data, runs)
    fd = os.open(source, os.O_RDONLY)
    try:
        value = writer.FileRuns(fd, tuple(runs))
        written = writer.write_safetensors(tmp_path / "m.safetensors", [("t", (len(expected),), "uint8")],
                                           lambda key: value, {"format": "pt"})
    finally:
        os.close(fd)
    assert load_file(str(tmp_path / "m.safetensors"))["t"].tobytes() == expected
    assert written.tensor_data_sha256 == hashlib.sha256(expected).hexdigest()


def _with_swaps() -> str:
    chosen = [c.name for c in CONFIGURATIONS if "swap_blocks" in step_kinds(c)]
    if not chosen:
        pytest.skip("no shipped mapping swaps blocks")
    return min(chosen, key=checkpoint_bytes)


def test_a_conversion_copies_swapped_tensors_and_writes_what_memory_computes(checkpoints, converted, tmp_path, monkeypatch):
    name = _with_swaps()
    copied_in_runs = []
    real = writer._Output.copy_runs

    def recording(self, source):
        copied_in_runs.append(source)
        return real(self, source)

    monkeypatch.setattr(writer._Output, "copy_runs", recording)
    result = api.convert_checkpoint(checkpoints.path(name), tmp_path / "out")
    swapped = [s for s in result.plan.steps if any(op.name == "swap_blocks" for ops, _ in s.transforms for op in ops)]
    assert swapped and len(copied_in_runs) == len(swapped)
    got = load_file(str(tmp_path / "out" / api.MODEL_FILE))
    in_memory, _ = converted(name)
    for step in swapped:
        assert got[step.target].tobytes() == in_memory[step.target].numpy().tobytes(), step.target
