"""Build hook for one piece of metadata that depends on where lic-checkpoints is installed.

Everything else is declared in ``pyproject.toml``. The dependencies are computed here because of one
case: CompressAI master is distributed as ``compressai-temp`` (and forks under other names), which
installs the ``compressai`` package under another distribution name. A plain ``compressai>=1.2.8``
requirement would then make pip install PyPI's compressai 1.2.8 over master's files. So when the
environment being installed into already has a ``compressai`` package from a distribution not named
``compressai``, that requirement is left out and the installed package is used as it is; otherwise
(a fresh environment, or PyPI's compressai already there) it is required as usual.

``LIC_COMPRESSAI_REQUIREMENT`` overrides the choice: a requirement to use instead (e.g.
``compressai==1.2.8``), or an empty value for none.  The choice is made where the package is built:
it holds for installs from source (a checkout, ``-e .``, git, an sdist), not for a wheel built
elsewhere, whose metadata is fixed (install such a wheel with ``--no-deps`` beside master).
"""

from __future__ import annotations

import importlib.metadata
import os
import sysconfig

from setuptools import setup

COMPRESSAI = "compressai>=1.2.8"
REQUIREMENTS = [
    "torch>=2.1",
    "safetensors>=0.4",
    "huggingface-hub>=2.4",
    "click>=8.1",
    "deepdiff>=6",
    "pyyaml>=6",
    "numpy",
    "timm>=0.9",
    "einops>=0.6",
    "PyWavelets>=1.4",
    "pytorch-msssim>=1.0",
    "pillow",
    "tqdm>=4",
]


def _normalized(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def compressai_provider(paths: list[str]) -> str | None:
    """The distribution other than ``compressai`` that installed a ``compressai`` package in ``paths``."""
    for dist in importlib.metadata.distributions(path=paths):
        name = dist.metadata["Name"] or ""
        if _normalized(name) == "compressai":
            continue
        if any(str(f).replace("\\", "/") == "compressai/__init__.py" for f in dist.files or ()):
            return name
    return None


def target_site_packages() -> list[str]:
    """The install folders of the interpreter running the build (pip builds with the target's own
    interpreter; its isolated build environment hides these folders from ``sys.path``, not from
    ``sysconfig``)."""
    paths = sysconfig.get_paths()
    return list(dict.fromkeys(p for p in (paths.get("purelib"), paths.get("platlib")) if p and os.path.isdir(p)))


def compressai_requirement() -> list[str]:
    override = os.environ.get("LIC_COMPRESSAI_REQUIREMENT")
    if override is not None:
        return [override] if override.strip() else []
    return [] if compressai_provider(target_site_packages()) else [COMPRESSAI]


if __name__ == "__main__":
    setup(install_requires=REQUIREMENTS + compressai_requirement())
