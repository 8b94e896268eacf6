"""Reading checkpoints safely: torch files (zip or legacy pickle) and safetensors.

Checkpoints are pickles, and a pickle can run code.  Every torch file is read with
``torch.load(weights_only=True)`` (memory-mapped when the zip format allows), which refuses any
global outside torch's allow-list.  Full unpickling happens only when the caller passes
``trust_pickle=True`` (the CLI's ``--unsafe-trust-pickle``), and it warns every time.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import struct
import warnings
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

#: container entries that hold the model's state dict, in the order they are looked for
STATE_DICT_ENTRIES = ("state_dict", "model", "net", "network", "model_state_dict")
SUFFIXES = (".pth.tar", ".pth", ".pt", ".tar", ".ckpt", ".bin", ".safetensors")


@dataclass
class SourceCheckpoint:
    """A checkpoint's state dict, flattened and cleaned, plus what was around it."""

    path: Path
    state_dict: "OrderedDict[str, torch.Tensor]"
    file_format: str  # "torch-zip" | "torch-legacy" | "safetensors"
    container_entry: str | None  # e.g. "state_dict"; None for a bare state dict
    ignored_entries: list[str] = field(default_factory=list)
    stripped_prefix_keys: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    size_bytes: int = 0
    _sha256: str | None = None

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _check_path(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; give the checkpoint file inside it")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path}: permission denied; make the file readable")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty; download it again")


def _load_torch(path: Path, trust_pickle: bool) -> tuple[Any, str, str | None]:
    is_zip = zipfile.is_zipfile(path)
    if not is_zip:
        with open(path, "rb") as fh:
            head = fh.read(4)
        if head[:2] == b"PK":
            raise CheckpointError(f"{path}: the zip archive is truncated or damaged; download the file again")
        if not head.startswith(b"\x80"):
            raise CheckpointError(
                f"{path}: not a PyTorch checkpoint (neither torch's zip format nor a pickle); check the file"
            )
    file_format = "torch-zip" if is_zip else "torch-legacy"
    if trust_pickle:
        warnings.warn(
            f"loading {path} with full unpickling (--unsafe-trust-pickle): code inside the file can run",
            stacklevel=3,
        )
    try:
        sha256 = _verify_zip_members(path) if is_zip else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's own chatter about pickle protocols is not for users
            obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=is_zip)
        return obj, file_format, sha256
    except CheckpointError:
        raise
    except Exception as exc:  # torch raises many types for bad input; translate them all
        raise CheckpointError(_describe_load_failure(path, exc, is_zip)) from None


def _verify_zip_members(path: Path) -> str:
    """Check every member of a torch zip against its CRC; return the file's sha256 from the same pass.

    torch maps tensor records straight from the file and never checks their CRC, so a flipped or
    cut record would otherwise load as silently wrong weights.  torch stores its records
    uncompressed, so one sequential read feeds both the per-record CRC32 and the whole-file sha256.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            if any(info.compress_type != zipfile.ZIP_STORED for info in infos):
                damaged = archive.testzip()  # not written by torch: let zipfile decompress and check
                if damaged is not None:
                    raise CheckpointError(
                        f"{path}: the zip record {damaged!r} is damaged (CRC check failed); download the file again"
                    )
                return file_sha256(path)
        ranges = _record_ranges(path, infos)
    except CheckpointError:
        raise
    except OSError:  # a record shorter or longer than the directory says sends reads off the file
        raise CheckpointError(
            f"{path}: broken zip archive (its records do not match its directory); download the file again"
        ) from None
    except Exception as exc:  # BadZipFile, EOFError, zlib and struct errors all mean the same here
        raise CheckpointError(f"{path}: broken zip archive ({exc}); download the file again") from None
    digest = hashlib.sha256()
    crcs = [0] * len(ranges)
    current, pos = 0, 0
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            view = memoryview(block)
            end = pos + len(block)
            while current < len(ranges) and ranges[current][0] < end:
                start, stop, _ = ranges[current]
                lo, hi = max(start, pos), min(stop, end)
                if lo < hi:
                    crcs[current] = zlib.crc32(view[lo - pos: hi - pos], crcs[current])
                if stop > end:
                    break
                current += 1
            digest.update(view)
            pos = end
    for (_, _, info), crc in zip(ranges, crcs):
        if crc != info.CRC:
            raise CheckpointError(
                f"{path}: the zip record {info.filename!r} is damaged (CRC check failed); download the file again"
            )
    return digest.hexdigest()


_CHUNK = 1 << 22


def _record_ranges(path: Path, infos) -> list[tuple[int, int, zipfile.ZipInfo]]:
    """Byte range of each member's data in the file (after its local header), in file order."""
    size = path.stat().st_size
    ranges = []
    with open(path, "rb") as fh:
        for info in infos:
            fh.seek(info.header_offset)
            head = fh.read(30)
            if len(head) < 30 or head[:4] != b"PK\x03\x04":
                raise OSError("local header missing")
            name_len, extra_len = struct.unpack("<HH", head[26:30])
            start = info.header_offset + 30 + name_len + extra_len
            if start + info.compress_size > size:
                raise OSError("record runs past the end of the file")
            ranges.append((start, start + info.compress_size, info))
    ranges.sort(key=lambda r: r[0])
    return ranges


_SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "collections.Counter", "_codecs.encode",
                         "builtins.set", "builtins.frozenset", "builtins.bytearray", "numpy.")
#: how much of each pickle inside a zip is scanned for names (a hostile archive may hold a huge one)
_SCAN_BYTES = 1 << 20


def unsafe_globals(path: Path, limit: int = 5) -> list[str]:
    """Names of the non-torch globals a pickle would import (read from its opcodes, nothing is run)."""
    import pickletools

    streams = []
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for name in (n for n in zf.namelist() if n.endswith(".pkl")):
                with zf.open(name) as member:
                    streams.append(io.BytesIO(member.read(_SCAN_BYTES)))
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


def _load_safetensors(path: Path) -> tuple[OrderedDict, dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        tensors: OrderedDict[str, torch.Tensor] = OrderedDict()
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
        return tensors, metadata
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file ({str(exc).splitlines()[0][:120]})") from None


def _find_state_dict(obj: Any, path: Path) -> tuple[Any, str | None, list[str]]:
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a state dict or a checkpoint dict; save model.state_dict()"
        )
    for entry in STATE_DICT_ENTRIES:
        if entry in obj and isinstance(obj[entry], dict):
            return obj[entry], entry, [k for k in obj if k != entry]
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None, []
    tensors = [k for k, v in obj.items() if isinstance(v, torch.Tensor)]
    if tensors and len(tensors) >= len(obj) / 2:
        bad = next(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
        raise CheckpointError(f"{path}: state dict entry {bad!r} is a {type(obj[bad]).__name__}, not a tensor")
    raise CheckpointError(
        f"{path}: no state dict found (top-level keys: {', '.join(map(str, list(obj)[:8]))}); "
        f"expected one of {', '.join(STATE_DICT_ENTRIES)} or a bare state dict"
    )


def read_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False) -> SourceCheckpoint:
    """Read a checkpoint file into a flat, cleaned state dict.

    ``module.`` is removed from every key the way the upstream eval scripts do it
    (``key.replace("module.", "")``).  Non-tensor values inside the state dict are refused.
    """
    path = Path(path)
    _check_path(path)
    metadata: dict[str, str] = {}
    sha256 = None  # known after reading a torch zip (computed in the same pass as its CRC checks)
    try:
        if path.name.endswith(".safetensors"):
            state_dict, metadata = _load_safetensors(path)
            entry, ignored, file_format = None, [], "safetensors"
        else:
            obj, file_format, sha256 = _load_torch(path, trust_pickle)
            state_dict, entry, ignored = _find_state_dict(obj, path)
    except OSError as exc:  # permission checks can pass and reads still fail (ACLs, I/O errors)
        raise CheckpointError(f"{path}: cannot read the file ({exc.strerror or exc})") from None

    cleaned: OrderedDict[str, torch.Tensor] = OrderedDict()
    stripped = 0
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: state dict key {key!r} is not a string")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: state dict entry {key!r} is a {type(value).__name__}, not a tensor; the file is not a plain state dict"
            )
        if "module." in key:
            key = key.replace("module.", "")
            stripped += 1
        if key in cleaned:
            raise CheckpointError(f"{path}: key {key!r} appears twice once 'module.' prefixes are removed")
        cleaned[key] = value
    if not cleaned:
        raise CheckpointError(f"{path}: the state dict is empty")
    return SourceCheckpoint(
        path=path,
        state_dict=cleaned,
        file_format=file_format,
        container_entry=entry,
        ignored_entries=[str(k) for k in ignored],
        stripped_prefix_keys=stripped,
        metadata=metadata,
        size_bytes=path.stat().st_size,
        _sha256=sha256,
    )
