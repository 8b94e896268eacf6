"""Choose the CompressAI-layout model class: ours, or the installed compressai's own.

CompressAI master ships ``DCAE``, ``SAAF`` and ``TCM`` (PRs #355/#356); PyPI compressai 1.2.8
does not, so by default the verifier uses our re-implementations, which hold the same keys. When
a compressai that has the classes is installed, :func:`target_class` can hand those out instead
(to check a converted file against CompressAI itself). Both sides are imported only on request.
"""

from __future__ import annotations

import importlib
from typing import Literal

from lic_checkpoints.convert.errors import LicError

__all__ = ["MissingTargetClassError", "installed_classes", "target_class"]

Source = Literal["ours", "installed"]

#: family -> (module name shared by compressai master and our package, class name).
#: TCM+AuxT is master's ``TCM`` built with ``use_auxt=True``.
TARGET_CLASSES: dict[str, tuple[str, str]] = {
    "dcae": ("dcae", "DCAE"),
    "saaf": ("saaf", "SAAF"),
    "tcm": ("tcm", "TCM"),
    "tcm_auxt": ("tcm", "TCM"),
}

INSTALLED_PACKAGE = "compressai.models"
OUR_PACKAGE = "lic_checkpoints.verify.models.compressai"


class MissingTargetClassError(LicError):
    """The requested CompressAI-layout model class cannot be imported."""


def _load_class(package: str, family: str) -> type:
    """Import ``package.<module>.<Class>`` for ``family``; raise a clear error if it is absent."""
    try:
        module_name, class_name = TARGET_CLASSES[family]
    except KeyError:
        raise MissingTargetClassError(
            f"unknown model family {family!r}; known families: {', '.join(sorted(TARGET_CLASSES))}"
        ) from None
    path = f"{package}.{module_name}.{class_name}"
    try:
        module = importlib.import_module(f"{package}.{module_name}")
    except ImportError as error:
        raise MissingTargetClassError(f"cannot import {path}: {error}") from error
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise MissingTargetClassError(f"cannot import {path}: the module has no class {class_name}")
    return cls


def installed_classes() -> dict[str, type]:
    """The installed compressai's own DCAE / SAAF / TCM classes, keyed by family.

    Families whose class the installed compressai lacks (all of them in 1.2.8) are left out.
    """
    found: dict[str, type] = {}
    for family in TARGET_CLASSES:
        try:
            found[family] = _load_class(INSTALLED_PACKAGE, family)
        except MissingTargetClassError:
            continue
    return found


def target_class(family: str, source: Source = "ours") -> type:
    """The CompressAI-layout model class for ``family`` from ``source``.

    ``"ours"`` imports our re-implementation, ``"installed"`` the installed compressai's class;
    either raises :class:`MissingTargetClassError` naming the class when it is not available.
    """
    if source == "ours":
        return _load_class(OUR_PACKAGE, family)
    if source == "installed":
        try:
            return _load_class(INSTALLED_PACKAGE, family)
        except MissingTargetClassError as error:
            import compressai

            raise MissingTargetClassError(
                f"{error} (installed compressai {compressai.__version__} does not ship it; "
                f"use source='ours' or install a compressai with PRs #355/#356)"
            ) from error
    raise ValueError(f"source must be 'ours' or 'installed', got {source!r}")
