"""Tensor operations a rule may apply, each with its inverse.

An op is built from its YAML spelling (``{swap_blocks: {dim: 1, sizes: [M, M]}}``) and evaluated
lazily: ``apply(tensor, env)`` runs it forward, ``inverse()`` returns the op that undoes it.  Every op
takes a :class:`Spec` (shape and dtype only: how the engine plans without data), a numpy array (how
``lic-convert`` computes tensors, without importing torch) or a torch tensor (verification, ``--inverse``).

Pure renames have no op at all: the target tensor *is* the source tensor (no copy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from . import dtypes, expr


class OpError(ValueError):
    """An op's arguments are wrong, or it cannot apply to this tensor."""


class Op:
    name: str = ""
    #: True when the op changes values or their order (the result needs its own storage)
    rewrites_values: bool = True

    def apply(self, tensor, env: Mapping[str, Any]):
        raise NotImplementedError

    def inverse(self) -> "Op":
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def variables(self) -> set[str]:
        """Names the op's expressions use (checked against the mapping's variables at load time)."""
        return set()

    def byte_runs(self, spec: "Spec", env: Mapping[str, Any]) -> "tuple[Spec, list[tuple[int, int]]] | None":
        """For an op that only moves runs of bytes of a contiguous input: the result's spec and, in the
        result's order, where its bytes lie in the input as ``(offset, length)`` runs.  None for an op
        that computes values (the writer then computes the tensor instead of copying its bytes)."""
        return None


#: at most this many runs per tensor: a tensor that would need more is computed instead
MAX_RUNS = 1 << 16


def append_run(runs: list[tuple[int, int]], offset: int, length: int) -> None:
    """Add a run of bytes, merged into the last one when it continues it."""
    if not length:
        return
    if runs and runs[-1][0] + runs[-1][1] == offset:
        runs[-1] = (runs[-1][0], runs[-1][1] + length)
    else:
        runs.append((offset, length))


class Spec:
    """The shape and dtype (a name) of a tensor to be: what planning pushes through the ops."""

    __slots__ = ("shape", "dtype")
    is_meta = True

    def __init__(self, shape, dtype):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtypes.name(dtype)

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    def permute(self, *dims: int) -> "Spec":
        return Spec([self.shape[d] for d in dims], self.dtype)

    def contiguous(self) -> "Spec":
        return self

    def reshape(self, shape) -> "Spec":
        target = Spec(shape, self.dtype)
        if target.numel() != self.numel():
            raise ValueError(f"shape {list(target.shape)} is invalid for input of size {self.numel()}")
        return target

    def __repr__(self) -> str:
        return f"Spec({list(self.shape)}, {self.dtype})"


def spec_of(tensor) -> Spec:
    return tensor if isinstance(tensor, Spec) else Spec(tensor.shape, tensor.dtype)


_NUMPY_DTYPES = ("float32", "float64", "float16", "int32", "int64")


def _ndim(tensor) -> int:
    return tensor.ndim if isinstance(tensor, np.ndarray) else tensor.dim()


def _env_with_shape(env: Mapping[str, Any], tensor) -> dict[str, Any]:
    return {**env, "shape": list(tensor.shape), "ndim": _ndim(tensor)}


