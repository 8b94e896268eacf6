"""The tree stays clean: pyflakes finds nothing, and no build artefact is committed."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PYTHON_FOLDERS = ("convert", "verify", "publish", "mappings", "lic_checkpoints", "benchmarks", "tools", "tests")


def test_pyflakes_reports_nothing():
    from pyflakes.api import checkRecursive
    from pyflakes.reporter import Reporter

    out, err = io.StringIO(), io.StringIO()
    found = checkRecursive([str(REPO_ROOT / folder) for folder in PYTHON_FOLDERS], Reporter(out, err))
    assert found == 0, out.getvalue() + err.getvalue()


def test_no_wheel_or_archive_is_tracked():
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    bad = [f for f in tracked.stdout.splitlines() if f.endswith((".whl", ".tar.gz", ".zip", ".egg"))]
    assert not bad, bad
