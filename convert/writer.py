"""Writing converted tensors: a streaming safetensors writer and atomic file replacement.

The writer lays out the safetensors header from the plan's shapes and dtypes, then writes each tensor's
bytes straight from its (possibly memory-mapped) source, one tensor at a time: memory stays at one
tensor beyond what the source mapping already pages in.  Everything goes to a temporary file in the
destination folder that replaces the final name only once complete and flushed to disk, so an
interrupted run leaves either the previous file or none, never a partial one.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from .errors import OutputError

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success it is fsynced and renamed over ``final``.

    On any failure the temporary file is removed and ``final`` is left as it was; an ``OSError``
    (disk full, file too large, folder not writable) becomes an :class:`OutputError` in one line.
    """
    final = Path(final)
    tmp_path: Path | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        tmp_path = Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.close(fd)
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, final)
        tmp_path = None
        with contextlib.suppress(OSError):
            dir_fd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except OSError as exc:
        raise OutputError(
            f"{final}: writing failed ({exc.strerror or exc}); nothing partial was left behind"
        ) from None
    finally:
        if tmp_path is not None:
            with contextlib.suppress(OSError):
                tmp_path.unlink()


@contextlib.contextmanager
def output_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on an output folder while its files are written.

    Two conversions into one folder then run one after the other, so ``model.safetensors`` and
    ``config.json`` always come from the same run (the last one to take the lock).  The lock is
    ``flock`` on the folder itself: nothing is left behind, and the kernel drops it when a process
    dies, so a killed run never blocks the next.  Where folders cannot be locked (some network file
    systems) the files are still each replaced atomically.
    """
    import fcntl

    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot open the output folder ({exc.strerror})") from None
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def _raw_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_safetensors(
    path: Path,
    entries: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str],
    *,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Stream tensors into ``path`` (atomically); ``produce(key)`` is called once per key, in order.

    Returns the number of bytes written.
    """
    entries = list(entries)
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for key, shape, dtype in entries:
        if dtype not in SAFETENSORS_DTYPES:
            raise OutputError(f"{key}: dtype {dtype} cannot be stored in safetensors")
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(blob)))
            fh.write(blob)
            for key, shape, dtype in entries:
                value = produce(key)
                if tuple(value.shape) != tuple(shape) or value.dtype != dtype:
                    raise OutputError(f"{key}: produced {list(value.shape)} {value.dtype}, planned {list(shape)} {dtype}")
                fh.write(_raw_bytes(value))
                if progress is not None:
                    progress(value.numel() * value.element_size())
            fh.flush()
    return 8 + len(blob) + offset


def write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_torch(path: Path, obj) -> None:
    """``torch.save`` atomically; tensors viewing a shared (e.g. memory-mapped) buffer are copied first."""

    def own(value):
        if isinstance(value, torch.Tensor):
            return value.clone()
        if isinstance(value, dict):
            return type(value)((k, own(v)) for k, v in value.items())
        return value

    with atomic_path(path) as tmp:
        try:
            torch.save(own(obj), tmp)
        except RuntimeError as exc:  # torch's zip writer reports a failed write this way, without errno
            if "unexpected pos" not in str(exc) and "write" not in str(exc).lower():
                raise
            detail = str(exc).splitlines()[0].rsplit("] . ", 1)[-1][:80]
            raise OSError(f"torch's writer stopped early: {detail}; is the disk full?") from None
