"""The public conversion functions: one way in for the CLI, the tests, ``lic-verify`` and the benchmarks.

``convert_checkpoint``: upstream checkpoint -> ``model.safetensors`` + ``config.json`` (CompressAI layout).
``restore_checkpoint``: a converted file -> the upstream layout again (``--inverse``).
``plan_conversion`` / ``convert_in_memory``: the same without writing, for verification.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .. import __version__
from . import detect as detect_mod
from . import dtypes, engine, layouts, report
from .checkpoint import SourceCheckpoint, read_checkpoint
from .detect import Detection
from .errors import CheckpointError, ConversionError, OutputError
from .finite import ByteRange, FileFiniteCheck, all_finite
from .writer import FileRange, output_lock, write_json, write_safetensors, write_torch

if TYPE_CHECKING:  # the conversion itself never imports torch
    import torch

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CONFIG_FORMAT = "lic-checkpoints/config-v1"


@dataclass
class ConversionResult:
    source: SourceCheckpoint
    detection: Detection
    plan: engine.Plan
    out_dir: Path | None = None
    files: list[Path] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    non_finite: list[str] = field(default_factory=list)
    bytes_written: int = 0

    @property
    def family(self) -> str:
        return self.detection.family

    @property
    def variant(self) -> str:
        return self.detection.variant.name


def plan_conversion(
    source: SourceCheckpoint, *, family: str | None = None, mapping: "str | Path | None" = None
) -> tuple[Detection, engine.Plan]:
    """Detect the family and variant of a read checkpoint and plan its conversion (no tensor is read).

    ``mapping`` replaces the shipped mapping files by one of the user's (e.g. while writing a new one).
    """
    shapes = {k: tuple(v.shape) for k, v in source.state_dict.items()}
    if mapping is not None:
        from .rules import load_mapping

        custom = load_mapping(Path(mapping))
        detection = detect_mod.detect(shapes, family or custom.family, mappings=(custom,))
    else:
        detection = detect_mod.detect(shapes, family)
    layout = layouts.load(detection.variant.layout, "target") if detection.variant.layout else None
    plan = engine.plan(source.state_dict, detection, layout)
    return detection, plan


def _require_ok(plan: engine.Plan, source: SourceCheckpoint) -> None:
    if not plan.ok:
        raise ConversionError(
            f"{source.path}: cannot convert as {plan.detection.describe()}: {plan.problems()}", report=plan
        )


def convert_in_memory(
    path: str | Path, *, family: str | None = None, trust_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], ConversionResult]:
    """The converted state dict in memory: renamed tensors share storage with the (mapped) source."""
    source = read_checkpoint(path, trust_pickle=trust_pickle)
    detection, plan = plan_conversion(source, family=family)
    _require_ok(plan, source)
    tensors = {step.target: engine.tensor(step, source.state_dict, own_storage=True) for step in plan.steps}
    result = ConversionResult(source, detection, plan)
    result.config = build_config(result)
    return tensors, result


def build_config(result: ConversionResult, *, source_sha256: str | None = None) -> dict[str, Any]:
    """The ``config.json`` of a conversion (``source_sha256`` stands in for the source's own hash)."""
    d, m, src = result.detection, result.detection.mapping, result.source
    return {
        "format": CONFIG_FORMAT,
        "tool": {"name": "lic-checkpoints", "version": __version__},
        "family": d.family,
        "variant": d.variant.name,
        "variables": d.variables,
        "target": {
            "class": m.target["class"],
            "compressai_class": m.target.get("compressai_class"),
            "kwargs": dict(d.variant.target_kwargs),
        },
        "upstream": {
            "repo": m.upstream.get("repo"),
            "commit": m.upstream.get("commit"),
            "paper": m.upstream.get("paper"),
            "class": m.upstream["class"],
            "kwargs": dict(d.variant.upstream_kwargs),
        },
        "license": m.license,
        "mapping": {"file": m.file, "version": m.version, "sha256": m.sha256, "layout": d.variant.layout},
        "source": {
            "file": src.path.name,
            "sha256": source_sha256 or src.sha256,
            "format": src.file_format,
            "container_entry": src.container_entry,
            "ignored_entries": src.ignored_entries,
            "module_prefix_stripped_from": src.stripped_prefix_keys,
        },
        "report": report.summary(result.plan),
        "dtypes_preserved": result.plan.dtype_notes,
        "non_finite_tensors": result.non_finite,
    }


def safetensors_metadata(config: Mapping[str, Any]) -> dict[str, str]:
    return {
        "format": "pt",
        "lic.family": config["family"],
        "lic.variant": config["variant"],
        "lic.variables": json.dumps(config["variables"], sort_keys=True),
        "lic.mapping": config["mapping"]["file"],
        "lic.mapping_version": str(config["mapping"]["version"]),
        "lic.mapping_sha256": config["mapping"]["sha256"],
        "lic.source_sha256": config["source"]["sha256"],
        "lic.target_class": config["target"]["class"],
        "lic.tool_version": config["tool"]["version"],
    }


def _prepare_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a folder; choose another -o")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot create the output folder ({exc.strerror})") from None


