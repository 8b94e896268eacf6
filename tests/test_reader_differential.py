"""Differential tests of the torch-zip reader, with ``torch.load(weights_only=True)`` as the oracle.

Valid checkpoints (small synthetic ones with shared, strided, offset, expanded, float16, bfloat16,
integer, bool, scalar, empty and parameter tensors, plus the smallest published configuration's
demo checkpoint) are altered at the pickle, record and byte level: storage sizes, dtypes and keys,
tensor offsets, shapes, strides and ranks, requires_grad, calls the reader does not know, other
pickle protocols, record sizes and names, records left out, listed twice or compressed, unusual
archive records, pickle bytes replaced, deleted or inserted, a local header naming another record
than the directory, and files truncated, flipped or shifted.  For every case, each way lic-convert
and lic-verify read a file (``read_checkpoint`` lazy and eager, and the reader's own structure)
must either

- yield exactly the tensors ``torch.load(map_location="cpu", weights_only=True)`` yields (same keys,
  dtypes, shapes and bytes; the reader's whole container equal to torch's), or
- refuse the file with a :class:`CheckpointError`, or hand it over to torch, which then decides:

it never yields something torch refuses, nor tensors that differ from torch's.  ``map_location`` is
the converter's own: it reads every file onto the CPU whatever device it was saved from.

The runs are bounded (derandomized; 120 examples of the combined property, 8 per alteration, 3 on
the real checkpoint; a 10 s deadline per example), so the module takes about half a minute.  Run it
longer, with fresh random examples each time, by setting ``LIC_DIFFERENTIAL_EXAMPLES`` (examples of
the combined property; each alteration gets a fifteenth of it, the real checkpoint a fortieth)::

    LIC_DIFFERENTIAL_EXAMPLES=3000 python -m pytest tests/test_reader_differential.py --hypothesis-show-statistics

Deterministic sweeps run beside them: every byte of a small torch zip's directory and end records,
and every byte of a small safetensors source (whose oracle is safetensors' own loader), each
changed several ways.  The three altered checkpoints of issue 17 are tested through ``lic-convert``
at the end.
"""

from __future__ import annotations

import math
import os
import tempfile
import zipfile
from collections import Counter, OrderedDict
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lic_checkpoints.convert import dtypes, registry, torch_zip
from lic_checkpoints.convert.checkpoint import read_checkpoint
from lic_checkpoints.convert.cli import main
from lic_checkpoints.convert.demo import demo_checkpoint
from lic_checkpoints.convert.errors import CheckpointError
from test_reader_bounds import (DTYPES, STORAGE_TYPES, Storage, Tensor, all_refused, describe, members, outcomes,
                                summary, torch_verdict, write_zip)

