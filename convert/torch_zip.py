"""Reading the structure of a torch zip checkpoint as data: no torch, and no pickle is ever run.

A torch zip holds ``<name>/data.pkl`` (the pickled container, whose tensors refer to storages by key)
and one record ``<name>/data/<key>`` per storage.  :func:`read_structure` decodes the pickle's
opcodes itself, as torch's weights-only unpickler decodes them, and interprets a fixed, small subset:
plain containers and numbers, ``OrderedDict``, torch's tensor rebuild call and its storage
references.  Nothing is imported and nothing is called: a name outside that subset is never looked
up, the reader just declines.

It returns ``None`` for anything it does not know (other globals, other opcodes, compressed records,
another byte order, odd archive records), and the caller then reads the file with
``torch.load(weights_only=True)``, which stays the authority on what is refused for those.  So this
reader only ever accepts a subset of what torch's safe loader accepts, and gives each tensor's shape,
dtype and byte offset in the file without touching its data (it lets ``lic-convert`` run without
importing torch: seconds and hundreds of megabytes less per process).

Because ``lic-convert`` copies tensor bytes file to file at the offsets computed here, every claim
the pickle makes about sizes is checked against the archive before an offset is handed out, at
least as strictly as ``torch.load`` checks it: a storage's byte size (elements times element size)
equals its record's size; every tensor's elements lie inside its storage; offsets, sizes and strides
are non-negative and fit in 64 bits; a storage key means the same dtype and size wherever it is used;
every referenced record exists; no record is listed twice or overlaps another.  A file that breaks
one of these is refused with a :class:`CheckpointError` naming the tensor, also where the reader
would otherwise decline (what it cannot interpret is skipped, what it can is checked).

The opcodes are run the way torch's weights-only unpickler runs them (its stack, marks and memo), and
only those it accepts: what the reader yields, torch would yield too.

torch checks none of the record sizes when it maps a file (``mmap=True``) or reads it onto the meta
device (how ``lic-convert`` locates tensors the reader declined), and on the meta device it computes
storage offsets from the claimed sizes instead of looking records up; :func:`check_records` and
:func:`check_mapped_tensor` apply the same checks, and check those offsets, for files torch read so.
"""

from __future__ import annotations

import functools
import math
import os
import struct
import sys
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import dtypes
from .errors import CheckpointError
from .integrity import record_ranges

#: a data.pkl larger than this is left to torch (a state dict's pickle is a few hundred kilobytes)
MAX_PICKLE_BYTES = 64 << 20
#: archive format versions ``torch.save`` writes; other values are left to torch (which reads 1 to 10)
READ_VERSIONS = range(1, 4)
_INT64_MAX = 2**63 - 1
#: storage classes torch's safe loader knows and :mod:`.dtypes` does not: their sizes are checked,
#: the files that use them are left to torch
_OTHER_STORAGES = {
    "ComplexFloatStorage": ("complex64", 8), "ComplexDoubleStorage": ("complex128", 16),
    "QInt8Storage": ("qint8", 1), "QUInt8Storage": ("quint8", 1), "QInt32Storage": ("qint32", 4),
    "QUInt4x2Storage": ("quint4x2", 1), "QUInt2x4Storage": ("quint2x4", 1),
}
_OTHER_ITEMSIZE = dict(_OTHER_STORAGES.values())


class _Decline(Exception):
    """The pickle uses something this reader does not interpret at all (it cannot even check it)."""


@dataclass(frozen=True)
class StorageRef:
    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class TensorRecord:
    """A tensor as the pickle describes it: storage, element offset, shape, strides (in elements)."""

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> str:
        return self.storage.dtype


@dataclass(frozen=True)
class _Callable:
    name: str


@dataclass(frozen=True)
class _StorageType:
    dtype: str
    known: bool = True  # False: a dtype lic-convert does not handle (sizes are still checked)


