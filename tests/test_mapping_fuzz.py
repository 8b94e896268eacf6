"""Mutated mapping files: the loader accepts them or says what is wrong (file, line, rule), never crashes.

Each example takes a shipped mapping, breaks it in one place (a field dropped, duplicated, renamed or
replaced by a scalar of the wrong type, a pattern bent, a line of text removed or corrupted) and loads
the result from text.  Hypothesis runs derandomized, so the examples are the same on every run.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lic_checkpoints.mappings as mappings_pkg
from lic_checkpoints.convert.errors import MappingError
from lic_checkpoints.convert.rules import Mapping_, load_mapping

MAPPING_DIR = Path(mappings_pkg.__file__).parent
MAPPING_FILES = sorted(p.name for p in MAPPING_DIR.glob("*.yaml"))
FUZZ = settings(max_examples=150, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# values a careless edit might leave behind
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 1 << 40), st.floats(allow_nan=True),
    st.text(max_size=12), st.sampled_from(["", "{", "}", "{x:bogus}", "{k:int}", "{rest}", "a.{p}.{p}",
                                           "N", "M*", "K // 0", "shape[9]", "[", "!!python/name:os.system"]),
    st.lists(st.integers(-2, 5), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
PATTERN_EDITS = ["{", "}", "{k:int}", "{rest}", "{x:float}", ".{t:name}", "{p}", "weight", ""]
# YAML tags: unsafe ones must be refused, standard ones given values they cannot parse
TAGS = ["!!python/name:os.system ", "!!python/object/apply:os.system ", "!!binary ", "!!timestamp ", "!!int ",
        "!!float ", "!!set ", "!custom "]
UNKNOWN_NAMES = ["frobnicate", "swap_block", "form", "too", "ops ", "drop_", "1", "fan_in"]


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, prefix + (i,))
    return out


def _parent(doc: Any, path: tuple) -> Any:
    for step in path[:-1]:
        doc = doc[step]
    return doc


@st.composite
def mutated(draw, file: str) -> tuple[str, tuple, str]:
    """(mutated YAML text, path of the change, kind of change)."""
    original = (MAPPING_DIR / file).read_text()
    kind = draw(st.sampled_from(["drop", "duplicate", "scalar", "rename", "pattern", "swap",
                                 "delete_line", "corrupt_char"]))
    if kind in ("delete_line", "corrupt_char"):
        lines = original.splitlines(keepends=True)
        i = draw(st.integers(0, len(lines) - 1))
        if kind == "delete_line":
            del lines[i]
        else:
            j = draw(st.integers(0, max(len(lines[i]) - 1, 0)))
            lines[i] = lines[i][:j] + draw(st.sampled_from([":", "-", "{", "[", "'", "\t", "#", " ", "&a", "*a"] + TAGS)) + lines[i][j:]
        return "".join(lines), (), kind
    doc = yaml.safe_load(original)
    paths = [p for p in _paths(doc) if p]
    path = draw(st.sampled_from(paths))
    parent, last = _parent(doc, path), path[-1]
    if kind == "drop":
        del parent[last]
    elif kind == "duplicate":
        if isinstance(parent, list):
            parent.insert(last, copy.deepcopy(parent[last]))
        else:
            other = draw(st.sampled_from(sorted(map(str, parent))))
            parent[other] = copy.deepcopy(parent[last])
    elif kind == "scalar":
        parent[last] = draw(SCALARS)
    elif kind == "rename" and isinstance(parent, dict):
        value = parent.pop(last)
        parent[draw(st.sampled_from(UNKNOWN_NAMES))] = value
    elif kind == "pattern" and isinstance(parent[last], str):
        text = parent[last]
        at = draw(st.integers(0, len(text)))
        parent[last] = text[:at] + draw(st.sampled_from(PATTERN_EDITS)) + text[at + draw(st.integers(0, 4)):]
    elif kind == "swap":
        other = draw(st.sampled_from(paths))
        try:
            other_parent = _parent(doc, other)
            parent[last], other_parent[other[-1]] = copy.deepcopy(other_parent[other[-1]]), copy.deepcopy(parent[last])
        except (KeyError, IndexError, TypeError):  # the other path lay inside this one
            parent[last] = None
    else:
        parent[last] = None
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), path, kind


def _rule_at(text: str, path: tuple) -> str | None:
    """The name of the rule that ``path`` points inside of (not at its name), if it still has one."""
    if "rules" not in path:
        return None
    at = path.index("rules")
    if len(path) < at + 3 or path[at + 2] == "name":
        return None
    try:
        rule = _parent(yaml.safe_load(text), path[: at + 3])
    except (KeyError, IndexError, TypeError):
        return None
    name = rule.get("name") if isinstance(rule, dict) else None
    return name if isinstance(name, str) and name else None


def check_load(file: str, text: str, path: tuple = ()) -> Mapping_ | MappingError:
    try:
        return load_mapping(MAPPING_DIR / file, text=text)
    except MappingError as exc:
        message = str(exc)
        assert exc.file == file and message.startswith(f"{file}:"), message
        assert isinstance(exc.line, int) and 1 <= exc.line <= text.count("\n") + 1, message
        assert re.match(rf"{re.escape(file)}:{exc.line}\b", message), message
        if exc.rule is not None:
            assert f"(rule {exc.rule!r})" in message
        return exc


@pytest.mark.parametrize("file", MAPPING_FILES)
def test_tagged_values_are_refused_or_read_safely(file):
    text = (MAPPING_DIR / file).read_text()
    for tag in TAGS:
        for field in ("family: ", "version: "):
            outcome = check_load(file, text.replace(field, field + tag, 1))
            if tag.startswith(("!!python", "!custom")):  # never constructed, always refused with a line
                assert isinstance(outcome, MappingError), (tag, field)


@pytest.mark.parametrize("file", MAPPING_FILES)
def test_shipped_mappings_load(file):
    assert isinstance(check_load(file, (MAPPING_DIR / file).read_text()), Mapping_)


@pytest.mark.parametrize("file", MAPPING_FILES)
def test_mutated_mapping_is_accepted_or_refused_with_a_location(file):
    @FUZZ
    @given(mutated(file))
    def fuzz(case):
        text, path, kind = case
        outcome = check_load(file, text, path)
        rule = _rule_at(text, path) if kind in ("drop", "scalar", "rename", "pattern") else None
        if isinstance(outcome, MappingError) and rule is not None and outcome.rule is None:
            # a change inside one rule's body is reported against a rule (this one, or one it now collides with)
            raise AssertionError(f"{path}: error names no rule: {outcome}")

    fuzz()


# Rules that would write one target key twice are refused at load time: the cases are built from
# one mapping's own rules, so they live with that family (tests/quirks/).
