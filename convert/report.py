"""The load report: what happened to every key, as a compact table.

Rows group keys by status and rule, and compress indices (``y{0..4}.mean_cc.{0,2,4}.weight``), so a
1400-key conversion reads in a screenful.  Statuses:

- CONVERTED: renamed (same tensor); TRANSFORMED: values re-ordered by ops; FANNED OUT: copied to
  several targets; SYNTHESIZED: made by a generator; DROPPED: a source key with no target, by rule;
- UNEXPECTED: a source key no rule takes (or a produced key the layout lacks); MISSING: a layout key
  nothing produces; MISMATCH: wrong shape or dtype; COLLISION: a target written twice.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any

from .engine import Plan

_NUM = re.compile(r"\d+")
PROBLEM_STATUSES = ("UNEXPECTED", "MISSING", "MISMATCH", "COLLISION")


def compress_keys(keys: list[str]) -> list[tuple[str, int]]:
    """Group keys that differ only in their numbers: ``a.0.b``, ``a.1.b`` -> ``a.{0..1}.b``."""
    groups: "OrderedDict[str, list[list[int]]]" = OrderedDict()
    for key in keys:
        shape = _NUM.sub("#", key)
        groups.setdefault(shape, []).append([int(n) for n in _NUM.findall(key)])
    out = []
    for shape, numbers in groups.items():
        parts = shape.split("#")
        text = parts[0]
        for i, tail in enumerate(parts[1:]):
            text += _render(sorted({n[i] for n in numbers})) + tail
        out.append((text, len(numbers)))
    return out


def _render(values: list[int]) -> str:
    if len(values) == 1:
        return str(values[0])
    if values == list(range(values[0], values[-1] + 1)):
        return "{%d..%d}" % (values[0], values[-1])
    return "{" + ",".join(map(str, values)) + "}"


def rows(plan: Plan) -> list[dict[str, Any]]:
    """Report rows: status, rule, compressed key pattern, count, detail."""
    buckets: "OrderedDict[tuple[str, str, str], list[str]]" = OrderedDict()

    def add(status, rule, key, detail=""):
        buckets.setdefault((status, rule, detail), []).append(key)

    status_of = {"rename": "CONVERTED", "transform": "TRANSFORMED", "fan_out": "FANNED OUT",
                 "fan_in": "FANNED IN", "synthesize": "SYNTHESIZED"}
    for step in plan.steps:
        if plan.layout is not None and step.target not in plan.layout:
            continue
        detail = step.describe_ops() if step.action == "transform" else ""
        add(status_of[step.action], step.rule.name, step.target, detail)
    for key, rule in plan.dropped:
        add("DROPPED", rule.name, key, rule.reason)
    for drop in plan.checked_drops:
        add("DROPPED", drop.rule.name, drop.key, "checked: equals its synthesized value")
    for key in plan.unexpected:
        add("UNEXPECTED", "-", key)
    for key in plan.missing:
        add("MISSING", "-", key)
    for m in plan.mismatched:
        add("MISMATCH", "-", m.key, f"expected {m.expected}, got {m.got}")
    for key, rules in plan.collisions:
        add("COLLISION", ", ".join(rules), key)
    out = []
    for (status, rule, detail), keys in buckets.items():
        for pattern, count in compress_keys(keys):
            out.append({"status": status, "rule": rule, "keys": pattern, "count": count, "detail": detail})
    return out


def summary(plan: Plan) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows(plan):
        counts[row["status"]] = counts.get(row["status"], 0) + row["count"]
    return counts


def render_table(plan: Plan, *, width: int = 100, problems_only: bool = False) -> str:
    """A plain-text table (problems first)."""
    table = rows(plan)
    table.sort(key=lambda r: (r["status"] not in PROBLEM_STATUSES,))
    if problems_only:
        table = [r for r in table if r["status"] in PROBLEM_STATUSES]
    lines = [f"{'STATUS':<12} {'COUNT':>5}  KEYS (RULE)"]
    for r in table:
        text = f"{r['status']:<12} {r['count']:>5}  {r['keys']}"
        if r["rule"] != "-":
            text += f"  ({r['rule']})"
        if r["detail"]:
            text += f"  [{r['detail']}]"
        lines.append(text if len(text) <= width else text[: width - 1] + "…")
    return "\n".join(lines)
