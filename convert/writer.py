"""Writing converted tensors: a streaming safetensors writer and atomic file replacement.

The writer lays out the safetensors header from the plan's shapes and dtypes, then writes the tensors
one at a time.  A tensor is either a value in memory (computed by a rule) or a :class:`FileRange`: bytes
to copy unchanged from the source file, which the kernel copies file to file (``copy_file_range``)
without them ever entering this process.  Everything goes to a temporary file in the destination
folder that replaces the final name only once complete and flushed to disk, so an interrupted run
leaves either the previous file or none, never a partial one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from . import dtypes
from .errors import OutputError
from .readback import ReadBack, checked_ranges, read_into


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


@dataclass(frozen=True)
class FileRange:
    """``nbytes`` bytes at ``offset`` in the open file ``fd``: a tensor to copy as it is."""

    fd: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class FileRuns:
    """A tensor whose bytes lie in the open file ``fd`` in several runs ``(offset, nbytes)``, in order."""

    fd: int
    runs: tuple[tuple[int, int], ...]

    @property
    def nbytes(self) -> int:
        return sum(length for _, length in self.runs)


def _raw_bytes(t) -> memoryview:
    if isinstance(t, np.ndarray):
        return memoryview(np.ascontiguousarray(t).reshape(-1).view(np.uint8))
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


#: errors after which copy_file_range is given up for plain reads and writes (old kernels, some file systems)
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.EPERM}


def _sync_file_range():
    """libc's ``sync_file_range`` (Linux), or None: starts writing a file range to disk without waiting."""
    try:
        import ctypes

        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE_WRITE = 2
#: how much is written before the disk is asked to start on it
WRITEBACK_STEP = 64 << 20
#: the writer's copy buffer, for copies the kernel cannot do and for gathered runs
_BUFFER_BYTES = 1 << 22
#: at most this many parts per ``writev`` (Linux's IOV_MAX)
_MAX_IOV = 1024


class _Output:
    """The open temporary file: writes from memory, copies from files, and a header written twice.

    Every :data:`WRITEBACK_STEP` bytes the kernel is asked to start writing what came before to disk
    (``sync_file_range``, without waiting), so the final ``fsync`` finds little left to do: the disk
    works while the conversion goes on instead of after it.
    """

    def __init__(self, fd: int):
        self.fd = fd
        self.kernel_copy = hasattr(os, "copy_file_range")
        self._buffer: bytearray | None = None
        self._written = 0
        self._flushed = 0
        self._writeback = _sync_file_range()

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
            self._advance(n)

    def _advance(self, n: int) -> None:
        self._written += n
        if self._writeback is not None and self._written - self._flushed >= WRITEBACK_STEP:
            if self._writeback(self.fd, self._flushed, self._written - self._flushed, _SYNC_FILE_RANGE_WRITE) != 0:
                self._writeback = None  # not supported here: the final fsync does it all
            self._flushed = self._written

    def copy_runs(self, source: FileRuns) -> None:
        """Copy runs of ``source``'s bytes in order, gathering nearby runs: the source span of a group
        is read into the buffer at once and its runs written out with one ``writev``."""
        runs, i = source.runs, 0
        while i < len(runs):
            low, high = runs[i][0], runs[i][0] + runs[i][1]
            if high - low > _BUFFER_BYTES:
                self.copy(FileRange(source.fd, *runs[i]))  # a long run goes on its own
                i += 1
                continue
            j = i + 1
            while j < len(runs) and j - i < _MAX_IOV:
                lo, hi = min(low, runs[j][0]), max(high, runs[j][0] + runs[j][1])
                if hi - lo > _BUFFER_BYTES:
                    break
                low, high, j = lo, hi, j + 1
            span = self._buffer_view(high - low)
            if read_into(source.fd, span, low) != len(span):
                raise OSError(errno.EIO, "the source file ended early (was it truncated while converting?)")
            self.write_parts([span[offset - low: offset - low + length] for offset, length in runs[i:j]])
            i = j

    def write_parts(self, parts: list[memoryview]) -> None:
        first = 0
        while first < len(parts):
            n = os.writev(self.fd, parts[first:] if first else parts)
            self._advance(n)
            while first < len(parts) and n >= len(parts[first]):
                n -= len(parts[first])
                first += 1
            if n:
                parts[first] = parts[first][n:]

    def _buffer_view(self, nbytes: int) -> memoryview:
        if self._buffer is None:
            self._buffer = bytearray(_BUFFER_BYTES)
        return memoryview(self._buffer)[:nbytes]

    def copy(self, source: FileRange) -> None:
        done = 0
        while self.kernel_copy and done < source.nbytes:
            try:
                n = os.copy_file_range(source.fd, self.fd, source.nbytes - done, source.offset + done)
            except OSError as exc:
                if exc.errno not in _NO_KERNEL_COPY or done:
                    raise
                self.kernel_copy = False
                break
            if n == 0:
                raise OSError(errno.EIO, "the source file ended early (was it truncated while converting?)")
            done += n
            self._advance(n)
        while done < source.nbytes:
            want = min(_BUFFER_BYTES, source.nbytes - done)
            got = os.preadv(source.fd, [self._buffer_view(want)], source.offset + done)
            if got == 0:
                raise OSError(errno.EIO, "the source file ended early (was it truncated while converting?)")
            self.write(memoryview(self._buffer)[:got])
            done += got