LONG_RUN = "LIC_DIFFERENTIAL_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("LIC_DIFFERENTIAL_EXAMPLES", "120"))
PER_KIND = max(6, EXAMPLES // 15)
REAL_EXAMPLES = max(3, EXAMPLES // 40)


def _settings(examples: int):
    return settings(max_examples=examples, deadline=timedelta(seconds=10), derandomize=not LONG_RUN, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# --------------------------------------------------------------------------- valid checkpoints


def _values(n: int, dtype: torch.dtype) -> torch.Tensor:
    values = (torch.arange(n) * 37 + 11) % 101 - 50
    return (values % 2 == 0) if dtype == torch.bool else (values / 7).to(dtype) if dtype.is_floating_point \
        else values.to(dtype)


def _view(base: torch.Tensor, kind: str, draw) -> torch.Tensor:
    n = base.numel()
    if kind == "slice":
        a = draw(st.integers(0, n))
        return base[a:draw(st.integers(a, n))]
    if kind == "step" and n:
        return base[draw(st.integers(0, n - 1))::2]
    if kind in ("matrix", "transposed") and n >= 2:
        rows = draw(st.integers(1, n))
        matrix = base[: rows * (n // rows)].view(rows, n // rows)
        return matrix.t() if kind == "transposed" else matrix
    if kind == "scalar" and n:
        return base[draw(st.integers(0, n - 1))]
    if kind == "empty":
        return base[n:].view(0, 1) if draw(st.booleans()) else base[:0]
    if kind == "expanded" and n:
        i = draw(st.integers(0, n - 1))
        return base[i:i + 1].expand(draw(st.integers(0, 4)))
    if kind == "parameter":
        return torch.nn.Parameter(base, requires_grad=base.dtype.is_floating_point)
    return base


VIEWS = ("whole", "slice", "step", "matrix", "transposed", "scalar", "empty", "expanded", "parameter")


@st.composite
def checkpoints(draw) -> dict:
    """A container torch.save could have written: tensors over 1 to 3 shared storages."""
    bases = [_values(draw(st.integers(0, 24)), draw(st.sampled_from(DTYPES))) for _ in range(draw(st.integers(1, 3)))]
    state = OrderedDict()
    for i in range(draw(st.integers(1, 5))):
        state[f"block{i}.weight"] = _view(draw(st.sampled_from(bases)), draw(st.sampled_from(VIEWS)), draw)
    container = {"state_dict": state}
    if draw(st.booleans()):
        container["epoch"] = draw(st.integers(0, 300))
        container["optimizer"] = {"state": {0: {"step": torch.tensor(float(draw(st.integers(0, 9))))}},
                                  "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}]}
    return container


# --------------------------------------------------------------------------- alterations


def _tensors(obj) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    found = [t for v in values for t in _tensors(v)]
    return list({id(t): t for t in found}.values())


BIG = [2**31, 2**62, 2**63 - 1, 2**63, 2**64]


def _number(draw, current: int) -> int:
    return draw(st.sampled_from([0, current + 1, current - 1, current * 2, current // 2, -1, -current,
                                 *BIG]))


def _pickle_edit(kind: str, draw, desc: dict) -> int:
    """Alter ``desc`` (a :func:`describe`d container) in place; the pickle protocol to write it with."""
    tensor = draw(st.sampled_from(_tensors(desc)))
    storage = tensor.storage
    if kind == "numel":
        storage.numel = _number(draw, storage.numel)
    elif kind == "dtype":
        storage.dtype = draw(st.sampled_from(DTYPES))
        storage.storage_type = STORAGE_TYPES[storage.dtype]
    elif kind == "key":
        storage.key = draw(st.sampled_from(["0", "1", "2", "99", "x/../0"]))
    elif kind == "described_twice":  # this tensor's storage reference says another size or dtype
        storage.key = storage.key or "s"
        other = Storage(storage.data, draw(st.sampled_from(DTYPES)), key=storage.key)
        other.numel = draw(st.sampled_from([storage.numel, other.numel, storage.numel + 1]))
        tensor.storage = other
    elif kind == "offset":
        tensor.offset = _number(draw, tensor.offset)
    elif kind == "shape" and tensor.shape:
        i = draw(st.integers(0, len(tensor.shape) - 1))
        tensor.shape = tensor.shape[:i] + (_number(draw, tensor.shape[i]),) + tensor.shape[i + 1:]
    elif kind == "stride" and tensor.stride:
        i = draw(st.integers(0, len(tensor.stride) - 1))
        tensor.stride = tensor.stride[:i] + (_number(draw, tensor.stride[i]),) + tensor.stride[i + 1:]
    elif kind == "rank":
        if draw(st.booleans()) and tensor.stride:
            tensor.stride = tensor.stride[:-1]
        else:
            tensor.shape, tensor.stride = tensor.shape + (draw(st.sampled_from([1, 2])),), tensor.stride + (1,)
    elif kind == "requires_grad":
        tensor.requires_grad, tensor.parameter = True, draw(st.booleans())
    elif kind == "old_rebuild":  # a call torch allows and the reader does not interpret
        tensor.rebuild = torch._utils._rebuild_tensor
    elif kind == "counter":  # a global torch allows and the reader does not interpret
        desc["counts"] = Counter(a=1)
    elif kind == "protocol":
        return draw(st.sampled_from([1, 3, 4, 5]))
    return 2


def _record_edit(kind: str, draw, entries: list) -> dict:
    """Alter the archive's records in place; options for :func:`write_zip`."""
    data_records = [i for i, (name, _) in enumerate(entries) if name.startswith("data/")]
    if kind in ("record_size", "record_drop", "record_rename", "record_duplicate", "record_deflate") and not data_records:
        return {}
    i = draw(st.sampled_from(data_records)) if data_records else None
    if kind == "record_size":
        name, data = entries[i]
        cut = draw(st.sampled_from([1, 2, 4, len(data) // 2, len(data)]))
        grown = data + bytes(draw(st.sampled_from([1, 2, 4, 64])))
        entries[i] = (name, data[:-cut] if 0 < cut <= len(data) and draw(st.booleans()) else grown)
    elif kind == "record_drop":
        del entries[i]
        return {"python_zip": True}
    elif kind == "record_rename":
        entries[i] = (entries[i][0] + draw(st.sampled_from(["9", "x", "/"])), entries[i][1])
        return {"python_zip": True}  # torch's writer takes no name ending in "/"
    elif kind == "record_duplicate":
        entries.insert(draw(st.integers(0, len(entries))), (entries[i][0], draw(st.sampled_from([entries[i][1], b""]))))
        return {"python_zip": True}
    elif kind == "record_deflate":
        return {"deflate": (entries[i][0],)}
    elif kind == "archive_records":
        name = draw(st.sampled_from(["version", "byteorder", ".format_version", ".storage_alignment"]))
        value = draw(st.sampled_from([None, b"", b"x", b"2", b"11", b"3abc", b"big", b"little\n"]))
        entries[:] = [(n, value if n == name else d) for n, d in entries if not (n == name and value is None)]
        return {"python_zip": True}
    elif kind == "extra_record":
        entries.append(("data/77", bytes(draw(st.integers(0, 16)))))
    return {}


def _pickle_bytes_edit(draw, data: bytes) -> bytes:
    if not data:
        return data
    at = draw(st.integers(0, len(data) - 1))
    how = draw(st.sampled_from(["replace", "delete", "insert", "truncate"]))
    byte = bytes([draw(st.integers(0, 255))])
    if how == "replace":
        return data[:at] + byte + data[at + 1:]
    if how == "delete":
        return data[:at] + data[at + 1:]
    if how == "insert":
        return data[:at] + byte + data[at:]
    return data[:at]


def _file_edit(draw, path: Path) -> None:
    raw = path.read_bytes()
    how = draw(st.sampled_from(["truncate", "flip", "local_name", "append", "prepend"]))
    if how == "local_name":  # a local header names another record than the directory (zipfile refuses it)
        raw = bytearray(raw)
        at = draw(st.sampled_from([i for i in range(len(raw) - 30) if raw[i:i + 4] == b"PK\x03\x04"])) + 30
        raw[at] ^= draw(st.integers(1, 255))
        path.write_bytes(bytes(raw))
    elif how == "truncate":
        path.write_bytes(raw[: draw(st.integers(0, len(raw) - 1))])
    elif how == "flip":
        at = draw(st.integers(0, len(raw) - 1))
        path.write_bytes(raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1:])
    elif how == "append":
        path.write_bytes(raw + b"\0" * draw(st.integers(1, 100)))
    else:
        path.write_bytes(b"PK\x03\x04" * draw(st.integers(1, 16)) + raw)


PICKLE_KINDS = ("numel", "dtype", "key", "described_twice", "offset", "shape", "stride", "rank", "requires_grad",
                "old_rebuild", "counter", "protocol")
RECORD_KINDS = ("record_size", "record_drop", "record_rename", "record_duplicate", "record_deflate",
                "archive_records", "extra_record")
BYTE_KINDS = ("pickle_bytes", "file_bytes")
KINDS = ("none",) + PICKLE_KINDS + RECORD_KINDS + BYTE_KINDS
#: alterations after which every reading path must refuse (torch refuses too, or the reader is stricter)
ALWAYS_REFUSED = {"record_size", "record_drop", "record_duplicate"}


def build(draw, directory: Path, container: dict, kinds: list[str]) -> Path:
    """Write ``container`` with the alterations ``kinds`` applied, in the order pickle, records, bytes."""
    desc = describe(container)
    protocol = 2
    for kind in kinds:
        if kind in PICKLE_KINDS:
            chosen = _pickle_edit(kind, draw, desc)
            protocol = chosen if kind == "protocol" else protocol
    entries = members(desc, protocol)
    options: dict = {}
    for kind in kinds:
        if kind in RECORD_KINDS:
            options.update(_record_edit(kind, draw, entries))
        elif kind == "pickle_bytes":
            entries[0] = ("data.pkl", _pickle_bytes_edit(draw, entries[0][1]))
    path = write_zip(directory / "checkpoint.pth.tar", entries, **options)
    if "file_bytes" in kinds:
        _file_edit(draw, path)
    return path


# --------------------------------------------------------------------------- the property


def _record_array(raw: bytes, places: dict, tensor: torch_zip.TensorRecord) -> np.ndarray:
    kind = np.dtype(dtypes.get(tensor.dtype).numpy)
    start, size = places[tensor.storage.key]
    storage = np.frombuffer(raw, dtype=np.uint8, count=size, offset=start).view(kind)
    return np.lib.stride_tricks.as_strided(storage[tensor.offset:], tensor.shape,
                                           [s * kind.itemsize for s in tensor.stride], writeable=False)


def _same_object(ours, theirs, raw: bytes, places: dict, where: str = "") -> None:
    """The reader's container equals torch's: same structure, same plain values, same tensors."""
    if isinstance(ours, torch_zip.TensorRecord):
        assert isinstance(theirs, torch.Tensor), where
        assert summary(_record_array(raw, places, ours), ours.dtype) == summary(theirs), where
    elif isinstance(ours, dict):
        assert type(theirs) is type(ours) and list(theirs) == list(ours), where
        for key in ours:
            _same_object(ours[key], theirs[key], raw, places, f"{where}/{key}")
    elif isinstance(ours, (list, tuple)):
        assert type(theirs) is type(ours) and len(theirs) == len(ours), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _same_object(a, b, raw, places, f"{where}/{i}")
    else:
        assert type(theirs) is type(ours) and (ours == theirs or (ours != ours and theirs != theirs)), where


def check_against_torch(path: Path, note=lambda text: None) -> dict:
    """Assert the property for one file; returns what each path made of it.  ``note`` gets a line for
    the statistics (hypothesis' ``event``)."""
    verdict = torch_verdict(path)
    found = outcomes(path)
    refused = isinstance(verdict, Exception)
    note(f"torch {'refuses' if refused else 'reads'}; reader {_kind(found['reader'])}; "
          f"lazy {_kind(found['lazy'])}; eager {_kind(found['eager'])}")
    for where in ("lazy", "eager"):
        if isinstance(found[where], CheckpointError):
            continue  # refusing is always allowed
        assert not refused, f"{where} reading yields a file torch refuses ({type(verdict).__name__}: {verdict})"
        entry = found["entry"]
        theirs = verdict[entry] if entry is not None else verdict
        got = found[where][1]
        assert list(got.values()) == [summary(v) for v in theirs.values()], where
        assert len(got) == len(theirs)
        for ours, key in zip(got, theirs):
            if "module." not in str(key):
                assert ours == key, where
    if found["reader"] == "yield":
        assert not refused, f"the reader yields a file torch refuses ({verdict})"
        obj, places = torch_zip.read_structure(path)
        _same_object(obj, verdict, path.read_bytes(), places)
    return found


def _kind(value) -> str:
    return "refuses" if isinstance(value, CheckpointError) else value if isinstance(value, str) else "yields"


@pytest.mark.parametrize("kind", KINDS)
@_settings(PER_KIND)
@given(data=st.data())
def test_each_alteration_reads_like_torch_or_is_refused(kind, data):
    container = data.draw(checkpoints(), label="checkpoint")
    with tempfile.TemporaryDirectory() as tmp:
        path = build(data.draw, Path(tmp), container, [kind])
        found = check_against_torch(path, event)
        if kind == "none":
            assert found["reader"] == "yield", "the reader must read what torch.save writes, without torch"
        if kind in ALWAYS_REFUSED:
            assert all_refused(found), found


@_settings(EXAMPLES)
@given(data=st.data())
def test_combined_alterations_read_like_torch_or_are_refused(data):
    container = data.draw(checkpoints(), label="checkpoint")
    kinds = data.draw(st.lists(st.sampled_from(KINDS[1:]), min_size=1, max_size=3), label="alterations")
    with tempfile.TemporaryDirectory() as tmp:
        check_against_torch(build(data.draw, Path(tmp), container, kinds), event)


# --------------------------------------------------------------------------- the archive's directory, byte by byte


def _small_archive(directory: Path) -> Path:
    storage = Storage(np.arange(16, dtype=np.float32).tobytes(), torch.float32)
    return write_zip(directory / "small.pt", {"state_dict": OrderedDict(
        a=Tensor(storage, 0, (4, 4), (4, 1)), b=Tensor(Storage(storage.data[:32], torch.float32), 0, (8,), (1,)))})


def test_every_byte_of_the_directory_altered_reads_like_torch_or_is_refused(tmp_path):
    """Each byte of the zip directory and end records, changed in its low bit, its high bit and all its
    bits: torch's zip reader and Python's differ on disk numbers, record counts, stated lengths,
    encryption, folder marks and names outside the archive's folder.  A sweep of the whole file found
    these; the directory is where they live, so it is swept in every run."""
    path = _small_archive(tmp_path)
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        start = archive.start_dir
    seen = Counter()
    altered = tmp_path / "altered.pt"
    for at in range(start, len(raw)):
        for change in (0x01, 0x80, 0xFF):
            altered.write_bytes(raw[:at] + bytes([raw[at] ^ change]) + raw[at + 1:])
            found = check_against_torch(altered)
            seen[_kind(found["lazy"])] += 1
    assert seen["refuses"] and seen["yields"], seen  # both outcomes occur: the sweep is not vacuous


def test_a_serialization_id_torch_cannot_read_as_text_is_not_read(tmp_path):
    """torch hands ``.data/serialization_id`` to Python as text after unpickling, and fails on other bytes."""
    small = _small_archive(tmp_path)
    raw = bytearray(small.read_bytes())
    with zipfile.ZipFile(small) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(".data/serialization_id"))
    names, extras = int.from_bytes(raw[info.header_offset + 26: info.header_offset + 28], "little"), \
        int.from_bytes(raw[info.header_offset + 28: info.header_offset + 30], "little")
    raw[info.header_offset + 30 + names + extras] = 0xB0  # not the first byte of any UTF-8 character
    path = tmp_path / "id.pt"
    path.write_bytes(bytes(raw))
    assert isinstance(torch_verdict(path), Exception)
    found = check_against_torch(path)
    assert found["reader"] != "yield" and isinstance(found["lazy"], CheckpointError), found


# --------------------------------------------------------------------------- safetensors sources


def _safetensors_outcome(path: Path):
    """safetensors' own loader's tensors (key -> summary), or the exception it refuses the file with."""
    from safetensors.torch import load_file

    try:
        return {k: summary(v) for k, v in load_file(str(path)).items()}
    except Exception as exc:  # noqa: BLE001 - any refusal counts
        return exc


def _check_safetensors_source(path: Path) -> str:
    """Both ways of reading ``path`` yield what safetensors' loader yields, or refuse it; returns what
    the lazy way did ('refuses' or 'yields')."""
    verdict = _safetensors_outcome(path)
    kinds = []
    for lazy in (True, False):
        try:
            with read_checkpoint(path, lazy=lazy) as source:
                got = {k: summary(source.read_tensor(k), source.state_dict[k].dtype) if lazy and source.lazy
                       else summary(v) for k, v in source.state_dict.items()}
        except CheckpointError:
            kinds.append("refuses")
            continue
        kinds.append("yields")
        assert not isinstance(verdict, Exception), f"{'lazy' if lazy else 'eager'} reads what safetensors refuses"
        assert got == verdict, "lazy" if lazy else "eager"
    return kinds[0]


def test_every_byte_of_a_safetensors_source_altered_reads_like_safetensors_or_is_refused(tmp_path):
    """A safetensors source (lic-convert takes them too) is validated by ``safe_open`` before the
    converter reads its header itself: each byte changed four ways must give safetensors' own tensors
    or a refusal, never other tensors."""
    from safetensors.torch import save_file

    path = tmp_path / "source.safetensors"
    save_file({"g_a.0.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
               "g_a.0.bias": torch.arange(5, dtype=torch.float16), "count": torch.tensor([1, 2])},
              str(path), metadata={"format": "pt"})
    raw = path.read_bytes()
    altered = tmp_path / "altered.safetensors"
    seen = Counter()
    for at in range(len(raw)):
        for change in (0x01, 0x20, 0x80, 0xFF):
            altered.write_bytes(raw[:at] + bytes([raw[at] ^ change]) + raw[at + 1:])
            seen[_check_safetensors_source(altered)] += 1
    assert seen["refuses"] and seen["yields"], seen


# --------------------------------------------------------------------------- a real configuration


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The demo checkpoint of the smallest published configuration, and its description."""
    folder = tmp_path_factory.mktemp("real")
    path = demo_checkpoint(registry.smallest_configuration().name, folder / "demo.pth.tar")
    container = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    desc = describe(container)
    del container
    yield path, desc
    for file in folder.iterdir():
        file.unlink()


def _mid_file_4d(desc: dict) -> str:
    """The state-dict key of a 4-D tensor in the middle of the file, alone on its storage."""
    state = desc["state_dict"]
    uses = Counter(id(t.storage) for t in _tensors(desc))
    keys = [k for k, t in state.items() if len(t.shape) == 4 and uses[id(t.storage)] == 1
            and t.offset == 0 and math.prod(t.shape) == t.storage.numel and t.storage.numel % 4 == 0]
    assert keys, "the demo checkpoint has no plain 4-D tensor"
    return keys[len(keys) // 2]


def test_the_real_checkpoint_is_read_like_torch(real):
    path, _ = real
    found = check_against_torch(path)
    assert found["reader"] == "yield" and found["lazy"][0] == found["eager"][0] == "yield"


@_settings(REAL_EXAMPLES)
@given(data=st.data())
def test_the_real_checkpoint_altered_reads_like_torch_or_is_refused(real, data):
    path, desc = real
    key = _mid_file_4d(desc)
    original = desc["state_dict"][key]
    tensor = Tensor(Storage(original.storage.data, original.storage.dtype), original.offset, original.shape,
                    original.stride)
    desc["state_dict"][key] = tensor
    kind = data.draw(st.sampled_from(["numel", "dtype", "offset", "shape", "stride"]), label="alteration")
    try:
        if kind == "numel":
            tensor.storage.numel = data.draw(st.sampled_from([tensor.storage.numel // 2, tensor.storage.numel + 1]))
        elif kind == "dtype":
            tensor.storage.dtype = data.draw(st.sampled_from([torch.float16, torch.int32, torch.float64]))
            tensor.storage.storage_type = STORAGE_TYPES[tensor.storage.dtype]
        elif kind == "offset":
            tensor.offset = data.draw(st.sampled_from([1, tensor.storage.numel // 4]))
        elif kind == "shape":
            tensor.shape = (tensor.shape[0] + data.draw(st.sampled_from([-1, 1])),) + tensor.shape[1:]
        else:
            tensor.stride = (tensor.stride[0] + data.draw(st.sampled_from([-1, 1])),) + tensor.stride[1:]
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            check_against_torch(write_zip(Path(tmp) / "altered.pth.tar", desc), event)
    finally:
        desc["state_dict"][key] = original


# --------------------------------------------------------------------------- issue 17, through lic-convert


@pytest.mark.parametrize("case", ["a", "b", "c"])
def test_issue_17_altered_checkpoints_are_refused_by_lic_convert(real, tmp_path, case):
    """(a) the tensor claims its full shape, its storage and record half its elements; (b) the storage
    claims the full count, the record holds half; (c) as (b), with a storage offset of a quarter."""
    path, desc = real
    key = _mid_file_4d(desc)
    original = desc["state_dict"][key]
    n, data = original.storage.numel, original.storage.data
    itemsize = len(data) // n
    if case == "a":
        storage, offset = Storage(data[: len(data) // 2], original.storage.dtype), 0
    elif case == "b":
        storage, offset = Storage(data[: len(data) // 2], original.storage.dtype, n), 0
    else:
        claimed = n + n // 4
        storage, offset = Storage((bytes(itemsize * (n // 4)) + data)[: claimed * itemsize // 2],
                                  original.storage.dtype, claimed), n // 4
    desc["state_dict"][key] = Tensor(storage, offset, original.shape, original.stride)
    try:
        altered = write_zip(tmp_path / f"{case}.pth.tar", desc)
    finally:
        desc["state_dict"][key] = original
    verdict = torch_verdict(altered)
    assert isinstance(verdict, Exception), "torch.load must refuse the altered file"
    if case != "a":
        assert f"record size ({len(storage.data)} bytes) does not match expected size" in str(verdict)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [str(altered), "-o", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"lic-convert: error: {altered}: refused: tensor {key!r} ")
    assert lines[0].endswith("; the file is damaged or was altered")
    record_bytes, dtype = len(storage.data), str(storage.dtype).removeprefix("torch.")
    claims = storage.numel
    expected = {
        "a": f"claims {n * itemsize} bytes but its storage record",
        "b": f"holds {claims} {dtype} elements ({claims * itemsize} bytes), but the record holds {record_bytes}",
        "c": f"holds {claims} {dtype} elements ({claims * itemsize} bytes), but the record holds {record_bytes}",
    }[case]
    assert expected in lines[0], lines[0]
    assert not out.exists() or not any(out.iterdir())
