"""The public conversion functions: one way in for the CLI, the tests, ``lic-verify`` and the benchmarks.

``convert_checkpoint``: upstream checkpoint -> ``model.safetensors`` + ``config.json`` (CompressAI layout).
``restore_checkpoint``: a converted file -> the upstream layout again (``--inverse``), spelled the way
the source spelled its keys (:class:`Spelling`, recorded by the conversion) unless asked for canonical names.
``plan_conversion`` / ``convert_in_memory``: the same without writing, for verification.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .. import __version__
from . import detect as detect_mod
from . import dtypes, engine, layouts, report, seal
from .checkpoint import SourceCheckpoint, read_checkpoint
from .detect import Detection
from .errors import CheckpointError, ConversionError, OutputError
from .finite import all_finite
from .ops import Spec
from .writer import FileRange, FileRuns, output_lock, write_json, write_safetensors, write_torch

if TYPE_CHECKING:  # the conversion itself never imports torch
    import torch

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CONFIG_FORMAT = "lic-checkpoints/config-v1"


@dataclass(frozen=True)
class Spelling:
    """How a source checkpoint spelled its keys: recorded by the conversion, given back by ``--inverse``.

    The restored name of each tensor is its canonical upstream name with the source's ``from:``
    alternatives (``alternatives``), then ``key_prefix`` in front, then ``renamed_keys`` for the keys
    those two do not give back; the tensors come in the layout's order unless ``key_order`` says
    otherwise; the state dict goes into ``container_entry``.
    """

    #: put in front of every key (``module.`` from DataParallel); "" for none.  With a prefix on only
    #: some keys it is the most common one, and ``renamed_keys`` holds the others.
    key_prefix: str = ""
    #: rule name -> index of the ``from:`` alternative the source used (with mixed use: the most used)
    alternatives: Mapping[str, int] = field(default_factory=dict)
    #: key as prefix and alternatives spell it -> key as the source stored it, where those differ
    renamed_keys: Mapping[str, str] = field(default_factory=dict)
    #: None: the source's order is the layout's; else ``[start, length]`` runs of the layout's order,
    #: concatenated in the source's order
    key_order: tuple[tuple[int, int], ...] | None = None
    #: the top-level entry that holds the state dict (``state_dict``, ``model``, ...); None: a bare state dict
    container_entry: str | None = "state_dict"
    #: the container's other top-level entries (optimizer, epoch, ...): listed, never restored
    other_entries: tuple[str, ...] = ()
    #: restored key -> dtype the source stored it in, for tensors the inverse regenerates (derived
    #: buffers the conversion dropped) where that is not the layout's dtype (e.g. a float16 file)
    dtypes: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "key_prefix": self.key_prefix,
            "alternatives": dict(self.alternatives),
            "renamed_keys": dict(self.renamed_keys),
            "key_order": [list(run) for run in self.key_order] if self.key_order is not None else None,
            "container_entry": self.container_entry,
            "other_entries": list(self.other_entries),
            "dtypes": dict(self.dtypes),
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> "Spelling":
        """Read a recorded spelling; anything malformed is a one-line error naming ``where``."""

        def bad(what: str) -> CheckpointError:
            return CheckpointError(f"{where}: the recorded key spelling is malformed ({what}); "
                                   "convert back with --canonical")

        if not isinstance(data, dict):
            raise bad("not an object")
        prefix = data.get("key_prefix", "")
        alternatives = data.get("alternatives", {})
        renamed = data.get("renamed_keys", {})
        order = data.get("key_order")
        entry = data.get("container_entry", "state_dict")
        others = data.get("other_entries", [])
        stored_dtypes = data.get("dtypes", {})
        if not isinstance(prefix, str):
            raise bad("key_prefix is not a string")
        if not isinstance(alternatives, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in alternatives.values()):
            raise bad("alternatives is not a map of rule names to indexes")
        if not isinstance(renamed, dict) or not all(isinstance(v, str) for v in renamed.values()):
            raise bad("renamed_keys is not a map of keys to keys")
        if not isinstance(stored_dtypes, dict) or not all(
                isinstance(v, str) and dtypes.known(v) for v in stored_dtypes.values()):
            raise bad("dtypes is not a map of keys to dtype names")
        if order is not None and not (isinstance(order, list) and all(
                isinstance(r, list) and len(r) == 2 and all(isinstance(n, int) and n >= 0 for n in r) for r in order)):
            raise bad("key_order is not a list of [start, length] runs")
        if entry is not None and not isinstance(entry, str):
            raise bad("container_entry is not a string")
        if not isinstance(others, list) or not all(isinstance(k, str) for k in others):
            raise bad("other_entries is not a list of names")
        return cls(prefix, dict(alternatives), dict(renamed),
                   tuple((a, b) for a, b in order) if order is not None else None, entry, tuple(others),
                   dict(stored_dtypes))

    def describe(self) -> str:
        parts = [f"prefix {self.key_prefix!r}" if self.key_prefix else "no prefix"]
        used = sorted(name for name, index in self.alternatives.items() if index)
        if used:
            parts.append(f"alternative names for {len(used)} rule(s) ({', '.join(used)})")
        if self.renamed_keys:
            parts.append(f"{len(self.renamed_keys)} key(s) named one by one")
        if self.key_order is not None:
            parts.append("the source's key order")
        if self.dtypes:
            parts.append(f"{len(self.dtypes)} regenerated buffer(s) in the source's dtype")
        parts.append(f"in {self.container_entry!r}" if self.container_entry else "a bare state dict")
        return ", ".join(parts)


#: upstream's plain names: no prefix, the first alternative of every rule, ``{"state_dict": ...}``
CANONICAL = Spelling()


def source_spelling(
    plan: engine.Plan,
    source_keys: list[str],
    stored_as: Mapping[str, str],
    upstream_layout: layouts.Layout | None,
    *,
    container_entry: str | None = None,
    other_entries: tuple[str, ...] | list[str] = (),
    source_dtype: Callable[[str], str] | None = None,
) -> Spelling:
    """How the source of the forward ``plan`` spelled its keys.

    ``source_keys``: the source's keys as read (``module.`` removed), in the file's order;
    ``stored_as``: key as read -> key as the file stores it, for the keys reading changed.
    Alternatives come from the plan's counts.  When the plan is complete, the inverse is
    planned on the converted shapes (no tensor is read) and its result compared with the source's
    keys: ``renamed_keys`` then lists every key prefix and alternatives do not give back, and
    ``key_order`` the source's order when it is not the layout's, so that the recorded spelling
    restores every key exactly.  ``source_dtype(key as read)`` gives a source tensor's dtype: the
    regenerated buffers whose stored dtype is not the layout's are recorded in ``dtypes``.
    """
    prefix = _common_prefix(source_keys, stored_as)
    alternatives = {name: max(sorted(counts), key=lambda i: counts[i]) for name, counts in plan.alternatives.items()}
    spelling = Spelling(prefix, alternatives, {}, None, container_entry, tuple(other_entries))
    if not plan.ok:
        return spelling
    specs = {s.target: Spec(s.shape, s.dtype) for s in plan.steps}
    # keys a rule dropped for good are not given back: the spelling covers the rest
    upstream_layout, _ = engine.restorable_layout(upstream_layout, plan.detection.mapping.rules)
    inverse = engine.plan(specs, plan.detection, upstream_layout, direction=engine.INVERSE, alternatives=alternatives)
    if not inverse.ok:
        return spelling
    origin = {s.target: s.sources[0] for s in plan.steps if s.sources}
    dropped: dict[str, list[str]] = {}
    for key, rule in plan.dropped:
        dropped.setdefault(rule.name, []).append(key)
    restored: list[str] = []
    originals: list[str | None] = []
    regenerated_dtypes: dict[str, str] = {}
    for step in inverse.steps:
        spelled = step.spelled or step.target
        if step.sources:
            cleaned = origin.get(step.sources[0])
        else:  # a derived buffer the conversion dropped: the inverse regenerates it under its own name
            pool = dropped.get(step.rule.name, [])
            cleaned = spelled if spelled in pool else None
            if cleaned is not None:
                pool.remove(cleaned)
                stored = source_dtype(cleaned) if source_dtype is not None else step.dtype
                if stored != step.dtype:
                    regenerated_dtypes[prefix + spelled] = stored
        restored.append(prefix + spelled)
        originals.append(stored_as.get(cleaned, cleaned) if cleaned is not None else None)
    renamed = {r: o for r, o in zip(restored, originals) if o is not None and r != o}
    rank = {stored_as.get(k, k): i for i, k in enumerate(source_keys)}
    paired = sorted((j for j, o in enumerate(originals) if o is not None), key=lambda j: rank[originals[j]])
    sequence = paired + [j for j, o in enumerate(originals) if o is None]
    order = None if sequence == list(range(len(sequence))) else _runs(sequence)
    stored_dtypes = {renamed.get(key, key): dtype for key, dtype in regenerated_dtypes.items()}
    return Spelling(prefix, alternatives, renamed, order, container_entry, tuple(other_entries), stored_dtypes)


def _common_prefix(source_keys: list[str], stored_as: Mapping[str, str]) -> str:
    """The text most keys have in front of their name as read ("" when most have none)."""
    fronts: Counter[str] = Counter()
    for key in source_keys:
        stored = stored_as.get(key, key)
        if stored.endswith(key):
            fronts[stored[: len(stored) - len(key)]] += 1
    if not fronts:
        return ""
    return max(sorted(fronts), key=fronts.__getitem__)  # ties: the shortest, so "" before "module."


def _runs(sequence: list[int]) -> tuple[tuple[int, int], ...]:
    """``[start, length]`` runs of consecutive indexes that concatenate to ``sequence``."""
    runs: list[list[int]] = []
    for index in sequence:
        if runs and runs[-1][0] + runs[-1][1] == index:
            runs[-1][1] += 1
        else:
            runs.append([index, 1])
    return tuple((a, b) for a, b in runs)


def _expand_runs(runs: tuple[tuple[int, int], ...], count: int, where: str) -> list[int]:
    order = [i for start, length in runs for i in range(start, start + length)]
    if sorted(order) != list(range(count)):
        raise ConversionError(f"{where}: the recorded key order does not fit the {count} tensors restored; "
                              "convert back with --canonical")
    return order


def spelling_of(source: SourceCheckpoint, plan: engine.Plan, upstream_layout: layouts.Layout | None) -> Spelling:
    """:func:`source_spelling` of a read checkpoint (its keys in the file's order and its container)."""
    return source_spelling(plan, list(source.state_dict), source.stored_as, upstream_layout,
                           container_entry=source.container_entry, other_entries=source.ignored_entries,
                           source_dtype=lambda key: dtypes.name(source.state_dict[key].dtype))


def spelled_steps(inverse: engine.Plan, spelling: Spelling, where: str) -> list[tuple[str, engine.Step]]:
    """Each step of an inverse plan with the key it is written under, in the order it is written.

    ``inverse`` must have been planned with ``spelling.alternatives``.  Raises a one-line
    :class:`ConversionError` when the spelling does not fit the plan (recorded for another file).
    """
    compact = [spelling.key_prefix + (step.spelled or step.target) for step in inverse.steps]
    stray = sorted(set(spelling.renamed_keys) - set(compact))
    if stray:
        raise ConversionError(f"{where}: the recorded spelling renames {stray[0]!r}, which this file does not "
                              "give back; convert back with --canonical")
    keys = [spelling.renamed_keys.get(key, key) for key in compact]
    order = _expand_runs(spelling.key_order, len(keys), where) if spelling.key_order is not None else range(len(keys))
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            raise ConversionError(f"{where}: the recorded spelling names two tensors {key!r}; "
                                  "convert back with --canonical")
        seen.add(key)
    return [(keys[i], inverse.steps[i]) for i in order]


def spelled_tensor(key: str, step: engine.Step, tensors: Mapping[str, Any], spelling: Spelling):
    """The restored value of ``step`` under ``key``, in the dtype the source stored it in."""
    value = engine.tensor(step, tensors)
    stored = spelling.dtypes.get(key)
    if stored is not None and dtypes.name(value.dtype) != stored:
        value = value.to(dtypes.to_torch(stored))
    return value


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
    tensor_data_sha256: str | None = None  # the seal of model.safetensors (see seal.py)
    spelling: Spelling | None = None  # how the source spelled its keys (set once the plan is complete)
    _summary: dict[str, Any] | None = field(default=None, repr=False)

    def summary(self) -> dict[str, Any]:
        """The load report's summary of the plan (made once: ``config.json`` is built up to three times)."""
        if self._summary is None:
            self._summary = report.summary(self.plan)
        return self._summary

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
    result = ConversionResult(source, detection, plan, spelling=spelling_of(source, plan, _upstream_layout(detection)))
    result.config = build_config(result)
    return tensors, result


def _upstream_layout(detection: Detection) -> layouts.Layout | None:
    return layouts.load(detection.variant.layout, "upstream") if detection.variant.layout else None


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
            "spelling": result.spelling.to_json() if result.spelling is not None else None,
            "dropped": dropped_record(result.plan),
        },
        "report": result.summary(),
        "dtypes_preserved": result.plan.dtype_notes,
        "non_finite_tensors": result.non_finite,
        **({seal.SEAL_SECTION: {"file": MODEL_FILE, seal.SEAL_KEY: result.tensor_data_sha256}}
           if result.tensor_data_sha256 else {}),
    }


