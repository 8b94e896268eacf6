"""The writer's read-back pass: the seal of the tensor data and its NaN/Inf check, in one read.

While :func:`.writer.write_safetensors` streams tensors into the output, a background thread reads
back what is already in the file (it is still in the page cache), feeds it to sha256 (the seal, see
:mod:`.seal`) and checks every floating tensor it passes for NaN and Inf.  One read of the written
bytes serves both, and the check covers exactly the bytes the file holds, whether the writer copied
them from the source file or computed them.

Reads end on element boundaries of the tensor they stop in, so a value is never split between two
checks.  Everything is handed over by :meth:`ReadBack.result`; an error in the thread is raised there.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass

from . import dtypes
from .finite import bytes_finite, checked_dtype

__all__ = ["CheckedRange", "ReadBack", "ReadBackResult"]

#: read buffer of the thread: 1 MiB keeps its memory small and hashlib at full speed
CHUNK = 1 << 20


@dataclass(frozen=True)
class CheckedRange:
    """One floating tensor's bytes, counted from the start of the tensor data."""

    key: str
    offset: int
    nbytes: int
    itemsize: int
    dtype: str


@dataclass(frozen=True)
class ReadBackResult:
    tensor_data_sha256: str
    non_finite: tuple[str, ...]  # keys of the checked tensors holding NaN or Inf, in file order


def checked_ranges(entries) -> list[CheckedRange]:
    """The ranges to check for ``(key, nbytes, dtype)`` entries laid out one after another."""
    ranges, offset = [], 0
    for key, nbytes, dtype in entries:
        if nbytes and checked_dtype(dtype):
            ranges.append(CheckedRange(key, offset, nbytes, dtypes.get(dtype).itemsize, dtypes.name(dtype)))
        offset += nbytes
    return ranges


class ReadBack:
    """Hash and check bytes ``[start, start + total)`` of a file being written, as they appear.

    The writer calls :meth:`written` with how many data bytes are in the file so far (always at a
    tensor's end), and :meth:`finish` with the total once it is done; :meth:`result` waits.
    """

    def __init__(self, path: str | os.PathLike, start: int, ranges: list[CheckedRange]):
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._start = start
        self._ranges = ranges
        self._available = 0
        self._total: int | None = None
        self._error: BaseException | None = None
        self._result: ReadBackResult | None = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="seal", daemon=True)
        self._thread.start()

    def written(self, nbytes: int) -> None:
        with self._changed:
            self._available = nbytes
            self._changed.notify()

    def finish(self, total: int) -> None:
        with self._changed:
            self._available = self._total = total
            self._changed.notify()

    def cancel(self) -> None:
        """Stop reading (the file is being abandoned)."""
        self.finish(-1)
        self._thread.join()

    def result(self) -> ReadBackResult:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def _run(self) -> None:
        digest = hashlib.sha256()
        bad: list[str] = []
        buffer = memoryview(bytearray(CHUNK))
        ranges, current = self._ranges, 0  # ranges[current] is the first one not yet fully checked
        done = 0
        try:
            while True:
                with self._changed:
                    while self._available <= done and self._total is None:
                        self._changed.wait()
                    available, total = self._available, self._total
                if total == -1:
                    return
                while done < available:
                    end = min(done + CHUNK, available)
                    inside = current  # the range ``end`` may fall in: the first one ending after it
                    while inside < len(ranges) and ranges[inside].offset + ranges[inside].nbytes <= end:
                        inside += 1
                    if inside < len(ranges):
                        end = _element_boundary(ranges[inside], end)
                    assert end > done, "the writer reports progress at tensor ends only"
                    block = buffer[: end - done]
                    if read_into(self._fd, block, self._start + done) != len(block):
                        raise OSError(f"the output ended before data byte {end} of {available}")
                    digest.update(block)
                    while current < len(ranges) and ranges[current].offset < end:
                        item = ranges[current]
                        lo, hi = max(item.offset, done), min(item.offset + item.nbytes, end)
                        if item.key not in bad and not bytes_finite(block[lo - done: hi - done], item.dtype):
                            bad.append(item.key)
                        if item.offset + item.nbytes > end:
                            break
                        current += 1
                    done = end
                if total is not None and done >= total:
                    self._result = ReadBackResult(digest.hexdigest(), tuple(bad))
                    return
        except BaseException as exc:  # handed to the thread that asks for the result
            self._error = exc
        finally:
            os.close(self._fd)


def _element_boundary(item: CheckedRange, end: int) -> int:
    """``end``, moved back to the start of the element of ``item`` it falls in, if it falls inside ``item``.

    The writer reports progress at tensor ends, so a cut read still covers at least one element.
    """
    if not item.offset < end < item.offset + item.nbytes:
        return end
    return end - (end - item.offset) % item.itemsize


def read_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``offset`` of ``fd``; returns fewer bytes only where the file ends."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got
