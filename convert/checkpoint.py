"""Reading checkpoints safely: torch files (zip or legacy pickle) and safetensors.

Checkpoints are pickles, and a pickle can run code.  No pickle is ever run here unless the caller
passes ``trust_pickle=True`` (the CLI's ``--unsafe-trust-pickle``, which warns every time): a torch
file is read either as data by :mod:`.torch_zip` (which interprets a fixed subset of pickle opcodes
and never imports or calls anything) or with ``torch.load(weights_only=True)``, which refuses any
global outside torch's allow-list and is the authority on every refusal.

Two ways to read:

- eager (the default): a state dict of real tensors, memory-mapped from a torch zip or a safetensors
  file where the format allows, so nothing is copied until used (verification, ``--inverse``);
- ``lazy=True`` (conversion): each tensor's shape and dtype (a :class:`~.ops.Spec`) plus where its bytes
  lie in the file.  Nothing is read: a conversion copies the bytes of renamed tensors file to file and
  reads only the tensors a rule computes (:attr:`SourceCheckpoint.tensors`, as numpy arrays).  A torch
  zip's structure comes from :mod:`.torch_zip` (its pickle read as data, without torch); what that
  reader declines goes to ``torch.load(map_location="meta", weights_only=True)``, which records every
  storage's offset.  Legacy pickles, other byte orders and ``--unsafe-trust-pickle`` read eagerly.

Either way a background :class:`~.integrity.SourceScan` checks every zip record's CRC and hashes the file.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import struct
import sys
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from . import dtypes, torch_zip
from .errors import CheckpointError
from .integrity import SourceScan, is_zip, source_scan
from .ops import Spec
from .torch_zip import TensorRecord

#: container entries that hold the model's state dict, in the order they are looked for
STATE_DICT_ENTRIES = ("state_dict", "model", "net", "network", "model_state_dict")
SUFFIXES = (".pth.tar", ".pth", ".pt", ".tar", ".ckpt", ".bin", ".safetensors")


@dataclass(frozen=True)
class TensorLocation:
    """Where a tensor's elements lie in the source file: first element's byte offset, then strides."""

    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]  # in elements
    dtype: str

    @property
    def itemsize(self) -> int:
        return dtypes.get(self.dtype).itemsize

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def contiguous(self) -> bool:
        expected = 1
        for size, stride in reversed(list(zip(self.shape, self.stride))):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True

    def span(self) -> int:
        """Bytes from the first to one past the last element (strides may skip or overlap)."""
        if self.numel == 0:
            return 0
        last = sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        return (last + 1) * self.itemsize


@dataclass
class SourceCheckpoint:
    """A checkpoint's state dict, flattened and cleaned, plus what was around it."""

    path: Path
    state_dict: "OrderedDict[str, Any]"  # torch tensors; :class:`~.ops.Spec` records when ``lazy``
    file_format: str  # "torch-zip" | "torch-legacy" | "safetensors"
    container_entry: str | None  # e.g. "state_dict"; None for a bare state dict
    ignored_entries: list[str] = field(default_factory=list)
    stripped_prefix_keys: int = 0
    #: cleaned key -> the key as the file stores it, for every key reading changed (``module.`` removed)
    stored_as: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    #: the container's plain entries (numbers, strings, booleans) beside the state dict, and those of a
    #: top-level ``args`` / ``hparams`` / ``config`` dict, e.g. ``{"epoch": 120, "lmbda": 0.0483}``
    container_values: dict[str, Any] = field(default_factory=dict)
    size_bytes: int = 0
    locations: dict[str, TensorLocation] | None = None  # set when ``lazy``
    scan: SourceScan | None = None
    _file: Any = None

    @property
    def lazy(self) -> bool:
        return self.locations is not None

    def stored_key(self, key: str) -> str:
        """The key ``key`` of :attr:`state_dict` as the file spells it."""
        return self.stored_as.get(key, key)

    def stored_keys(self) -> list[str]:
        """Every key as the file spells it, in the file's order."""
        return [self.stored_as.get(key, key) for key in self.state_dict]

    @property
    def sha256(self) -> str:
        """The file's sha256 (waits for the background scan; raises if it found the file damaged)."""
        if self.scan is None:
            self.scan = SourceScan(self.path)
        return self.scan.result()

    @property
    def fileno(self) -> int:
        """A descriptor open on the source (lazy sources only), for copying and reading tensor bytes."""
        if self._file is None:
            raise ValueError("only a lazily read checkpoint keeps its file open")
        return self._file.fileno()

    @property
    def tensors(self) -> Mapping[str, Any]:
        """Key -> value: torch tensors, or for a lazy source numpy arrays read when asked (not cached)."""
        return _FileTensors(self) if self.lazy else self.state_dict

    def read_tensor(self, key: str) -> np.ndarray:
        """One tensor's values from the file (bfloat16 comes as its uint16 bits)."""
        where = self.locations[key]  # type: ignore[index]
        kind = np.dtype(dtypes.get(where.dtype).numpy)
        span = where.span()
        data = np.empty(span // kind.itemsize, dtype=kind)
        if span:
            got = os.preadv(self.fileno, [memoryview(data).cast("B")], where.offset)
            if got != span:
                raise CheckpointError(f"{self.path}: the file is truncated (tensor {key!r} runs past its end); download it again")
        if where.contiguous:
            return data.reshape(where.shape)
        strides = tuple(s * kind.itemsize for s in where.stride)
        return np.lib.stride_tricks.as_strided(data, where.shape, strides, writeable=False)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "SourceCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _FileTensors(Mapping):
    def __init__(self, source: SourceCheckpoint):
        self._source = source

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._source.state_dict:
            raise KeyError(key)
        return self._source.read_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._source.state_dict)

    def __len__(self) -> int:
        return len(self._source.state_dict)


