"""The rule engine: plan a conversion, check its coverage, then produce tensors one at a time.

``plan`` matches every source key against the mapping's rules (first match wins), computes each
target's shape and dtype on :class:`~.ops.Spec` records (no data), and compares the result with the
expected layout:

- every source key is consumed exactly once, or dropped by a named rule (else UNEXPECTED);
- every layout key is produced exactly once (else MISSING, or a collision between rules);
- every produced tensor has the layout's shape and dtype (else MISMATCH).

``tensor`` then materialises one target tensor from the source (torch tensors, or numpy arrays on the
torch-free path of ``lic-convert``): a pure rename returns the source tensor itself (no copy), ops
produce new tensors, fan-out copies are cloned only when asked.  Dtypes are names (``"float32"``).

The same mapping runs backwards: ``inverse_rules`` derives the CompressAI -> upstream rules (each op
replaced by its inverse, fan-out by a fan-in that checks the copies are equal, drops of derived
buffers by their ``restore`` generator, synthesized tensors by drops that check their value).

Spelling: a ``from:`` rule may list alternatives (e.g. the names an older library saved).  The forward
plan counts which alternative each source key matched (:attr:`Plan.alternatives`).  The inverse plan
writes the first alternative, the canonical name, and checks the layout on those names; given
``alternatives`` (rule name -> index) it also spells every key the way the source did
(:attr:`Step.spelled`), so a round trip can give back the source's own names.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

import numpy as np

from . import dtypes, expr
from .detect import Detection
from .errors import ConversionError
from .layouts import Layout
from .ops import Generator, Op, OpError, Spec, append_run, spec_of
from .patterns import KeyPattern
from .rules import Rule

FORWARD, INVERSE = "forward", "inverse"


@dataclass(frozen=True)
class Step:
    """How one target tensor is made: from its source key(s) or a generator, through each stage's ops."""

    target: str
    rules: tuple[Rule, ...]
    sources: tuple[str, ...]
    transforms: tuple[tuple[tuple[Op, ...], Mapping[str, Any]], ...] = ()
    generator: Generator | None = None
    generator_env: Mapping[str, Any] = field(default_factory=dict)
    fan_out: bool = False
    fan_in: bool = False
    shape: tuple[int, ...] = ()
    dtype: str = "float32"
    #: the target key in the source's spelling (inverse plans given ``alternatives``); None: ``target``
    spelled: str | None = None

    @property
    def rule(self) -> Rule:
        return self.rules[-1]

    @property
    def action(self) -> str:
        if self.generator is not None:
            return "synthesize"
        if self.fan_in:
            return "fan_in"
        if any(ops for ops, _ in self.transforms):
            return "transform"
        if self.fan_out:
            return "fan_out"
        return "rename"

    @property
    def shares_source_storage(self) -> bool:
        return self.action == "rename"

    def describe_ops(self) -> str:
        return ", ".join(op.describe() for ops, _ in self.transforms for op in ops)


@dataclass(frozen=True)
class Mismatch:
    key: str
    expected: str
    got: str


