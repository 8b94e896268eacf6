"""Reading the structure of a torch zip checkpoint as data: no torch, and no pickle is ever run.

A torch zip holds ``<name>/data.pkl`` (the pickled container, whose tensors refer to storages by key)
and one record ``<name>/data/<key>`` per storage.  :func:`read_structure` walks the pickle's opcodes
with :mod:`pickletools` and interprets a fixed, small subset of them itself: plain containers and
numbers, ``OrderedDict``, torch's tensor rebuild call and its storage references.  Nothing is imported
and nothing is called: a name outside that subset is never looked up, the reader just declines.

It returns ``None`` for anything it does not know (other globals, other opcodes, compressed records,
another byte order, odd sizes), and the caller then reads the file with
``torch.load(weights_only=True)``, which stays the authority on what is refused and why.  So this
reader only ever accepts a subset of what torch's safe loader accepts, and gives each tensor's shape,
dtype and byte offset in the file without touching its data (it lets ``lic-convert`` run without
importing torch: seconds and hundreds of megabytes less per process).
"""

from __future__ import annotations

import pickletools
import sys
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import dtypes
from .integrity import record_ranges

#: a data.pkl larger than this is left to torch (a state dict's pickle is a few hundred kilobytes)
MAX_PICKLE_BYTES = 64 << 20


class _Decline(Exception):
    """The pickle uses something this reader does not interpret."""


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


_ORDERED_DICT = _Callable("collections.OrderedDict")
_REBUILD_TENSOR = _Callable("torch._utils._rebuild_tensor_v2")
_REBUILD_PARAMETER = _Callable("torch._utils._rebuild_parameter")
_KNOWN = {
    ("collections", "OrderedDict"): _ORDERED_DICT,
    ("torch._utils", "_rebuild_tensor_v2"): _REBUILD_TENSOR,
    ("torch._utils", "_rebuild_parameter"): _REBUILD_PARAMETER,
}
_MARK = object()