def convert_checkpoint(
    path: str | Path,
    out_dir: str | Path,
    *,
    family: str | None = None,
    output_format: str = "safetensors",
    trust_pickle: bool = False,
    progress: Callable[[int], None] | None = None,
    source: SourceCheckpoint | None = None,
) -> ConversionResult:
    """Convert one upstream checkpoint into ``out_dir`` (``model.safetensors`` + ``config.json``).

    Nothing is written unless the plan is complete; each file is written atomically.  Tensors the
    mapping only renames are copied file to file; only the ones a rule computes are read.  The model
    file takes its name only after the source passed its integrity scan and every tensor its NaN/Inf
    check.
    """
    own_source = source is None
    source = source or read_checkpoint(path, trust_pickle=trust_pickle, lazy=True)
    try:
        return _convert(source, Path(out_dir), family, output_format, progress)
    finally:
        if own_source:
            source.close()


#: stands in for the source's sha256 in the header until the background scan has it (same length)
_PENDING_SHA256 = "0" * 64


def _convert(source: SourceCheckpoint, out_dir: Path, family, output_format, progress) -> ConversionResult:
    detection, plan = plan_conversion(source, family=family)
    _require_ok(plan, source)
    result = ConversionResult(source, detection, plan, out_dir=out_dir)
    _prepare_out_dir(out_dir)
    steps = plan.by_target()
    tensors = source.tensors
    copies = _copies(plan, source) if output_format == "safetensors" else {}
    computed_non_finite: list[str] = []

    def produce(key: str):
        """A :class:`FileRange` for bytes copied as they are, else the computed value."""
        if key in copies:
            return copies[key]
        value = engine.tensor(steps[key], tensors, as_numpy=source.lazy)
        if not all_finite(value, steps[key].dtype):
            computed_non_finite.append(key)
        return value

    def finish_checks() -> dict[str, str]:
        """Wait for the background checks: the source's scan (raises if damaged) and the NaN/Inf one."""
        bad = set(computed_non_finite) | set(check.result() if check else ())
        result.non_finite = [s.target for s in plan.steps if s.target in bad]
        return safetensors_metadata(build_config(result))

    check = None
    if copies:
        ranges = [ByteRange(key, r.offset, r.nbytes, steps[key].dtype) for key, r in copies.items()]
        check = FileFiniteCheck(source.fileno, ranges)
    # One writer at a time per folder, so model and config always come from the same run.
    with output_lock(out_dir):
        if output_format == "safetensors":
            model_path = out_dir / MODEL_FILE
            early = safetensors_metadata(build_config(result, source_sha256=_PENDING_SHA256))
            result.bytes_written = write_safetensors(
                model_path,
                [(s.target, s.shape, s.dtype) for s in plan.steps],
                produce,
                early,
                progress=progress,
                final_metadata=finish_checks,
            )
        elif output_format == "pth":
            model_path = out_dir / "model.pth"
            values = {s.target: _as_torch(produce(s.target), s.dtype) for s in plan.steps}
            finish_checks()
            write_torch(model_path, values)
            result.bytes_written = model_path.stat().st_size
        else:
            raise OutputError(f"unknown output format {output_format!r}; use safetensors or pth")
        result.config = build_config(result)
        config_path = out_dir / CONFIG_FILE
        write_json(config_path, result.config)
    result.files = [model_path, config_path]
    return result