def _check_path(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; give the checkpoint file inside it")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path}: permission denied; make the file readable")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty; download it again")


def _load_torch(path: Path, trust_pickle: bool, lazy: bool, scan: SourceScan) -> tuple[Any, str, bool]:
    """torch.load the file; returns (object, file format, whether its tensors are meta tensors)."""
    zipped = is_zip(path)
    if not zipped:
        with open(path, "rb") as fh:
            head = fh.read(4)
        if head[:2] == b"PK":
            raise CheckpointError(f"{path}: the zip archive is truncated or damaged; download the file again")
        if not head.startswith(b"\x80"):
            raise CheckpointError(
                f"{path}: not a PyTorch checkpoint (neither torch's zip format nor a pickle); check the file"
            )
    file_format = "torch-zip" if zipped else "torch-legacy"
    import torch  # only now: the checks above answer without it

    if trust_pickle:
        warnings.warn(
            f"loading {path} with full unpickling (--unsafe-trust-pickle): code inside the file can run",
            stacklevel=3,
        )
    try:
        mappable = zipped and _offsets_usable(path)  # torch cannot map compressed records
        meta = lazy and mappable and not trust_pickle
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's own chatter about pickle protocols is not for users
            if meta:  # records each storage's offset in the file and reads no tensor data
                obj = torch.load(path, map_location="meta", weights_only=True)
            else:
                obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=mappable)
            # mapped and meta reading take the pickle's storage sizes on trust: check them, or, where
            # the reader cannot follow the archive, read it again the way that checks every record
            if mappable and not torch_zip.check_records(path, obj if meta else None):
                del obj
                obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
                meta = False
        return obj, file_format, meta
    except CheckpointError:
        raise
    except Exception as exc:  # torch raises many types for bad input; translate them all
        raise _torch_refusal(path, exc, zipped, scan) from None


def _torch_refusal(path: Path, exc: Exception, zipped: bool, scan: SourceScan) -> CheckpointError:
    """torch's refusal of ``path`` in one line; a damaged record, found by the scan, explains a failed
    load better than torch's message does, so the scan's own refusal is raised first if it has one."""
    failure = _describe_load_failure(path, exc, zipped)
    scan.result()
    return CheckpointError(failure)


def _built_alike_on_cpu(path: Path, loaded, scan: SourceScan) -> bool:
    """Whether the CPU builds the tensors of ``loaded`` (a meta-device load of ``path``) the same way.

    The meta device builds some tensors otherwise (a negative stride the CPU refuses comes back as 1),
    so the file is read again mapped on the CPU, which reads no tensor data; a file the CPU refuses
    is refused here.
    """
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            on_cpu = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch's refusal, translated as any other
        raise _torch_refusal(path, exc, True, scan) from None
    return _same_layout(loaded, on_cpu)


def _same_layout(meta, cpu) -> bool:
    """Whether two loads of one file hold the same containers, and tensors of the same dtype, shape,
    strides and storage offset (what the meta device gives is compared with what the CPU gives)."""
    import torch

    if isinstance(meta, torch.Tensor) or isinstance(cpu, torch.Tensor):
        return (isinstance(meta, torch.Tensor) and isinstance(cpu, torch.Tensor) and meta.dtype == cpu.dtype
                and meta.shape == cpu.shape and meta.stride() == cpu.stride()
                and meta.storage_offset() == cpu.storage_offset())
    if isinstance(meta, dict):
        return (isinstance(cpu, dict) and list(meta) == list(cpu)
                and all(_same_layout(meta[k], cpu[k]) for k in meta))
    if isinstance(meta, (list, tuple)):
        return (isinstance(cpu, (list, tuple)) and len(meta) == len(cpu)
                and all(_same_layout(a, b) for a, b in zip(meta, cpu)))
    return True