@dataclass(frozen=True)
class SwapBlocks(Op):
    """Exchange consecutive channel blocks along ``dim``: sizes ``[a, b]`` turns ``[A|B|rest]`` into ``[B|A|rest]``.

    With equal sizes the op is its own inverse (e.g. exchanging the means and scales input blocks).
    """

    dim: int
    sizes: tuple[Any, ...]
    name = "swap_blocks"

    def _sizes(self, tensor, env) -> list[int]:
        local = _env_with_shape(env, tensor)
        sizes = [expr.evaluate(s, local) for s in self.sizes]
        if len(sizes) != 2 or any(not isinstance(s, int) or s <= 0 for s in sizes):
            raise OpError(f"swap_blocks needs two positive block sizes, got {sizes}")
        if _ndim(tensor) <= self.dim or tensor.shape[self.dim] < sum(sizes):
            raise OpError(
                f"swap_blocks on dim {self.dim} needs at least {sum(sizes)} channels, tensor has shape {list(tensor.shape)}"
            )
        return sizes

    def apply(self, tensor, env):
        a, b = self._sizes(tensor, env)
        if getattr(tensor, "is_meta", False):  # planning: the shape is unchanged
            return spec_of(tensor)
        if isinstance(tensor, np.ndarray):
            return self._swap(tensor, a, b)
        if dtypes.name(tensor.dtype) in _NUMPY_DTYPES:
            # numpy copies the blocks in one thread; torch's threaded cat is slower on small machines
            import torch

            return torch.from_numpy(self._swap(tensor.detach().cpu().numpy(), a, b))
        import torch

        first, second, rest = torch.split(tensor, [a, b, tensor.shape[self.dim] - a - b], dim=self.dim)
        return torch.cat([second, first, rest], dim=self.dim)

    def byte_runs(self, spec, env):
        a, b = self._sizes(spec, env)
        if math.prod(spec.shape[: self.dim]) > MAX_RUNS // 3:
            return None  # blocks this small are faster swapped in memory than copied one by one
        channels = spec.shape[self.dim]
        block = math.prod(spec.shape[self.dim + 1:]) * dtypes.get(spec.dtype).itemsize  # one channel's bytes
        runs: list[tuple[int, int]] = []
        for outer in range(math.prod(spec.shape[: self.dim])):
            base = outer * channels * block
            for first, count in ((a, b), (0, a), (a + b, channels - a - b)):
                append_run(runs, base + first * block, count * block)
        return spec, runs

    def _swap(self, array: np.ndarray, a: int, b: int) -> np.ndarray:
        first, second, rest = np.split(array, [a, a + b], axis=self.dim)
        return np.concatenate([second, first, rest], axis=self.dim)

    def inverse(self):
        return SwapBlocks(self.dim, (self.sizes[1], self.sizes[0]))

    def describe(self):
        return f"swap_blocks(dim={self.dim}, sizes={list(self.sizes)})"

    def variables(self):
        return set().union(*(expr.names(s) for s in self.sizes)) - {"shape", "ndim"}


@dataclass(frozen=True)
class Permute(Op):
    dims: tuple[int, ...]
    name = "permute"

    def apply(self, tensor, env):
        if _ndim(tensor) != len(self.dims):
            raise OpError(f"permute{list(self.dims)} needs a {len(self.dims)}-d tensor, got shape {list(tensor.shape)}")
        if isinstance(tensor, np.ndarray):
            return np.ascontiguousarray(np.transpose(tensor, self.dims))
        return tensor.permute(*self.dims).contiguous()

    def inverse(self):
        inv = [0] * len(self.dims)
        for i, d in enumerate(self.dims):
            inv[d] = i
        return Permute(tuple(inv))

    def describe(self):
        return f"permute({list(self.dims)})"


@dataclass(frozen=True)
class Reshape(Op):
    """Reshape between two symbolic shapes, e.g. ``from: [a, a, h]`` ``to: [a*a, h]``.

    Symbols are bound from the input tensor's shape by matching it against ``from``; an entry that is a
    product with one unknown (``a*a``, ``2*a``) is solved exactly, so the inverse (``to`` -> ``from``) can
    recover sizes that a plain ``-1`` could not.
    """

    source: tuple[Any, ...]
    target: tuple[Any, ...]
    name = "reshape"

    def apply(self, tensor, env):
        if _ndim(tensor) != len(self.source):
            raise OpError(f"reshape expects a {len(self.source)}-d tensor matching {list(self.source)}, got {list(tensor.shape)}")
        bound = _bind_shape(self.source, list(tensor.shape), env)
        shape = [expr.evaluate(t, bound) for t in self.target]
        try:
            return tensor.reshape(shape)
        except (RuntimeError, ValueError) as exc:
            raise OpError(f"reshape {list(tensor.shape)} -> {shape}: {exc}") from None

    def inverse(self):
        return Reshape(self.target, self.source)

    def byte_runs(self, spec, env):
        result = self.apply(spec, env)  # a contiguous tensor keeps its bytes in order
        return result, [(0, result.numel() * dtypes.get(spec.dtype).itemsize)] if result.numel() else []

    def describe(self):
        return f"reshape({list(self.source)} -> {list(self.target)})"

    def variables(self):
        return set()


