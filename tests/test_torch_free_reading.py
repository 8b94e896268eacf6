"""lic-convert's lazy, torch-free reading (convert/torch_zip.py, ``read_checkpoint(lazy=True)``).

- the data-only pickle reader finds exactly the tensors ``torch.load`` finds: same keys, shapes, dtypes
  and bytes (read at the offsets it reports), for plain, shared, strided, half and bfloat16 tensors;
- it declines (returns None) whatever it does not interpret, and the file then goes to
  ``torch.load(weights_only=True)``, which still refuses hostile pickles with the usual message;
- a conversion copies renamed tensors file to file and reads only what a rule computes, and its
  output is byte-identical to the conversion of an eagerly read (torch) source;
- ``lic-convert`` on an ordinary checkpoint never imports torch.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from collections import Counter, OrderedDict
from pathlib import Path

import pytest
import torch

from conftest import SMALL, covering_configurations, upstream_checkpoint
from lic_checkpoints.convert import api, engine, torch_zip, writer
from lic_checkpoints.convert.checkpoint import SourceCheckpoint, read_checkpoint
from lic_checkpoints.convert.errors import CheckpointError
from lic_checkpoints.convert.ops import Spec


def _bytes_at(path: Path, offset: int, nbytes: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(nbytes)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _assert_reads_like_torch(path: Path) -> None:
    expected = torch.load(path, map_location="cpu", weights_only=True)
    expected = expected.get("state_dict", expected)
    source = read_checkpoint(path, lazy=True)
    with source:
        assert list(source.state_dict) == list(expected)
        for key, value in expected.items():
            spec, where = source.state_dict[key], source.locations[key]
            assert spec.shape == tuple(value.shape) and spec.dtype == str(value.dtype).removeprefix("torch."), key
            got = source.read_tensor(key)
            assert got.shape == tuple(value.shape), key
            assert got.tobytes() == _tensor_bytes(value), key
            if where.contiguous:
                assert _bytes_at(path, where.offset, where.nbytes) == _tensor_bytes(value), key


def test_reader_matches_torch_on_a_real_layout(checkpoints):
    path = checkpoints.path(SMALL)
    assert torch_zip.read_structure(path) is not None, "an ordinary checkpoint must not need torch"
    _assert_reads_like_torch(path)


def test_reader_matches_torch_on_unusual_tensors(tmp_path):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    module = torch.nn.Linear(3, 2)
    state = OrderedDict(
        plain=torch.randn(4, 5),
        view_with_offset=base[2:4],  # shares base's storage, starts 20 elements in
        base=base,
        transposed=base.t(),  # strided: not contiguous
        half=torch.randn(7, dtype=torch.float16),
        brain=torch.randn(3, 3).to(torch.bfloat16),
        ints=torch.arange(5, dtype=torch.int64),
        flags=torch.tensor([True, False, True]),
        scalar=torch.tensor(2.5),
        empty=torch.zeros(0, 3),
        parameter=module.weight,  # a Parameter, pickled through _rebuild_parameter
    )
    container = {"state_dict": state, "epoch": 3, "loss": torch.tensor(0.1), "optimizer": {"state": {0: {"step": 1}},
                 "param_groups": [{"lr": 1e-4, "params": [0, 1], "betas": (0.9, 0.999), "amsgrad": False}]},
                 "name": "run", "notes": None}
    path = tmp_path / "odd.pth.tar"
    torch.save(container, path)
    structure = torch_zip.read_structure(path)
    assert structure is not None
    obj, _ = structure
    assert obj["epoch"] == 3 and obj["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert obj["state_dict"]["view_with_offset"].storage == obj["state_dict"]["base"].storage
    _assert_reads_like_torch(path)


class Shell:
    def __reduce__(self):
        return (os.system, ("echo owned",))


def _zip_with_pickle(tmp_path: Path, payload: object) -> Path:
    """A torch-style zip whose data.pkl pickles ``payload`` (plain pickle, any globals)."""
    good = tmp_path / "good.pth.tar"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, good)
    bad = tmp_path / "bad.pth.tar"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data.pkl"):
                data = pickle.dumps(payload, protocol=2)
            dst.writestr(info, data)
    return bad


def test_reader_declines_globals_it_does_not_know_and_torch_refuses_them(tmp_path):
    bad = _zip_with_pickle(tmp_path, {"state_dict": {"w": Shell()}})
    assert torch_zip.read_structure(bad) is None
    with pytest.raises(CheckpointError, match="refused to unpickle.*posix.system|refused to unpickle.*os.system"):
        read_checkpoint(bad, lazy=True)


@pytest.mark.parametrize("payload", [
    {"state_dict": OrderedDict(), "counts": Counter(a=1)},  # a global torch allows but this reader does not know
    {"state_dict": OrderedDict(), "tags": {1, 2}},  # a set (builtins.set at protocol 2)
    {"state_dict": OrderedDict(), "day": datetime.date(2026, 1, 1)},
])
def test_reader_declines_what_it_does_not_interpret(tmp_path, payload):
    assert torch_zip.read_structure(_zip_with_pickle(tmp_path, payload)) is None


def test_reader_declines_legacy_and_compressed_files(tmp_path):
    legacy = tmp_path / "legacy.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, legacy, _use_new_zipfile_serialization=False)
    assert torch_zip.read_structure(legacy) is None
    good = tmp_path / "good.pth.tar"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, good)
    squeezed = tmp_path / "deflated.pth.tar"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(squeezed, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    assert torch_zip.read_structure(squeezed) is None
    source = read_checkpoint(squeezed, lazy=True)  # torch reads it instead, eagerly
    assert not source.lazy and torch.equal(source.state_dict["w"], torch.zeros(1000))


def _digests(folder: Path) -> dict[str, str]:
    return {file: hashlib.sha256((folder / file).read_bytes()).hexdigest() for file in ("model.safetensors", "config.json")}


@pytest.mark.parametrize("name", covering_configurations())
def test_conversion_reads_only_what_rules_compute(tmp_path, monkeypatch, checkpoints, name):
    """Renamed tensors are copied whole and tensors whose ops only move bytes are copied in runs, file
    to file; only tensors whose values a rule computes are read."""
    path = checkpoints.path(name)  # shared by the session: read it, never modify it
    read: list[str] = []
    copied: list[writer.FileRange] = []
    in_runs: list[writer.FileRuns] = []
    original_read, original_copy, original_runs = (SourceCheckpoint.read_tensor, writer._Output.copy,
                                                    writer._Output.copy_runs)

    def recording_read(self, key):
        read.append(key)
        return original_read(self, key)

    def recording_copy(self, source):
        if not getattr(self, "_in_runs", False):
            copied.append(source)
        return original_copy(self, source)

    def recording_runs(self, source):
        in_runs.append(source)
        self._in_runs = True
        try:
            return original_runs(self, source)
        finally:
            self._in_runs = False

    monkeypatch.setattr(SourceCheckpoint, "read_tensor", recording_read)
    monkeypatch.setattr(writer._Output, "copy", recording_copy)
    monkeypatch.setattr(writer._Output, "copy_runs", recording_runs)
    result = api.convert_checkpoint(path, tmp_path / "lazy")
    monkeypatch.undo()

    steps = result.plan.steps
    passed_on = [s for s in steps if s.action in ("rename", "fan_out")]
    locations = result.source.locations
    moved = [s for s in steps if s.action == "transform" and engine.byte_runs(
        s, Spec(locations[s.sources[0]].shape, locations[s.sources[0]].dtype)) is not None]
    moved_targets = {s.target for s in moved}
    computed_sources = {src for s in steps if s.action in ("transform", "fan_in") and s.target not in moved_targets
                        for src in s.sources}
    assert result.source.lazy
    assert set(read) == computed_sources, "the conversion read tensors it only renames or rearranges"
    assert len(copied) == len(passed_on)
    assert len(in_runs) == len(moved)
    assert sum(c.nbytes for c in copied) > 0.5 * result.bytes_written

    lazy = _digests(tmp_path / "lazy")
    shutil.rmtree(tmp_path / "lazy")  # one output on disk at a time
    eager = read_checkpoint(path)  # torch.load, memory-mapped: the reference path
    api.convert_checkpoint(path, tmp_path / "eager", source=eager)
    assert _digests(tmp_path / "eager") == lazy  # byte-identical files


def test_lic_convert_runs_without_importing_torch(tmp_path, checkpoints):
    path = checkpoints.path(SMALL)
    script = (
        "import sys\n"
        "from lic_checkpoints.convert.cli import main\n"
        f"main([{str(path)!r}, '-o', {str(tmp_path / 'out')!r}], standalone_mode=False)\n"
        "print('torch imported' if 'torch' in sys.modules else 'no torch')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("no torch"), done.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_strided_and_shared_source_tensors_convert_like_torch(tmp_path):
    """A renamed tensor stored with other strides, or inside a bigger storage, is computed, not copied."""
    container = upstream_checkpoint(SMALL)
    state = container["state_dict"]
    strided = next(k for k, v in state.items() if v.dim() == 2 and v.shape[0] != v.shape[1])
    state[strided] = state[strided].t().contiguous().t()  # same values, column-major storage
    assert not state[strided].is_contiguous()
    shared = next(k for k, v in state.items() if v.dim() == 1 and v.numel() > 8)
    state[shared] = torch.cat([torch.zeros(3), state[shared]])[3:]  # a view 3 elements into its storage
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(container, path)
    lazy = api.convert_checkpoint(path, tmp_path / "lazy")
    assert lazy.source.lazy and not lazy.source.locations[strided].contiguous
    api.convert_checkpoint(path, tmp_path / "eager", source=read_checkpoint(path))
    for file in ("model.safetensors", "config.json"):
        assert (tmp_path / "lazy" / file).read_bytes() == (tmp_path / "eager" / file).read_bytes(), file
