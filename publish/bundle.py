"""What one push sends: the converted folder's files plus a generated model card.

:func:`collect` reads a ``lic-convert`` output folder (with the parity report that ``lic-verify``
writes beside it), checks it is fit to publish and returns a :class:`Bundle`.  The same bundle
feeds the real commit and the ``--dry-run`` staging folder, so what is staged is what is sent.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lic_checkpoints.convert.api import CONFIG_FILE, CONFIG_FORMAT, MODEL_FILE
from lic_checkpoints.convert.errors import LicError
from lic_checkpoints.convert.seal import check_seal

from . import card
from .errors import ParityRefusedError, PublishError

PARITY_JSON = "parity_report.json"
PARITY_MARKDOWN = "parity_report.md"
PARITY_SCHEMA = "lic-checkpoints/parity-report-v1"
CARD_FILE = "README.md"
HASH_BLOCK = 1 << 20


@dataclass(frozen=True)
class BundleFile:
    """One file of the commit: held in memory (``data``) or read from disk (``source``)."""

    name: str
    data: bytes | None = None
    source: Path | None = None

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else self.source.stat().st_size

    def sha256(self) -> str:
        if self.data is not None:
            return hashlib.sha256(self.data).hexdigest()
        digest = hashlib.sha256()
        with self.source.open("rb") as handle:
            while block := handle.read(HASH_BLOCK):
                digest.update(block)
        return digest.hexdigest()

    def payload(self) -> bytes | str:
        """What ``CommitOperationAdd`` takes: the bytes, or the path of a file on disk."""
        return self.data if self.data is not None else str(self.source)


@dataclass
class Bundle:
    """The checked contents of one push."""

    folder: Path
    config: dict[str, Any]
    parity: dict[str, Any] | None
    parity_passed: bool
    files: list[BundleFile] = field(default_factory=list)

    @property
    def family(self) -> str:
        return self.config["family"]

    def names(self) -> list[str]:
        return [f.name for f in self.files]


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PublishError(f"{path}: cannot read the {what} ({exc.__class__.__name__}); re-run the tool that writes it")
    if not isinstance(value, dict):
        raise PublishError(f"{path}: the {what} is not a JSON object; re-run the tool that writes it")
    return value


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise PublishError(f"{folder}: no {CONFIG_FILE}; publish a folder written by lic-convert")
    config = _read_json(path, "converter config")
    if config.get("format") != CONFIG_FORMAT:
        raise PublishError(f"{path}: format is {config.get('format')!r}, expected {CONFIG_FORMAT!r}")
    return config


def _read_parity(folder: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    path = folder / PARITY_JSON
    if not path.is_file():
        return None
    report = _read_json(path, "parity report")
    if report.get("schema") != PARITY_SCHEMA:
        raise PublishError(f"{path}: schema is {report.get('schema')!r}, expected {PARITY_SCHEMA!r}")
    if not isinstance(report.get("passed"), bool):
        raise PublishError(f"{path}: 'passed' must be true or false")
    for key in ("family", "variant"):
        if report.get(key) != config.get(key):
            raise PublishError(f"{path}: the report is for {key} {report.get(key)!r} but {CONFIG_FILE} says "
                               f"{config.get(key)!r}; re-run lic-verify on this folder")
    return report


def _check_parity(folder: Path, report: dict[str, Any] | None, allow_failing: bool) -> bool:
    passed = bool(report and report["passed"])
    if passed or allow_failing:
        return passed
    if report is None:
        raise ParityRefusedError(f"{folder}: no {PARITY_JSON}; run lic-verify first "
                                 "(or pass --allow-failing-parity to publish without proof)")
    raise ParityRefusedError(f"{folder}: {PARITY_JSON} says the parity check FAILED; fix it "
                             "(or pass --allow-failing-parity to publish with a warning on the card)")


def collect(folder: str | Path, repo_id: str, *, allow_failing_parity: bool = False) -> Bundle:
    """Check ``folder`` and assemble the files of its push to ``repo_id`` (README.md first)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PublishError(f"{folder}: not a folder; give the output folder of lic-convert")
    model = folder / MODEL_FILE
    if not model.is_file():
        raise PublishError(f"{folder}: no {MODEL_FILE}; publish a folder written by lic-convert")
    config = _read_config(folder)
    try:
        check_seal(model, config)  # never publish a file that changed after its conversion
    except LicError as exc:
        raise PublishError(str(exc)) from None
    report = _read_parity(folder, config)
    passed = _check_parity(folder, report, allow_failing_parity)
    markdown_path = folder / PARITY_MARKDOWN
    markdown = markdown_path.read_text(encoding="utf-8") if markdown_path.is_file() else None
    text = card.render(config, repo_id, report=report, report_markdown=markdown)
    files = [
        BundleFile(CARD_FILE, data=text.encode("utf-8")),
        BundleFile(MODEL_FILE, source=model),
        BundleFile(CONFIG_FILE, data=(folder / CONFIG_FILE).read_bytes()),
    ]
    if report is not None:
        files.append(BundleFile(PARITY_JSON, data=(folder / PARITY_JSON).read_bytes()))
    return Bundle(folder, config, report, passed, files)


def stage(bundle: Bundle, staging: str | Path) -> list[tuple[str, int, str]]:
    """Write the bundle's files into ``staging``; return one (name, size, sha256) row per file.

    The folder may be new, empty or an earlier staging of the same files; anything else is refused
    rather than overwritten.
    """
    staging = Path(staging)
    if staging.exists():
        if not staging.is_dir():
            raise PublishError(f"{staging}: exists and is not a folder; choose another --stage-dir")
        strangers = sorted(p.name for p in staging.iterdir() if p.name not in bundle.names())
        if strangers or staging.resolve() == bundle.folder.resolve():
            raise PublishError(f"{staging}: holds other files ({', '.join(strangers) or 'the converted folder'}); "
                               "choose an empty or new --stage-dir")
    staging.mkdir(parents=True, exist_ok=True)
    rows = []
    for item in bundle.files:
        target = staging / item.name
        if item.data is not None:
            target.write_bytes(item.data)
        else:
            shutil.copyfile(item.source, target)
        rows.append((item.name, item.size, item.sha256()))
    return rows
