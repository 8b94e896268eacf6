"""``verify_checkpoint``: rebuild both models from the same weights, run both, report tier by tier.

One way in for ``lic-verify``, the tests and the benchmarks.  Memory: the source is memory-mapped,
both models are built on the meta device and take their tensors by assignment, so every tensor the
mapping only renames is one storage shared by the two models; only swapped and fanned-out tensors
get their own.
"""

from __future__ import annotations

import contextlib
import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from lic_checkpoints.convert import api as convert_api
from lic_checkpoints.convert import engine, integrity, layouts
from lic_checkpoints.convert import seal as seal_mod
from lic_checkpoints.convert.checkpoint import SourceCheckpoint, read_checkpoint
from lic_checkpoints.convert.errors import LicError
from lic_checkpoints.convert.finite import all_finite

from . import images as images_mod
from . import device as device_mod
from .builders import ModelCache, build_target, build_upstream, canonical_upstream_names
from .report import ParityReport
from .reuse import TransformReuse
from .tiers import (OUTPUT_ORDER, CodedSide, Check, TierResult, Tolerances, compare_tensor, entropy_tables_check,
                    tier0, tier1, tier2, tier3)

ALL_TIERS = ("T0", "T1", "T2", "T3")

# Every model the verifier builds is made of compressai layers and entropy models.  Importing the
# compressai package takes seconds (its __init__ imports its datasets, hence torch_geometric and
# scipy); like ``import torch`` that is paid once, when this module is imported, and not inside
# each :func:`verify_checkpoint` call, whose time is then the verification's own.
importlib.import_module("compressai.models")


@dataclass
class _Converted:
    tensors: dict[str, torch.Tensor]
    description: dict[str, Any]
    read: SourceCheckpoint | None = None  # the converted file, when there is one


def _converted_file(converted: str | Path) -> Path:
    path = Path(converted)
    return path / convert_api.MODEL_FILE if path.is_dir() else path


def _load_converted(converted: str | Path | None, plan: engine.Plan, source: SourceCheckpoint,
                    seal: str) -> _Converted:
    if converted is None:
        tensors = {s.target: engine.tensor(s, source.state_dict, own_storage=True) for s in plan.steps}
        return _Converted(tensors, {"origin": "converted on the fly"})
    path = _converted_file(converted)
    read = read_checkpoint(path, check_now=False)
    return _Converted(dict(read.state_dict), {"origin": "file", "file": str(path), "sha256": None, "seal": seal}, read)


def _check_seal(converted: str | Path | None, check_integrity: bool) -> str:
    """Whether the converted file hashes to the seal its ``config.json`` records; raises if it does not."""
    if converted is None:
        return "converted on the fly"
    if not check_integrity:
        return "not checked (skipped on request)"
    path = _converted_file(converted)
    config_path = path.parent / convert_api.CONFIG_FILE
    if not config_path.is_file() or not path.is_file():
        return "not checked (no config.json beside the file)"
    from .loading import read_config

    digest = seal_mod.check_seal(path, read_config(path.parent), skip_hint="pass --skip-integrity-check")
    return f"matches config.json (sha256 {digest})" if digest else "not recorded in config.json"


def _forward(model, x: torch.Tensor, with_params: bool) -> dict[str, Any]:
    with torch.no_grad():
        return model(x, return_params=True) if with_params else model(x, return_latents=True)


#: the buffers ``update()`` fills in compressai's entropy models
TABLE_BUFFERS = ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")


def _entropy_tables(model) -> dict[str, torch.Tensor]:
    """Copies of the entropy tables ``model`` holds now, by state-dict name."""
    from compressai.entropy_models import EntropyModel

    out = {}
    for prefix, module in model.named_modules():
        if isinstance(module, EntropyModel):
            for name in TABLE_BUFFERS:
                value = getattr(module, name, None)
                if isinstance(value, torch.Tensor):
                    out[f"{prefix}.{name}" if prefix else name] = value.detach().clone()
    return out


