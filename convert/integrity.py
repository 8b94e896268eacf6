"""Checking a source file while it is converted: sha256 of the file, CRC-32 of each zip record.

The check is one sequential read in a background thread (``hashlib`` and ``zlib`` release the GIL
on large buffers, so it runs beside the conversion on another core).  It reads through one reusable
buffer with ``readinto``, so it adds a few megabytes of memory whatever the file's size.  Only the
standard library is used: ``lic-convert`` starts the check before ``import torch``, so the check is
done by the time the conversion needs it.

Usage: ``scan = source_scan(path)`` starts (or picks up an already started) check; ``scan.result()``
waits for it and returns the file's sha256, or raises :class:`CheckpointError` for a damaged file.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import zipfile
import zlib
from pathlib import Path

from .errors import CheckpointError

CHUNK = 1 << 22
_LOCAL_HEADER = 30


class SourceScan:
    """sha256 of ``path`` and, for a zip, every record's CRC-32 against its directory, in one read."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._key = _identity(self.path)
        self._sha256: str | None = None
        self._error: CheckpointError | None = None
        self._thread = threading.Thread(target=self._run, name=f"scan {self.path.name}", daemon=True)
        self._thread.start()

    def result(self) -> str:
        """Wait for the scan; the file's sha256 (hex), or a :class:`CheckpointError` if it is damaged."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._sha256 is not None
        return self._sha256

    def done(self) -> bool:
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            self._sha256 = _scan(self.path)
        except CheckpointError as exc:
            self._error = exc
        except OSError as exc:
            self._error = CheckpointError(f"{self.path}: cannot read the file ({exc.strerror or exc})")
        except Exception as exc:  # BadZipFile, struct and zlib errors all mean a broken archive
            self._error = CheckpointError(f"{self.path}: broken zip archive ({exc}); download the file again")


_started: dict[tuple, SourceScan] = {}
_lock = threading.Lock()


def prefetch(path: str | os.PathLike) -> None:
    """Start checking ``path`` now, so a later :func:`source_scan` finds the work done or under way."""
    try:
        key = _identity(Path(path))
    except OSError:
        return  # the reader reports a missing or unreadable file in its own words
    with _lock:
        if key not in _started:
            _started[key] = SourceScan(path)


def source_scan(path: str | os.PathLike) -> SourceScan:
    """The scan of ``path``: one :func:`prefetch` started for this very file, or a new one."""
    key = _identity(Path(path))
    with _lock:
        scan = _started.pop(key, None)
    return scan if scan is not None else SourceScan(path)


def _identity(path: Path) -> tuple:
    """A prefetched scan is reused only for the same file, unchanged since (inode, size, mtime)."""
    st = path.stat()
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def is_zip(path: str | os.PathLike) -> bool:
    """Whether ``path`` ends like a zip archive; True also where Python's zipfile finds such an end and
    cannot follow it (a multi-disk record): the file is then a broken archive, not another format."""
    try:
        return zipfile.is_zipfile(path)
    except zipfile.BadZipFile:
        return True


def _scan(path: Path) -> str:
    ranges: list[tuple[int, int, zipfile.ZipInfo]] = []
    if is_zip(path):
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            if any(info.compress_type != zipfile.ZIP_STORED for info in infos):
                damaged = archive.testzip()  # not written by torch: let zipfile decompress and check
                if damaged is not None:
                    raise _damaged(path, damaged)
                infos = []
        try:
            ranges = record_ranges(path, infos)
        except OSError:  # a record shorter or longer than the directory says sends reads off the file
            raise CheckpointError(
                f"{path}: broken zip archive (its records do not match its directory); download the file again"
            ) from None
    digest = hashlib.sha256()
    crcs = [0] * len(ranges)
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    current, pos = 0, 0
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            block = view[:n]
            end = pos + n
            while current < len(ranges) and ranges[current][0] < end:
                start, stop, _ = ranges[current]
                lo, hi = max(start, pos), min(stop, end)
                if lo < hi:
                    crcs[current] = zlib.crc32(block[lo - pos: hi - pos], crcs[current])
                if stop > end:
                    break
                current += 1
            digest.update(block)
            pos = end
    for (_, _, info), crc in zip(ranges, crcs):
        if crc != info.CRC:
            raise _damaged(path, info.filename)
    return digest.hexdigest()


def _damaged(path: Path, record: str) -> CheckpointError:
    return CheckpointError(f"{path}: the zip record {record!r} is damaged (CRC check failed); download the file again")


def record_ranges(path: Path, infos) -> list[tuple[int, int, zipfile.ZipInfo]]:
    """Byte range of each stored member's data in the file (after its local header), in file order."""
    ranges = []
    with open(path, "rb", buffering=0) as fh:  # one small pread per header: no read-ahead buffer to fill
        fd, size = fh.fileno(), os.fstat(fh.fileno()).st_size
        for info in infos:
            head = os.pread(fd, _LOCAL_HEADER, info.header_offset)
            if len(head) < _LOCAL_HEADER or head[:4] != b"PK\x03\x04":
                raise CheckpointError(
                    f"{path}: broken zip archive (its records do not match its directory); download the file again"
                )
            name_len, extra_len = struct.unpack("<HH", head[26:30])
            start = info.header_offset + _LOCAL_HEADER + name_len + extra_len
            if start + info.compress_size > size:
                raise CheckpointError(f"{path}: the file is truncated (a zip record runs past its end); download it again")
            ranges.append((start, start + info.compress_size, info))
    ranges.sort(key=lambda r: r[0])
    return ranges