def _offsets_usable(path: Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        return torch_zip.copyable_as_stored(archive)


def _torch_location(path: Path, key: str, value, size: int) -> TensorLocation | None:
    """A meta tensor's place in the file, from the offset torch.load recorded; None if it recorded none."""
    base = getattr(value.untyped_storage(), "_checkpoint_offset", None)
    if base is None or not dtypes.known(value.dtype):
        return None
    torch_zip.check_mapped_tensor(path, key, int(base), value.untyped_storage().nbytes(), value.storage_offset(),
                                  tuple(value.shape), tuple(value.stride()), value.element_size())
    where = TensorLocation(int(base) + value.storage_offset() * value.element_size(),
                           tuple(value.shape), tuple(value.stride()), dtypes.name(value.dtype))
    return _inside(path, key, where, size)


def _record_location(path: Path, key: str, value: TensorRecord, places: dict[str, tuple[int, int]],
                     size: int) -> TensorLocation:
    start, _ = places[value.storage.key]
    where = TensorLocation(start + value.offset * dtypes.get(value.dtype).itemsize, value.shape, value.stride, value.dtype)
    return _inside(path, key, where, size)


def _inside(path: Path, key: str, where: TensorLocation, size: int) -> TensorLocation:
    """``where``, if it ends within the ``size`` bytes of ``path``."""
    if where.offset + where.span() > size:
        raise CheckpointError(f"{path}: the file is truncated (tensor {key!r} runs past its end); download it again")
    return where


_SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "collections.Counter", "_codecs.encode",
                         "builtins.set", "builtins.frozenset", "builtins.bytearray", "numpy.")
#: how much of each pickle inside a zip is scanned for names (a hostile archive may hold a huge one)
_SCAN_BYTES = 1 << 20


def unsafe_globals(path: Path, limit: int = 5) -> list[str]:
    """Names of the non-torch globals a pickle would import (read from its opcodes, nothing is run)."""
    import pickletools

    streams = []
    if is_zip(path):
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError):
            return []  # an archive Python cannot open: no names to report from it
        with zf:
            for name in (n for n in zf.namelist() if n.endswith(".pkl")):
                try:
                    with zf.open(name) as member:
                        streams.append(io.BytesIO(member.read(_SCAN_BYTES)))
                except Exception:  # a damaged record (bad header, bad compressed data): no names from it
                    continue
    else:
        streams = [open(path, "rb")]
    found: list[str] = []
    for stream in streams:
        with stream:
            while len(found) < limit:
                strings: list[str] = []
                try:
                    for opcode, arg, _ in pickletools.genops(stream):
                        name = None
                        if opcode.name in ("GLOBAL", "INST"):
                            name = str(arg).replace(" ", ".")
                        elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                            name = f"{strings[-2]}.{strings[-1]}"
                        elif isinstance(arg, str):
                            strings.append(arg)
                        if name and not name.startswith(_SAFE_GLOBAL_PREFIXES) and name not in found:
                            found.append(name)
                except Exception:  # end of the stream, or bytes that are no pickle: stop scanning
                    break
    return found


def _describe_load_failure(path: Path, exc: Exception, is_zip: bool) -> str:
    text = str(exc)
    if "weights_only" in text or "Unsupported global" in text or "Unsupported operand" in text:
        names = unsafe_globals(path)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        culprit = f" ({', '.join(names)})" if names else f" ({found.group(1)})" if found else ""
        return (
            f"{path}: refused to unpickle an object outside torch's safe list{culprit}; the file may run code. "
            "If you trust its source, rerun with --unsafe-trust-pickle"
        )
    if isinstance(exc, (EOFError,)) or "EOF" in text or "truncated" in text.lower() or "failed finding central directory" in text:
        return f"{path}: the file is truncated; download it again"
    if "PytorchStreamReader" in text or "zip" in text.lower():
        return f"{path}: broken torch zip archive ({text.splitlines()[0][:120]}); download it again"
    if "invalid load key" in text or "magic number" in text.lower() or "UnpicklingError" in type(exc).__name__:
        return f"{path}: not a PyTorch checkpoint ({text.splitlines()[0][:120]})"
    first = text.splitlines()[0][:160] if text else type(exc).__name__
    return f"{path}: cannot read as a PyTorch checkpoint ({type(exc).__name__}: {first})"


