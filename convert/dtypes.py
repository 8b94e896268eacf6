"""Tensor element types by name ("float32", "bfloat16", ...), without importing torch.

The converter plans and copies tensors without torch: a dtype is its name, and this table gives its
size, its safetensors code, the numpy type that holds its values (or, for bfloat16, which numpy lacks,
its bits) and torch's storage class name in pickled checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DType:
    name: str
    itemsize: int
    safetensors: str
    numpy: str  # numpy type of the values; for bfloat16 the unsigned integer that holds its bits
    floating: bool
    storage: str  # torch's legacy storage class (how pickled checkpoints name a storage's type)


_TABLE = [
    DType("float64", 8, "F64", "float64", True, "DoubleStorage"),
    DType("float32", 4, "F32", "float32", True, "FloatStorage"),
    DType("float16", 2, "F16", "float16", True, "HalfStorage"),
    DType("bfloat16", 2, "BF16", "uint16", True, "BFloat16Storage"),
    DType("int64", 8, "I64", "int64", False, "LongStorage"),
    DType("int32", 4, "I32", "int32", False, "IntStorage"),
    DType("int16", 2, "I16", "int16", False, "ShortStorage"),
    DType("int8", 1, "I8", "int8", False, "CharStorage"),
    DType("uint8", 1, "U8", "uint8", False, "ByteStorage"),
    DType("bool", 1, "BOOL", "bool", False, "BoolStorage"),
]
BY_NAME = {d.name: d for d in _TABLE}
BY_SAFETENSORS = {d.safetensors: d for d in _TABLE}
BY_STORAGE = {d.storage: d for d in _TABLE}


def name(dtype: Any) -> str:
    """The name of a torch dtype, numpy dtype or name: ``torch.float32`` -> ``"float32"``."""
    text = str(dtype)
    return text[len("torch."):] if text.startswith("torch.") else text


def get(dtype: Any) -> DType:
    key = name(dtype)
    if key not in BY_NAME:
        raise KeyError(f"dtype {key} is not supported (supported: {', '.join(BY_NAME)})")
    return BY_NAME[key]


def known(dtype: Any) -> bool:
    return name(dtype) in BY_NAME


def to_torch(dtype: Any):
    import torch

    return getattr(torch, name(dtype))