@dataclass
class Plan:
    direction: str
    detection: Detection
    layout: Layout | None
    steps: list[Step]
    dropped: list[tuple[str, Rule]] = field(default_factory=list)
    checked_drops: list = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    mismatched: list[Mismatch] = field(default_factory=list)
    collisions: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    dtype_notes: list[str] = field(default_factory=list)
    unrestorable: list[tuple[str, Rule]] = field(default_factory=list)
    #: rule name -> {index of the ``from:`` alternative -> how many keys matched it}, for every rule
    #: with several alternatives that took a key
    alternatives: dict[str, dict[int, int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.unexpected or self.missing or self.mismatched or self.collisions)

    def by_target(self) -> dict[str, Step]:
        return {s.target: s for s in self.steps}

    def problems(self) -> str:
        parts = []
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected source key(s), e.g. {self.unexpected[0]!r}")
        if self.missing:
            parts.append(f"{len(self.missing)} missing target key(s), e.g. {self.missing[0]!r}")
        if self.mismatched:
            m = self.mismatched[0]
            parts.append(f"{len(self.mismatched)} mismatch(es), e.g. {m.key!r}: expected {m.expected}, got {m.got}")
        if self.collisions:
            key, rules = self.collisions[0]
            parts.append(f"{len(self.collisions)} target key(s) written twice, e.g. {key!r} by {', '.join(rules)}")
        return "; ".join(parts)


# --- inverse rules -------------------------------------------------------------------------------


def _typed(template: KeyPattern, types: Mapping[str, str]) -> KeyPattern:
    """A target template as a pattern, giving each capture the type it had in the source pattern."""

    def annotate(m: re.Match) -> str:
        name = m.group(1)
        kind = types.get(name, "path")
        return "{" + name + ("" if kind == "path" else f":{kind}") + "}"

    return KeyPattern(re.sub(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::[A-Za-z]+)?\}", annotate, template.text))


def inverse_rules(rules: Iterable[Rule]) -> list[Rule]:
    """The CompressAI -> upstream rules of one stage, derived from its upstream -> CompressAI rules."""
    out: list[Rule] = []
    for r in rules:
        if r.kind == "map":
            src = r.source
            types = dict(zip(src.names, src.types))
            types.update({name: "int" for name, _ in r.fan_out})
            pattern = _typed(r.target, types)
            ops = tuple(op.inverse() for op in reversed(r.ops))
            kind = "fan_in" if r.fan_out else "map"
            out.append(Rule(r.name, kind, r.line, sources=(pattern,), target=src, ops=ops, fan_out=r.fan_out))
        elif r.kind == "drop":
            if r.restore_value is not None:
                out.append(Rule(r.name, "synthesize", r.line, target=r.source, for_each=r.restore_for_each,
                                value=r.restore_value, reason=f"restored: {r.reason}"))
            else:
                out.append(Rule(r.name, "unrestorable", r.line, sources=(r.source,), reason=r.reason))
        elif r.kind == "synthesize":
            types = dict(zip(r.for_each.names, r.for_each.types))
            out.append(Rule(r.name, "drop", r.line, sources=(_typed(r.target, types),),
                            reason=f"synthesized by the forward mapping ({r.reason})",
                            for_each=r.for_each, value=r.value))
    return out


def stages_for(detection: Detection, direction: str) -> list[tuple[str, list[Rule]]]:
    stages = [(s.name, list(s.rules)) for s in detection.mapping.stages]
    if direction == INVERSE:
        stages = [(name, inverse_rules(rules)) for name, rules in reversed(stages)]
    return stages


def unrestorable_rules(rules: Iterable[Rule]) -> list[Rule]:
    """The ``drop`` rules without ``restore``: what they take from a source cannot be converted back
    (e.g. a training-only branch the CompressAI layout has no place for)."""
    return [r for r in rules if r.kind == "drop" and r.restore_value is None]


def restorable_layout(layout: Layout | None, rules: Iterable[Rule]) -> tuple[Layout | None, list[str]]:
    """An upstream ``layout`` without the keys an unrestorable drop rule takes, and those keys.

    The way back can produce only the rest: a checkpoint the authors' code loads for inference
    (their eval scripts load such checkpoints non-strictly), not the training checkpoint itself.
    """
    drops = unrestorable_rules(rules)
    if layout is None or not drops:
        return layout, []
    gone = [e.key for e in layout.entries if any(r.match(e.key) is not None for r in drops)]
    if not gone:
        return layout, []
    lost = set(gone)
    kept = tuple(e for e in layout.entries if e.key not in lost)
    return replace(layout, entries=kept), gone


def alternative_of(rule: Rule, key: str) -> int:
    """Which of the rule's ``from:`` alternatives matches ``key`` first (the one the rule used)."""
    return next(i for i, pattern in enumerate(rule.sources) if pattern.match(key) is not None)


def _spellings(detection: Detection, alternatives: Mapping[str, int]) -> dict[str, dict[str, KeyPattern]]:
    """Stage name -> inverse rule name -> the pattern that spells its output as the source did.

    Every name in ``alternatives`` must be a rule with several ``from:`` alternatives, and each index
    one of them; anything else means the spelling was recorded with another mapping.
    """
    mapping = detection.mapping
    found: dict[str, dict[str, KeyPattern]] = {}
    known: set[str] = set()
    for stage in mapping.stages:
        for rule in stage.rules:
            if rule.kind != "map" or len(rule.sources) < 2 or rule.name not in alternatives:
                continue
            index = alternatives[rule.name]
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(rule.sources):
                raise ConversionError(
                    f"the recorded spelling names alternative {index!r} of rule {rule.name!r}, which has "
                    f"{len(rule.sources)} in {mapping.file} version {mapping.version}; convert back with --canonical"
                )
            found.setdefault(stage.name, {})[rule.name] = rule.sources[index]
            known.add(rule.name)
    unknown = sorted(set(alternatives) - known)
    if unknown:
        raise ConversionError(
            f"the recorded spelling names rule {unknown[0]!r}, which {mapping.file} version {mapping.version} "
            "has no alternatives for; convert back with --canonical"
        )
    return found


# --- planning ------------------------------------------------------------------------------------


def _evolve(obj, **changes):
    """``dataclasses.replace`` for the plain frozen records of a plan (no ``__post_init__``), without
    running ``__init__`` again: planning makes one per key per stage, and this is several times faster."""
    if not changes.keys() <= obj.__dict__.keys():
        raise TypeError(f"{type(obj).__name__} has no field {sorted(changes.keys() - obj.__dict__.keys())[0]!r}")
    new = object.__new__(type(obj))
    new.__dict__.update(obj.__dict__, **changes)
    return new


def _apply_ops(ops: tuple[Op, ...], tensor, env: Mapping[str, Any]):
    for op in ops:
        tensor = op.apply(tensor, env)
    return tensor


@dataclass(frozen=True)
class _Entry:
    """A key on its way through the stages, with how its value will be made and its shape and dtype."""

    key: str
    step: Step
    meta: Spec
    spelled: str = ""  # the key in the source's spelling (inverse plans given alternatives); "": ``key``


def plan(
    source: Mapping[str, Any],
    detection: Detection,
    layout: Layout | None,
    *,
    direction: str = FORWARD,
    alternatives: Mapping[str, int] | None = None,
) -> Plan:
    """Run every source key through the mapping's stages and check the result against ``layout``.

    ``alternatives`` (inverse only): rule name -> index of the ``from:`` alternative to spell that
    rule's output with (see :attr:`Step.spelled`); the layout is still checked on canonical names.
    """
    variables = dict(detection.variables)
    result = Plan(direction, detection, layout, steps=[])
    entries = [
        _Entry(key, Step(key, (), (key,), shape=tuple(t.shape), dtype=dtypes.name(t.dtype)), spec_of(t))
        for key, t in source.items()
    ]
    if alternatives and direction != INVERSE:
        raise ValueError("alternatives only apply to the inverse direction")
    spellings = _spellings(detection, alternatives) if alternatives else {}
    complete_stage = detection.mapping.stages[-1].name
    for stage_name, rules in stages_for(detection, direction):
        entries = _run_stage(entries, rules, variables, result, complete=stage_name == complete_stage,
                             spell=spellings.get(stage_name, {}))

    produced: dict[str, list[_Entry]] = {}
    for e in entries:
        produced.setdefault(e.key, []).append(e)
    for target, found in produced.items():
        if len(found) > 1:
            result.collisions.append((target, tuple(dict.fromkeys(r.name for e in found for r in e.step.rules[-1:]))))
    steps = {
        t: _evolve(found[0].step, target=t, shape=tuple(found[0].meta.shape), dtype=found[0].meta.dtype,
                   spelled=found[0].spelled if found[0].spelled not in ("", t) else None)
        for t, found in produced.items()
    }
    if layout is None:
        result.steps = list(steps.values())
        return result

    ordered = []
    for entry in layout.entries:
        step = steps.pop(entry.key, None)
        if step is None:
            result.missing.append(entry.key)
            continue
        ordered.append(step)
        if not entry.accepts(tuple(step.shape)):
            result.mismatched.append(Mismatch(entry.key, f"shape {list(entry.shape)}", f"{list(step.shape)} (from {_origin(step)})"))
        if step.dtype != entry.dtype:
            floating = dtypes.known(step.dtype) and dtypes.get(step.dtype).floating and dtypes.get(entry.dtype).floating
            if floating and step.generator is None:
                result.dtype_notes.append(entry.key)
            else:
                result.mismatched.append(Mismatch(entry.key, f"dtype {entry.dtype}", f"{step.dtype} (from {_origin(step)})"))
    for target, step in steps.items():
        result.unexpected.append(f"{target} (from {_origin(step)})")
        ordered.append(step)
    result.steps = ordered
    return result


def _spell(rule: Rule, pattern: KeyPattern, match_on: KeyPattern | None, e: _Entry, captures, spell,
           drop: tuple[str, ...] = ()) -> str:
    """The output key of ``rule`` in the source's spelling ("" when it is the canonical one).

    The rule matched the canonical key; its captures are taken again from the spelled key when the
    two differ (an earlier stage of the inverse spelled it otherwise), so every part of the source's
    own name is kept.
    """
    if not spell and not e.spelled:
        return ""
    if e.spelled and match_on is not None:
        captures = match_on.match(e.spelled) or captures
    if rule.kind in ("map", "fan_in"):  # the inverses of ``from:`` rules, the only ones with alternatives
        pattern = spell.get(rule.name, pattern)
    return pattern.format({k: v for k, v in captures.items() if k not in drop})


def _run_stage(entries: list[_Entry], rules: list[Rule], variables, result: Plan, *, complete: bool,
               spell: Mapping[str, KeyPattern] | None = None) -> list[_Entry]:
    """One pass of a stage's rules over every key.

    In a ``complete`` stage (the last one of the forward mapping) every key must be taken by a rule;
    in the others, keys no rule matches pass through unchanged.  ``spell``: inverse rule name -> the
    pattern that writes its output in the source's spelling.
    """
    spell = spell or {}
    out: list[_Entry] = []
    fan_in: dict[tuple[str, str], list[_Entry]] = {}
    checked: list[tuple[_Entry, Rule, dict]] = []
    matcher = _RuleIndex(rules)
    for e in entries:
        rule, captures = matcher.first_match(e.key)
        if rule is not None and len(rule.sources) > 1:
            counts = result.alternatives.setdefault(rule.name, {})
            index = alternative_of(rule, e.key)
            counts[index] = counts.get(index, 0) + 1
        if rule is None:
            if complete:
                result.unexpected.append(e.key if e.key == _origin(e.step) else f"{e.key} (from {_origin(e.step)})")
            else:
                out.append(e)
            continue
        if rule.kind == "drop" and rule.value is not None:
            checked.append((e, rule, captures))
            continue
        if rule.kind in ("drop", "unrestorable"):
            result.dropped.append((e.key, rule))
            continue
        env = {**variables, **captures}
        rules_so_far = e.step.rules + (rule,)
        if rule.kind == "fan_in":
            fan_names = {name for name, _ in rule.fan_out}
            target = rule.target.format({k: v for k, v in captures.items() if k not in fan_names})
            spelled = _spell(rule, rule.target, rule.source, e, captures, spell, tuple(fan_names))
            fan_in.setdefault((target, rule.name), []).append(_evolve(e, spelled=spelled))
            continue
        if rule.fan_out:
            (name, count_expr), = rule.fan_out
            try:
                count = int(expr.evaluate(count_expr, env))
            except expr.ExprError as exc:
                result.mismatched.append(Mismatch(e.key, f"fan_out count {count_expr}", str(exc)))
                continue
            for j in range(count):
                target = rule.target.format({**captures, name: j})
                out.append(_Entry(target, _evolve(e.step, rules=rules_so_far, fan_out=True), e.meta))
            continue
        try:
            meta = _apply_ops(rule.ops, e.meta, env)
        except (OpError, expr.ExprError) as exc:
            result.mismatched.append(Mismatch(e.key, f"rule {rule.name!r} ({rule.describe_ops()})", str(exc)))
            continue
        step = _evolve(e.step, rules=rules_so_far, transforms=e.step.transforms + ((rule.ops, env),))
        spelled = _spell(rule, rule.target, rule.source, e, captures, spell)
        out.append(_Entry(rule.target.format(captures), step, meta, spelled))

    for (target, rule_name), group in fan_in.items():
        rule = next(r for r in rules if r.name == rule_name and r.kind == "fan_in")
        first = group[0]
        sources = tuple(s for e in group for s in e.step.sources)
        step = _evolve(first.step, rules=first.step.rules + (rule,), sources=sources, fan_in=True)
        out.append(_Entry(target, step, first.meta, first.spelled))

    for rule in rules:
        if rule.kind != "synthesize":
            continue
        for e in entries:
            captures = rule.for_each.match(e.key)
            if captures is None:
                continue
            env = {**variables, **captures, "shape": list(e.meta.shape), "ndim": e.meta.dim()}
            target = rule.target.format(captures)
            try:
                value = rule.value.spec(env)
            except (OpError, expr.ExprError) as exc:
                result.mismatched.append(Mismatch(target, f"rule {rule.name!r}", str(exc)))
                continue
            step = Step(target, (rule,), (), generator=rule.value, generator_env=env)
            out.append(_Entry(target, step, value, _spell(rule, rule.target, rule.for_each, e, captures, spell)))
    # a synthesized tensor dropped on the way back is sized from the key it was made for, which this
    # stage's inverse has just restored among its outputs
    made_for: dict[str, list[tuple[dict, _Entry]]] = {}  # rule name -> (captures, entry) of the keys it sizes from
    for e, rule, captures in checked:
        if rule.value.kind != "literal" and rule.name not in made_for:
            made_for[rule.name] = [(c, o) for o in out if (c := rule.for_each.match(o.key)) is not None]
        result.checked_drops.append(_checked_drop(e, rule, captures, made_for.get(rule.name, []), variables))
    return out


@dataclass(frozen=True)
class CheckedDrop:
    """A tensor the inverse drops because the forward mapping synthesized it: its value must match."""

    key: str
    rule: Rule
    step: Step
    env: Mapping[str, Any] | None  # None: no key to size the expected value from


def _checked_drop(e: _Entry, rule: Rule, captures, candidates: list[tuple[dict, _Entry]], variables) -> CheckedDrop:
    """``candidates``: the stage's outputs that ``rule.for_each`` matches, with their captures."""
    if rule.value.kind == "literal":
        return CheckedDrop(e.key, rule, e.step, dict(variables))
    for c, other in candidates:
        if all(c.get(n) == v for n, v in captures.items() if n in c):
            env = {**variables, **c, "shape": list(other.meta.shape), "ndim": other.meta.dim()}
            return CheckedDrop(e.key, rule, e.step, env)
    return CheckedDrop(e.key, rule, e.step, None)


def _origin(step: Step) -> str:
    return step.sources[0] if step.sources else f"rule {step.rule.name!r}"


class _RuleIndex:
    """A stage's matching rules by the leading and the last dotted segments of the keys they can match.

    A pattern that begins with literal segments (``latent_codec.y.``) can only match keys that begin
    with them; one that ends with a literal segment (``.weight``), keys that end with it.  A key is tried
    only against the patterns it can match, in the stage's order (a rule's ``from:`` alternatives in
    theirs): the same first match as trying every rule, without running most of the patterns.
    """

    _DEPTH = 3  # leading segments indexed

    def __init__(self, rules: list[Rule]) -> None:
        self._patterns: list[tuple[Rule, KeyPattern, tuple[str, ...], str | None]] = []
        for rule in rules:
            if rule.kind == "synthesize":
                continue
            for pattern in rule.sources:
                lead = tuple(pattern.head.split(".")[:-1][: self._DEPTH])
                last = pattern.tail.rsplit(".", 1)[1] if "." in pattern.tail else None
                self._patterns.append((rule, pattern, lead, last))
        self._candidates: dict[tuple[tuple[str, ...], str], list[tuple[Rule, KeyPattern]]] = {}

    def first_match(self, key: str) -> tuple[Rule | None, dict[str, Any]]:
        segments = key.split(".")
        ends = (tuple(segments[: self._DEPTH]), segments[-1])
        candidates = self._candidates.get(ends)
        if candidates is None:
            candidates = self._candidates[ends] = [
                (rule, pattern) for rule, pattern, lead, last in self._patterns
                if ends[0][: len(lead)] == lead and (last is None or last == ends[1])]
        for rule, pattern in candidates:
            captures = pattern.match(key)
            if captures is not None:
                return rule, captures
        return None, {}


# --- producing tensors ---------------------------------------------------------------------------


def tensor(step: Step, source: Mapping[str, Any], *, own_storage: bool = False, as_numpy: bool = False):
    """The value of one target tensor: a torch tensor, or with ``as_numpy`` a numpy array.

    ``source`` holds values of the same kind.  A rename returns the source tensor itself;
    ``own_storage=True`` copies fan-out copies so no two targets alias (needed for
    ``safetensors.save_file`` and for independent in-memory tensors).
    """
    if step.generator is not None:
        value = step.generator.make_array(step.generator_env) if as_numpy else step.generator.make(step.generator_env)
    else:
        value = source[step.sources[0]]
        if step.fan_in:
            for other in step.sources[1:]:
                if not _equal(value, source[other]):
                    raise ConversionError(
                        f"{other} differs from {step.sources[0]}: the {len(step.sources)} copies of {step.target} "
                        "must be equal to convert back to one upstream tensor"
                    )
    for ops, env in step.transforms:
        value = _apply_ops(ops, value, env)
    if step.fan_out and own_storage and step.action == "fan_out":
        value = value.copy() if isinstance(value, np.ndarray) else value.clone()
    return value


def byte_runs(step: Step, spec: Spec) -> list[tuple[int, int]] | None:
    """Where each byte of ``step``'s tensor lies in its one source's bytes (contiguous, of ``spec``), as
    ``(offset, length)`` runs in order, when every op only moves bytes; None when some op computes."""
    if step.generator is not None or step.fan_in:
        return None
    runs = [(0, spec.numel() * dtypes.get(spec.dtype).itemsize)]
    for ops, env in step.transforms:
        for op in ops:
            moved = op.byte_runs(spec, env)
            if moved is None:
                return None
            spec, op_runs = moved
            runs = _follow_runs(runs, op_runs)
    return [run for run in runs if run[1]]


def _follow_runs(outer: list[tuple[int, int]], inner: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Compose byte moves: ``inner`` runs index the bytes that ``outer`` runs lay out one after another."""
    if len(outer) == 1 and outer[0][0] == 0:
        return list(inner)  # the bytes have not moved yet
    starts, at = [], 0
    for _, length in outer:
        starts.append(at)
        at += length
    runs: list[tuple[int, int]] = []
    for offset, length in inner:
        i = bisect.bisect_right(starts, offset) - 1
        while length:
            within = offset - starts[i]
            take = min(length, outer[i][1] - within)
            append_run(runs, outer[i][0] + within, take)
            offset, length, i = offset + take, length - take, i + 1
    return runs


def _equal(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    import torch

    return torch.equal(a, b)


def check_dropped_values(plan_: Plan, source: Mapping[str, Any]) -> list[str]:
    """For tensors dropped because the forward mapping synthesized them: do they hold that value?"""
    failures = []
    for drop in plan_.checked_drops:
        origin = _origin(drop.step)
        if drop.env is None:
            failures.append(f"{origin}: cannot check it (no key matches {drop.rule.for_each.text!r})")
            continue
        expected = drop.rule.value.make(drop.env)
        actual = tensor(drop.step, source)
        if actual.shape != expected.shape or not _equal(actual.to(expected.dtype), expected):
            failures.append(f"{origin}: holds values other than {drop.rule.value.describe()}; converting back would lose them")
    return failures


def convert_state_dict(plan_: Plan, source: Mapping[str, Any]) -> dict[str, Any]:
    """Every target tensor, in plan order (fan-out copies get their own storage)."""
    if not plan_.ok:
        raise ConversionError(plan_.problems(), report=plan_)
    return {step.target: tensor(step, source, own_storage=True) for step in plan_.steps}
