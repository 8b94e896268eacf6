"""Verify a whole release at once: many checkpoints, one process, one report for the set.

``lic-verify A.pth.tar B.pth.tar ... --out-dir OUT`` converts each checkpoint into ``OUT/<name>/``
(or reuses the conversion already there when its ``config.json`` records this source's sha256 and
its model file still hashes to the recorded seal), runs the parity tiers and writes the usual
``parity_report.json`` / ``.md`` there; then ``OUT/release_report.json``, ``OUT/release_report.md``
(one row per checkpoint) and ``OUT/rd.png`` (bpp against PSNR and MS-SSIM in dB, reference and
target).  Checkpoints of one configuration share their two models (built once, weights reassigned).
A checkpoint that cannot be read, converted or verified gets a row saying why; the others still run.
The release numbers are averaged as CompressAI's ``eval_model`` averages: the mean over images of
per-image bpp, PSNR and MS-SSIM.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TextIO

from lic_checkpoints.convert.errors import LicError

SCHEMA = "lic-checkpoints/release-report-v1"
RELEASE_JSON = "release_report.json"
RELEASE_MARKDOWN = "release_report.md"
RD_PLOT = "rd.png"
_SUFFIXES = (".pth.tar", ".safetensors", ".pth", ".pt", ".tar", ".ckpt")
#: λ or quality in a file name: ``lambda0.05``, ``lmbda_0.0018``, ``q3``, ``quality-6``, ``mse0.0483``
_LAMBDA = re.compile(r"(?:lambda|lmbda|lmb|lam|mse|ms-?ssim|beta)[_=-]?(\d*\.\d+|\d+(?:e-?\d+)?)", re.I)
_QUALITY = re.compile(r"(?:^|[_\-.])(?:q|quality)[_=-]?(\d{1,2})(?!\d|\.\d)", re.I)
_BARE_FLOAT = re.compile(r"(?<![\d.])(0\.\d+)(?![\d.])")


def checkpoint_name(path: Path) -> str:
    """The folder name of a checkpoint's outputs: its file name without the checkpoint suffix."""
    stem = path.name
    for suffix in _SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def output_names(sources: Sequence[Path]) -> list[str]:
    """A distinct folder name per source; names that collide take their parent folder's name in front."""
    resolved = [p.resolve() for p in sources]
    twice = next((p for i, p in enumerate(resolved) if p in resolved[:i]), None)
    if twice is not None:
        raise LicError(f"{twice}: given twice")
    names = [checkpoint_name(p) for p in sources]
    names = [f"{p.resolve().parent.name}-{n}" if names.count(n) > 1 else n for p, n in zip(sources, names)]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise LicError(f"two checkpoints would be written to the same folder {dup!r}; rename one")
    return names


#: container entries (or entries of its ``args`` / ``hparams`` / ``config`` dict) that state λ or quality
_LAMBDA_ENTRY = re.compile(r"(?:(?:args|hparams|config)\.)?(?:lmbda|lambda|lmb|lam|lambda_rd|rd_lambda)", re.I)
_QUALITY_ENTRY = re.compile(r"(?:(?:args|hparams|config)\.)?(?:quality|q)", re.I)