def _bind_shape(pattern, shape, env) -> dict[str, Any]:
    """Bind the symbols of a symbolic shape from a concrete one; raises OpError when they disagree."""
    bound = dict(env)
    pending = []
    for entry, size in zip(pattern, shape):
        if isinstance(entry, int):
            if entry != size:
                raise OpError(f"dimension {entry} expected, got {size} (shape {shape}, pattern {list(pattern)})")
        elif isinstance(entry, str) and entry.isidentifier():
            if entry in bound and entry not in env and bound[entry] != size:
                raise OpError(f"symbol {entry} bound to both {bound[entry]} and {size} (shape {shape})")
            bound[entry] = size
        else:
            pending.append((entry, size))
    for entry, size in pending:
        unknown = sorted(n for n in expr.names(entry) if n not in bound)
        if len(unknown) > 1:
            raise OpError(f"cannot solve {entry!r} for {unknown} from size {size}")
        if unknown:
            bound[unknown[0]] = _solve(entry, unknown[0], size, bound)
        if expr.evaluate(entry, bound) != size:
            raise OpError(f"{entry!r} = {expr.evaluate(entry, bound)} does not match size {size} (shape {shape})")
    return bound


def _solve(entry: str, name: str, size: int, bound: Mapping[str, Any]) -> int:
    """Smallest non-negative integer value of ``name`` that makes the monotone ``entry`` equal ``size``."""
    lo, hi = 0, max(1, size)
    while lo < hi:
        mid = (lo + hi) // 2
        if expr.evaluate(entry, {**bound, name: mid}) < size:
            lo = mid + 1
        else:
            hi = mid
    return lo


OP_TYPES: dict[str, Callable[[Any], Op]] = {}


def _register(name: str):
    def deco(fn):
        OP_TYPES[name] = fn
        return fn

    return deco


@_register("swap_blocks")
def _build_swap(args):
    _expect_keys(args, {"dim", "sizes"}, "swap_blocks")
    sizes = args["sizes"]
    if not isinstance(sizes, list) or len(sizes) != 2:
        raise OpError("swap_blocks: 'sizes' must be a list of two block sizes, e.g. [M, M]")
    for s in sizes:
        expr.parse(s)
    if not isinstance(args["dim"], int) or isinstance(args["dim"], bool) or args["dim"] < 0:
        raise OpError("swap_blocks: 'dim' must be a non-negative integer")
    return SwapBlocks(args["dim"], tuple(sizes))


@_register("permute")
def _build_permute(args):
    dims = args.get("dims") if isinstance(args, dict) else args
    if isinstance(args, dict):
        _expect_keys(args, {"dims"}, "permute")
    if not isinstance(dims, list) or sorted(dims) != list(range(len(dims))) or any(isinstance(d, bool) for d in dims):
        raise OpError("permute: 'dims' must be a permutation of 0..n-1, e.g. [1, 2, 0]")
    return Permute(tuple(dims))


@_register("reshape")
def _build_reshape(args):
    _expect_keys(args, {"from", "to"}, "reshape")
    src, dst = args["from"], args["to"]
    if not isinstance(src, list) or not isinstance(dst, list) or not src or not dst:
        raise OpError("reshape: 'from' and 'to' must be non-empty lists of sizes or symbols")
    for entry in src + dst:
        expr.parse(entry)
    return Reshape(tuple(src), tuple(dst))


def _expect_keys(args, keys: set[str], op: str) -> None:
    if not isinstance(args, dict):
        raise OpError(f"{op}: expected a mapping with {sorted(keys)}")
    missing, extra = keys - set(args), set(args) - keys
    if missing:
        raise OpError(f"{op}: missing {sorted(missing)}")
    if extra:
        raise OpError(f"{op}: unknown argument(s) {sorted(extra)}")


def build_op(spec: Any) -> Op:
    """``{name: args}`` -> an Op; raises OpError with the reason."""
    if not isinstance(spec, dict) or len(spec) != 1:
        raise OpError(f"an op is a one-entry mapping like {{swap_blocks: {{...}}}}, got {spec!r}")
    (name, args), = spec.items()
    if name not in OP_TYPES:
        raise OpError(f"unknown op {name!r} (known: {', '.join(sorted(OP_TYPES))})")
    return OP_TYPES[name](args)


# --- values of synthesized tensors -------------------------------------------------------------


