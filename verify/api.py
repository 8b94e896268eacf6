"""``verify_checkpoint``: rebuild both models from the same weights, run both, report tier by tier.

One way in for ``lic-verify``, the tests and the benchmarks.  Memory: the source is memory-mapped,
both models are built on the meta device and take their tensors by assignment, so every tensor the
mapping only renames is one storage shared by the two models; only swapped and fanned-out tensors
get their own.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from lic_checkpoints.convert import api as convert_api
from lic_checkpoints.convert import engine, integrity, layouts
from lic_checkpoints.convert.checkpoint import SourceCheckpoint, read_checkpoint
from lic_checkpoints.convert.errors import LicError
from lic_checkpoints.convert.finite import all_finite

from . import images as images_mod
from .builders import build_target, build_upstream, canonical_upstream_names
from .report import ParityReport
from .tiers import CodedSide, TierResult, Tolerances, entropy_tables_check, tier0, tier1, tier2, tier3

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


def _load_converted(converted: str | Path | None, plan: engine.Plan, source: SourceCheckpoint) -> _Converted:
    if converted is None:
        tensors = {s.target: engine.tensor(s, source.state_dict, own_storage=True) for s in plan.steps}
        return _Converted(tensors, {"origin": "converted on the fly"})
    path = _converted_file(converted)
    read = read_checkpoint(path, check_now=False)
    return _Converted(dict(read.state_dict), {"origin": "file", "file": str(path), "sha256": None}, read)


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
) -> ParityReport:
    """Check that the CompressAI-layout model computes what the upstream model computes."""
    tol = tolerances or Tolerances()
    wanted = [t for t in ALL_TIERS if t in set(tiers)]
    say = progress or (lambda message: None)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    if converted is not None:
        integrity.prefetch(_converted_file(converted))
    # Both files' integrity scans (CRC of every record, sha256) run in the background while the
    # tiers run; the report takes their hashes at the end, and a damaged file fails the check there.
    source = read_checkpoint(src, trust_pickle=trust_pickle, check_now=False)
    detection, plan = convert_api.plan_conversion(source, family=family, mapping=mapping)
    conv = _load_converted(converted, plan, source) if plan.ok else _Converted({}, {"origin": "not converted"})
    test_images = images_mod.load(images)
    mapping = detection.mapping
    report = ParityReport(
        family=detection.family,
        variant=detection.variant.name,
        variables=detection.variables,
        source={"file": source.path.name, "sha256": None, "format": source.file_format},
        converted=conv.description,
        mapping={"file": mapping.file, "version": mapping.version, "sha256": mapping.sha256},
        reference=(f"the authors' {mapping.upstream['class']} from {upstream_repo}" if upstream_repo else
                   "lic-checkpoints re-implementation of " + mapping.upstream["class"]
                   + f" ({mapping.upstream.get('repo', '')}@{str(mapping.upstream.get('commit', ''))[:7]})"),
        target=("lic-checkpoints " if target == "ours" else "installed compressai ") + mapping.target["class"],
        inputs=[{"name": i.name, "shape": list(i.x.shape), "sha256": i.sha256} for i in test_images],
        tolerances=tol,
    )
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
    if model_tiers:
        say("building both models")
        t = time.perf_counter()
        if upstream_repo is None:
            reference = build_upstream(detection.family, detection.variant.upstream_kwargs, source.state_dict)
        else:
            reference = _AuthorsCode(Path(upstream_repo), mapping, detection, source.state_dict)
        tgt_model = build_target(detection.family, detection.variant.target_kwargs, conv.tensors, source=target)
        timings["build"] = time.perf_counter() - t
        _run_model_tiers(report, model_tiers, reference, tgt_model, test_images, tol, timings, say, save_outputs,
                         detection)
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
        if "module" not in mapping.upstream:
            raise LicError(f"mapping {mapping.file} does not say which module holds {mapping.upstream['class']}")
        self.repo, self.mapping, self.detection = repo, mapping, detection
        self.state_dict = canonical_upstream_names(state_dict)

    def run(self, test_images, coding: bool):
        from .upstream_repo import run_reference

        up = self.mapping.upstream
        return run_reference(self.repo, up["module"], up["class"], self.detection.variant.upstream_kwargs,
                             self.state_dict, test_images, coding=coding)


def _run_model_tiers(report, wanted, reference, tgt_model, test_images, tol, timings, say, save_outputs, detection):
    t = time.perf_counter()
    say("T1: forward")
    coding = "T2" in wanted or "T3" in wanted
    if isinstance(reference, _AuthorsCode):
        ref_out, authors_sides = reference.run(test_images, coding)
    else:
        ref_out = [_forward(reference, img.x, False) for img in test_images]
    tgt_out = [_forward(tgt_model, img.x, True) for img in test_images]
    timings["forward"] = time.perf_counter() - t
    if "T1" in wanted:
        report.tiers.append(tier1(test_images, ref_out, tgt_out, tol))
    ref_sides = tgt_sides = None
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
            ref_sides = [_reference_side(reference, img.x, out) for img, out in zip(test_images, ref_out)]
        tgt_sides = [_target_side(tgt_model, img.x, out, ref) for img, out, ref in zip(test_images, tgt_out, ref_sides)]
        timings["coding"] = time.perf_counter() - t
        table = tgt_model.latent_codec.y.latent_codec["y0"].gaussian_conditional.scale_table
        if "T2" in wanted:
            report.tiers.append(tier2(test_images, ref_sides, tgt_sides, detection.variables.get("K", 5), table, tol))
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
