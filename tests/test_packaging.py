"""Installing beside CompressAI master: ``setup.py`` leaves out ``compressai>=1.2.8`` when the
environment already holds a ``compressai`` package installed by a distribution of another name
(``compressai-temp``), so that pip does not write PyPI's 1.2.8 over it."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _setup_module():
    spec = importlib.util.spec_from_file_location("lic_setup_hook", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # runs no setup(): that is only for ``__main__``
    return module


hook = _setup_module()


def _install(site: Path, dist: str, version: str) -> None:
    """A distribution as pip leaves it: the package files and a dist-info whose RECORD lists them."""
    (site / "compressai").mkdir(parents=True, exist_ok=True)
    (site / "compressai" / "__init__.py").write_text(f"__version__ = {version!r}\n")
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "RECORD").write_text(f"compressai/__init__.py,,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n")


def test_master_under_another_name_is_kept(tmp_path, monkeypatch):
    _install(tmp_path, "compressai-temp", "1.2.9.dev0")
    assert hook.compressai_provider([str(tmp_path)]) == "compressai-temp"
    monkeypatch.delenv("LIC_COMPRESSAI_REQUIREMENT", raising=False)
    monkeypatch.setattr(hook, "target_site_packages", lambda: [str(tmp_path)])
    assert hook.compressai_requirement() == []


@pytest.mark.parametrize("present", [False, True], ids=["fresh environment", "pypi compressai"])
def test_otherwise_compressai_is_required(tmp_path, monkeypatch, present):
    if present:
        _install(tmp_path, "compressai", "1.2.8")
    assert hook.compressai_provider([str(tmp_path)]) is None
    monkeypatch.delenv("LIC_COMPRESSAI_REQUIREMENT", raising=False)
    monkeypatch.setattr(hook, "target_site_packages", lambda: [str(tmp_path)])
    assert hook.compressai_requirement() == ["compressai>=1.2.8"]


def test_the_environment_variable_overrides_the_choice(tmp_path, monkeypatch):
    _install(tmp_path, "compressai-temp", "1.2.9.dev0")
    monkeypatch.setattr(hook, "target_site_packages", lambda: [str(tmp_path)])
    monkeypatch.setenv("LIC_COMPRESSAI_REQUIREMENT", "compressai==1.2.8")
    assert hook.compressai_requirement() == ["compressai==1.2.8"]
    monkeypatch.setenv("LIC_COMPRESSAI_REQUIREMENT", "")
    assert hook.compressai_requirement() == []


def test_the_hook_looks_where_this_interpreter_installs():
    import sysconfig

    assert sysconfig.get_paths()["purelib"] in hook.target_site_packages()


def test_dependencies_are_declared_once_in_the_hook():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "dependencies" not in project and project["dynamic"] == ["dependencies"]
    assert not any(r.startswith("compressai") for r in hook.REQUIREMENTS)
    assert hook.COMPRESSAI == "compressai>=1.2.8"
