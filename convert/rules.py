"""Mapping files (YAML) -> frozen rule objects, with errors that name the file, line and rule.

A mapping file describes one model family: how to recognise its checkpoints (``detect``), which
numbers to read off their shapes (``variables``), which published configurations exist
(``variants``), and the ordered ``rules`` that turn each upstream key into CompressAI-layout keys.
The rule language is documented in the README; in short, each rule is one of

- ``from``/``to``: rename with typed captures, optionally with ``ops`` (tensor operations, each with
  an inverse) and ``fan_out`` (one source written to several targets, each with its own storage);
- ``drop``: a source key that has no target, with a ``reason`` and, for derived buffers, a
  ``restore`` recipe so the inverse conversion can regenerate it exactly;
- ``synthesize``: a target key with no source, made by a value generator for each match of
  ``for_each`` (a source-layout pattern).

The first rule whose source pattern matches a key takes it; later rules never see it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from . import expr
from .errors import MappingError
from .ops import Generator, Op, OpError, build_generator, build_op
from .patterns import KeyPattern, PatternError

SCHEMA_VERSION = 1
_TOP_KEYS = {
    "schema", "family", "version", "name", "title", "license", "upstream", "target", "extends",
    "detect", "variables", "variants", "rules", "stages", "notes", "input",
}
#: facts about the authors' model the verifier and the tests need, with the values most families have:
#: ``input``: image sides must be multiples of ``multiple`` and at least ``minimum``
MODEL_FACTS = {
    "input": {"multiple": 128, "minimum": 256},
}
_RULE_KEYS = {"name", "from", "to", "ops", "fan_out", "drop", "reason", "restore", "synthesize", "for_each", "value", "note"}


# --- YAML with line numbers ------------------------------------------------------------------


class _Lined(dict):
    """A mapping from the YAML file that remembers the line it started on, and the line of each key."""

    line: int = 0
    key_lines: dict

    def line_of(self, key: Any) -> int:
        """The line of ``key`` when it is present, else the line the mapping starts on."""
        return getattr(self, "key_lines", {}).get(key, self.line)


class _LinedList(list):
    line: int = 0


def _to_python(node: yaml.Node, file: str) -> Any:
    if isinstance(node, yaml.MappingNode):
        out = _Lined()
        out.line = node.start_mark.line + 1
        out.key_lines = {}
        for key_node, value_node in node.value:
            key = _to_python(key_node, file)
            if not isinstance(key, (str, int)):
                raise MappingError(f"mapping keys must be strings, got {key!r}", file=file, line=key_node.start_mark.line + 1)
            if key in out:
                raise MappingError(f"duplicate key {key!r}", file=file, line=key_node.start_mark.line + 1)
            out[key] = _to_python(value_node, file)
            out.key_lines[key] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        seq = _LinedList(_to_python(n, file) for n in node.value)
        seq.line = node.start_mark.line + 1
        return seq
    return _scalar(node, file)


def _scalar(node: yaml.ScalarNode, file: str) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    except Exception as exc:  # an unknown tag (!!python/...) or a tagged value that does not parse
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise MappingError(f"cannot read the value {node.value!r} ({node.tag}): {problem}",
                           file=file, line=node.start_mark.line + 1) from None
    finally:
        loader.dispose()


#: libyaml's parser where PyYAML was built with it (ten times faster), else the pure-Python one
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_yaml(path: Path, text: str | None = None) -> Any:
    file = path.name  # errors name the file the way load_mapping does
    try:
        text = path.read_text() if text is None else text
    except OSError as exc:
        raise MappingError(f"cannot read mapping file: {exc.strerror}", file=file) from None
    try:
        node = yaml.compose(text, Loader=_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise MappingError(f"not valid YAML: {problem}", file=file, line=mark.line + 1 if mark else None) from None
    if node is None:
        raise MappingError("the file is empty", file=file, line=1)
    return _to_python(node, file)


# --- rule objects ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One line of the mapping: what a source key becomes, or why it has no target."""

    name: str
    kind: str  # "map" | "drop" | "synthesize"
    line: int
    sources: tuple[KeyPattern, ...] = ()
    target: KeyPattern | None = None
    ops: tuple[Op, ...] = ()
    fan_out: tuple[tuple[str, Any], ...] = ()
    reason: str = ""
    restore_for_each: KeyPattern | None = None
    restore_value: Generator | None = None
    for_each: KeyPattern | None = None
    value: Generator | None = None

    @property
    def source(self) -> KeyPattern | None:
        return self.sources[0] if self.sources else None

    def match(self, key: str) -> dict[str, Any] | None:
        for pattern in self.sources:
            found = pattern.match(key)
            if found is not None:
                return found
        return None

    def describe_ops(self) -> str:
        return ", ".join(op.describe() for op in self.ops)