def _load_safetensors(path: Path, lazy: bool) -> tuple[OrderedDict, dict[str, str], dict[str, TensorLocation] | None]:
    from safetensors import SafetensorError, safe_open

    try:
        tensors: OrderedDict[str, Any] = OrderedDict()
        # safe_open validates the header against the file; the numpy flavour does not import torch
        with safe_open(str(path), framework="numpy" if lazy else "pt") as fh:
            metadata = dict(fh.metadata() or {})
            keys = list(fh.keys())
            if not lazy:
                for key in keys:
                    tensors[key] = fh.get_tensor(key)
                return tensors, metadata, None
        locations = _safetensors_locations(path)
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file ({str(exc).splitlines()[0][:120]})") from None
    for key in keys:
        tensors[key] = Spec(locations[key].shape, locations[key].dtype)
    return tensors, metadata, locations


def _safetensors_locations(path: Path) -> dict[str, TensorLocation]:
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    start = 8 + length
    locations = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in dtypes.BY_SAFETENSORS:
            raise ValueError(f"tensor {key!r} has dtype {info['dtype']}, which lic-convert does not handle")
        shape = tuple(info["shape"])
        stride, step = [], 1
        for size in reversed(shape):
            stride.insert(0, step)
            step *= size
        dtype = dtypes.BY_SAFETENSORS[info["dtype"]].name
        locations[key] = TensorLocation(start + info["data_offsets"][0], shape, tuple(stride), dtype)
    return locations


class _FileMapping:
    """Torch tensors over one private, read-only-in-practice mapping of a torch zip (pages load on use)."""

    def __init__(self, path: Path, places: dict[str, tuple[int, int]]):
        import torch

        self._torch = torch
        self._places = places
        self._file = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size)
        self._storages: dict[str, Any] = {}

    def tensor(self, record: TensorRecord):
        key = record.storage.key
        if key not in self._storages:
            start, nbytes = self._places[key]
            self._storages[key] = self._file[start: start + nbytes]
        dtype = dtypes.to_torch(record.dtype)
        return self._torch.empty(0, dtype=dtype).set_(self._storages[key], record.offset, record.shape, record.stride)


def _is_tensor(value: Any) -> bool:
    if isinstance(value, TensorRecord):
        return True
    torch = sys.modules.get("torch")  # a torch tensor can only exist if torch was imported
    return torch is not None and isinstance(value, torch.Tensor)


def _find_state_dict(obj: Any, path: Path) -> tuple[Any, str | None, list[str]]:
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a state dict or a checkpoint dict; save model.state_dict()"
        )
    for entry in STATE_DICT_ENTRIES:
        if entry in obj and isinstance(obj[entry], dict):
            return obj[entry], entry, [k for k in obj if k != entry]
    if obj and all(_is_tensor(v) for v in obj.values()):
        return obj, None, []
    tensors = [k for k, v in obj.items() if _is_tensor(v)]
    if tensors and len(tensors) >= len(obj) / 2:
        bad = next(k for k, v in obj.items() if not _is_tensor(v))
        raise CheckpointError(f"{path}: state dict entry {bad!r} is a {type(obj[bad]).__name__}, not a tensor")
    raise CheckpointError(
        f"{path}: no state dict found (top-level keys: {', '.join(map(str, list(obj)[:8]))}); "
        f"expected one of {', '.join(STATE_DICT_ENTRIES)} or a bare state dict"
    )


#: top-level container entries whose plain entries are read too (training scripts save their options there)
_OPTION_ENTRIES = ("args", "hparams", "config")
#: at most this many container values are kept, with names and strings of at most 200 characters
#: (a report quotes them; a hostile container cannot make it large)
_MAX_VALUES, _MAX_TEXT = 64, 200


def _plain_values(obj: Any, entry: str | None) -> dict[str, Any]:
    """The container's scalar entries, and those of its options dict (see ``container_values``)."""
    if entry is None or not isinstance(obj, dict):
        return {}

    def plain(key: Any, value: Any) -> bool:
        return isinstance(key, str) and len(key) <= _MAX_TEXT and (
            type(value) in (int, float, bool) or (type(value) is str and len(value) <= _MAX_TEXT))

    out = {k: v for k, v in obj.items() if k != entry and plain(k, v)}
    for name in _OPTION_ENTRIES:
        options = obj.get(name)
        if isinstance(options, dict):
            out.update({f"{name}.{k}": v for k, v in options.items() if plain(k, v)})
    return dict(list(out.items())[:_MAX_VALUES])