def read_structure(path: Path) -> tuple[Any, dict[str, tuple[int, int]]] | None:
    """(the container with :class:`TensorRecord` leaves, storage key -> (byte offset of its data, size)).

    ``None`` when the file is not something this reader handles; see the module's doc.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            pickles = [i for i in infos if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
            if len(pickles) != 1 or pickles[0].file_size > MAX_PICKLE_BYTES:
                return None
            prefix = pickles[0].filename[: -len("data.pkl")]
            if not copyable_as_stored(archive):
                return None
            data = archive.read(pickles[0])
            records = [i for i in infos if i.filename.startswith(prefix + "data/")]
        obj = _interpret(data)
        places = {info.filename[len(prefix) + len("data/"):]: (start, stop - start)
                  for start, stop, info in record_ranges(path, records)}
    except (_Decline, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError, TypeError, EOFError):
        return None
    except Exception:  # anything unexpected: leave the file to torch's reader and its messages
        return None
    for tensor in _tensors(obj):
        place = places.get(tensor.storage.key)
        if place is None or not _fits(tensor, place[1]):
            return None
    return obj, places


def copyable_as_stored(archive: zipfile.ZipFile) -> bool:
    """Whether tensor bytes can be taken from the file as they are: every record stored uncompressed,
    in this machine's byte order (torch's ``byteorder`` record; archives from before it existed were
    written little-endian in practice)."""
    infos = archive.infolist()
    if any(info.compress_type != zipfile.ZIP_STORED for info in infos):
        return False
    order = next((i for i in infos if i.filename.endswith("/byteorder")), None)
    return order is None or archive.read(order).decode(errors="replace").strip() == sys.byteorder


def _fits(tensor: TensorRecord, record_bytes: int) -> bool:
    itemsize = dtypes.get(tensor.dtype).itemsize
    if record_bytes != tensor.storage.numel * itemsize:
        return False
    if any(n == 0 for n in tensor.shape):
        return True
    last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride))
    return last < tensor.storage.numel


def _tensors(obj: Any):
    if isinstance(obj, TensorRecord):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def _int_tuple(value: Any) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(type(v) is int and v >= 0 for v in value):
        raise _Decline("sizes and strides must be tuples of non-negative integers")
    return value


def _call(function: Any, args: Any) -> Any:
    if not isinstance(args, tuple):
        raise _Decline("call arguments are not a tuple")
    if function is _ORDERED_DICT and args == ():
        return OrderedDict()
    if function is _REBUILD_TENSOR and len(args) in (6, 7):
        storage, offset, shape, stride = args[:4]
        if not isinstance(storage, StorageRef) or type(offset) is not int or offset < 0:
            raise _Decline("unexpected tensor arguments")
        shape, stride = _int_tuple(shape), _int_tuple(stride)
        if len(shape) != len(stride) or args[4] not in (True, False):
            raise _Decline("unexpected tensor arguments")
        if not (isinstance(args[5], OrderedDict) and not args[5]):  # backward hooks: must be none
            raise _Decline("tensor with backward hooks")
        if len(args) == 7 and args[6] not in ({}, None):  # tensor metadata (e.g. subclasses)
            raise _Decline("tensor with metadata")
        return TensorRecord(storage, offset, shape, stride)
    if function is _REBUILD_PARAMETER and len(args) == 3 and isinstance(args[0], TensorRecord):
        if not (isinstance(args[2], OrderedDict) and not args[2]):
            raise _Decline("parameter with backward hooks")
        return args[0]
    raise _Decline("unsupported call")


def _storage(pid: Any, storages: dict[str, StorageRef]) -> StorageRef:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
        raise _Decline("unsupported persistent id")
    _, kind, key, _location, numel = pid
    if not isinstance(key, str) or type(numel) is not int or numel < 0:
        raise _Decline("unsupported storage reference")
    ref = storages.setdefault(key, StorageRef(key, kind.dtype, numel))
    if ref != StorageRef(key, kind.dtype, numel):
        raise _Decline("one storage described two ways")
    return ref


def _global(module: Any, name: Any) -> Any:
    if (module, name) in _KNOWN:
        return _KNOWN[(module, name)]
    if module == "torch" and isinstance(name, str) and name in dtypes.BY_STORAGE:
        return _StorageType(dtypes.BY_STORAGE[name].name)
    raise _Decline(f"global {module}.{name}")


def _pop_mark(stack: list) -> list:
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is _MARK:
            items = stack[i + 1:]
            del stack[i:]
            return items
    raise _Decline("no mark")


_CONSTANTS = {
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
    "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
    "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
}


def _interpret(data: bytes) -> Any:
    """Run the pickle's opcodes on a stack of plain values (the subset torch's state dicts use)."""
    stack: list = []
    memo: dict[int, Any] = {}
    storages: dict[str, StorageRef] = {}
    for opcode, arg, _ in pickletools.genops(data):
        op = opcode.name
        if op in ("PROTO", "FRAME"):
            continue
        if op in _CONSTANTS:
            stack.append(arg)
        elif op == "NONE":
            stack.append(None)
        elif op in ("NEWTRUE", "NEWFALSE"):
            stack.append(op == "NEWTRUE")
        elif op == "MARK":
            stack.append(_MARK)
        elif op in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1]
        elif op == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif op in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo[arg])
        elif op == "EMPTY_DICT":
            stack.append({})
        elif op == "EMPTY_LIST":
            stack.append([])
        elif op == "EMPTY_TUPLE":
            stack.append(())
        elif op in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(op[-1])
            items = tuple(stack[-n:])
            del stack[-n:]
            stack.append(items)
        elif op == "TUPLE":
            stack.append(tuple(_pop_mark(stack)))
        elif op == "LIST":
            stack.append(_pop_mark(stack))
        elif op == "DICT":
            items = _pop_mark(stack)
            stack.append(dict(zip(items[::2], items[1::2])))
        elif op == "APPEND":
            value = stack.pop()
            _require(stack[-1], list).append(value)
        elif op == "APPENDS":
            items = _pop_mark(stack)
            _require(stack[-1], list).extend(items)
        elif op == "SETITEM":
            value, key = stack.pop(), stack.pop()
            _set(_require(stack[-1], dict), key, value)
        elif op == "SETITEMS":
            items = _pop_mark(stack)
            target = _require(stack[-1], dict)
            for key, value in zip(items[::2], items[1::2]):
                _set(target, key, value)
        elif op == "GLOBAL":
            module, _, name = str(arg).partition(" ")
            stack.append(_global(module, name))
        elif op == "STACK_GLOBAL":
            name, module = stack.pop(), stack.pop()
            stack.append(_global(module, name))
        elif op == "REDUCE":
            args, function = stack.pop(), stack.pop()
            stack.append(_call(function, args))
        elif op == "BINPERSID":
            stack.append(_storage(stack.pop(), storages))
        elif op == "BUILD":
            state = stack.pop()
            if not isinstance(stack[-1], OrderedDict) or not isinstance(state, (dict, tuple)):
                raise _Decline("BUILD on something other than a state dict")
            # an OrderedDict's attributes (torch's ``_metadata``) are not part of its items: ignored
        elif op == "POP":
            stack.pop()
        elif op == "POP_MARK":
            _pop_mark(stack)
        elif op == "DUP":
            stack.append(stack[-1])
        elif op == "STOP":
            if len(stack) != 1 or stack[0] is _MARK:
                raise _Decline("stack not empty at STOP")
            return stack[0]
        else:
            raise _Decline(f"opcode {op}")
    raise _Decline("no STOP")


def _require(value: Any, kind: type) -> Any:
    if not isinstance(value, kind) or value is _MARK:
        raise _Decline(f"expected a {kind.__name__}")
    return value


def _set(target: dict, key: Any, value: Any) -> None:
    if not isinstance(key, (str, int, float, bool, type(None), tuple)):
        raise _Decline("unhashable or unusual dict key")
    target[key] = value