def _as_torch(value, dtype: str):
    import numpy as np
    import torch

    if not isinstance(value, np.ndarray):
        return value
    tensor = torch.from_numpy(np.ascontiguousarray(value))
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def _copies(plan: engine.Plan, source: SourceCheckpoint) -> dict[str, FileRange]:
    """Target key -> the source bytes it is, for every tensor the mapping passes on unchanged."""
    if not source.lazy:
        return {}
    copies = {}
    for step in plan.steps:
        if step.action not in ("rename", "fan_out"):
            continue
        where = source.locations[step.sources[0]]  # type: ignore[index]
        if where.contiguous and where.dtype == dtypes.name(step.dtype):
            copies[step.target] = FileRange(source.fileno, where.offset, where.nbytes)
    return copies


# --- the way back -------------------------------------------------------------------------------


def _read_converted(path: Path) -> tuple[SourceCheckpoint, dict[str, Any] | None]:
    if path.is_dir():
        config_path = path / CONFIG_FILE
        model = path / MODEL_FILE
        if not model.is_file():
            raise CheckpointError(f"{path}: no {MODEL_FILE} in this folder; give a lic-convert output folder or file")
        config = json.loads(config_path.read_text()) if config_path.is_file() else None
        return read_checkpoint(model), config
    return read_checkpoint(path), None


def restore_checkpoint(
    path: str | Path,
    out_file: str | Path,
    *,
    family: str | None = None,
    variant: str | None = None,
) -> tuple[dict[str, torch.Tensor], engine.Plan]:
    """Turn a converted file (or output folder) back into the upstream layout and save it.

    The result is ``{"state_dict": ...}`` in upstream key order, loadable by the authors' eval scripts.
    Derived buffers the conversion dropped are regenerated to their exact upstream values.
    """
    converted, config = _read_converted(Path(path))
    detection = _detection_of_converted(converted, config, family, variant)
    layout = layouts.load(detection.variant.layout, "upstream") if detection.variant.layout else None
    plan = engine.plan(converted.state_dict, detection, layout, direction=engine.INVERSE)
    if not plan.ok:
        raise ConversionError(f"{converted.path}: cannot convert back: {plan.problems()}", report=plan)
    failures = engine.check_dropped_values(plan, converted.state_dict)
    if failures:
        raise ConversionError(f"{converted.path}: cannot convert back: {failures[0]}", report=plan)
    state = {s.target: engine.tensor(s, converted.state_dict) for s in plan.steps}
    out_file = Path(out_file)
    _prepare_out_dir(out_file.parent)
    write_torch(out_file, {"state_dict": state})
    return state, plan


def _detection_of_converted(converted: SourceCheckpoint, config, family, variant) -> Detection:
    meta = converted.metadata
    family = family or (config or {}).get("family") or meta.get("lic.family")
    if not family:
        raise CheckpointError(
            f"{converted.path}: no lic-convert metadata; pass --family (and --variant) to convert it back"
        )
    mapping = detect_mod.mapping_for(family)
    variables: dict[str, Any] = {}
    if config and "variables" in config:
        variables = dict(config["variables"])
    elif "lic.variables" in meta:
        variables = json.loads(meta["lic.variables"])
    name = variant or (config or {}).get("variant") or meta.get("lic.variant")
    if not variables:
        chosen = next((v for v in mapping.variants if v.name == name), None) if name else (
            mapping.variants[0] if len(mapping.variants) == 1 else None)
        if chosen is None:
            names = ", ".join(v.name for v in mapping.variants)
            raise CheckpointError(f"{converted.path}: pass --variant (one of {names}) to convert it back")
        variables = dict(chosen.when)
    return Detection(mapping, variables, detect_mod.pick_variant(mapping, variables))
