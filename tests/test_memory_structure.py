"""The structure behind lic-convert's memory numbers (see benchmarks/README.md), checked without timing.

- the source checkpoint is memory-mapped: its tensors live in a mapping of the checkpoint file;
- ``convert_in_memory`` returns renamed tensors that *are* the mapped source tensors (same storage),
  while transformed and fanned-out tensors own fresh storage;
- ``convert_checkpoint`` hands the writer every renamed (and fanned-out) tensor straight from the
  mapping, so the only bytes the conversion allocates are those of the computed steps (transforms and
  synthesized buffers).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from conftest import covering_configurations
from lic_checkpoints.convert import api, writer
from lic_checkpoints.convert.checkpoint import read_checkpoint
from lic_checkpoints.verify.builders import build_target, build_upstream, canonical_upstream_names

#: small configurations whose mappings together use every kind of step (synthesized buffers,
#: swapped channel blocks, permuted tables, dropped keys, fan-outs)
NAMES = covering_configurations()


def file_mappings(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process that map ``path`` (from /proc/self/maps)."""
    target = os.path.realpath(path)
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def inside(ptr: int, nbytes: int, ranges: list[tuple[int, int]]) -> bool:
    return any(start <= ptr and ptr + nbytes <= end for start, end in ranges)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@pytest.fixture(scope="module", params=NAMES)
def checkpoint(request, checkpoints) -> Path:
    return checkpoints.path(request.param)  # shared by the session: read it, never modify it


@pytest.fixture(scope="module")
def in_memory(checkpoint):
    tensors, result = api.convert_in_memory(checkpoint)
    return tensors, result


def test_source_tensors_are_memory_mapped(in_memory, checkpoint):
    _, result = in_memory
    ranges = file_mappings(checkpoint)
    assert ranges, "the checkpoint file is not mapped into this process"
    state = result.source.state_dict
    outside = [k for k, v in state.items() if v.numel() and not inside(v.data_ptr(), nbytes(v), ranges)]
    assert not outside, f"{len(outside)} source tensors are not in the file mapping, e.g. {outside[0]}"


def test_plan_has_every_kind_of_step(in_memory):
    _, result = in_memory
    actions = {s.action for s in result.plan.steps}
    assert "rename" in actions and "fan_out" in actions
    assert actions & {"transform", "synthesize"}, actions


def test_renamed_tensors_share_the_source_storage(in_memory):
    tensors, result = in_memory
    state = result.source.state_dict
    renames = [s for s in result.plan.steps if s.action == "rename"]
    for step in renames:
        got, src = tensors[step.target], state[step.sources[0]]
        assert got.untyped_storage().data_ptr() == src.untyped_storage().data_ptr(), step.target
        assert got.data_ptr() == src.data_ptr(), step.target


def test_verified_models_share_the_source_storage(in_memory, checkpoint):
    """The two models lic-verify builds hold the renamed tensors as the very pages of the mapped file."""
    tensors, result = in_memory
    detection, source = result.detection, result.source.state_dict
    variant = detection.variant
    upstream = build_upstream(detection.family, variant.upstream_kwargs, source).state_dict(keep_vars=True)
    target = build_target(detection.family, variant.target_kwargs, tensors).state_dict(keep_vars=True)
    names = dict(zip(source, canonical_upstream_names(source)))
    ranges = file_mappings(checkpoint)
    renames = [s for s in result.plan.steps if s.action == "rename" and source[s.sources[0]].numel()]
    assert renames
    for step in renames:
        original = source[step.sources[0]]
        assert target[step.target].data_ptr() == original.data_ptr(), step.target
        assert upstream[names[step.sources[0]]].data_ptr() == original.data_ptr(), step.sources[0]
        assert inside(original.data_ptr(), nbytes(original), ranges), step.sources[0]


def test_changed_tensors_own_their_storage(in_memory, checkpoint):
    tensors, result = in_memory
    ranges = file_mappings(checkpoint)
    source_storages = {v.untyped_storage().data_ptr() for v in result.source.state_dict.values()}
    others = [s for s in result.plan.steps if s.action != "rename"]
    seen: set[int] = set()
    for step in others:
        got = tensors[step.target]
        ptr = got.untyped_storage().data_ptr()
        if got.numel() == 0:
            continue
        assert ptr not in source_storages, f"{step.target} ({step.action}) aliases a source tensor"
        assert not inside(got.data_ptr(), nbytes(got), ranges), f"{step.target} ({step.action}) points into the file"
        assert ptr not in seen, f"{step.target} ({step.action}) shares storage with another target"
        seen.add(ptr)


def test_writer_streams_renamed_tensors_from_the_mapping(checkpoint, tmp_path, monkeypatch):
    source = read_checkpoint(checkpoint)
    ranges = file_mappings(checkpoint)
    written: list[torch.Tensor] = []
    original = writer._raw_bytes

    def recording(value: torch.Tensor):
        written.append(value)
        return original(value)

    monkeypatch.setattr(writer, "_raw_bytes", recording)
    result = api.convert_checkpoint(checkpoint, tmp_path / "out", source=source)

    steps = result.plan.steps
    assert len(written) == len(steps)
    allocated = 0
    for step, value in zip(steps, written):
        if value.numel() == 0:
            continue
        mapped = inside(value.data_ptr(), nbytes(value), ranges)
        if step.action in ("rename", "fan_out"):  # written straight from the file mapping, never copied
            assert value.data_ptr() == source.state_dict[step.sources[0]].data_ptr(), step.target
            assert mapped, step.target
        else:
            assert not mapped, f"{step.target} ({step.action}) was not computed"
            allocated += nbytes(value)
    computed = sum(nbytes(v) for s, v in zip(steps, written) if s.action not in ("rename", "fan_out"))
    renamed = sum(nbytes(v) for s, v in zip(steps, written) if s.action == "rename")
    assert allocated == computed
    assert renamed + allocated + 8 <= result.bytes_written
    assert renamed > 0.5 * result.bytes_written  # most of the output is never copied in memory
