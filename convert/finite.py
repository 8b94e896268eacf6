"""NaN and Inf detection, for tensors in memory and for tensor bytes still in the source file.

Converted weights holding NaN or Inf are written as they are and flagged in the report.  Tensors the
conversion copies file to file never pass through Python, so their bytes are checked by a background
thread that reads them in fixed-size chunks (one reusable buffer).  The checks use numpy: on these CPUs
torch's elementwise ops on memory-mapped tensors are many times slower.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import dtypes

CHUNK = 1 << 22

# float dtypes as unsigned integers: a value is NaN or Inf exactly when all its exponent bits are set
_EXPONENT_MASKS = {
    "float64": (np.uint64, 0x7FF0000000000000),
    "float32": (np.uint32, 0x7F800000),
    "float16": (np.uint16, 0x7C00),
    "bfloat16": (np.uint16, 0x7F80),
}


def all_finite(value: Any, dtype: Any = None) -> bool:
    """No NaN or Inf in ``value``, a torch tensor or a numpy array (``dtype`` names bfloat16 bits)."""
    if isinstance(value, np.ndarray):
        name = dtypes.name(dtype) if dtype is not None else value.dtype.name
        return value.size == 0 or bytes_finite(memoryview(np.ascontiguousarray(value).reshape(-1).view(np.uint8)), name)
    if not value.is_floating_point() or value.numel() == 0:
        return True
    import torch

    value = value.detach().cpu()
    if not value.is_contiguous():
        value = value.contiguous()
    return bytes_finite(memoryview(value.reshape(-1).view(torch.uint8).numpy()), value.dtype)


def bytes_finite(data: memoryview, dtype: Any) -> bool:
    """No NaN or Inf among the values of ``dtype`` stored in ``data`` (native byte order)."""
    dtype = dtypes.name(dtype)
    if dtype not in _EXPONENT_MASKS:
        return True
    if dtype in ("float32", "float64"):
        values = np.frombuffer(data, dtype=dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            total = np.add.reduce(values)  # one pass; NaN and Inf always make the sum non-finite
        if np.isfinite(total):
            return True
        return bool(np.isfinite(values).all())  # the sum also overflows for large finite values
    unsigned, mask = _EXPONENT_MASKS[dtype]
    bits = np.frombuffer(data, dtype=unsigned)
    return not bool(((bits & unsigned(mask)) == unsigned(mask)).any())


@dataclass(frozen=True)
class ByteRange:
    """Where one tensor's bytes lie in a file."""

    key: str
    offset: int
    nbytes: int
    dtype: str


class FileFiniteCheck:
    """Check tensors that are still bytes in a file, in a background thread: ``result()`` lists the bad keys."""

    def __init__(self, fd: int, ranges: list[ByteRange]):
        self._fd = fd
        self._ranges = [r for r in ranges if dtypes.name(r.dtype) in _EXPONENT_MASKS and r.nbytes]
        self._bad: list[str] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="finite check", daemon=True)
        self._thread.start()

    def result(self) -> list[str]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return list(self._bad)

    def _run(self) -> None:
        try:
            buffer = bytearray(CHUNK)
            for item in self._ranges:
                if not _range_finite(self._fd, item, buffer):
                    self._bad.append(item.key)
        except BaseException as exc:  # handed to the caller by result()
            self._error = exc


def _range_finite(fd: int, item: ByteRange, buffer: bytearray) -> bool:
    itemsize = dtypes.get(item.dtype).itemsize
    step = len(buffer) - len(buffer) % itemsize
    view = memoryview(buffer)
    done = 0
    while done < item.nbytes:
        want = min(step, item.nbytes - done)
        got = os.preadv(fd, [view[:want]], item.offset + done)
        if got != want:
            raise OSError(f"read {got} of {want} bytes at offset {item.offset + done}: the file changed or is truncated")
        if not bytes_finite(view[:want], item.dtype):
            return False
        done += want
    return True