def _reference_side(model, x: torch.Tensor, fwd: dict[str, Any]) -> CodedSide:
    para = fwd["para"]
    gc = model.gaussian_conditional
    with torch.no_grad():
        z = model.hyper_analysis(para["y"])
        medians = model.entropy_bottleneck._get_medians()
        enc = model.compress(x)
        dec = model.decompress(enc["strings"], enc["shape"])["x_hat"]
    y_minus = para["y"] - para["means"]
    return CodedSide(
        symbols_y=torch.round(y_minus).int(),
        indexes_y=gc.build_indexes(para["scales"]).int(),
        symbols_z=torch.round(z - medians).int(),
        y_minus_means=y_minus,
        scales=gc.lower_bound_scale(para["scales"]),
        z_minus_medians=z - medians,
        decoded=dec,
        forward_x_hat=fwd["x_hat"],
        nbytes=sum(len(s) for group in enc["strings"] for s in group),
        streams=sum(len(group) for group in enc["strings"]),
        latents=fwd.get("latents"),
    )


def _slice_gaussian(leaf):
    """A slice leaf's GaussianConditional, wherever the leaf keeps it (master's checkerboard leaves
    hold it one level down, under ``y.``)."""
    from compressai.entropy_models import GaussianConditional

    return next(m for m in leaf.modules() if isinstance(m, GaussianConditional))


def _feeds_context(model) -> bool:
    """Whether the target's slice codec can predict a slice from a given context (ours can)."""
    codec = getattr(getattr(model, "latent_codec", None), "y", None)
    leaves = getattr(codec, "latent_codec", None)
    leaf = leaves["y0"] if isinstance(leaves, torch.nn.ModuleDict) and "y0" in leaves else None
    return callable(getattr(codec, "context_params", None)) and callable(getattr(leaf, "split_context", None))


