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


# --- rules that would write one target key twice are refused at load time ---------------------


def _with_rules(file: str, stage: int, extra: list[dict], at: int | None = None) -> str:
    doc = yaml.safe_load((MAPPING_DIR / file).read_text())
    rules = doc["stages"][stage]["rules"] if "stages" in doc else doc["rules"]
    rules[len(rules) if at is None else at:len(rules) if at is None else at] = extra
    return yaml.safe_dump(doc, sort_keys=False)


@pytest.mark.parametrize(
    "extra, at, culprit",
    [
        # the same template under other capture names
        ([{"name": "copy of g_a", "from": "ga_old.{tail}", "to": "g_a.{tail}"}], None, "copy of g_a"),
        # a literal target that a later template also produces from another source
        ([{"name": "one key", "from": "legacy.h_a_weight", "to": "latent_codec.h_a.0.weight"}], 0, "hyper analysis"),
        # a template covering a literal written earlier
        ([{"name": "literal first", "from": "legacy_scale", "to": "g_s.9.weight"},
          {"name": "broad", "from": "old_g_s.{r}", "to": "g_s.{r}"}], 0, "broad"),
        # a synthesized key that a rename also writes
        ([{"name": "stray proj", "from": "{p}.msa.proj_legacy.{t:name}", "to": "{p}.msa.attn.proj.{t}"}], 0,
         "identity inner projection weight"),
        # a fan_out rule landing on keys another rule writes
        ([{"name": "per-slice gc", "from": "gc_slices.{k:int}.{rest}",
           "to": "latent_codec.y.latent_codec.y{k}.gaussian_conditional.{rest}"}], None, "per-slice gc"),
    ],
    ids=["same-template", "literal-then-template", "template-after-literal", "synthesize-vs-map", "fan-out"],
)
def test_colliding_rules_are_refused(extra, at, culprit):
    stage = 0 if extra[0]["name"] == "stray proj" else 1
    with pytest.raises(MappingError) as info:
        load_mapping(MAPPING_DIR / "tcm.yaml", text=_with_rules("tcm.yaml", stage, extra, at))
    message = str(info.value)
    assert "writes the same target key" in message and f"(rule {culprit!r})" in message, message
    assert re.match(r"tcm\.yaml:\d+ \(rule ", message), message


def test_specific_rule_before_a_catch_all_is_not_a_collision():
    """``entropy_bottleneck.{rest}`` after ``entropy_bottleneck.matrices.{i}``: first match wins, no clash."""
    extra = [{"name": "special g_a conv", "from": "g_a.0.conv1.weight", "to": "g_a.0.conv1.weight"}]
    loaded = load_mapping(MAPPING_DIR / "tcm.yaml", text=_with_rules("tcm.yaml", 1, extra, 0))
    assert loaded.rule("special g_a conv").target.text == "g_a.0.conv1.weight"