def _nbytes(shape, dtype) -> int:
    return math.prod(int(s) for s in shape) * dtypes.get(dtype).itemsize


def _header(entries: list[tuple[str, tuple[int, ...], Any]], metadata: dict[str, str]) -> tuple[bytes, int]:
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for key, shape, dtype in entries:
        if not dtypes.known(dtype):
            raise OutputError(f"{key}: dtype {dtypes.name(dtype)} cannot be stored in safetensors")
        nbytes = _nbytes(shape, dtype)
        header[key] = {"dtype": dtypes.get(dtype).safetensors, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    return json.dumps(header, separators=(",", ":")).encode("utf-8"), offset


def _holds(value, shape, dtype) -> bool:
    """Whether a produced value has the planned shape and dtype (numpy holds bfloat16 as uint16 bits)."""
    if tuple(value.shape) != tuple(shape):
        return False
    if isinstance(value, np.ndarray):
        return value.dtype == np.dtype(dtypes.get(dtype).numpy)
    return dtypes.name(value.dtype) == dtypes.name(dtype)


def write_safetensors(
    path: Path,
    entries: Iterable[tuple[str, tuple[int, ...], Any]],
    produce: Callable[[str], Any],
    metadata: dict[str, str],
    *,
    progress: Callable[[int], None] | None = None,
    final_metadata: Callable[[tuple[str, ...]], dict[str, str]] | None = None,
) -> Written:
    """Stream tensors into ``path`` (atomically); ``produce(key)`` is called once per key, in order.

    A background thread reads back what is written, hashing it (the file's seal) and checking every
    floating tensor for NaN and Inf (see :mod:`.readback`).  ``final_metadata``, if given, is called
    once every tensor is written and read back, with the keys holding NaN or Inf, before the file
    takes its final name; its metadata replaces ``metadata`` in the header (room for values up to
    :data:`HEADER_SLACK` bytes longer is reserved).  It may raise to abandon the file.
    """
    entries = list(entries)
    blob, data_bytes = _header(entries, metadata)
    reserved = len(blob) + (HEADER_SLACK if final_metadata is not None else 0)
    reserved += -reserved % 8
    ranges = checked_ranges((key, _nbytes(shape, dtype), dtype) for key, shape, dtype in entries)
    reader: ReadBack | None = None
    try:
        with atomic_path(path) as tmp:
            fd = os.open(tmp, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))  # no O_TRUNC: ext4 flushes truncated files on close
            try:
                out = _Output(fd)
                out.write(struct.pack("<Q", reserved) + blob.ljust(reserved))
                reader = ReadBack(tmp, 8 + reserved, ranges)
                done = told = 0
                for key, shape, dtype in entries:
                    value = produce(key)
                    if isinstance(value, FileRange):
                        nbytes = value.nbytes
                        out.copy(value)
                    elif isinstance(value, FileRuns):
                        nbytes = value.nbytes
                        out.copy_runs(value)
                    else:
                        if not _holds(value, shape, dtype):
                            raise OutputError(f"{key}: produced {list(value.shape)} {value.dtype}, planned {list(shape)} {dtype}")
                        data = _raw_bytes(value)
                        nbytes = data.nbytes
                        out.write(data)
                    done += nbytes
                    if done - told >= HASH_STEP:  # wake the reading thread per few MB, not per tensor
                        reader.written(told := done)
                    if progress is not None:
                        progress(nbytes)
                reader.finish(done)
                if final_metadata is not None:
                    # the header names the tensors holding NaN or Inf, so it waits for the read-back;
                    # most of the data is on its way to disk by now (see _Output), so the flush is short
                    final, _ = _header(entries, final_metadata(reader.result().non_finite))
                    if len(final) > reserved:
                        raise OutputError(f"{path}: the final metadata is {len(final) - len(blob)} bytes longer than planned")
                    os.pwrite(fd, final.ljust(reserved), 8)
            finally:
                os.close(fd)
        read = reader.result()
    except BaseException:
        if reader is not None:
            reader.cancel()
        raise
    return Written(8 + reserved + data_bytes, read.tensor_data_sha256, read.non_finite)


@dataclass(frozen=True)
class Written:
    """What :func:`write_safetensors` wrote: its size, the sha256 of its tensor data, the keys holding NaN or Inf."""

    nbytes: int
    tensor_data_sha256: str
    non_finite: tuple[str, ...] = ()


#: how much is written before the reading thread is told (it follows the writer by up to this much)
HASH_STEP = 8 << 20
#: extra header room kept for metadata known only at the end (a safetensors header may end in spaces)
HEADER_SLACK = 64


def write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_torch(path: Path, obj) -> None:
    """``torch.save`` atomically; tensors viewing a shared (e.g. memory-mapped) buffer are copied first."""
    import torch

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
