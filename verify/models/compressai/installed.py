"""Choose the CompressAI-layout model class: ours, or the installed compressai's own.

Each mapping file names both: ``target.ours`` (our re-implementation, holding CompressAI master's
keys) and ``target.compressai_class`` (master's own class, after PRs #355/#356; PyPI compressai
1.2.8 lacks them). By default the verifier uses ours; when the installed compressai has the class,
:func:`target_class` can hand it out instead (to check a converted file against CompressAI itself).
Both are imported only on request.
"""

from __future__ import annotations

from typing import Literal

from lic_checkpoints.convert import registry
from lic_checkpoints.convert.errors import LicError

__all__ = ["MissingTargetClassError", "installed_classes", "target_class"]

Source = Literal["ours", "installed"]


class MissingTargetClassError(LicError):
    """The requested CompressAI-layout model class cannot be imported."""


def _class_path(family: str, source: Source) -> str:
    """Where ``family``'s class lives for ``source``, as its mapping file declares it."""
    try:
        target = registry.family(family).target
    except LicError as error:
        raise MissingTargetClassError(str(error)) from None
    if source == "ours":
        return target["ours"]
    return target.get("compressai_class") or ""


def _load_class(family: str, source: Source) -> type:
    path = _class_path(family, source)
    if not path:
        raise MissingTargetClassError(f"the {family} mapping names no CompressAI class")
    try:
        return registry.import_class(path)
    except LicError as error:
        raise MissingTargetClassError(str(error)) from None


def installed_classes() -> dict[str, type]:
    """The installed compressai's own classes, keyed by family.

    Families whose class the installed compressai lacks (all of them in 1.2.8) are left out.
    """
    found: dict[str, type] = {}
    for family in registry.family_names():
        try:
            found[family] = _load_class(family, "installed")
        except MissingTargetClassError:
            continue
    return found


def target_class(family: str, source: Source = "ours") -> type:
    """The CompressAI-layout model class for ``family`` from ``source``.

    ``"ours"`` imports our re-implementation, ``"installed"`` the installed compressai's class;
    either raises :class:`MissingTargetClassError` naming the class when it is not available.
    """
    if source == "ours":
        return _load_class(family, "ours")
    if source == "installed":
        try:
            return _load_class(family, "installed")
        except MissingTargetClassError as error:
            import compressai

            raise MissingTargetClassError(
                f"{error} (installed compressai {compressai.__version__} does not ship it; "
                f"use source='ours' or install a compressai with PRs #355/#356)"
            ) from error
    raise ValueError(f"source must be 'ours' or 'installed', got {source!r}")