class _Opaque:
    """A value built by something the reader does not interpret: it only passes it along."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<opaque>"


_OPAQUE = _Opaque()
_ORDERED_DICT = _Callable("collections.OrderedDict")
_REBUILD_TENSOR = _Callable("torch._utils._rebuild_tensor_v2")
_REBUILD_PARAMETER = _Callable("torch._utils._rebuild_parameter")
_KNOWN = {
    ("collections", "OrderedDict"): _ORDERED_DICT,
    ("torch._utils", "_rebuild_tensor_v2"): _REBUILD_TENSOR,
    ("torch._utils", "_rebuild_parameter"): _REBUILD_PARAMETER,
}


@dataclass
class _Archive:
    prefix: str  # "<name>/"
    pickle: bytes
    records: dict[str, tuple[int, int]]  # storage key -> (byte offset of its data, size), every data/ record
    declined: str | None  # why the file is left to torch, though it can be checked
    computed_offsets: bool = False  # whether torch's meta reading computes offsets instead of reading them


@dataclass
class _Reading:
    """What interpreting a pickle found: its object and every storage and tensor it builds."""

    obj: Any = None
    tensors: list[TensorRecord] = field(default_factory=list)
    storages: dict[str, StorageRef] = field(default_factory=dict)
    conflicts: list[tuple[StorageRef, StorageRef]] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)  # id(tensor) -> where it sits in the object
    declined: str | None = None

    def decline(self, why: str) -> None:
        if self.declined is None:
            self.declined = why


def read_structure(path: Path) -> tuple[Any, dict[str, tuple[int, int]]] | None:
    """(the container with :class:`TensorRecord` leaves, storage key -> (byte offset of its data, size)).

    ``None`` when the file is not something this reader handles (see the module's doc); raises
    :class:`CheckpointError` when the pickle's claims do not match the archive.
    """
    path = Path(path)
    archive = _open_archive(path)
    if archive is None:
        return None
    reading = _read_pickle(archive.pickle)
    if reading is None:
        return None
    _check(path, archive, reading)
    if archive.declined or reading.declined:
        return None
    return reading.obj, archive.records


def check_records(path: Path, loaded: Any = None) -> bool:
    """Check a torch zip that ``torch.load`` read mapped or onto the meta device, which compares no
    storage's claimed size with its record: the checks of :func:`read_structure`, for every storage
    and tensor the reader can interpret; a :class:`CheckpointError` for the first that fails.
    Returns False, having checked nothing, where the reader cannot interpret the archive or its
    pickle: such a file must be read the way that checks each record itself (unmapped).

    ``loaded`` is what ``torch.load(map_location="meta")`` returned.  torch then does not look each
    storage's record up: where the archive has a ``.format_version`` record it computes the offsets
    from the claimed sizes and the layout ``torch.save`` writes, so they are checked against the
    records, storage by storage, in the order torch reads them.
    """
    path = Path(path)
    archive = _open_archive(path)
    if archive is None:
        return False
    reading = _read_pickle(archive.pickle)
    if reading is None:
        return False
    _check(path, archive, reading)
    if loaded is not None and archive.computed_offsets:
        _check_computed_offsets(path, archive, reading, loaded)
    return True


def check_mapped_tensor(path: Path, key: str, record_start: int, storage_nbytes: int, offset: int,
                        shape: tuple[int, ...], stride: tuple[int, ...], itemsize: int) -> None:
    """Check one tensor torch read onto the meta device against the record its storage starts in.

    ``record_start`` is torch's ``_checkpoint_offset`` of the storage; torch grows a meta storage to
    fit any tensor set on it, so the storage's size must equal its record's and the tensor fit in it.
    """
    path = Path(path)
    found = _records_by_start(str(path), *_identity(path)).get(record_start)
    if found is None:
        raise _refusal(path, f"tensor {key!r} is read from byte {record_start}, where no storage record starts")
    name, size = found
    if storage_nbytes != size:
        raise _refusal(path, f"tensor {key!r} says its storage {name!r} holds {storage_nbytes} bytes, "
                             f"but the record holds {size}")
    problem = _tensor_problem(offset, shape, stride, itemsize, size, name)
    if problem:
        raise _refusal(path, f"tensor {key!r} {problem}")


def copyable_as_stored(archive: zipfile.ZipFile) -> bool:
    """Whether tensor bytes can be taken from the file as they are: every record stored uncompressed,
    in this machine's byte order (torch's ``byteorder`` record, exactly as torch writes it; archives
    from before it existed were written little-endian in practice)."""
    infos = archive.infolist()
    if any(info.compress_type != zipfile.ZIP_STORED for info in infos):
        return False
    order = next((i for i in infos if i.filename.endswith("/byteorder")), None)
    return order is None or archive.read(order) == sys.byteorder.encode()


# --------------------------------------------------------------------------- the archive


def _open_archive(path: Path) -> _Archive | None:
    """The archive's pickle and records; None where the reader cannot look into it (torch decides)."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            _refuse_duplicates(path, infos)
            # torch's reader takes the folder of the first record as the archive's name
            if not infos or "/" not in infos[0].filename:
                return None
            prefix = infos[0].filename.split("/", 1)[0] + "/"
            names = {info.filename: info for info in infos}
            pickle_info = names.get(prefix + "data.pkl")
            if pickle_info is None or pickle_info.file_size > MAX_PICKLE_BYTES:
                return None
            if any(info.compress_type != zipfile.ZIP_STORED for info in infos):
                return None  # torch reads such a file into memory, checking each record's size itself
            if _directory_oddity(path, infos, prefix) is not None:
                return None  # torch's zip reader may refuse it, or read it otherwise: torch decides
            if _shifted(archive):
                return None  # bytes before the archive: offsets in the directory are not the file's
            try:  # every record's local header, before any record is read (CheckpointError: a broken archive)
                ranges = record_ranges(path, infos)
            except (OSError, ValueError):
                return None
            _refuse_overlaps(path, infos, ranges, archive.start_dir)
            declined = _unusual_records(archive, prefix, names)
            # torch.load(map_location="meta") computes offsets when this holds (torch/serialization.py)
            version_info = names.get(prefix + ".format_version")
            computed = version_info is not None and archive.read(version_info) >= b"1"
            data = archive.read(pickle_info)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, KeyError, NotImplementedError,
            RuntimeError):  # RuntimeError: zipfile's word for a record it cannot read without a password
        return None
    start = prefix + "data/"
    records = {info.filename[len(start):]: (lo, hi - lo) for lo, hi, info in ranges if info.filename.startswith(start)}
    return _Archive(prefix, data, records, declined, computed)