@dataclass(frozen=True)
class Stage:
    """An ordered list of rules applied to every key in one pass.

    In a mapping with several stages, a key that no rule of a non-final stage matches passes through
    unchanged to the next stage; in the final stage every key must be taken by a rule.
    """

    name: str
    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class VariableSpec:
    name: str
    kind: str  # "shape" | "count" | "exists" | "expr"
    pattern: KeyPattern | None = None
    dim: int = 0
    capture: str | None = None
    expression: str | int | None = None


@dataclass(frozen=True)
class Variant:
    name: str
    when: tuple[tuple[str, Any], ...]
    layout: str | None
    upstream_kwargs: Mapping[str, Any]
    target_kwargs: Mapping[str, Any]
    line: int = 0
    aliases: tuple[str, ...] = ()  # other names of this configuration (e.g. for ``--demo``)


@dataclass(frozen=True)
class Mapping_:
    """A loaded mapping file."""

    family: str
    version: int
    title: str
    license: str
    file: str
    name: str  # the family's short display name (model cards, help texts)
    upstream: Mapping[str, Any]
    target: Mapping[str, Any]
    detect_all: tuple[KeyPattern, ...]
    detect_none: tuple[KeyPattern, ...]
    variables: tuple[VariableSpec, ...]
    variants: tuple[Variant, ...]
    stages: tuple[Stage, ...]
    notes: str = ""
    sha256: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def rules(self) -> tuple[Rule, ...]:
        return tuple(r for stage in self.stages for r in stage.rules)

    def rule(self, name: str) -> Rule:
        for r in self.rules:
            if r.name == name:
                return r
        raise KeyError(name)


# --- parsing -----------------------------------------------------------------------------------