def container_operating_point(values: dict[str, Any]) -> dict[str, Any]:
    """λ and quality as the checkpoint's container states them (see ``SourceCheckpoint.container_values``)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        number = type(value) in (int, float) and value > 0
        if number and "lambda" not in out and _LAMBDA_ENTRY.fullmatch(key):
            out["lambda"] = float(value)
        elif number and type(value) is int and "quality" not in out and _QUALITY_ENTRY.fullmatch(key):
            out["quality"] = value
    return out


def operating_point(name: str, container_values: dict[str, Any] | None = None) -> dict[str, Any]:
    """λ (or β) and quality as the container states them, else as the file name does ({} when neither)."""
    out = container_operating_point(container_values or {})
    if out:
        return out
    if m := _LAMBDA.search(name):
        out["lambda"] = float(m.group(1))
    elif m := _BARE_FLOAT.search(name):
        out["lambda"] = float(m.group(1))
    if m := _QUALITY.search(name):
        out["quality"] = int(m.group(1))
    return out


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    except OSError as exc:
        raise LicError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    return digest.hexdigest()


def reusable(folder: Path, source: Path) -> str | None:
    """Why the conversion in ``folder`` can be reused for ``source`` (None: it cannot).  The source is
    hashed only when the folder holds a conversion to compare it with."""
    from lic_checkpoints.convert.api import CONFIG_FILE, MODEL_FILE
    from lic_checkpoints.convert.seal import check_seal, recorded_seal

    config_path, model_path = folder / CONFIG_FILE, folder / MODEL_FILE
    if not (config_path.is_file() and model_path.is_file()):
        return None
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    recorded = config.get("source") if isinstance(config, dict) else None
    if not isinstance(recorded, dict) or recorded.get("sha256") != file_sha256(source):
        return None
    if recorded_seal(config) is None:
        return None
    try:
        check_seal(model_path, config)
    except LicError:
        return None
    return "reused: config.json records this source's sha256 and the model file matches its seal"


# --- the report of a release ----------------------------------------------------------------------


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return float(sum(values) / len(values)) if values else None


def _msssim_db(value: float | None) -> float | None:
    if value is None:
        return None
    return float("inf") if value >= 1 else -10 * math.log10(1 - value)


@dataclass
class ReleaseRow:
    name: str
    source: str
    folder: str | None = None
    family: str | None = None
    variant: str | None = None
    operating_point: dict[str, Any] = field(default_factory=dict)
    verdict: str = "error"  # passed | FAILED | error
    why: str = ""  # one line: the first failure, or the error
    conversion: str = ""
    #: per side ("reference", "target"): mean over images of bpp, psnr, ms_ssim (and ms_ssim_db)
    metrics: dict[str, dict[str, float | None]] = field(default_factory=dict)
    metrics_from: str | None = None  # "T3 (coded bytes)" or "T1 (estimated from likelihoods)"
    worst_t1: dict[str, Any] | None = None
    bytes: dict[str, int] | None = None  # total coded bytes over the images, per side (T2)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.verdict == "passed"


def summarize(row: ReleaseRow, report) -> None:
    """Fill ``row`` from a parity report (numbers averaged as CompressAI's eval_model does)."""
    row.family, row.variant = report.family, report.variant
    stated = operating_point(Path(row.source).name, report.source.get("container_values"))
    if stated:  # the container's statement, now known, before the file name's
        row.operating_point = stated
    row.verdict = "passed" if report.passed else "FAILED"
    failure = report.first_failure()
    if failure is not None:
        row.why = f"{failure[0].tier} {failure[1].name}: {failure[1].detail}".splitlines()[0]
    elif not report.passed:
        skipped = next((t for t in report.tiers if t.skipped), None)
        row.why = f"{skipped.tier} skipped: {skipped.skipped}" if skipped else "no tier ran"
    tiers = {t.tier: t for t in report.tiers if not t.skipped}
    if report.eval_model:  # T3: real bytes
        labels = list(report.eval_model)
        for side, label in zip(("reference", "target"), labels):
            per_image = report.eval_model[label].get("per_image", {}).values()
            row.metrics[side] = {
                "bpp": _mean(v["bpp"] for v in per_image),
                "psnr": _mean(v["psnr-rgb"] for v in per_image),
                "ms_ssim": _mean(v["ms-ssim-rgb"] for v in per_image),
            }
            row.metrics[side]["ms_ssim_db"] = _msssim_db(row.metrics[side]["ms_ssim"])
        row.metrics_from = "T3 (coded bytes)"
    elif "T1" in tiers:
        est = [c.values for c in tiers["T1"].checks if c.name.endswith(": estimated bpp / PSNR")]
        if est:
            for side in ("reference", "target"):
                row.metrics[side] = {"bpp": _mean(v[f"bpp_{side}"] for v in est),
                                     "psnr": _mean(v[f"psnr_{side}"] for v in est), "ms_ssim": None,
                                     "ms_ssim_db": None}
            row.metrics_from = "T1 (estimated from likelihoods)"
    if "T1" in tiers:
        compared = [c for c in tiers["T1"].checks if "max_abs" in c.values]
        if compared:
            worst = max(compared, key=lambda c: c.values["max_abs"])
            row.worst_t1 = {"check": worst.name, "max_abs": worst.values["max_abs"],
                            "max_rel": worst.values.get("max_rel")}
    if "T2" in tiers:
        counted = [c.values for c in tiers["T2"].checks if "reference_bytes" in c.values]
        if counted:
            row.bytes = {"reference": sum(v["reference_bytes"] for v in counted),
                         "target": sum(v["target_bytes"] for v in counted)}


@dataclass
class ReleaseReport:
    rows: list[ReleaseRow]
    images: list[str]
    tiers: list[str]
    runtime: dict[str, Any]
    out_dir: Path
    seconds: float = 0.0
    builds: int = 0
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.passed for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        from .report import versions

        return {"schema": SCHEMA, "passed": self.passed, "created": self.created, "versions": versions(),
                "images": self.images, "tiers": self.tiers, "runtime": self.runtime,
                "averaging": "mean over images of per-image bpp, PSNR and MS-SSIM (as CompressAI's eval_model)",
                "models_built": self.builds, "seconds": round(self.seconds, 3),
                "rows": [asdict(r) for r in self.rows]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def to_markdown(self) -> str:
        def num(value, fmt):
            return "—" if value is None else format(value, fmt)

        verdict = "✅ every checkpoint passed" if self.passed else "❌ FAILED"
        out = [f"## Release report — {verdict}", "",
               f"- Checkpoints: {len(self.rows)}, passed: {sum(r.passed for r in self.rows)}",
               f"- Images ({len(self.images)}): {', '.join(self.images)}",
               f"- Tiers: {', '.join(self.tiers)}; run on {self.runtime.get('device')} "
               f"({self.runtime.get('threads')} CPU threads; entropy coding on the CPU)",
               "- Numbers: mean over images of per-image bpp, PSNR, MS-SSIM (as CompressAI's eval_model)",
               "", "| checkpoint | family / variant | λ / quality | verdict | bpp ref / tgt | PSNR ref / tgt "
               "| MS-SSIM ref / tgt | worst T1 max abs | bytes ref / tgt | why |",
               "|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            ref, tgt = r.metrics.get("reference", {}), r.metrics.get("target", {})
            point = ", ".join(f"{'λ' if k == 'lambda' else k} {v:g}" for k, v in r.operating_point.items()) or "—"
            out.append(
                f"| `{r.name}` | {r.family or '—'} / {r.variant or '—'} | {point} | "
                f"{'**' + r.verdict + '**' if not r.passed else r.verdict} | "
                f"{num(ref.get('bpp'), '.4f')} / {num(tgt.get('bpp'), '.4f')} | "
                f"{num(ref.get('psnr'), '.3f')} / {num(tgt.get('psnr'), '.3f')} | "
                f"{num(ref.get('ms_ssim'), '.5f')} / {num(tgt.get('ms_ssim'), '.5f')} | "
                f"{num((r.worst_t1 or {}).get('max_abs'), '.3g')} | "
                f"{(str(r.bytes['reference']) + ' / ' + str(r.bytes['target'])) if r.bytes else '—'} | "
                f"{r.why.replace('|', '/') or '—'} |")
        out += ["", f"![rate-distortion]({RD_PLOT})"]
        return "\n".join(out) + "\n"

    def write(self) -> list[Path]:
        from lic_checkpoints.convert.writer import atomic_path

        from . import rd_plot

        paths = [self.out_dir / RELEASE_JSON, self.out_dir / RELEASE_MARKDOWN]
        for path, text in zip(paths, (self.to_json() + "\n", self.to_markdown())):
            with atomic_path(path) as tmp:
                tmp.write_text(text)

        def series(metric: str) -> list:
            return [(side, [(r.metrics[side]["bpp"], r.metrics[side][metric]) for r in self.rows
                            if side in r.metrics and r.metrics[side].get(metric) is not None
                            and r.metrics[side].get("bpp") is not None]) for side in ("reference", "target")]

        paths.append(rd_plot.draw(self.out_dir / RD_PLOT, [
            ("PSNR", "bpp", "PSNR [dB]", series("psnr")),
            ("MS-SSIM", "bpp", "MS-SSIM [dB]", series("ms_ssim_db")),
        ]))
        return paths


# --- progress -------------------------------------------------------------------------------------


class Progress:
    """One bar over checkpoints x images on a terminal (tqdm, with an ETA); plain lines otherwise."""

    def __init__(self, total: int, *, quiet: bool = False, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.quiet, self.total, self.done = quiet, total, 0
        self.started = time.perf_counter()
        self.bar = None
        if not quiet and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", file=self.stream, dynamic_ncols=True, leave=True)

    def stage(self, name: str, message: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"{name}: {message}", refresh=True)

    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        elif not self.quiet:
            print(text, file=self.stream, flush=True)

    def advance(self, count: int, text: str) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
            self.bar.write(text, file=self.stream)
        elif not self.quiet:
            elapsed = time.perf_counter() - self.started
            eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
            print(f"[{self.done}/{self.total} images] {text} (elapsed {elapsed:.0f} s, ETA {eta:.0f} s)",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- the run --------------------------------------------------------------------------------------


def verify_release(
    sources: Sequence[str | Path],
    out_dir: str | Path,
    *,
    images: str | Path | Sequence[str | Path] | None = None,
    tiers: Iterable[str] = ("T0", "T1", "T2", "T3"),
    tolerances=None,
    device: str | None = "cpu",
    family: str | None = None,
    target: str = "ours",
    trust_pickle: bool = False,
    upstream_repo: str | Path | None = None,
    check_integrity: bool = True,
    quiet: bool = True,
    stream: TextIO | None = None,
    on_row: Callable[[ReleaseRow], None] | None = None,
) -> ReleaseReport:
    """Convert (or reuse) and verify every checkpoint of ``sources`` into ``out_dir``; write the release
    report and plot there.  Usage errors (no sources, unreadable images, a device that is absent) raise
    :class:`LicError` before any work; a checkpoint's own failure is its row's verdict."""
    import torch

    from lic_checkpoints.convert.api import convert_checkpoint

    from . import device as device_mod
    from . import images as images_mod
    from .api import ALL_TIERS, verify_checkpoint
    from .builders import ModelCache

    if not sources:
        raise LicError("give the checkpoints to verify")
    started = time.perf_counter()
    sources = [Path(s) for s in sources]
    names = output_names(sources)
    run_on = device_mod.resolve(device)
    wanted = [t for t in ALL_TIERS if t in set(tiers)]
    loaded = images_mod.load(images)  # a bad image set is a usage error, up front
    if "T3" in wanted:
        images_mod.require_ms_ssim_size(loaded)
    image_names = [i.name for i in loaded]
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LicError(f"{out_dir}: exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    models = ModelCache()
    progress = Progress(len(sources) * len(image_names), quiet=quiet, stream=stream)
    rows = []
    try:
        for src, name in zip(sources, names):
            t = time.perf_counter()
            row = ReleaseRow(name=name, source=str(src), operating_point=operating_point(src.name))
            before = progress.done
            folder = out_dir / name
            try:
                progress.stage(name, "converting")
                why = reusable(folder, src)
                if why is None:
                    convert_checkpoint(src, folder, family=family, trust_pickle=trust_pickle)
                    why = "converted"
                row.conversion, row.folder = why, str(folder)
                report = verify_checkpoint(
                    src, folder, family=family, images=images, tiers=wanted, tolerances=tolerances, target=target,
                    trust_pickle=trust_pickle, upstream_repo=upstream_repo, check_integrity=check_integrity,
                    device=run_on, models=models, progress=lambda m, n=name: progress.stage(n, m),
                    on_image=lambda i, n=name: progress.advance(1, f"{n}: {image_names[i]} done"))
                report.write(folder)
                summarize(row, report)
            except LicError as error:
                row.verdict, row.why = "error", str(error).splitlines()[0] if str(error) else type(error).__name__
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as error:  # noqa: BLE001 - one checkpoint's crash must not lose the release
                text = str(error).strip().splitlines()
                row.verdict, row.why = "error", f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")
            row.seconds = round(time.perf_counter() - t, 3)
            rows.append(row)
            if on_row is not None:
                on_row(row)
            ticked = progress.done - before
            progress.advance(len(image_names) - ticked, f"{name}: {row.verdict}" + (f" ({row.why})" if row.why else ""))
    finally:
        progress.close()
    runtime = {**device_mod.runtime(run_on, "T2" in wanted or "T3" in wanted), "threads": torch.get_num_threads()}
    release = ReleaseReport(rows, image_names, wanted, runtime, out_dir, builds=models.builds)
    release.seconds = time.perf_counter() - started
    release.write()
    return release