def _refuse_duplicates(path: Path, infos: list[zipfile.ZipInfo]) -> None:
    # torch's zip reader looks names up ignoring case: two such names would leave it the choice
    seen: dict[str, str] = {}
    for info in infos:
        folded = info.filename.lower()
        if folded in seen:
            twice = (f"the record {info.filename!r} twice" if seen[folded] == info.filename
                     else f"the records {seen[folded]!r} and {info.filename!r}, which torch's reader does not tell apart")
            raise _refusal(path, f"the zip archive lists {twice}")
        seen[folded] = info.filename


def _refuse_overlaps(path: Path, infos, ranges, end_of_records: int) -> None:
    stops = {id(info): stop for _, stop, info in ranges}
    spans = sorted((info.header_offset, stops[id(info)], info.filename) for info in infos)
    for (_, stop, name), (start, _, following) in zip(spans, spans[1:]):
        if stop > start:
            raise _refusal(path, f"the zip records {name!r} and {following!r} overlap")
    if spans and spans[-1][1] > end_of_records:
        raise _refusal(path, f"the zip record {spans[-1][2]!r} runs into the archive's directory")


#: general-purpose flags of a record that torch's zip reader does not read as plain stored bytes:
#: encrypted (bit 0), strongly encrypted (bit 6), local header masked (bit 13)
_UNREAD_FLAGS = 0x0001 | 0x0040 | 0x2000
_END = struct.Struct("<4sHHHHIIH")  # end of central directory
_END64_LOCATOR = struct.Struct("<4sIQI")
_END64 = struct.Struct("<4sQHHIIQQQQ")
_CENTRAL = struct.Struct("<4s24xHHH12x")  # a directory record's fixed part (46 bytes): its three lengths


def _directory_oddity(path: Path, infos: list[zipfile.ZipInfo], prefix: str) -> str | None:
    """What in the archive's directory ``torch.save`` never writes and torch's zip reader might refuse
    or read otherwise (None: nothing).  Python's zipfile takes all of these in its stride.  A record
    marked as a folder is refused (a :class:`CheckpointError`)."""
    for info in infos:
        if info.flag_bits & _UNREAD_FLAGS:
            return f"record {info.filename!r} is encrypted"
        if info.is_dir() or info.external_attr & 0x10:
            # zip readers take it as a folder: torch then gives whatever its buffer held as the tensor data
            raise _refusal(path, f"the zip record {info.filename!r} is marked as a folder")
        if info.file_size != info.compress_size:
            return f"record {info.filename!r} has two sizes"
        if not info.filename.startswith(prefix):
            return f"record {info.filename!r} is outside the folder {prefix!r}"
        if info.volume != 0:
            return f"record {info.filename!r} is on another disk"
        raw = _raw_name(info)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return f"record name {raw!r} is not UTF-8"
    return _end_oddity(path, len(infos))


def _raw_name(info: zipfile.ZipInfo) -> bytes:
    return info.filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")


