"""Small arithmetic expressions in mapping files: ``M``, ``2*M``, ``(shape[1] + 1) // 2``, ``min(shape)``.

Only integer literals, names bound by the caller, indexing, ``+ - * //``, unary minus and the
functions ``min``/``max`` are allowed; anything else is refused before evaluation.
"""

from __future__ import annotations

import ast
import functools
import operator
from typing import Any, Mapping

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}
_FUNCS = {"min": min, "max": max}


class ExprError(ValueError):
    """An expression is not allowed, or names something that is not bound."""


def parse(text: str | int) -> ast.AST:
    """The checked syntax tree of an expression (made once per text: mappings repeat theirs per key)."""
    if isinstance(text, bool):
        raise ExprError(f"expected a number or an expression, got {text!r}")
    if isinstance(text, int):
        return ast.Constant(text)
    if not isinstance(text, str):
        raise ExprError(f"expected a number or an expression, got {text!r}")
    return _parse_text(text)


@functools.lru_cache(maxsize=4096)
def _parse_text(text: str) -> ast.AST:
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as exc:
        raise ExprError(f"cannot parse expression {text!r}: {exc.msg}") from None
    _check(tree, text)
    return tree


def names(text: str | int) -> set[str]:
    """Free names used by an expression (function names excluded)."""
    tree = parse(text)
    found = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    return found - set(_FUNCS)


def _check(node: ast.AST, text: str) -> None:
    allowed = (ast.Constant, ast.Name, ast.BinOp, ast.UnaryOp, ast.Subscript, ast.Call, ast.Load, ast.USub)
    allowed_ops = tuple(_BINOPS)
    for sub in ast.walk(node):
        if isinstance(sub, ast.operator):
            if not isinstance(sub, allowed_ops):
                raise ExprError(f"operator {type(sub).__name__} not allowed in {text!r}")
            continue
        if not isinstance(sub, allowed):
            raise ExprError(f"{type(sub).__name__} not allowed in expression {text!r}")
        if isinstance(sub, ast.Constant) and not (isinstance(sub.value, int) and not isinstance(sub.value, bool)):
            raise ExprError(f"only integer literals are allowed in {text!r}")
        if isinstance(sub, ast.Call) and not (isinstance(sub.func, ast.Name) and sub.func.id in _FUNCS and not sub.keywords):
            raise ExprError(f"only min(...) and max(...) may be called in {text!r}")


def evaluate(text: str | int, env: Mapping[str, Any]) -> Any:
    return _eval(parse(text), env, text)


def _eval(node: ast.AST, env: Mapping[str, Any], text) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in env:
            raise ExprError(f"{node.id!r} is not defined (in {text!r}; known: {', '.join(sorted(env)) or 'nothing'})")
        return env[node.id]
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left, env, text), _eval(node.right, env, text)
        try:
            return _BINOPS[type(node.op)](left, right)
        except (TypeError, ZeroDivisionError) as exc:
            raise ExprError(f"cannot evaluate {text!r}: {exc}") from None
    if isinstance(node, ast.UnaryOp):
        return -_eval(node.operand, env, text)
    if isinstance(node, ast.Subscript):
        seq = _eval(node.value, env, text)
        idx = _eval(node.slice, env, text)
        try:
            return seq[idx]
        except (IndexError, TypeError) as exc:
            raise ExprError(f"cannot evaluate {text!r}: {exc}") from None
    if isinstance(node, ast.Call):
        args = [_eval(a, env, text) for a in node.args]
        try:
            return _FUNCS[node.func.id](*args)
        except (TypeError, ValueError) as exc:
            raise ExprError(f"cannot evaluate {text!r}: {exc}") from None
    raise ExprError(f"cannot evaluate {text!r}")