def dropped_record(plan: engine.Plan) -> list[dict[str, Any]]:
    """Per drop rule that took source keys: how many, whether ``--inverse`` can restore them, why."""
    counts: dict[str, list] = {}
    for _, rule in plan.dropped:
        counts.setdefault(rule.name, [0, rule])[0] += 1
    return [{"rule": name, "count": n, "restorable": rule.restore_value is not None, "reason": rule.reason}
            for name, (n, rule) in counts.items()]


def safetensors_metadata(config: Mapping[str, Any]) -> dict[str, str]:
    meta = {
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
    unrestorable = {d["rule"]: d["count"] for d in config["source"].get("dropped") or [] if not d["restorable"]}
    if unrestorable:  # so that --inverse on a bare model.safetensors knows what it cannot give back
        meta["lic.unrestorable"] = json.dumps(unrestorable, separators=(",", ":"))
    spelling = config["source"].get("spelling")
    if spelling is not None:  # so that a bare model.safetensors converts back to the source's names too
        meta["lic.spelling"] = json.dumps(spelling, separators=(",", ":"))
    return meta


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
    mapping only renames, or only rearranges in runs of bytes, are copied file to file; only the ones a
    rule computes are read.  The model file takes its name only after the source passed its integrity
    scan and every tensor its NaN/Inf check.
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
    result = ConversionResult(source, detection, plan, out_dir=out_dir,
                              spelling=spelling_of(source, plan, _upstream_layout(detection)))
    _prepare_out_dir(out_dir)
    steps = plan.by_target()
    tensors = source.tensors
    copies = _copies(plan, source) if output_format == "safetensors" else {}

    def produce(key: str):
        """A :class:`FileRange` for bytes copied as they are, else the computed value."""
        if key in copies:
            return copies[key]
        return engine.tensor(steps[key], tensors, as_numpy=source.lazy)

    def finish_checks(non_finite) -> dict[str, str]:
        """The final metadata: waits for the source's scan (raises if the file is damaged)."""
        bad = set(non_finite)
        result.non_finite = [s.target for s in plan.steps if s.target in bad]
        return safetensors_metadata(build_config(result))

    # One writer at a time per folder, so model and config always come from the same run.
    with output_lock(out_dir):
        if output_format == "safetensors":
            model_path = out_dir / MODEL_FILE
            early = safetensors_metadata(build_config(result, source_sha256=_PENDING_SHA256))
            written = write_safetensors(
                model_path,
                [(s.target, s.shape, s.dtype) for s in plan.steps],
                produce,
                early,
                progress=progress,
                final_metadata=finish_checks,
            )
            result.bytes_written, result.tensor_data_sha256 = written.nbytes, written.tensor_data_sha256
        elif output_format == "pth":
            model_path = out_dir / "model.pth"
            values = {s.target: _as_torch(produce(s.target), s.dtype) for s in plan.steps}
            finish_checks(k for k, v in values.items() if not all_finite(v))
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


def _copies(plan: engine.Plan, source: SourceCheckpoint) -> dict[str, FileRange | FileRuns]:
    """Target key -> the source bytes it is, for every tensor the mapping passes on unchanged or only
    rearranges in whole runs of bytes (e.g. ``swap_blocks``): those are copied file to file."""
    if not source.lazy:
        return {}
    copies: dict[str, FileRange | FileRuns] = {}
    for step in plan.steps:
        if step.action not in ("rename", "fan_out", "transform"):
            continue
        where = source.locations[step.sources[0]]  # type: ignore[index]
        if not where.contiguous or where.dtype != dtypes.name(step.dtype):
            continue
        if step.action != "transform":
            copies[step.target] = FileRange(source.fileno, where.offset, where.nbytes)
        elif (runs := engine.byte_runs(step, Spec(where.shape, where.dtype))) is not None:
            if sum(n for _, n in runs) == where.nbytes == math.prod(step.shape) * where.itemsize:
                copies[step.target] = FileRuns(source.fileno, tuple((where.offset + at, n) for at, n in runs))
    return copies


# --- the way back -------------------------------------------------------------------------------


def _read_converted(path: Path) -> tuple[SourceCheckpoint, dict[str, Any] | None]:
    if path.is_dir():
        config_path = path / CONFIG_FILE
        model = path / MODEL_FILE
        if not model.is_file():
            raise CheckpointError(f"{path}: no {MODEL_FILE} in this folder; give a lic-convert output folder or file")
        config = json.loads(config_path.read_text()) if config_path.is_file() else None
        if config is not None:
            seal.check_seal(model, config)  # the way back starts from the file the conversion wrote
        return read_checkpoint(model), config
    return read_checkpoint(path), None


@dataclass
class RestoreResult:
    """What ``restore_checkpoint`` wrote.  Unpacks as the former ``(state_dict, plan)`` pair."""

    state_dict: dict[str, torch.Tensor]  # as written: the keys in the restored spelling and order
    plan: engine.Plan  # the inverse plan (canonical names; each step's ``spelled`` name)
    out_file: Path
    spelling: Spelling  # what was restored: the recorded spelling, or CANONICAL
    recorded: bool  # whether ``spelling`` is the source's recorded one (False: canonical names)

    def __iter__(self):
        return iter((self.state_dict, self.plan))

    @property
    def detection(self) -> Detection:
        return self.plan.detection


def recorded_spelling(converted: SourceCheckpoint, config: Mapping[str, Any] | None) -> Spelling | None:
    """The source's spelling as the conversion recorded it: config.json first, else the file's metadata."""
    if config is not None and (config.get("source") or {}).get("spelling") is not None:
        return Spelling.from_json(config["source"]["spelling"], f"{converted.path.parent / CONFIG_FILE}")
    text = converted.metadata.get("lic.spelling")
    if text is None:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    return Spelling.from_json(data, str(converted.path))


def restore_checkpoint(
    path: str | Path,
    out_file: str | Path,
    *,
    family: str | None = None,
    variant: str | None = None,
    canonical: bool = False,
    without_dropped: bool = False,
) -> RestoreResult:
    """Turn a converted file (or output folder) back into the upstream layout and save it.

    By default the keys are spelled the way the source spelled them (its ``module.`` prefix, legacy
    names, key order and container entry, as the conversion recorded them in config.json and in the
    file's metadata), so upstream -> CompressAI -> upstream gives back the same file contents.  With
    ``canonical=True``, or when nothing was recorded, the result is ``{"state_dict": ...}`` with
    upstream's plain names in upstream key order.  Derived buffers the conversion dropped are
    regenerated to their exact upstream values.

    Keys a rule dropped without a way back (e.g. a training-only branch) cannot be restored: when the
    conversion dropped any, this refuses unless ``without_dropped`` asks for the checkpoint without
    them (what the authors' inference code loads).
    """
    converted, config = _read_converted(Path(path))
    detection = _detection_of_converted(converted, config, family, variant)
    recorded = None if canonical else recorded_spelling(converted, config)
    spelling = recorded or CANONICAL
    layout = _restorable_upstream_layout(converted, config, detection, without_dropped)
    try:
        plan = engine.plan(converted.state_dict, detection, layout, direction=engine.INVERSE,
                           alternatives=spelling.alternatives)
    except ConversionError as exc:
        raise ConversionError(f"{converted.path}: {exc}") from None
    if not plan.ok:
        raise ConversionError(f"{converted.path}: cannot convert back: {plan.problems()}", report=plan)
    failures = engine.check_dropped_values(plan, converted.state_dict)
    if failures:
        raise ConversionError(f"{converted.path}: cannot convert back: {failures[0]}", report=plan)
    named = spelled_steps(plan, spelling, str(converted.path))
    state = {key: spelled_tensor(key, step, converted.state_dict, spelling) for key, step in named}
    out_file = Path(out_file)
    _prepare_out_dir(out_file.parent)
    write_torch(out_file, state if spelling.container_entry is None else {spelling.container_entry: state})
    return RestoreResult(state, plan, out_file, spelling, recorded is not None)


def _restorable_upstream_layout(converted: SourceCheckpoint, config, detection: Detection,
                                without_dropped: bool) -> layouts.Layout | None:
    """The upstream layout ``--inverse`` can write: without the keys no rule can restore, when the
    source had none of them or ``without_dropped`` allows leaving them out; else a one-line refusal."""
    full = _upstream_layout(detection)
    reduced, gone = engine.restorable_layout(full, detection.mapping.rules)
    if not gone:
        return full
    if config is not None and "dropped" in config.get("source", {}):
        lost = {d["rule"]: d["count"] for d in config["source"]["dropped"] or [] if not d["restorable"]}
    elif "lic.unrestorable" in converted.metadata:
        lost = json.loads(converted.metadata["lic.unrestorable"])
    else:
        lost = None  # not recorded: the source may have held them
    if lost == {} or without_dropped:
        return reduced
    if lost:
        name, count = next(iter(lost.items()))
        rule = next((r for r in detection.mapping.rules if r.name == name), None)
        what = (f"the conversion dropped {sum(lost.values())} source keys that no rule can restore "
                f"({count} by rule {name!r}" + (f": {rule.reason}" if rule is not None else "") + ")")
    else:
        what = (f"the upstream layout holds {len(gone)} keys no rule can restore (e.g. {gone[0]!r}) and "
                "the file does not record whether its source had them")
    raise ConversionError(f"{converted.path}: cannot give the source back: {what}; rerun with --without-dropped "
                          "to write the checkpoint without them (what the authors' inference code loads)")


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