@dataclass(frozen=True)
class Generator:
    """How to make a tensor that has no source: ``eye``, ``zeros``, ``literal``, ``relative_position_index``."""

    kind: str
    args: Any
    dtype: str = "float32"

    def shape(self, env: Mapping[str, Any]) -> list[int]:
        """The shape ``make`` will give, without making the values (how planning sizes it)."""
        if self.kind == "eye":
            n = int(expr.evaluate(self.args, env))
            return [n, n]
        if self.kind == "zeros":
            return [int(expr.evaluate(s, env)) for s in self.args]
        if self.kind == "literal":
            return list(self.args["shape"])
        if self.kind == "relative_position_index":
            w = int(expr.evaluate(self.args, env))
            return [w * w, w * w]
        raise OpError(f"unknown generator {self.kind!r}")

    def spec(self, env: Mapping[str, Any]) -> Spec:
        return Spec(self.shape(env), self.dtype)

    def make_array(self, env: Mapping[str, Any]) -> np.ndarray:
        """The values as a numpy array (the torch-free path of ``lic-convert``)."""
        info = dtypes.get(self.dtype)
        if self.dtype == "bfloat16":
            raise OpError("a bfloat16 generator needs torch; this path only handles numpy dtypes")
        shape = self.shape(env)
        if self.kind == "eye":
            return np.eye(shape[0], dtype=info.numpy)
        if self.kind == "zeros":
            return np.zeros(shape, dtype=info.numpy)
        if self.kind == "literal":
            return np.asarray(self.args["values"], dtype=np.float64).astype(info.numpy).reshape(shape)
        return relative_position_index_array(int(expr.evaluate(self.args, env))).astype(info.numpy)

    def make(self, env: Mapping[str, Any]):
        """The values as a torch tensor."""
        import torch

        dtype = getattr(torch, self.dtype)
        if self.kind == "eye":
            return torch.eye(int(expr.evaluate(self.args, env)), dtype=dtype)
        if self.kind == "zeros":
            return torch.zeros([int(expr.evaluate(s, env)) for s in self.args], dtype=dtype)
        if self.kind == "literal":
            values = torch.tensor(self.args["values"], dtype=torch.float64).to(dtype)
            return values.reshape(self.args["shape"])
        if self.kind == "relative_position_index":
            return torch.from_numpy(relative_position_index_array(int(expr.evaluate(self.args, env)))).to(dtype)
        raise OpError(f"unknown generator {self.kind!r}")

    def describe(self) -> str:
        if self.kind == "literal":
            return f"literal{list(self.args['shape'])}"
        return f"{self.kind}({self.args})"


def relative_position_index_array(window: int) -> np.ndarray:
    """Swin's index of relative offsets within a ``window x window`` window: shape ``[w*w, w*w]``, int64.

    Entry ``[p, q]`` is ``(di + w - 1) * (2w - 1) + (dj + w - 1)`` where ``(di, dj)`` is the row/column
    offset of token ``p`` from token ``q`` (tokens in row-major order).
    """
    rows, cols = np.meshgrid(np.arange(window), np.arange(window), indexing="ij")
    coords = np.stack([rows.reshape(-1), cols.reshape(-1)])
    delta = coords[:, :, None] - coords[:, None, :] + (window - 1)
    return (delta[0] * (2 * window - 1) + delta[1]).astype(np.int64)


def relative_position_index(window: int):
    """:func:`relative_position_index_array` as a torch tensor."""
    import torch

    return torch.from_numpy(relative_position_index_array(window))


def build_generator(spec: Any) -> Generator:
    if not isinstance(spec, dict):
        raise OpError(f"a value is a mapping like {{eye: N}}, got {spec!r}")
    spec = dict(spec)
    dtype = spec.pop("dtype", None)
    if len(spec) != 1:
        raise OpError(f"a value names exactly one generator (eye, zeros, literal, relative_position_index), got {sorted(spec)}")
    (kind, args), = spec.items()
    if kind == "eye":
        expr.parse(args)
    elif kind == "zeros":
        if not isinstance(args, list):
            raise OpError("zeros: give the shape as a list")
        for a in args:
            expr.parse(a)
    elif kind == "literal":
        if not isinstance(args, dict) or set(args) != {"shape", "values"}:
            raise OpError("literal: give 'shape' and 'values'")
        shape, values = args["shape"], args["values"]
        n = 1
        for s in shape if isinstance(shape, list) else [None]:
            if not isinstance(s, int) or isinstance(s, bool) or s < 0:
                raise OpError("literal: 'shape' must be a list of non-negative integers")
            n *= s
        if not isinstance(values, list) or len(values) != n or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
        ):
            raise OpError(f"literal: 'values' must be a flat list of {n} numbers")
    elif kind == "relative_position_index":
        expr.parse(args)
        dtype = dtype or "int64"
    else:
        raise OpError(f"unknown generator {kind!r} (known: eye, zeros, literal, relative_position_index)")
    dtype = dtype or "float32"
    if not isinstance(dtype, str) or not dtypes.known(dtype) or dtype.startswith("torch."):
        raise OpError(f"unknown dtype {dtype!r}")
    return Generator(kind, args, dtype)