def _end_oddity(path: Path, entries: int) -> str | None:
    """Why the archive's end records and directory are not the single-disk ones Python's zipfile read
    as ``entries`` records (None: they are).  zipfile ignores disk numbers and stops reading the
    directory where its stated size ends, even inside a record; torch's reader refuses both."""
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        tail_start = max(0, size - (_END.size + 0xFFFF + _END64_LOCATOR.size))
        fh.seek(tail_start)
        tail = fh.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or at + _END.size > len(tail):
            return "no end record"
        _, disk, disk_of_directory, here, total, directory_size, directory_start, _ = _END.unpack_from(tail, at)
        if disk or disk_of_directory or here != total:
            return "the end record describes several disks"
        locator = at - _END64_LOCATOR.size
        if locator >= 0 and tail[locator: locator + 4] == b"PK\x06\x07":
            _, disk_of_end64, end64_offset, disks = _END64_LOCATOR.unpack_from(tail, locator)
            if disk_of_end64 or disks != 1:
                return "the zip64 locator describes several disks"
            fh.seek(end64_offset)
            end64 = fh.read(_END64.size)
            if len(end64) < _END64.size or end64[:4] != b"PK\x06\x06":
                return "no zip64 end record where its locator points"
            _, _, _, _, disk, disk_of_directory, here, total, directory_size, directory_start = _END64.unpack(end64)
            if disk or disk_of_directory or here != total:
                return "the zip64 end record describes several disks"
        if total != entries or directory_size > size:
            return f"the end record counts {total} records, the directory read holds {entries}"
        fh.seek(directory_start)
        directory = fh.read(directory_size)
    at = count = 0
    while at < len(directory):  # each record's header and the lengths it states must fit the directory
        if directory[at: at + 4] != b"PK\x01\x02" or at + _CENTRAL.size > len(directory):
            return f"directory record {count} is not where the one before it ends"
        names, extras, comments = _CENTRAL.unpack_from(directory, at)[-3:]
        at += _CENTRAL.size + names + extras + comments
        count += 1
    if at != len(directory) or count != entries:
        return f"the directory's records ({count}) do not fill its {len(directory)} bytes"
    return None


def _shifted(archive: zipfile.ZipFile) -> bool:
    """Whether the archive sits behind other bytes (Python's zipfile allows that, torch's reader does not)."""
    first = min((info.header_offset for info in archive.infolist()), default=0)
    return first != 0


def _unusual_records(archive: zipfile.ZipFile, prefix: str, names: dict[str, zipfile.ZipInfo]) -> str | None:
    """Why torch might read this archive differently from ``torch.save``'s files (None: it would not)."""
    order = names.get(prefix + "byteorder")
    if order is not None and archive.read(order) != sys.byteorder.encode():
        return "another byte order"
    version = names.get(prefix + ".data/version") or names.get(prefix + "version")
    if version is None:
        return "no version record"
    text = archive.read(version)
    if not (text.rstrip(b"\n").isdigit() and text.count(b"\n") <= 1 and int(text) in READ_VERSIONS):
        return f"archive version {text[:16]!r}"
    serialization_id = names.get(prefix + ".data/serialization_id")
    if serialization_id is not None:
        try:  # torch hands it to Python as text once the pickle is read
            archive.read(serialization_id).decode("utf-8")
        except UnicodeDecodeError:
            return "a serialization id that is not UTF-8"
    for extra in (".format_version", ".storage_alignment"):
        info = names.get(prefix + extra)
        if info is not None:
            try:
                int(archive.read(info))
            except ValueError:
                return f"record {extra} is not a number"
    return None


def _check_computed_offsets(path: Path, archive: _Archive, reading: _Reading, loaded: Any) -> None:
    """Each storage torch read onto the meta device starts where its own record starts.

    torch reads storages in the order the pickle first refers to them and computes each offset from
    the previous one, so its offsets, in increasing order, belong to those storages in that order.
    """
    expected = [(key, archive.records[key][0]) for key, ref in reading.storages.items()
                if ref.numel * _itemsize(ref.dtype) > 0]
    got = sorted(_meta_offsets(loaded))
    for i, (key, start) in enumerate(expected):
        place = got[i] if i < len(got) else None
        if place != start:
            where = f"from byte {place}" if place is not None else "from nowhere"
            raise _refusal(path, f"the record of storage 'data/{key}' starts at byte {start}, but torch's reading "
                                 f"takes it {where} (the archive is not laid out the way torch.save writes it)")
    if len(got) > len(expected):
        raise _refusal(path, f"torch's reading takes a storage from byte {got[len(expected)]}, "
                             "which is no storage of the pickle")


