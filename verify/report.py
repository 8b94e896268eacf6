"""The parity report: one object, three renderings (terminal table, JSON, Markdown), and a baseline diff.

The JSON form is the durable one: it carries a schema version, the tool and library versions, the
source checkpoint's sha256, the mapping version, the input images' hashes, the tolerances, and every
check of every tier.  ``compare_to_baseline`` diffs two reports with deepdiff, ignoring what changes
from run to run (timestamps, timings, paths) and numbers within tolerance, for CI.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .tiers import Check, TierResult, Tolerances

SCHEMA = "lic-checkpoints/parity-report-v1"
REPORT_JSON = "parity_report.json"
REPORT_MARKDOWN = "parity_report.md"


def versions() -> dict[str, str]:
    import torch

    from lic_checkpoints import __version__

    out = {"lic-checkpoints": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for name in ("compressai", "safetensors", "numpy"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # pragma: no cover - reported as absent
            out[name] = "absent"
    return out


@dataclass
class ParityReport:
    family: str
    variant: str
    variables: dict[str, Any]
    source: dict[str, Any]
    converted: dict[str, Any]
    mapping: dict[str, Any]
    reference: str
    target: str
    inputs: list[dict[str, Any]]
    tolerances: Tolerances
    tiers: list[TierResult] = field(default_factory=list)
    eval_model: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: where the models ran: device, dtype, CPU threads (set when model tiers ran; see verify/device.py)
    runtime: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    @property
    def passed(self) -> bool:
        """Every tier that ran passed, and no requested tier was skipped."""
        return bool(self.tiers) and all(t.passed for t in self.tiers)

    def first_failure(self) -> tuple[TierResult, Check] | None:
        for tier in self.tiers:
            check = tier.first_failure()
            if check is not None:
                return tier, check
        return None

    # --- JSON ----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "passed": self.passed,
            "created": self.created,
            "versions": versions(),
            "family": self.family,
            "variant": self.variant,
            "variables": self.variables,
            "source": self.source,
            "converted": self.converted,
            "mapping": self.mapping,
            "reference": self.reference,
            "target": self.target,
            "inputs": self.inputs,
            "tolerances": asdict(self.tolerances),
            "tiers": {
                t.tier: {
                    "title": t.title,
                    "passed": t.passed,
                    "skipped": t.skipped,
                    "checks": [asdict(c) for c in t.checks],
                }
                for t in self.tiers
            },
            "eval_model": self.eval_model,
            "timings": self.timings,
            "notes": self.notes,
            "runtime": self.runtime,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_json_default)

    # --- text ----------------------------------------------------------------------------------

    def rows(self):
        """(tier, check name, status, detail) for every check; one row for a skipped tier."""
        for tier in self.tiers:
            if tier.skipped:
                yield tier, "", "skipped", tier.skipped
                continue
            for c in tier.checks:
                yield tier, c.name, ("pass" if not c.explained else "explained") if c.passed else "FAIL", c.detail

    def tolerance_line(self) -> str:
        t = self.tolerances
        return (f"T0 tensors and T2 symbols bit-exact; T1 allclose rtol={t.forward_rtol:g}, atol={t.forward_atol:g} "
                f"(likelihoods rtol={t.likelihood_rtol:g}, atol={t.likelihood_atol:g}); a flipped decision counts as "
                f"explained only within {t.flip_margin:g} of its boundary; T3 PSNR/MS-SSIM within {t.metric_atol:g}, "
                f"bytes within {t.stream_overhead_bytes} per extra rANS stream")

    def render_table(self, width: int = 110) -> str:
        lines = [f"parity report: {self.family} / {self.variant}  (reference: {self.reference}; target: {self.target})"]
        lines.append(f"{'TIER':<5} {'RESULT':<9} CHECK")
        for tier, name, status, detail in self.rows():
            text = f"{tier.tier:<5} {status:<9} {name or tier.title}: {detail}"
            lines.append(text if len(text) <= width else text[: width - 1] + "…")
        verdict = "PASSED" if self.passed else "FAILED"
        failure = self.first_failure()
        lines.append(f"result: {verdict}" + (f" (first failure: {failure[0].tier} {failure[1].name})" if failure else ""))
        lines.append("tolerances: " + self.tolerance_line())
        return "\n".join(lines)

    def _coding_place(self) -> str:
        where = self.runtime.get("coding_transforms_device")
        if where and where != "cpu":
            return f"entropy coding on the CPU, its analysis and synthesis on {where}"
        return "entropy coding on the CPU"

    def to_markdown(self) -> str:
        verdict = "✅ passed" if self.passed else "❌ FAILED"
        src = self.source
        out = [
            f"## Parity report: {self.family} / {self.variant} — {verdict}",
            "",
            f"- Source checkpoint: `{src.get('file')}` (sha256 `{src.get('sha256', '')[:16]}…`)",
            *([f"- Converted file: `{Path(self.converted['file']).name}`, its seal (sha256 of the tensor data) "
               f"{self.converted['seal']}"] if self.converted.get("seal") else []),
            f"- Mapping: `{self.mapping.get('file')}` v{self.mapping.get('version')}",
            f"- Reference: {self.reference}; target: {self.target}",
            f"- Inputs: {', '.join(i['name'] for i in self.inputs)}",
            *([f"- Run on: {self.runtime.get('device')} ({self.runtime.get('dtype')}, "
               f"{self.runtime.get('threads')} CPU threads; {self._coding_place()})"] if self.runtime else []),
            f"- Generated by lic-checkpoints {versions()['lic-checkpoints']} (torch {versions()['torch']}) on {self.created}",
            "",
            "| Tier | Check | Result | Details |",
            "|---|---|---|---|",
        ]
        for tier, name, status, detail in self.rows():
            status = "**FAIL**" if status == "FAIL" else status
            out.append(f"| {tier.tier} {tier.title} | {name or '—'} | {status} | {detail.replace('|', '/')} |")
        out += ["", f"Tolerances: {self.tolerance_line()}."]
        if self.notes:
            out += [""] + [f"> {n}" for n in self.notes]
        return "\n".join(out) + "\n"

    def write(self, folder: Path) -> tuple[Path, Path]:
        from lic_checkpoints.convert.writer import atomic_path

        folder.mkdir(parents=True, exist_ok=True)
        paths = (folder / REPORT_JSON, folder / REPORT_MARKDOWN)
        for path, text in zip(paths, (self.to_json() + "\n", self.to_markdown())):
            with atomic_path(path) as tmp:
                tmp.write_text(text)
        return paths


def _json_default(value):
    if isinstance(value, float):
        return value
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def schema() -> dict[str, Any]:
    """The JSON Schema the reports follow (shipped with the package)."""
    return json.loads((resources.files("lic_checkpoints.verify") / "report_schema.json").read_text())


# --- baseline comparison (CI) -------------------------------------------------------------------

#: paths that differ between two runs of the same code and carry no parity information
VOLATILE = [r"root\['created'\]", r"root\['timings'\]", r"root\['versions'\]", r"root\['source'\]\['file'\]",
            r"root\['converted'\]", r"root\['notes'\]", r"root\['runtime'\]"]


def compare_to_baseline(new: dict[str, Any], old: dict[str, Any], *, rel_tol: float = 1e-6) -> list[str]:
    """Differences that count as a regression, as readable lines (empty: no regression)."""
    from deepdiff import DeepDiff

    if old.get("schema") != SCHEMA:
        return [f"the baseline is not a {SCHEMA} report (schema {old.get('schema')!r})"]
    diff = DeepDiff(old, new, exclude_regex_paths=VOLATILE, ignore_order=False, math_epsilon=None,
                    significant_digits=None, ignore_numeric_type_changes=True, cutoff_distance_for_pairs=1.0)
    lines = []
    for kind, changes in diff.items():
        items = changes.items() if isinstance(changes, dict) else ((c, None) for c in changes)
        for path, change in items:
            if kind == "values_changed":
                a, b = change["old_value"], change["new_value"]
                if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
                    if abs(a - b) <= rel_tol * max(abs(a), abs(b), 1e-12):
                        continue
                lines.append(f"{_path(path)}: {a!r} -> {b!r}")
            elif kind == "type_changes":
                lines.append(f"{_path(path)}: {change['old_value']!r} -> {change['new_value']!r}")
            elif kind in ("dictionary_item_added", "iterable_item_added"):
                lines.append(f"{_path(path)}: added")
            elif kind in ("dictionary_item_removed", "iterable_item_removed"):
                lines.append(f"{_path(path)}: removed")
            else:
                lines.append(f"{_path(path)}: {kind}")
    return lines


def _path(path: str) -> str:
    return path.replace("root", "report", 1).replace("']['", ".").replace("['", ".").replace("']", "")