def load_mapping(path: str | Path, *, text: str | None = None, _seen: tuple[str, ...] = ()) -> Mapping_:
    """Read and validate one mapping file (following ``extends``)."""
    import hashlib

    path = Path(path)
    file = path.name
    data = read_yaml(path, text)
    if not isinstance(data, dict):
        raise MappingError("the top level must be a mapping", file=file, line=getattr(data, "line", 1))
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise MappingError(f"unknown top-level key(s) {sorted(unknown)}", file=file, line=data.line)

    parent = None
    if "extends" in data:
        if not isinstance(data["extends"], str):
            raise MappingError("'extends' must name another mapping file", file=file, line=data.line)
        parent_path = path.parent / data["extends"]
        if str(parent_path) in _seen or parent_path == path:
            raise MappingError(f"'extends' loops back to {data['extends']}", file=file, line=data.line)
        if not parent_path.is_file():
            raise MappingError(f"'extends' names {data['extends']}, which does not exist", file=file, line=data.line)
        parent = load_mapping(parent_path, _seen=_seen + (str(path),))

    def need(key, kind, default=None):
        if key not in data:
            if parent is not None or default is not None:
                return default
            raise MappingError(f"missing required key {key!r}", file=file, line=data.line)
        value = data[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise MappingError(f"{key!r} must be a {kind.__name__}", file=file, line=data.line_of(key))
        return value

    schema = need("schema", int, SCHEMA_VERSION if parent else None)
    if schema != SCHEMA_VERSION:
        raise MappingError(f"schema {schema} is not supported (this tool reads schema {SCHEMA_VERSION})", file=file,
                           line=data.line_of("schema"))
    family = need("family", str)
    version = need("version", int)
    title = need("title", str, parent.title if parent else None)
    license_ = need("license", str, parent.license if parent else None)
    upstream = need("upstream", dict, dict(parent.upstream) if parent else None)
    target = need("target", dict, dict(parent.target) if parent else None)
    for section, value in (("upstream", upstream), ("target", target)):
        for key in ("class", "ours"):
            if not isinstance(value.get(key), str):
                raise MappingError(f"'{section}' must name a '{key}'", file=file, line=data.line_of(section))
        if ":" not in value["ours"]:
            raise MappingError(f"'{section}.ours' must read 'module:Class', got {value['ours']!r}", file=file,
                               line=data.line_of(section))
    if not isinstance(data.get("name"), str):  # each family names itself, even when it extends another
        raise MappingError("missing required key 'name' (the family's short display name)", file=file, line=data.line)

    detect_all, detect_none = _parse_detect(data.get("detect"), file, parent, data.line_of("detect"))
    variables = _parse_variables(data.get("variables"), file, parent, data.line_of("variables"))
    variants = _parse_variants(data.get("variants"), file, parent, {v.name for v in variables}, data.line_of("variants"))
    stages = _parse_stages(data, file, parent, {v.name for v in variables})

    facts = _parse_facts(data, file, parent)
    digest = hashlib.sha256((path.read_bytes() if text is None else text.encode())).hexdigest()
    return Mapping_(
        family=family,
        version=version,
        name=data["name"],
        title=title,
        license=license_,
        file=file,
        upstream=dict(upstream),
        target=dict(target),
        detect_all=detect_all,
        detect_none=detect_none,
        variables=variables,
        variants=variants,
        stages=stages,
        notes=str(data.get("notes", "")),
        sha256=digest,
        extra=facts,
    )


def _parse_facts(data, file: str, parent) -> dict[str, dict[str, Any]]:
    """The sections of :data:`MODEL_FACTS` (``input``), each completed with its defaults."""
    out: dict[str, dict[str, Any]] = {}
    for section, defaults in MODEL_FACTS.items():
        base = dict(parent.extra.get(section, defaults)) if parent else dict(defaults)
        given = data.get(section, {})
        if not isinstance(given, dict) or set(given) - set(defaults):
            raise MappingError(f"{section!r} takes {sorted(defaults)}", file=file, line=data.line_of(section))
        for key, value in given.items():
            number = type(defaults[key]) is int
            if type(value) is not type(defaults[key]) or (number and value < 1):
                raise MappingError(f"'{section}.{key}' must be a {type(defaults[key]).__name__}"
                                   + (" of at least 1" if number else ""),
                                   file=file, line=data.line_of(section))
        out[section] = {**base, **given}
    return out


def _pattern(text: Any, file: str, line: int, rule: str | None = None) -> KeyPattern:
    if not isinstance(text, str):
        raise MappingError(f"a key pattern must be a string, got {text!r}", file=file, line=line, rule=rule)
    try:
        return KeyPattern(text)
    except PatternError as exc:
        raise MappingError(str(exc), file=file, line=line, rule=rule) from None


def _parse_detect(spec, file, parent, line: int):
    if spec is None:
        if parent is None:
            raise MappingError("missing required key 'detect'", file=file, line=line)
        return parent.detect_all, parent.detect_none
    if not isinstance(spec, dict) or not set(spec) <= {"all", "none"} or "all" not in spec:
        raise MappingError("'detect' must be a mapping with 'all' (and optionally 'none') lists of key patterns",
                           file=file, line=line)
    out = []
    for name in ("all", "none"):
        items = spec.get(name, [])
        if not isinstance(items, list) or (name == "all" and not items):
            raise MappingError(f"'detect.{name}' must be a list of key patterns", file=file, line=spec.line_of(name))
        out.append(tuple(_pattern(p, file, spec.line_of(name)) for p in items))
    return tuple(out)


def _parse_variables(spec, file, parent, line: int) -> tuple[VariableSpec, ...]:
    inherited = list(parent.variables) if parent else []
    if spec is None:
        return tuple(inherited)
    if not isinstance(spec, dict):
        raise MappingError("'variables' must be a mapping of name -> how to read it", file=file, line=line)
    names = {v.name for v in inherited}
    out = list(inherited)
    for name, body in spec.items():
        line = getattr(body, "line", spec.line_of(name))
        if not isinstance(name, str) or not name.isidentifier() or name in ("shape", "ndim"):
            raise MappingError(f"bad variable name {name!r}", file=file, line=line)
        if isinstance(body, (str, int)) and not isinstance(body, bool):
            try:
                unknown = expr.names(body) - names
            except expr.ExprError as exc:
                raise MappingError(str(exc), file=file, line=line) from None
            if unknown:
                raise MappingError(f"variable {name!r} uses undefined {sorted(unknown)}", file=file, line=line)
            var = VariableSpec(name, "expr", expression=body)
        elif isinstance(body, dict) and "shape" in body:
            if set(body) - {"shape", "dim"} or not isinstance(body.get("dim", 0), int):
                raise MappingError(f"variable {name!r}: a shape variable has 'shape' (a key) and 'dim' (an integer)", file=file, line=line)
            var = VariableSpec(name, "shape", pattern=_pattern(body["shape"], file, line), dim=body.get("dim", 0))
        elif isinstance(body, dict) and "count" in body:
            pattern = _pattern(body["count"], file, line)
            capture = body.get("capture")
            if set(body) - {"count", "capture"} or capture not in pattern.names:
                raise MappingError(f"variable {name!r}: 'capture' must name a capture of {pattern.text!r}", file=file, line=line)
            var = VariableSpec(name, "count", pattern=pattern, capture=capture)
        elif isinstance(body, dict) and "exists" in body:
            if set(body) != {"exists"}:
                raise MappingError(f"variable {name!r}: 'exists' takes a key pattern only", file=file, line=line)
            var = VariableSpec(name, "exists", pattern=_pattern(body["exists"], file, line))
        else:
            raise MappingError(
                f"variable {name!r} must be an expression or a mapping with 'shape', 'count' or 'exists'", file=file, line=line
            )
        out = [v for v in out if v.name != name] + [var]
        names.add(name)
    return tuple(out)


def _parse_variants(spec, file, parent, variable_names, line: int) -> tuple[Variant, ...]:
    if spec is None:
        if parent is None:
            raise MappingError("missing required key 'variants'", file=file, line=line)
        return parent.variants
    if not isinstance(spec, list) or not spec:
        raise MappingError("'variants' must be a non-empty list", file=file, line=line)
    out = []
    seen = set()
    for item in spec:
        line = getattr(item, "line", spec.line)
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise MappingError("each variant needs a 'name'", file=file, line=line)
        extra = set(item) - {"name", "when", "layout", "aliases", "upstream_kwargs", "target_kwargs"}
        if extra:
            raise MappingError(f"variant {item['name']!r}: unknown key(s) {sorted(extra)}", file=file, line=line)
        if item["name"] in seen:
            raise MappingError(f"variant {item['name']!r} is defined twice", file=file, line=line)
        seen.add(item["name"])
        when = item.get("when", {})
        if not isinstance(when, dict) or set(when) - variable_names:
            raise MappingError(
                f"variant {item['name']!r}: 'when' must map defined variables to values", file=file, line=line
            )
        for key in ("upstream_kwargs", "target_kwargs"):
            if not isinstance(item.get(key, {}), dict):
                raise MappingError(f"variant {item['name']!r}: {key!r} must be a mapping", file=file, line=line)
        layout = item.get("layout")
        if layout is not None and not isinstance(layout, str):
            raise MappingError(f"variant {item['name']!r}: 'layout' must be a string", file=file, line=line)
        aliases = item.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise MappingError(f"variant {item['name']!r}: 'aliases' must be a list of names", file=file, line=line)
        out.append(
            Variant(
                name=item["name"],
                when=tuple(when.items()),
                layout=layout,
                aliases=tuple(aliases),
                upstream_kwargs=dict(item.get("upstream_kwargs", {})),
                target_kwargs=dict(item.get("target_kwargs", {})),
                line=line,
            )
        )
    return tuple(out)


def _parse_stages(data, file, parent, variable_names) -> tuple[Stage, ...]:
    """``rules: [...]`` is one stage named "main"; ``stages: [{name, rules}, ...]`` gives several.

    A child mapping (``extends``) merges by stage name: a rule with the name of an inherited rule
    replaces it in place; new rules go before the inherited ones of that stage.
    """
    if "rules" in data and "stages" in data:
        raise MappingError("give either 'rules' (one stage) or 'stages', not both", file=file, line=data.line)
    inherited = {s.name: s for s in parent.stages} if parent else {}
    order = [s.name for s in parent.stages] if parent else []
    if "rules" in data:
        raw = [_Lined(name=order[-1] if order else "main", rules=data["rules"])]
        raw[0].line = getattr(data["rules"], "line", data.line)
    elif "stages" in data:
        raw = data["stages"]
        if not isinstance(raw, list) or not raw:
            raise MappingError("'stages' must be a non-empty list of {name, rules}", file=file, line=getattr(raw, "line", data.line))
    elif parent is not None:
        return parent.stages
    else:
        raise MappingError("missing required key 'rules' (or 'stages')", file=file, line=data.line)

    own: dict[str, list[Rule]] = {}
    all_names: set[str] = set()
    for stage in raw:
        line = getattr(stage, "line", data.line)
        if not isinstance(stage, dict) or set(stage) != {"name", "rules"} or not isinstance(stage["name"], str):
            raise MappingError("each stage is a mapping with 'name' and 'rules'", file=file, line=line)
        if not isinstance(stage["rules"], list) or not stage["rules"]:
            raise MappingError(f"stage {stage['name']!r}: 'rules' must be a non-empty list", file=file, line=line)
        if stage["name"] in own:
            raise MappingError(f"stage {stage['name']!r} is defined twice", file=file, line=line)
        rules = []
        for item in stage["rules"]:
            rule = parse_rule(item, file, variable_names, default_line=line)
            if rule.name in all_names:
                raise MappingError("two rules have this name", file=file, line=rule.line, rule=rule.name)
            all_names.add(rule.name)
            rules.append(rule)
        own[stage["name"]] = rules
        if stage["name"] not in order:
            order.append(stage["name"])

    stages = []
    for name in order:
        base = list(inherited[name].rules) if name in inherited else []
        mine = own.get(name, [])
        replaced = {r.name for r in mine} & {r.name for r in base}
        merged = [r for r in mine if r.name not in replaced] + [
            next(m for m in mine if m.name == r.name) if r.name in replaced else r for r in base
        ]
        _check_rule_set(merged, file)
        stages.append(Stage(name, tuple(merged)))
    return tuple(stages)


def parse_rule(item: Any, file: str, variable_names: set[str], default_line: int = 0) -> Rule:
    line = getattr(item, "line", default_line)
    if not isinstance(item, dict):
        raise MappingError(f"a rule must be a mapping, got {item!r}", file=file, line=line)
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise MappingError("every rule needs a 'name'", file=file, line=line)
    unknown = set(item) - _RULE_KEYS
    if unknown:
        raise MappingError(f"unknown key(s) {sorted(unknown)}", file=file, line=line, rule=name)
    kinds = [k for k in ("from", "drop", "synthesize") if k in item]
    if len(kinds) != 1:
        raise MappingError("a rule has exactly one of 'from' (with 'to'), 'drop' or 'synthesize'", file=file, line=line, rule=name)

    def allow_only(keys):
        extra = set(item) - keys - {"name", "note"}
        if extra:
            raise MappingError(f"{sorted(extra)} not allowed in a '{kinds[0]}' rule", file=file, line=line, rule=name)

    def text(key):
        value = item.get(key)
        if not isinstance(value, str) or not value.strip():
            raise MappingError(f"{key!r} must be a non-empty string", file=file, line=line, rule=name)
        return value

    try:
        if kinds[0] == "from":
            allow_only({"from", "to", "ops", "fan_out"})
            raw_sources = item["from"] if isinstance(item["from"], list) else [item["from"]]
            if not raw_sources:
                raise MappingError("'from' is empty", file=file, line=line, rule=name)
            sources = tuple(_pattern(s, file, line, name) for s in raw_sources)
            if "to" not in item:
                raise MappingError("a 'from' rule needs 'to'", file=file, line=line, rule=name)
            target = _pattern(item["to"], file, line, name)
            fan = item.get("fan_out", {})
            if not isinstance(fan, dict) or len(fan) > 1:
                raise MappingError("'fan_out' maps one new capture name to a count, e.g. {j: K}", file=file, line=line, rule=name)
            for var, count in fan.items():
                if not isinstance(var, str) or not var.isidentifier():
                    raise MappingError(f"bad fan_out name {var!r}", file=file, line=line, rule=name)
                unknown = expr.names(count) - variable_names
                if unknown:
                    raise MappingError(f"fan_out count uses undefined {sorted(unknown)}", file=file, line=line, rule=name)
            for pattern in sources:
                if set(pattern.names) != set(sources[0].names):
                    raise MappingError("all 'from' alternatives must capture the same names", file=file, line=line, rule=name)
            available = set(sources[0].names) | set(fan)
            missing = set(target.names) - available
            if missing:
                raise MappingError(f"'to' uses {sorted(missing)}, which 'from' does not capture", file=file, line=line, rule=name)
            lost = available - set(target.names)
            if lost:
                raise MappingError(
                    f"'to' drops the capture(s) {sorted(lost)}: several sources would collide on one target",
                    file=file, line=line, rule=name,
                )
            raw_ops = item.get("ops", [])
            if not isinstance(raw_ops, list):
                raise MappingError("'ops' must be a list", file=file, line=line, rule=name)
            ops = tuple(build_op(o) for o in raw_ops)
            for op in ops:
                unknown = op.variables() - variable_names - set(sources[0].names)
                if unknown:
                    raise MappingError(f"op {op.describe()} uses undefined {sorted(unknown)}", file=file, line=line, rule=name)
            if fan and ops:
                raise MappingError("a fan_out rule copies values unchanged; it cannot also have 'ops'", file=file, line=line, rule=name)
            return Rule(name, "map", line, sources=sources, target=target, ops=ops, fan_out=tuple(fan.items()))
        if kinds[0] == "drop":
            allow_only({"drop", "reason", "restore"})
            source = _pattern(item["drop"], file, line, name)
            reason = text("reason")
            restore_for_each = restore_value = None
            if "restore" in item:
                restore = item["restore"]
                if not isinstance(restore, dict) or set(restore) != {"for_each", "value"}:
                    raise MappingError("'restore' needs 'for_each' (a target-layout pattern) and 'value'", file=file, line=line, rule=name)
                restore_for_each = _pattern(restore["for_each"], file, line, name)
                restore_value = build_generator(restore["value"])
                missing = set(source.names) - set(restore_for_each.names)
                if missing:
                    raise MappingError(f"restore.for_each must capture {sorted(missing)}", file=file, line=line, rule=name)
            return Rule(name, "drop", line, sources=(source,), reason=reason,
                        restore_for_each=restore_for_each, restore_value=restore_value)
        allow_only({"synthesize", "for_each", "value", "reason"})
        target = _pattern(item["synthesize"], file, line, name)
        if "for_each" not in item or "value" not in item:
            raise MappingError("a 'synthesize' rule needs 'for_each' and 'value'", file=file, line=line, rule=name)
        for_each = _pattern(item["for_each"], file, line, name)
        missing = set(target.names) - set(for_each.names)
        if missing:
            raise MappingError(f"'synthesize' uses {sorted(missing)}, which 'for_each' does not capture", file=file, line=line, rule=name)
        return Rule(name, "synthesize", line, target=target, for_each=for_each,
                    value=build_generator(item["value"]), reason=text("reason"))
    except (OpError, expr.ExprError) as exc:
        raise MappingError(str(exc), file=file, line=line, rule=name) from None


def _check_rule_set(rules: list[Rule], file: str) -> None:
    """Refuse, before any checkpoint is read, two rules of one stage that can write the same target key.

    For each pair of rules, a witness key is built from one rule's target (captures filled with
    sample values); when the other rule's target also produces it, the source keys that both rules
    would need are rebuilt and the first-match order decides: the rules collide only when each
    source key really reaches its rule.  So ``{rest}`` after a more specific rule is fine, while a
    second rule onto the same template, or a literal target another template covers, is refused.
    """
    writers = [r for r in rules if r.target is not None]
    for later_index, later in enumerate(writers):
        for earlier in writers[:later_index]:
            for first, second in ((earlier, later), (later, earlier)):
                witness = _collision_witness(first, second, rules)
                if witness is not None:
                    raise MappingError(
                        f"writes the same target key as rule {earlier.name!r} (line {earlier.line}), "
                        f"e.g. {witness!r}; make the patterns disjoint",
                        file=file, line=later.line, rule=later.name,
                    )


_SAMPLE_VALUES = {"int": 0, "name": "x", "path": "x"}


def _capture_types(rule: Rule) -> dict[str, str]:
    pattern = rule.source if rule.kind == "map" else rule.for_each
    types = dict(zip(pattern.names, pattern.types)) if pattern is not None else {}
    types.update({name: "int" for name, _ in rule.fan_out})
    return types


def _collision_witness(first: Rule, second: Rule, rules: list[Rule]) -> str | None:
    """A target key that ``first`` and ``second`` would both write, or None when there is none to find."""
    types = _capture_types(first)
    key = first.target.format({n: _SAMPLE_VALUES[types.get(n, "path")] for n in first.target.names})
    found = second.target.match(key)
    if found is None:
        return None
    second_types = _capture_types(second)
    for name, value in found.items():
        if second_types.get(name) == "int" and not str(value).isdigit():
            return None
    first_values = {n: _SAMPLE_VALUES[types.get(n, "path")] for n in first.target.names}
    if not (_reaches(first, first_values, rules) and _reaches(second, found, rules)):
        return None
    if first.kind == second.kind == "map" and first.source.format(first_values) == second.source.format(found):
        return None  # one source key, taken by one rule only
    return key


def _reaches(rule: Rule, values: Mapping[str, Any], rules: list[Rule]) -> bool:
    """Whether the source key behind ``values`` would be taken by ``rule`` (first match wins)."""
    if rule.kind != "map":
        return True  # a synthesized key exists whenever its for_each key does
    fan = {name for name, _ in rule.fan_out}
    source_key = rule.source.format({k: v for k, v in values.items() if k not in fan})
    for candidate in rules:
        if candidate.kind in ("map", "drop") and candidate.match(source_key) is not None:
            return candidate is rule
    return False