def _meta_offsets(loaded: Any) -> set[int]:
    """The offsets torch recorded for the (non-empty) storages of the tensors in ``loaded``."""
    offsets: set[int] = set()
    seen: set[int] = set()
    todo = [loaded]
    while todo:
        value = todo.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if hasattr(value, "untyped_storage"):  # a tensor
            storage = value.untyped_storage()
        else:  # a storage pickled by itself (a TypedStorage), or something else
            storage = getattr(value, "_untyped_storage", None)
        if storage is not None:
            offset = getattr(storage, "_checkpoint_offset", None)
            if offset is not None and storage.nbytes() > 0:
                offsets.add(int(offset))
        elif isinstance(value, dict):
            todo.extend(value.keys())
            todo.extend(value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            todo.extend(value)
    return offsets


def _identity(path: Path) -> tuple:
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=4)
def _records_by_start(path: str, *identity) -> dict[int, tuple[str, int]]:
    """Data offset -> (record name, size) of every ``data/`` record of a torch zip (cached per file state)."""
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
    prefix = infos[0].filename.split("/", 1)[0] + "/" if infos else ""
    return {lo: (info.filename[len(prefix):], hi - lo) for lo, hi, info in record_ranges(Path(path), infos)
            if info.filename.startswith(prefix + "data/")}


# --------------------------------------------------------------------------- the checks