def read_checkpoint(
    path: str | os.PathLike, *, trust_pickle: bool = False, lazy: bool = False, check_now: bool = True
) -> SourceCheckpoint:
    """Read a checkpoint file into a flat, cleaned state dict.

    ``module.`` is removed from every key the way the upstream eval scripts do it
    (``key.replace("module.", "")``); :attr:`SourceCheckpoint.stored_as` keeps each changed key's
    original spelling.  Non-tensor values inside the state dict are refused.

    Eager reading waits for the file's integrity scan (unless ``check_now=False``: then reading
    ``source.sha256`` waits, and raises if the file is damaged).  With ``lazy=True`` the state dict holds
    :class:`~.ops.Spec` records (see the module's doc) and the scan goes on in the background:
    ``source.sha256`` waits for it and raises if the file is damaged, so read it before trusting
    anything copied from the file.
    """
    path = Path(path)
    _check_path(path)
    metadata: dict[str, str] = {}
    container_values: dict[str, Any] = {}
    locate = None  # (key, value) -> TensorLocation | None, for lazy reading
    on_meta_device = None  # what torch.load(map_location="meta") gave, where the reader declined the file
    try:
        scan = source_scan(path)
        structure = None
        if path.name.endswith(".safetensors"):
            state_dict, metadata, locations = _load_safetensors(path, lazy)
            entry, ignored, file_format = None, [], "safetensors"
            if locations is not None:
                locate = lambda key, original, value: locations[original]  # noqa: E731
        else:
            if not trust_pickle and is_zip(path):
                structure = torch_zip.read_structure(path)
            if structure is not None:
                obj, places = structure
                file_format = "torch-zip"
                if lazy:
                    size = path.stat().st_size
                    locate = lambda key, original, value: _record_location(path, key, value, places, size)  # noqa: E731
                else:  # tensors on a private mapping of the file, as torch.load(mmap=True) makes them
                    mapped = _FileMapping(path, places)
            else:
                obj, file_format, on_meta = _load_torch(path, trust_pickle, lazy, scan)
                if on_meta:
                    on_meta_device = obj
                    size = path.stat().st_size
                    locate = lambda key, original, value: _torch_location(path, key, value, size)  # noqa: E731
            state_dict, entry, ignored = _find_state_dict(obj, path)
            container_values = _plain_values(obj, entry)
        if locate is None and check_now:
            scan.result()
    except OSError as exc:  # permission checks can pass and reads still fail (ACLs, I/O errors)
        raise CheckpointError(f"{path}: cannot read the file ({exc.strerror or exc})") from None

    cleaned: OrderedDict[str, Any] = OrderedDict()
    where: dict[str, TensorLocation] = {}
    stored_as: dict[str, str] = {}
    stripped = 0
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: state dict key {key!r} is not a string")
        if not (_is_tensor(value) or isinstance(value, Spec)):
            raise CheckpointError(
                f"{path}: state dict entry {key!r} is a {type(value).__name__}, not a tensor; the file is not a plain state dict"
            )
        original = key
        if "module." in key:
            key = key.replace("module.", "")
            stored_as[key] = original
            stripped += 1
        if key in cleaned:
            raise CheckpointError(f"{path}: key {key!r} appears twice once 'module.' prefixes are removed")
        if isinstance(value, TensorRecord) and locate is None:
            value = mapped.tensor(value)
        if locate is not None:
            found = locate(key, original, value)
            if found is None:  # this torch did not record offsets: read the ordinary way
                return read_checkpoint(path, trust_pickle=trust_pickle)
            where[key] = found
            value = Spec(found.shape, found.dtype)
        cleaned[key] = value
    if not cleaned:
        raise CheckpointError(f"{path}: the state dict is empty")
    # every tensor passed its own checks against the records; the meta device must also have built
    # them as the CPU does, or the file is read the ordinary way
    if on_meta_device is not None and not _built_alike_on_cpu(path, on_meta_device, scan):
        return read_checkpoint(path, trust_pickle=trust_pickle)
    try:
        source_file = open(path, "rb", buffering=0) if locate is not None else None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    return SourceCheckpoint(
        path=path,
        state_dict=cleaned,
        file_format=file_format,
        container_entry=entry,
        ignored_entries=[str(k) for k in ignored],
        stripped_prefix_keys=stripped,
        stored_as=stored_as,
        metadata=metadata,
        container_values=container_values,
        size_bytes=path.stat().st_size,
        locations=where if locate is not None else None,
        scan=scan,
        _file=source_file,
    )
