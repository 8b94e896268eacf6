"""The registry is the only place that knows the families.

- no code outside the family-specific places names a family or a configuration;
- every configuration the registry lists has its golden data in ``tests/data`` (so a family added
  without data fails here, not silently nowhere), and no data lies there for a configuration the
  registry does not know;
- the layouts the package ships are exactly what ``tools/extract_layouts.py`` derives from that data.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess

import pytest

from conftest import CONFIGURATION_NAMES, DATA_DIR, FIXTURES_DIR, REPO_ROOT, TARGETS_DIR
from lic_checkpoints.convert import registry

#: where family names belong: the mapping files and shipped layouts, the model code, the family
#: quirk tests and the golden data
EXEMPT = ("mappings/", "verify/models/", "tests/quirks/", "tests/data/")
#: the kinds of files scanned (Markdown documentation is exempt)
SCANNED_SUFFIXES = (".py", ".toml", ".cfg", ".sh")
SCANNED_FILES = (".ci/run",)
FIXTURE_FILES = ("manifest.json", "constants.safetensors", "input.safetensors", "expected.safetensors",
                 "expected.json")


def _candidate_files() -> list[str]:
    """Tracked and new (not ignored) files, relative to the repository root."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                                cwd=REPO_ROOT, capture_output=True, check=True).stdout.decode()
        return sorted({name for name in listed.split("\0") if name})
    except (OSError, subprocess.CalledProcessError):  # no git (e.g. an unpacked archive): walk the tree
        skip = {".git", "__pycache__", "build", "dist", ".pytest_cache", ".hypothesis"}
        return sorted(
            str(p.relative_to(REPO_ROOT)) for p in REPO_ROOT.rglob("*")
            if p.is_file() and not any(part in skip or part.endswith(".egg-info") for part in p.parts)
        )


def scanned_files() -> list[str]:
    return [name for name in _candidate_files()
            if (name.endswith(SCANNED_SUFFIXES) or name in SCANNED_FILES)
            and not name.startswith(EXEMPT) and (REPO_ROOT / name).is_file()]


def _word(names: set[str]) -> str:
    """Any of ``names`` as a whole word: not touching a letter or digit on either side.

    An underscore separates words here, as in snake_case identifiers (``is_<id>_model`` names the
    family), and so do dots, slashes and dashes (``models.<id>``, ``mappings/<id>.yaml``, ``<id>-n64``).
    """
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return rf"(?<![A-Za-z0-9])(?:{alternatives})(?![A-Za-z0-9])"


def family_name_patterns() -> list[re.Pattern]:
    """Family ids and configuration names in any case; display names as written (case-sensitive)."""
    identifiers = set(registry.family_names()) | set(registry.configuration_names())
    display = {family.name for family in registry.families()}
    return [re.compile(_word(identifiers), re.IGNORECASE), re.compile(_word(display))]


def mentions(text: str, patterns: list[re.Pattern]) -> list[tuple[int, str, str]]:
    """``(line number, name, line)`` for every line of ``text`` that names a family."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for pattern in patterns:
            match = pattern.search(line)
            if match:
                found.append((number, match.group(0), line.strip()))
                break
    return found


def test_family_name_scan_finds_whole_words_only():
    """The scanner itself, on made-up names (so this module names no family either)."""
    patterns = [re.compile(_word({"abc", "abc_n64"}), re.IGNORECASE), re.compile(_word({"Abc + Xy"}))]
    lines = ["x = 'abc'", "models.ABC", "mappings/abc.yaml", "owner/abc-n64-0.05", "abc_n64_0.05/",
             "is_abc_model", "Abc + Xy", "abcd", "xabc", "abc2", "ab_c", "Abc+Xy"]
    hits = [line for line in lines if mentions(line, patterns)]
    assert hits == lines[:7] + ["Abc+Xy"]  # 'Abc' alone is a word there (the case-insensitive id)


def test_no_family_name_outside_registry():
    """Only mappings/, verify/models/, tests/quirks/ and tests/data/ may name a family or a configuration.

    Everything else asks ``lic_checkpoints.convert.registry``. Markdown documentation is exempt.
    """
    patterns = family_name_patterns()
    files = scanned_files()
    assert "tests/conftest.py" in files and "tests/test_registry.py" in files  # the scan reaches the tests
    problems = []
    for name in files:
        text = (REPO_ROOT / name).read_text(encoding="utf-8", errors="replace")
        problems += [f"{name}:{number}: {word!r}: {line[:120]}" for number, word, line in mentions(text, patterns)]
    assert not problems, f"{len(problems)} lines name a family outside the registry:\n" + "\n".join(problems)


# --------------------------------------------------------------------------- golden data


@pytest.mark.parametrize("name", CONFIGURATION_NAMES)
def test_every_configuration_has_its_test_data(name):
    missing = [f"fixtures/{name}/{file}" for file in FIXTURE_FILES if not (FIXTURES_DIR / name / file).is_file()]
    missing += [f"targets/{name}{suffix}" for suffix in (".json", ".constants.safetensors")
                if not (TARGETS_DIR / f"{name}{suffix}").is_file()]
    assert not missing, f"configuration {name!r} has no golden data {missing} in {DATA_DIR} (see its README.md)"
    assert json.loads((FIXTURES_DIR / name / "manifest.json").read_text())["fixture"] == name
    assert json.loads((TARGETS_DIR / f"{name}.json").read_text())["model"] == name


def test_no_test_data_without_a_configuration():
    known = set(CONFIGURATION_NAMES)
    folders = {p.name for p in FIXTURES_DIR.iterdir() if p.is_dir()}
    targets = {p.name.split(".")[0] for p in TARGETS_DIR.iterdir() if p.is_file()}
    assert folders <= known and targets <= known, (folders | targets) - known
    assert (DATA_DIR / "README.md").is_file()


def test_shipped_layouts_are_derived_from_the_test_data(tmp_path):
    spec = importlib.util.spec_from_file_location("extract_layouts", REPO_ROOT / "tools" / "extract_layouts.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main([str(DATA_DIR), str(tmp_path)])
    shipped = REPO_ROOT / "mappings" / "layouts"
    for name in CONFIGURATION_NAMES:
        made = sorted(p.name for p in (tmp_path / name).iterdir())
        assert made == sorted(p.name for p in (shipped / name).iterdir()), name
        for file in made:
            assert (tmp_path / name / file).read_bytes() == (shipped / name / file).read_bytes(), f"{name}/{file}"


def test_configurations_come_from_the_mapping_files():
    names = registry.configuration_names()
    assert names and len(names) == len(set(names))
    for conf in registry.configurations():
        assert conf.variant.layout == conf.name
        assert registry.configuration(conf.name).name == conf.name
        assert conf.family.family in registry.family_names()
        for spec in (conf.family.upstream["ours"], conf.family.target["ours"]):
            assert isinstance(registry.import_class(spec), type), spec
