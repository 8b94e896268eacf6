"""NaN and Inf detection on tensors in memory and on raw tensor bytes.

Converted weights holding NaN or Inf are written as they are and flagged in the report.  The
safetensors writer checks the bytes it reads back from its output (see :mod:`.readback`), so tensors
copied file to file are checked without passing through Python objects.  The checks use numpy: on
these CPUs torch's elementwise ops on memory-mapped tensors are many times slower.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import dtypes

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


def checked_dtype(dtype: Any) -> bool:
    """Whether values of ``dtype`` can be NaN or Inf (the floating dtypes)."""
    return dtypes.name(dtype) in _EXPONENT_MASKS


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