def _refusal(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: refused: {what}; the file is damaged or was altered")


def _itemsize(dtype: str) -> int:
    return dtypes.BY_NAME[dtype].itemsize if dtype in dtypes.BY_NAME else _OTHER_ITEMSIZE[dtype]


def _check(path: Path, archive: _Archive, reading: _Reading) -> None:
    """Every storage and tensor the pickle builds against the records; raise on the first mismatch."""

    def label(tensor: TensorRecord) -> str:
        name = reading.names.get(id(tensor))
        return f"tensor {name!r}" if name is not None else f"a tensor on storage 'data/{tensor.storage.key}'"

    users: dict[str, list[TensorRecord]] = {}
    for tensor in reading.tensors:
        users.setdefault(tensor.storage.key, []).append(tensor)
    for first, other in reading.conflicts:
        who = [label(t) for t in users.get(first.key, []) if t.storage in (first, other)]
        uses = f" (used by {', '.join(dict.fromkeys(who))})" if who else ""
        raise _refusal(path, f"storage 'data/{first.key}' is described two ways, as {first.numel} {first.dtype} "
                             f"elements and as {other.numel} {other.dtype} elements{uses}")
    checked: set[StorageRef] = set()
    for tensor in reading.tensors:
        _check_storage(path, archive, tensor.storage, label(tensor), checked)
        size = archive.records[tensor.storage.key][1]
        problem = _tensor_problem(tensor.offset, tensor.shape, tensor.stride, _itemsize(tensor.dtype), size,
                                  f"data/{tensor.storage.key}")
        if problem:
            raise _refusal(path, f"{label(tensor)} {problem}")
    for storage in reading.storages.values():
        _check_storage(path, archive, storage, "the pickle", checked)  # storages no tensor uses


def _check_storage(path: Path, archive: _Archive, storage: StorageRef, who: str, checked: set) -> None:
    if storage in checked:
        return
    record = archive.records.get(storage.key)
    if record is None:
        raise _refusal(path, f"{who} uses storage {storage.key!r}, but the archive has no record 'data/{storage.key}'")
    claimed = storage.numel * _itemsize(storage.dtype)
    if storage.numel < 0 or claimed != record[1]:
        raise _refusal(path, f"{who} says its storage 'data/{storage.key}' holds {storage.numel} {storage.dtype} "
                             f"elements ({claimed} bytes), but the record holds {record[1]}")
    checked.add(storage)


def _tensor_problem(offset: int, shape: tuple[int, ...], stride: tuple[int, ...], itemsize: int,
                    record_bytes: int, record: str) -> str | None:
    """What is wrong with a tensor of ``record`` (None: nothing); torch refuses all of it or more."""
    if offset < 0 or any(n < 0 for n in shape) or any(s < 0 for s in stride):
        return f"has a negative storage offset, size or stride (offset {offset}, shape {shape}, strides {stride})"
    if len(shape) != len(stride):
        return f"has {len(shape)} sizes but {len(stride)} strides"
    numel = math.prod(shape)
    if max((offset, *shape, *stride, numel)) * itemsize > _INT64_MAX:
        return (f"claims a shape {shape}, strides {stride} or offset {offset} too large for 64-bit byte counts "
                f"({numel} elements)")
    if numel == 0:
        if offset * itemsize > record_bytes:
            return f"starts at byte {offset * itemsize} of its storage record {record!r}, which holds {record_bytes}"
        return None
    end = (offset + sum((n - 1) * s for n, s in zip(shape, stride)) + 1) * itemsize
    if end <= record_bytes:
        return None
    if offset == 0:
        return f"claims {end} bytes but its storage record {record!r} holds {record_bytes}"
    return f"claims bytes {offset * itemsize} to {end} of its storage record {record!r}, which holds {record_bytes}"


# --------------------------------------------------------------------------- the pickle


def _read_pickle(data: bytes) -> _Reading | None:
    """Interpret the pickle; None where it uses something the reader cannot follow at all."""
    try:
        reading = _interpret(data)
        _name_tensors(reading)
    except (_Decline, ValueError, KeyError, IndexError, TypeError, EOFError, RecursionError, OverflowError,
            struct.error):
        return None  # opcodes torch's safe unpickler reads differently or refuses, stack errors: torch decides
    except Exception:  # anything unexpected: leave the file to torch's reader and its messages
        return None
    return reading


def _name_tensors(reading: _Reading) -> None:
    """Name each tensor by where it sits (``a/b/c``; a state dict's own keys bare); decline cycles.

    Iterative, and each container is entered once, so deep or widely shared pickles cost linear time.
    """
    from . import checkpoint  # imported here: checkpoint imports this module

    entries = getattr(checkpoint, "STATE_DICT_ENTRIES", ())  # only shortens names: never a reason to fail

    entered: set[int] = set()
    open_now: set[int] = set()
    todo: list[tuple[Any, tuple]] = [(reading.obj, ())]
    while todo:
        value, where = todo.pop()
        if value is _LEAVE:
            open_now.discard(where)
        elif isinstance(value, TensorRecord):
            if id(value) not in reading.names:
                shown = where[1:] if len(where) > 1 and where[0] in entries else where
                reading.names[id(value)] = "/".join(map(str, shown))
        elif isinstance(value, (dict, list, tuple)):
            if id(value) in open_now:
                reading.decline("a container that holds itself")
            elif id(value) not in entered:
                entered.add(id(value))
                open_now.add(id(value))
                todo.append((_LEAVE, id(value)))
                items = list(value.items() if isinstance(value, dict) else enumerate(value))
                todo.extend((item, where + (key,)) for key, item in reversed(items))


_LEAVE = object()  # marks, in :func:`_name_tensors`' work list, the end of a container


def _global(module: Any, name: Any, reading: _Reading) -> Any:
    if (module, name) in _KNOWN:
        return _KNOWN[(module, name)]
    if module == "torch" and name in dtypes.BY_STORAGE:
        return _StorageType(dtypes.BY_STORAGE[name].name)
    if module == "torch" and name in _OTHER_STORAGES:
        reading.decline(f"storage type {name}")
        return _StorageType(_OTHER_STORAGES[name][0], known=False)
    if (module, name) == ("torch.storage", "UntypedStorage"):  # torch reads it as bytes
        reading.decline("untyped storage")
        return _StorageType("uint8", known=False)
    reading.decline(f"global {module}.{name}")
    return _OPAQUE


def _int_tuple(value: Any) -> bool:
    return type(value) is tuple and all(type(v) is int for v in value)


def _empty_hooks(value: Any) -> bool:
    return type(value) is OrderedDict and not value


def _floating(dtype: str) -> bool:
    return dtype in dtypes.BY_NAME and dtypes.BY_NAME[dtype].floating


def _call(function: Any, args: Any, reading: _Reading) -> Any:
    if function is _OPAQUE:
        return _OPAQUE
    if isinstance(function, _StorageType):  # torch builds a storage in memory: nothing in the file
        reading.decline("a storage built by the pickle")
        return _OPAQUE
    if not isinstance(function, _Callable):
        raise _Decline("REDUCE on something that is not a function")  # torch refuses it
    if type(args) is list:  # torch calls function(*args) on any sequence
        reading.decline("call arguments in a list")
        args = tuple(args)
    if type(args) is not tuple:
        reading.decline("call arguments are not a tuple")
        return _OPAQUE
    if function is _ORDERED_DICT:
        if args == ():
            return OrderedDict()
        reading.decline("OrderedDict with arguments")
        return _OPAQUE
    if function is _REBUILD_TENSOR:
        if len(args) not in (6, 7) or not isinstance(args[0], StorageRef):
            reading.decline("unexpected tensor arguments")
            return _OPAQUE
        storage, offset, shape, stride = args[:4]
        if type(offset) is not int or not _int_tuple(shape) or not _int_tuple(stride):
            reading.decline("tensor offset, sizes or strides that are not integers")
            return _OPAQUE
        tensor = TensorRecord(storage, offset, shape, stride)
        reading.tensors.append(tensor)
        requires_grad = args[4]
        if type(requires_grad) is not bool or (requires_grad and not _floating(tensor.dtype)):
            reading.decline("requires_grad that torch may refuse")
        if not _empty_hooks(args[5]):
            reading.decline("tensor with backward hooks")
        if len(args) == 7 and not (args[6] is None or (type(args[6]) in (dict, OrderedDict) and not args[6])):
            reading.decline("tensor with metadata")  # e.g. conjugate or negative bits, subclasses
        return tensor
    if function is _REBUILD_PARAMETER:
        if len(args) != 3 or not isinstance(args[0], TensorRecord):
            reading.decline("unexpected parameter arguments")
            return _OPAQUE
        if type(args[1]) is not bool or (args[1] and not _floating(args[0].dtype)):
            reading.decline("requires_grad that torch may refuse")
        if not _empty_hooks(args[2]):
            reading.decline("parameter with backward hooks")
        return args[0]
    raise _Decline(f"unknown function {function.name}")


def _storage(pid: Any, reading: _Reading) -> Any:
    if not (type(pid) is tuple and len(pid) == 5 and pid[0] in ("storage", b"storage")):
        raise _Decline("unsupported persistent id")  # torch refuses it
    _, kind, key, _location, numel = pid
    if pid[0] != "storage" or type(key) is not str or type(numel) is not int:
        reading.decline("unusual storage reference")
    if type(numel) is bool:
        numel = int(numel)
    # torch reads the record f"data/{key}" whatever the key's type; a key it cannot format is left to it
    if not isinstance(kind, _StorageType) or type(numel) is not int or type(key) not in (str, int, bytes):
        reading.decline("unsupported storage reference")
        return _OPAQUE
    ref = StorageRef(f"{key}", kind.dtype, numel)
    known = reading.storages.setdefault(key, ref)
    if known != ref and (known, ref) not in reading.conflicts:
        reading.conflicts.append((known, ref))
    return ref


def _plain_key(key: Any) -> bool:
    if type(key) is tuple:
        return all(_plain_key(k) for k in key)
    return type(key) in (str, int, float, bool) or key is None


def _set_items(target: Any, items: list, reading: _Reading) -> None:
    if len(items) % 2:
        raise _Decline("odd number of items for a dict")
    if target is _OPAQUE:
        return
    if type(target) not in (dict, OrderedDict):
        raise _Decline("items set on something that is not a dict")
    for key, value in zip(items[::2], items[1::2]):
        if not _plain_key(key):
            reading.decline("unusual dict key")
            continue
        target[key] = value


def _append(target: Any, items: list) -> None:
    if target is _OPAQUE:
        return
    if type(target) is not list:
        raise _Decline("append to something that is not a list")
    target.extend(items)


_INT4, _UINT2, _UINT4, _FLOAT8 = struct.Struct("<i"), struct.Struct("<H"), struct.Struct("<I"), struct.Struct(">d")


def _interpret(data: bytes) -> _Reading:
    """Run the pickle's opcodes the way torch's weights-only unpickler does, on plain values.

    Only opcodes that unpickler accepts are followed (any other is declined: torch refuses it); each
    argument is decoded as that unpickler decodes it, and the stack, marks and memo behave as in it.
    A truncated argument is declined (``take``, or the IndexError and struct.error of a fixed-size
    read past the end: :func:`_read_pickle` declines those; torch then reports the damage).  Values built by globals the
    reader does not know stay opaque, and the reading is then declined, but its storages and tensors
    are still checked.  The opcodes are tested most frequent first (a state dict's pickle is mostly
    memo traffic, small ints, tuples and calls).
    """
    reading = _Reading()
    stack: list = []
    metastack: list[list] = []
    memo: dict[int, Any] = {}
    end = len(data)
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if n > end - pos:
            raise _Decline("truncated pickle")
        pos += n
        return data[pos - n : pos]

    def pop_mark() -> list:
        nonlocal stack
        items = stack
        stack = metastack.pop()
        return items

    def line() -> str:
        nonlocal pos
        stop = data.find(b"\n", pos)
        if stop < 0:
            raise _Decline("truncated pickle")
        text = data[pos:stop].decode("utf-8")  # as torch reads a GLOBAL's names
        pos = stop + 1
        return text

    while pos < end:
        op = data[pos]
        pos += 1
        if op == 0x72:  # LONG_BINPUT
            memo[_UINT4.unpack_from(data, pos)[0]] = stack[-1]
            pos += 4
        elif op == 0x68:  # BINGET
            stack.append(memo[data[pos]])
            pos += 1
        elif op == 0x4B:  # BININT1
            stack.append(data[pos])
            pos += 1
        elif op == 0x28:  # MARK
            metastack.append(stack)
            stack = []
        elif op == 0x74:  # TUPLE
            items = pop_mark()
            stack.append(tuple(items))
        elif op == 0x58:  # BINUNICODE
            size = _UINT4.unpack(take(4))[0]
            stack.append(str(take(size), "utf-8", "surrogatepass"))
        elif op == 0x52:  # REDUCE
            args = stack.pop()
            stack[-1] = _call(stack[-1], args, reading)
        elif op == 0x4D:  # BININT2
            stack.append(_UINT2.unpack_from(data, pos)[0])
            pos += 2
        elif op == 0x85:  # TUPLE1
            stack[-1] = (stack[-1],)
        elif op == 0x29:  # EMPTY_TUPLE
            stack.append(())
        elif op == 0x51:  # BINPERSID
            stack.append(_storage(stack.pop(), reading))
        elif op in (0x88, 0x89):  # NEWTRUE, NEWFALSE
            stack.append(op == 0x88)
        elif op == 0x86:  # TUPLE2
            stack[-2:] = [(stack[-2], stack[-1])]
        elif op == 0x4A:  # BININT
            stack.append(_INT4.unpack_from(data, pos)[0])
            pos += 4
        elif op == 0x71:  # BINPUT
            memo[data[pos]] = stack[-1]
            pos += 1
        elif op == 0x87:  # TUPLE3
            stack[-3:] = [(stack[-3], stack[-2], stack[-1])]
        elif op == 0x6A:  # LONG_BINGET
            stack.append(memo[_UINT4.unpack_from(data, pos)[0]])
            pos += 4
        elif op == 0x80:  # PROTO
            take(1)
        elif op == 0x8A:  # LONG1
            size = take(1)[0]
            stack.append(int.from_bytes(take(size), "little", signed=True))
        elif op == 0x47:  # BINFLOAT
            stack.append(_FLOAT8.unpack(take(8))[0])
        elif op == 0x55:  # SHORT_BINSTRING (torch decodes it as UTF-8)
            size = take(1)[0]
            stack.append(take(size).decode("utf-8"))
        elif op == 0x4E:  # NONE
            stack.append(None)
        elif op == 0x5D:  # EMPTY_LIST
            stack.append([])
        elif op == 0x7D:  # EMPTY_DICT
            stack.append({})
        elif op == 0x8F:  # EMPTY_SET
            reading.decline("a set")
            stack.append(_OPAQUE)
        elif op == 0x61:  # APPEND
            item = stack.pop()
            _append(stack[-1], [item])
        elif op == 0x65:  # APPENDS
            items = pop_mark()
            _append(stack[-1], items)
        elif op == 0x73:  # SETITEM
            value, key = stack.pop(), stack.pop()
            _set_items(stack[-1], [key, value], reading)
        elif op == 0x75:  # SETITEMS
            items = pop_mark()
            _set_items(stack[-1], items, reading)
        elif op == 0x63:  # GLOBAL
            module = line()
            stack.append(_global(module, line(), reading))
        elif op == 0x81:  # NEWOBJ
            stack.pop()
            stack[-1] = _OPAQUE
            reading.decline("NEWOBJ")
        elif op == 0x62:  # BUILD
            state = stack.pop()
            target = stack[-1]
            if isinstance(target, TensorRecord) and type(state) is tuple and len(state) >= 4 \
                    and isinstance(state[0], StorageRef) and type(state[1]) is int \
                    and _int_tuple(state[2]) and _int_tuple(state[3]):
                reading.tensors.append(TensorRecord(*state[:4]))  # torch sets the tensor anew: check it too
                reading.decline("BUILD on a tensor")
            elif not (type(target) is OrderedDict and type(state) is dict) and target is not _OPAQUE:
                reading.decline("BUILD on something other than a state dict")
            # an OrderedDict's attributes (torch's ``_metadata``) are not part of its items: ignored
        elif op == 0x2E:  # STOP
            if len(stack) != 1 or metastack:
                reading.decline("stack not empty at STOP")
            reading.obj = stack.pop()  # what torch returns
            return reading
        else:
            raise _Decline(f"opcode {op:#04x}")  # torch's weights-only unpickler refuses it
    raise _Decline("no STOP")