def _decisions_in_context(model, y: torch.Tensor, latents: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The target's rounding and scale-index decisions when it is fed the reference's context.

    Slice ``k`` is predicted from the reference's ``z_hat`` and the reference's decoded earlier slices,
    so a flip in one slice cannot cascade into the next: every slice is compared on its own.
    """
    codec = model.latent_codec.y
    side = model.latent_codec.h_s(latents["z_hat"])
    reference_slices = latents["y_hat"].split(codec.groups, dim=1)
    out: dict[str, list] = {"symbols": [], "indexes": [], "y_minus_means": [], "scales": []}
    with torch.no_grad():
        for k, y_slice in enumerate(y.split(codec.groups, dim=1)):
            leaf = codec.latent_codec[f"y{k}"]
            scales, means, _ = leaf.split_context(codec.context_params(k, side, reference_slices))
            gc = leaf.gaussian_conditional
            out["symbols"].append(torch.round(y_slice - means).int())
            out["indexes"].append(gc.build_indexes(scales).int())
            out["y_minus_means"].append(y_slice - means)
            out["scales"].append(gc.lower_bound_scale(scales))
    return {k: torch.cat(v, dim=1) for k, v in out.items()}


def _target_side(model, x: torch.Tensor, fwd: dict[str, Any], reference: CodedSide) -> CodedSide:
    """The target's coding results; with the reference's decoded latents at hand (our reference model)
    and a target that can be fed them, also its decisions in the reference's context."""
    para = fwd["para"]
    with torch.no_grad():
        enc = model.compress(x, return_symbols=True)
        dec = model.decompress(enc["strings"], enc["shape"])["x_hat"]
    forced = None
    if reference.latents is not None and _feeds_context(model):
        forced = _decisions_in_context(model, para["y"], reference.latents)
    leaf = model.latent_codec.y.latent_codec["y0"].gaussian_conditional
    eb = model.latent_codec.z.entropy_bottleneck
    with torch.no_grad():
        z = model.latent_codec.h_a(para["y"])
    return CodedSide(
        symbols_y=torch.cat(list(enc["symbols"]["y"]), dim=1).int(),
        indexes_y=torch.cat(list(enc["indexes"]["y"]), dim=1).int(),
        symbols_z=enc["symbols"]["z"].int(),
        y_minus_means=para["y"] - para["means"],
        scales=leaf.lower_bound_scale(para["scales"]),
        z_minus_medians=z - eb._get_medians(),
        decoded=dec,
        forward_x_hat=fwd["x_hat"],
        nbytes=sum(len(s) for group in enc["strings"] for s in group),
        streams=sum(len(group) for group in enc["strings"]),
        in_reference_context=forced,
    )


def _dtype_counts(state_dict) -> dict[str, int]:
    """How many source tensors hold each dtype (a float16 checkpoint is verified as float32 models)."""
    counts: dict[str, int] = {}
    for value in state_dict.values():
        name = str(value.dtype).removeprefix("torch.")
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def verify_checkpoint(
    src: str | Path,
    converted: str | Path | None = None,
    *,
    family: str | None = None,
    images: str | Path | Sequence[str | Path] | None = None,
    tiers: Iterable[str] = ALL_TIERS,
    tolerances: Tolerances | None = None,
    target: str = "ours",
    save_outputs: str | Path | None = None,
    trust_pickle: bool = False,
    mapping: str | Path | None = None,
    upstream_repo: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    check_integrity: bool = True,
    device: str | torch.device | None = "cpu",
    models: ModelCache | None = None,
    on_image: Callable[[int], None] | None = None,
) -> ParityReport:
    """Check that the CompressAI-layout model computes what the upstream model computes.

    A converted file whose tensor data no longer hashes to the seal in its ``config.json`` is
    refused before anything else runs (``check_integrity=False`` skips that check).
    ``device`` (``"auto"``, ``"cpu"``, ``"cuda"``) is where the T1 forward of both models runs
    (entropy coding stays on the CPU; see ``device.py``).  ``models``, a :class:`ModelCache`, reuses
    the models of a configuration built for an earlier checkpoint (weights reassigned, not rebuilt).
    ``on_image(i)`` is called once per test image when the model tiers are done with it (progress).
    """
    run_on = device_mod.resolve(device)
    if device_mod.off_cpu(run_on) and (upstream_repo is not None or target != "ours"):
        raise LicError(f"--device {run_on}: only our own reference and target models run off the CPU; "
                       "use --device cpu with --upstream-repo or --target installed")
    tol = tolerances or Tolerances()
    if target not in ("ours", "installed"):
        raise LicError(f"target must be 'ours' or 'installed', got {target!r}")
    wanted = [t for t in ALL_TIERS if t in set(tiers)]
    say = progress or (lambda message: None)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    seal = _check_seal(converted, check_integrity)
    if converted is not None:
        integrity.prefetch(_converted_file(converted))
    # Both files' integrity scans (CRC of every record, sha256) run in the background while the
    # tiers run; the report takes their hashes at the end, and a damaged file fails the check there.
    source = read_checkpoint(src, trust_pickle=trust_pickle, check_now=False)
    detection, plan = convert_api.plan_conversion(source, family=family, mapping=mapping)
    installed_cls = None
    if target == "installed":  # a usage error (exit 2) before any work when the class is missing
        from .models.compressai.installed import target_class

        installed_cls = target_class(detection.family, source="installed")
    conv = _load_converted(converted, plan, source, seal) if plan.ok else _Converted({}, {"origin": "not converted"})
    facts = detection.mapping.extra.get("input", {})  # the sides the authors' model accepts
    test_images = images_mod.load(images, **{k: facts[k] for k in ("multiple", "minimum") if k in facts})
    if "T3" in wanted:
        images_mod.require_ms_ssim_size(test_images)
    mapping = detection.mapping
    report = ParityReport(
        family=detection.family,
        variant=detection.variant.name,
        variables=detection.variables,
        source={"file": source.path.name, "sha256": None, "format": source.file_format,
                "dtypes": _dtype_counts(source.state_dict), "container_values": dict(source.container_values)},
        converted=conv.description,
        mapping={"file": mapping.file, "version": mapping.version, "sha256": mapping.sha256},
        reference=(f"the authors' {mapping.upstream['class']} from {upstream_repo}" if upstream_repo else
                   "lic-checkpoints re-implementation of " + mapping.upstream["class"]
                   + f" ({mapping.upstream.get('repo', '')}@{str(mapping.upstream.get('commit', ''))[:7]})"),
        target=("lic-checkpoints " + mapping.target["class"] if installed_cls is None else
                _installed_description(installed_cls, detection.variant.target_kwargs)),
        inputs=[{"name": i.name, "shape": list(i.x.shape), "sha256": i.sha256} for i in test_images],
        tolerances=tol,
    )
    if not check_integrity and converted is not None:
        report.notes.append("the converted file's seal (sha256 of its tensor data) was not checked, on request")
    narrow = [d for d in report.source["dtypes"] if d in ("float16", "bfloat16")]
    if narrow:
        report.notes.append(f"the checkpoint holds {' and '.join(narrow)} tensors; both models compute in float32 "
                            "with them cast, as loading them into the authors' float32 model does")
    non_finite = [k for k, v in source.state_dict.items() if not all_finite(v)]
    if non_finite:
        report.notes.append(f"{len(non_finite)} checkpoint tensors hold NaN or Inf, e.g. {non_finite[0]}")

    upstream_layout = layouts.load(detection.variant.layout, "upstream") if detection.variant.layout else None
    if "T0" in wanted:
        say("T0: tensors")
        t = time.perf_counter()
        report.tiers.append(tier0(plan, source.state_dict, conv.tensors, detection, upstream_layout, source.stored_as))
        timings["T0"] = time.perf_counter() - t
    model_tiers = [t for t in wanted if t != "T0"]
    if model_tiers and not plan.ok:
        for name in model_tiers:
            report.tiers.append(TierResult(name, "", skipped=f"the conversion is incomplete: {plan.problems()}"))
        model_tiers = []
    tgt_model = None
    if installed_cls is not None and plan.ok and ("T0" in wanted or model_tiers):
        say("loading the converted weights into the installed compressai's class")
        t = time.perf_counter()
        tgt_model, problem = _load_installed(detection, conv.tensors)
        timings["load_installed"] = time.perf_counter() - t
        if "T0" in wanted:
            next(r for r in report.tiers if r.tier == "T0").checks.append(Check(
                "strict load into the installed class", problem is None,
                f"{report.target}: load_state_dict(strict=True) takes every converted tensor"
                if problem is None else problem))
        if problem is not None:
            for name in model_tiers:
                report.tiers.append(TierResult(name, "", skipped=f"not run: {problem}"))
            model_tiers = []
        elif model_tiers:
            report.notes.append(
                "target: the installed compressai's own class, run unmodified; the tensors its forward does not "
                "return (y, means, scales, each slice's decoded y_hat) are observed with forward hooks on its "
                "modules, and its decompress output, which it does not clamp, is clamped to [0, 1] as eval "
                "scripts do")
    if model_tiers:
        say("building both models")
        t = time.perf_counter()
        if upstream_repo is None:
            reference = (build_upstream if models is None else models.reference)(
                detection.family, detection.variant.upstream_kwargs, source.state_dict)
        else:
            reference = _AuthorsCode(Path(upstream_repo), mapping, detection, source.state_dict)
        if tgt_model is None:
            tgt_model = (build_target if models is None else models.target)(
                detection.family, detection.variant.target_kwargs, conv.tensors, source=target)
        timings["build"] = time.perf_counter() - t
        report.runtime = device_mod.runtime(run_on, "T2" in model_tiers or "T3" in model_tiers)
        if installed_cls is None:
            _run_model_tiers(report, model_tiers, reference, tgt_model, test_images, tol, timings, say,
                             save_outputs, detection, device=run_on, ticks=_ImageTicks(on_image, len(test_images)))
        else:
            stage = ["T1: forward"]

            def say_stage(message: str) -> None:
                stage[0] = message
                say(message)

            try:
                _run_model_tiers(report, model_tiers, reference, tgt_model, test_images, tol, timings, say_stage,
                                 save_outputs, detection, installed=True,
                                 ticks=_ImageTicks(on_image, len(test_images)))
            except LicError:
                raise
            except Exception as error:  # noqa: BLE001 - the installed code's own failure, reported in one line
                text = str(error).strip().splitlines()
                raise LicError(f"{report.target} failed in {stage[0]}: {type(error).__name__}"
                               + (f": {text[0]}" if text else "")) from error
    for name in wanted:
        if not any(t.tier == name for t in report.tiers):
            report.tiers.append(TierResult(name, "", skipped="not run"))
    report.tiers.sort(key=lambda t: t.tier)
    report.source["sha256"] = source.sha256  # waits for the scans; raises if a file is damaged
    if conv.read is not None:
        report.converted["sha256"] = conv.read.sha256
    timings["total"] = time.perf_counter() - started
    report.timings = {k: round(v, 3) for k, v in timings.items()}
    return report


class _AuthorsCode:
    """The reference side run from the user's clone of the authors' repository, in a child process."""

    def __init__(self, repo: Path, mapping, detection, state_dict) -> None:
        from .upstream_repo import run_spec

        if "module" not in mapping.upstream:
            raise LicError(f"mapping {mapping.file} does not say which module holds {mapping.upstream['class']}")
        self.spec = run_spec(mapping.upstream, f"mapping {mapping.file}")
        self.repo, self.mapping, self.detection = repo, mapping, detection
        self.state_dict = canonical_upstream_names(state_dict)

    def run(self, test_images, coding: bool):
        from .upstream_repo import run_reference

        up = self.mapping.upstream
        return run_reference(self.repo, up["module"], up["class"], self.detection.variant.upstream_kwargs,
                             self.state_dict, test_images, coding=coding, spec=self.spec)


class _ImageTicks:
    """Calls ``on_image(i)`` once per image, as soon as the model tiers are done with it."""

    def __init__(self, on_image: Callable[[int], None] | None, count: int) -> None:
        self.on_image, self.count, self.done = on_image, count, 0

    def tick(self, index: int) -> None:
        if index != self.done:
            return
        self.done += 1
        if self.on_image is not None:
            self.on_image(index)

    def finish(self) -> None:
        for index in range(self.done, self.count):
            self.tick(index)


def _recording(reuse: TransformReuse | None, image: int):
    return reuse.recording(image) if reuse is not None else contextlib.nullcontext()


@contextlib.contextmanager
def _replaying(reuse: TransformReuse | None, image: int):
    if reuse is None:
        yield
        return
    with reuse.replaying(image):
        yield
    reuse.forget(image)  # this image's coding is done: let its records go


def _run_model_tiers(report, wanted, reference, tgt_model, test_images, tol, timings, say, save_outputs, detection,
                     installed: bool = False, device: torch.device | None = None, ticks: _ImageTicks | None = None):
    ticks = ticks or _ImageTicks(None, 0)
    t = time.perf_counter()
    say("T1: forward")
    coding = "T2" in wanted or "T3" in wanted
    # off the CPU: T1 compares the outputs of both models run there whole
    on_device = device_mod.forward_on(device, reference, tgt_model, test_images, _forward) \
        if device_mod.off_cpu(device) else None
    # off the CPU, coding runs each model's analysis and synthesis there (and so does the forward it is
    # compared with); everything else, and the range coder, on the CPU
    split = device_mod.off_cpu(device) and coding and not installed and not isinstance(reference, _AuthorsCode)
    ref_sides = tgt_sides = None
    with device_mod.transforms_on(device, reference, tgt_model) if split else contextlib.nullcontext():
        # the coding path gets each transform's forward result back when it feeds it the same input
        ref_reuse = TransformReuse(reference) if coding and not isinstance(reference, _AuthorsCode) else None
        tgt_reuse = TransformReuse(tgt_model) if coding else None
        if isinstance(reference, _AuthorsCode):
            ref_out, authors_sides = reference.run(test_images, coding)
        elif on_device is not None and not coding:
            ref_out = on_device[0]
        else:
            ref_out = []
            for i, img in enumerate(test_images):
                with _recording(ref_reuse, i):
                    ref_out.append(_forward(reference, img.x, False))
        view = None
        if installed:
            from .models.compressai.installed import MasterView

            view = MasterView(tgt_model)
            tgt_out = []
            for i, img in enumerate(test_images):
                with _recording(tgt_reuse, i):
                    tgt_out.append(view.forward(img.x))
        elif on_device is not None and not coding:
            tgt_out = on_device[1]
        else:
            tgt_out = []
            for i, img in enumerate(test_images):
                with _recording(tgt_reuse, i):
                    tgt_out.append(_forward(tgt_model, img.x, True))
                if not coding:
                    ticks.tick(i)
        if not coding:
            ticks.finish()  # forward passes run all at once (on a device, in the authors' process)
        timings["forward"] = time.perf_counter() - t
        if "T1" in wanted:
            report.tiers.append(tier1(test_images, *(on_device or (ref_out, tgt_out)), tol))
            if view is not None:
                _installed_forward_rows(report, report.tiers[-1], view, test_images, ref_out, tgt_out, tol, detection)
        if coding:
            say("T2: entropy coding")
            t = time.perf_counter()
            tgt_model.update(force=True)
            if isinstance(reference, _AuthorsCode):
                ref_sides = authors_sides
            else:
                stored = _entropy_tables(reference)
                reference.update(force=True)
                tables = entropy_tables_check(stored, _entropy_tables(reference))
                ref_sides = []
                for i, (img, out) in enumerate(zip(test_images, ref_out)):
                    with _replaying(ref_reuse, i):
                        ref_sides.append(_reference_side(reference, img.x, out))
            if view is not None:
                # master's decompress never clamps; it is held to the reference's convention: clamped to
                # [0, 1] where the authors' decompress clamps (then every decoded value lies inside)
                clamp = all(bool(((s.decoded >= 0) & (s.decoded <= 1)).all()) for s in ref_sides)
                tgt_sides = []
                for i, (img, out) in enumerate(zip(test_images, tgt_out)):
                    with _replaying(tgt_reuse, i):
                        tgt_sides.append(_installed_side(view, img.x, out, clamp))
                    ticks.tick(i)
            else:
                tgt_sides = []
                for i, (img, out, ref) in enumerate(zip(test_images, tgt_out, ref_sides)):
                    with _replaying(tgt_reuse, i):
                        tgt_sides.append(_target_side(tgt_model, img.x, out, ref))
                    ticks.tick(i)
            timings["coding"] = time.perf_counter() - t
            reused = [r for r in (ref_reuse, tgt_reuse) if r is not None]
            if reused and (count := sum(r.reused for r in reused)):
                report.notes.append(
                    f"coding reused the forward's analysis/synthesis results for {count} of "
                    f"{count + sum(r.computed for r in reused)} transform calls (inputs identical bit for bit)")
            table = _slice_gaussian(tgt_model.latent_codec.y.latent_codec["y0"]).scale_table
            if "T2" in wanted and view is not None and not view.observable:
                report.tiers.append(TierResult("T2", "entropy coding", skipped=(
                    f"the coded decisions of {type(tgt_model).__name__} cannot be observed ({view.missing})")))
            elif "T2" in wanted:
                groups = getattr(tgt_model.latent_codec.y, "groups", None)  # slice widths (may be uneven)
                slices = [int(g) for g in groups] if groups is not None else detection.variables.get("K", 5)
                report.tiers.append(tier2(test_images, ref_sides, tgt_sides, slices, table, tol))
                if not isinstance(reference, _AuthorsCode):
                    report.tiers[-1].checks.insert(0, tables)
            if "T3" in wanted:
                say("T3: rate-distortion")
                labels = (f"{detection.family}-upstream", f"{detection.family}-compressai")
                tier, eval_json = tier3(test_images, ref_sides, tgt_sides, labels, tol)
                report.tiers.append(tier)
                report.eval_model = eval_json
    if save_outputs is not None:
        _save_outputs(Path(save_outputs), ref_out, tgt_out, ref_sides, tgt_sides)


# --- the installed compressai's own classes as the target ----------------------------------------


def _installed_description(cls: type, kwargs) -> str:
    import compressai

    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return f"installed compressai {compressai.__version__} {cls.__module__}.{cls.__qualname__}({args})"


def _load_installed(detection, tensors) -> tuple[Any, str | None]:
    """The installed class holding the converted tensors, strictly loaded; or why it cannot be."""
    try:
        return build_target(detection.family, detection.variant.target_kwargs, tensors, source="installed"), None
    except LicError as error:
        return None, str(error)


def _installed_side(view, x: torch.Tensor, fwd: dict[str, Any], clamp: bool = True) -> CodedSide:
    """The installed model's coding results from its own ``compress``/``decompress``: its real strings
    (one rANS stream per slice) and the decisions behind them, observed while it coded (it does not
    return them).  It cannot be fed the reference's context, so slices are compared as coded."""
    model = view.model
    if not view.observable:  # rate and distortion only
        with torch.no_grad():
            enc = model.compress(x)
            dec = model.decompress(enc["strings"], enc["shape"])["x_hat"]
            dec = dec.clamp(0, 1) if clamp else dec
        empty = torch.empty(0)
        return CodedSide(empty, empty, empty, empty, empty, empty, dec, fwd["x_hat"],
                         nbytes=sum(len(s) for group in enc["strings"] for s in group),
                         streams=len(enc["strings"]))
    coded = view.compress(x)
    with torch.no_grad():
        dec = model.decompress(coded["strings"], coded["shape"])["x_hat"]
        dec = dec.clamp(0, 1) if clamp else dec
        y_slices = coded["y"].split(view.groups, dim=1)
        gcs = view.gaussians
        residual = [y - m for y, m in zip(y_slices, coded["means"])]
        eb = view.codec.z.entropy_bottleneck
        z_minus = coded["z"] - eb._get_medians()
    return CodedSide(
        symbols_y=torch.cat([torch.round(r) for r in residual], dim=1).int(),
        indexes_y=torch.cat([gc.build_indexes(s) for gc, s in zip(gcs, coded["scales"])], dim=1).int(),
        symbols_z=torch.round(z_minus).int(),
        y_minus_means=torch.cat(residual, dim=1),
        scales=torch.cat([gc.lower_bound_scale(s) for gc, s in zip(gcs, coded["scales"])], dim=1),
        z_minus_medians=z_minus,
        decoded=dec,
        forward_x_hat=fwd["x_hat"],
        nbytes=sum(len(s) for group in coded["strings"] for s in group),
        streams=len(coded["strings"]),
    )


def _installed_forward_rows(report, tier, view, test_images, ref_out, tgt_out, tol, detection) -> None:
    """T1 for the installed class: the rows it cannot give, and per image the first diverging step.

    The first failing row of an image is renamed to say where the divergence starts (the slice, and
    the step of the data flow), so the report's summary line names it; when that is where master's
    port is known to differ from the authors' code, the known cause is quoted.
    """
    from .models.compressai.installed import known_difference

    groups = view.groups if view.observable else None
    if not view.observable:
        for img in test_images:
            tier.checks.append(Check(f"{img.name}: y, means, scales", True,
                                     f"not compared: {type(view.model).__name__} does not return them and cannot "
                                     f"be observed ({view.missing})", explained=True))
    known = known_difference(detection.family)
    for img, ref, tgt in zip(test_images, ref_out, tgt_out):
        prefix = f"{img.name}: "
        failing = next((c for c in tier.checks if c.name.startswith(prefix) and not c.passed), None)
        if failing is None or failing.name[len(prefix):] not in OUTPUT_ORDER:
            continue
        row = failing.name[len(prefix):]
        first = _first_divergence(ref, tgt, tol, groups)
        step, detail = first if first is not None else (row, "")
        where = _first_slice(ref, tgt, row, tol, groups)
        what = f"{row} of slice {where} differ" if where is not None else f"{row} differ"
        what = what + "s" if row in ("y", "x_hat") and where is None else what
        stage = _STAGES.get(step.split(" of ")[0], "")
        cause = known.cause if known is not None and known.step == step and known.row == row else ""
        failing.name = (f"{prefix}{what} (first divergence: {step}{', ' + stage if stage else ''})"
                        + (f": {cause}" if cause else ""))
        if detail and step != row:
            failing.detail = f"first divergence {detail}; this row: {failing.detail}"
        failing.values["first_divergence"] = step
        if where is not None:
            failing.values["first_slice"] = where
        report.notes.append(f"{img.name}: the first tensor that differs, in data-flow order, is {step}"
                            + (f" ({stage})" if stage else "") + (f": {detail}" if detail else "")
                            + (f"; a known difference of the installed class from the authors' code: {cause}"
                               if cause else ""))


#: the step of the data flow that produces each compared tensor
_STAGES = {
    "y": "the analysis transform",
    "likelihoods_z": "the hyper-analysis or the entropy bottleneck",
    "means": "the slice's entropy parameters",
    "scales": "the slice's entropy parameters",
    "likelihoods_y": "the slice's Gaussian conditional",
    "y_hat": "the slice's rounding and latent residual prediction",
    "x_hat": "the synthesis transform",
}


def _slices(ref: dict[str, Any], tgt: dict[str, Any], name: str, groups: list[int]):
    """Reference and target ``name`` (a per-slice tensor), slice by slice; None if either lacks it."""
    from .tiers import flatten_outputs

    if name == "y_hat":
        ref_hat = ref.get("latents", {}).get("y_hat")
        if ref_hat is None or "slices" not in tgt:
            return None
        return ref_hat.split(groups, dim=1), tgt["slices"]["y_hat"]
    rf, tf = flatten_outputs(ref), flatten_outputs(tgt)
    if name not in rf or name not in tf:
        return None
    return rf[name].split(groups, dim=1), tf[name].split(groups, dim=1)


def _first_slice(ref, tgt, row: str, tol: Tolerances, groups: list[int] | None) -> int | None:
    """The first slice in which the per-slice row ``row`` differs beyond tolerance (None: not per slice)."""
    if groups is None or row not in ("means", "scales", "likelihoods_y"):
        return None
    pairs = _slices(ref, tgt, row, groups)
    if pairs is None:
        return None
    return next((k for k, (a, b) in enumerate(zip(*pairs)) if not compare_tensor(row, a, b, tol).passed), None)


def _first_divergence(ref: dict[str, Any], tgt: dict[str, Any], tol: Tolerances,
                      groups: list[int] | None) -> tuple[str, str] | None:
    """The first tensor, in data-flow order and slice by slice, that differs beyond tolerance.

    Order: ``y``, ``likelihoods_z``, then for each slice its ``means``, ``scales``, ``likelihoods_y``
    and decoded ``y_hat`` (which the next slices are predicted from), then ``x_hat``.
    """
    from .tiers import flatten_outputs

    rf, tf = flatten_outputs(ref), flatten_outputs(tgt)
    order: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    for name in ("y", "likelihoods_z"):
        if name in rf and name in tf:
            order.append((name, rf[name], tf[name]))
    if groups is not None:
        split = {name: pairs for name in ("means", "scales", "likelihoods_y", "y_hat")
                 if (pairs := _slices(ref, tgt, name, groups)) is not None}
        for k in range(len(groups)):
            for name, (a, b) in split.items():
                order.append((f"{name} of slice {k}", a[k], b[k]))
    order.append(("x_hat", rf["x_hat"], tf["x_hat"]))
    for label, a, b in order:
        check = compare_tensor(label.split(" of ")[0], a, b, tol)
        if not check.passed:
            return label, f"{label}: {check.detail}"
    return None


def _save_outputs(folder: Path, ref_out, tgt_out, ref_sides, tgt_sides) -> None:
    from lic_checkpoints.convert.writer import atomic_path
    from safetensors.torch import save_file

    from .tiers import flatten_outputs

    folder.mkdir(parents=True, exist_ok=True)
    for name, outs, sides in (("reference", ref_out, ref_sides), ("target", tgt_out, tgt_sides)):
        flats = [flatten_outputs(o) for o in outs]
        tensors = {k: torch.cat([f[k] for f in flats]).contiguous() for k in flats[0]}
        if sides is not None:
            tensors["decoded_x_hat"] = torch.cat([s.decoded for s in sides]).contiguous()
        with atomic_path(folder / f"{name}.safetensors") as tmp:
            save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, str(tmp))
