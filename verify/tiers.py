"""The parity tiers: each compares the reference (upstream) side with the CompressAI-layout side.

- T0 tensors: coverage, every target tensor equal to its rule applied to the source, inverse round trip.
- T1 forward: eval-mode outputs of both models on the same inputs.
- T2 entropy coding: quantized symbols and scale indexes, each side's own decode, decoded images, bytes.
- T3 rate-distortion: bpp from real bytes, PSNR and MS-SSIM per image, in CompressAI's eval schema.

Each tier returns a :class:`TierResult` of :class:`Check` rows; the report renders them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch

from lic_checkpoints.convert import engine
from lic_checkpoints.convert.errors import LicError

#: the order in which outputs are produced; the first one that diverges points at the cause
OUTPUT_ORDER = ("y", "likelihoods_z", "means", "scales", "likelihoods_y", "x_hat")


@dataclass(frozen=True)
class Tolerances:
    """Defaults: bit-exact tensors (T0) and symbols (T2); the fixture-recorded bounds for T1."""

    forward_rtol: float = 1e-4
    forward_atol: float = 1e-4
    likelihood_rtol: float = 1e-5
    likelihood_atol: float = 1e-5
    flip_margin: float = 1e-5
    metric_atol: float = 1e-4
    #: each extra rANS stream (CompressAI codes every slice separately) flushes its own 32-bit state
    #: and restarts from the lowest state: at most this many bytes more (or fewer) than one stream
    stream_overhead_bytes: int = 8

    def for_output(self, name: str) -> tuple[float, float]:
        if name.startswith("likelihoods"):
            return self.likelihood_rtol, self.likelihood_atol
        return self.forward_rtol, self.forward_atol


@dataclass
class Check:
    name: str
    passed: bool
    detail: str = ""
    values: dict[str, Any] = field(default_factory=dict)
    explained: bool = False  # passed because a divergence was explained (T2 flips near a boundary)


@dataclass
class TierResult:
    tier: str
    title: str
    checks: list[Check] = field(default_factory=list)
    skipped: str | None = None

    @property
    def passed(self) -> bool:
        return self.skipped is None and all(c.passed for c in self.checks)

    def first_failure(self) -> Check | None:
        return next((c for c in self.checks if not c.passed), None)


#: element size -> the integer dtype whose values are those bits
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
#: below this many bytes, comparing the ``bytes`` copies is cheaper than a numpy comparison
_SMALL_BYTES = 1 << 16


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (numpy's comparison: much faster than torch's on memory-mapped tensors)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a is b or a.numel() == 0:
        return True
    bits = _BITS.get(a.element_size(), torch.uint8)
    x = a.detach().reshape(-1).view(torch.uint8).view(bits).numpy()
    y = b.detach().reshape(-1).view(torch.uint8).view(bits).numpy()
    if x.nbytes <= _SMALL_BYTES:
        return x.tobytes() == y.tobytes()
    return bool((x == y).all())


# --- T0 ------------------------------------------------------------------------------------------


def tier0(plan: engine.Plan, source: Mapping[str, torch.Tensor], converted: Mapping[str, torch.Tensor],
          detection, upstream_layout, stored_as: Mapping[str, str] | None = None) -> TierResult:
    """Coverage, every converted tensor against its rule, and the inverse round trip.

    The round trip is compared with the source as its file spells it: ``source`` holds the keys as
    read, ``stored_as`` (key as read -> key as stored, for keys reading changed, e.g. ``module.``
    removed) gives back the stored names.  The restored keys must be exactly the source's keys, in
    the source's order, with the source's alternatives (legacy names), and each tensor bit-identical.
    """
    from lic_checkpoints.convert import api as convert_api

    result = TierResult("T0", "tensors")
    counts: dict[str, int] = {}
    for step in plan.steps:
        counts[step.action] = counts.get(step.action, 0) + 1
    result.checks.append(Check(
        "coverage", plan.ok,
        "every source key used once or dropped by a named rule; every target key produced once" if plan.ok
        else plan.problems(),
        {"steps": counts, "dropped": len(plan.dropped), "unexpected": len(plan.unexpected),
         "missing": len(plan.missing), "mismatched": len(plan.mismatched)},
    ))
    bad = []
    # (converted tensor, source tensor) pairs found bit-identical: a renamed tensor's round trip
    # compares the very same two tensors again, which need not be read a second time
    identical: set[tuple[int, int]] = set()
    for step in plan.steps:
        if step.target not in converted:
            bad.append(f"{step.target}: absent from the converted file")
            continue
        expected = engine.tensor(step, source)
        actual = converted[step.target]
        if actual is expected or _equal(actual, expected):
            if any(expected is source.get(k) for k in step.sources[:1]):  # both live as long as the maps
                identical.add((id(actual), id(expected)))
        else:
            bad.append(f"{step.target}: differs from rule {step.rule.name!r} applied to {step.sources[:1]}")
    extra = sorted(set(converted) - {s.target for s in plan.steps})
    bad.extend(f"{k}: in the converted file but produced by no rule" for k in extra)
    result.checks.append(Check(
        "tensors equal their rules", not bad,
        f"{len(plan.steps)} tensors bit-exact" if not bad else f"{len(bad)} differ, first: {bad[0]}",
        {"checked": len(plan.steps), "differing": len(bad)},
    ))
    stored_as = stored_as or {}
    spelling = convert_api.source_spelling(plan, list(source), stored_as, upstream_layout,
                                           source_dtype=lambda key: str(source[key].dtype).removeprefix("torch."))
    # keys a rule dropped with no way back (a training-only branch) are not expected back
    restorable, _ = engine.restorable_layout(upstream_layout, detection.mapping.rules)
    lost = {key: rule for key, rule in plan.dropped if rule.restore_value is None}
    problems: list[str] = []
    try:
        inverse = engine.plan(converted, detection, restorable, direction=engine.INVERSE,
                              alternatives=spelling.alternatives)
    except LicError as exc:
        inverse, problems = None, [str(exc)]
    if inverse is not None:
        problems = [] if inverse.ok else [inverse.problems()]
        problems += engine.check_dropped_values(inverse, converted) if inverse.ok else []
    restored_ok = 0
    if not problems:
        try:
            named = convert_api.spelled_steps(inverse, spelling, "the converted tensors")
        except LicError as exc:
            named, problems = [], [str(exc)]
        as_read = {stored_as.get(k, k): k for k in source if k not in lost}  # stored key -> key in ``source``
        restored_keys = [key for key, _ in named]
        if not problems and restored_keys != list(as_read):
            problems.append(_key_difference(restored_keys, list(as_read)))
        for key, step in named if not problems else ():
            original = source[as_read[key]]
            value = convert_api.spelled_tensor(key, step, converted, spelling)
            if (id(value), id(original)) not in identical and not _equal(value, original):
                problems.append(f"{key}: the round trip does not give back the source tensor")
                break
            restored_ok += 1
    not_restorable = ""
    if lost:
        rules = sorted({rule.name for rule in lost.values()})
        not_restorable = (f"; {len(lost)} source keys dropped by rule {', '.join(repr(r) for r in rules)} "
                          "cannot be restored and are not compared")
    result.checks.append(Check(
        "inverse round trip", not problems,
        f"upstream -> CompressAI -> upstream bit-exact for {restored_ok} tensors{not_restorable}" if not problems
        else problems[0],
        {"restored": restored_ok, "not_restorable": len(lost),
         # the source's spelling the keys were compared in
         "key_prefix": spelling.key_prefix,
         "alternatives": {name: index for name, index in sorted(spelling.alternatives.items()) if index},
         "renamed_keys": len(spelling.renamed_keys),
         "source_key_order": spelling.key_order is not None},
    ))
    return result


def _key_difference(restored: list[str], stored: list[str]) -> str:
    """One line naming the first way the restored keys differ from the source's."""
    extra = [k for k in restored if k not in set(stored)]
    if extra:
        return f"{extra[0]}: the round trip gives this key, which the source does not have ({len(extra)} such)"
    missing = [k for k in stored if k not in set(restored)]
    if missing:
        return f"{missing[0]}: in the source, but the round trip does not give it back ({len(missing)} such)"
    at = next(i for i, (a, b) in enumerate(zip(restored, stored)) if a != b)
    return f"{restored[at]}: the round trip puts the keys in another order than the source (position {at})"


# --- T1 ------------------------------------------------------------------------------------------


def flatten_outputs(out: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    flat = {"x_hat": out["x_hat"], "likelihoods_y": out["likelihoods"]["y"], "likelihoods_z": out["likelihoods"]["z"]}
    for key in ("means", "scales", "y"):
        if "para" in out and key in out["para"]:
            flat[key] = out["para"][key]
    return flat


def compare_tensor(name: str, ref: torch.Tensor, tgt: torch.Tensor, tol: Tolerances) -> Check:
    rtol, atol = tol.for_output(name)
    ref64, tgt64 = ref.double(), tgt.double()
    if ref.shape != tgt.shape:
        return Check(name, False, f"shapes differ: {list(ref.shape)} vs {list(tgt.shape)}")
    finite_ref, finite_tgt = bool(torch.isfinite(ref64).all()), bool(torch.isfinite(tgt64).all())
    if not (finite_ref and finite_tgt):
        side = "reference" if not finite_ref else "target"
        return Check(name, False, f"non-finite values (NaN or Inf) in the {side} output",
                     {"finite_reference": finite_ref, "finite_target": finite_tgt})
    diff = (ref64 - tgt64).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    rel = diff / ref64.abs().clamp_min(1e-12)
    max_rel = float(rel.max()) if rel.numel() else 0.0
    ok = bool(torch.allclose(tgt64, ref64, rtol=rtol, atol=atol))
    return Check(name, ok, f"max abs {max_abs:.3g}, max rel {max_rel:.3g} (rtol {rtol:g}, atol {atol:g})",
                 {"max_abs": max_abs, "max_rel": max_rel, "rtol": rtol, "atol": atol})


def bpp_from_likelihoods(likelihoods: Mapping[str, torch.Tensor], num_pixels: int) -> float:
    return float(sum(-torch.log2(v.double()).sum() for v in likelihoods.values()) / num_pixels)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def tier1(images, ref_outputs, tgt_outputs, tol: Tolerances) -> TierResult:
    result = TierResult("T1", "forward")
    for img, ref, tgt in zip(images, ref_outputs, tgt_outputs):
        rf, tf = flatten_outputs(ref), flatten_outputs(tgt)
        for name in OUTPUT_ORDER:
            if name in rf and name in tf:
                check = compare_tensor(name, rf[name], tf[name], tol)
                check.name = f"{img.name}: {name}"
                result.checks.append(check)
        x = img.unpad(img.x)
        info = {
            "bpp_reference": bpp_from_likelihoods(ref["likelihoods"], img.num_pixels),
            "bpp_target": bpp_from_likelihoods(tgt["likelihoods"], img.num_pixels),
            "psnr_reference": psnr(img.unpad(rf["x_hat"].clamp(0, 1)), x),
            "psnr_target": psnr(img.unpad(tf["x_hat"].clamp(0, 1)), x),
        }
        both_infinite = math.isinf(info["bpp_reference"]) and info["bpp_reference"] == info["bpp_target"]
        if both_infinite:  # likelihoods of exactly 0 on both sides; the rows above compare them elementwise
            rel = 0.0
        else:
            rel = abs(info["bpp_reference"] - info["bpp_target"]) / max(abs(info["bpp_reference"]), 1e-12)
        ok = math.isfinite(rel) and rel <= tol.likelihood_rtol
        note = " (both infinite: some likelihoods are exactly 0 on both sides)" if both_infinite else ""
        result.checks.append(Check(
            f"{img.name}: estimated bpp / PSNR", bool(ok),
            f"bpp {info['bpp_reference']:.6f} vs {info['bpp_target']:.6f} (rel {rel:.2g}){note}; "
            f"PSNR {info['psnr_reference']:.4f} vs {info['psnr_target']:.4f} dB",
            {**info, "bpp_rel_diff": rel},
        ))
    return result


# --- T2 ------------------------------------------------------------------------------------------


@dataclass
class CodedSide:
    """One side's entropy-coding results for one image."""

    symbols_y: torch.Tensor  # [1, M, H, W] int
    indexes_y: torch.Tensor  # [1, M, H, W] int
    symbols_z: torch.Tensor
    y_minus_means: torch.Tensor  # the values rounded into symbols_y (float)
    scales: torch.Tensor  # bounded scales that were indexed
    z_minus_medians: torch.Tensor
    decoded: torch.Tensor  # decompress(compress(x)) x_hat
    forward_x_hat: torch.Tensor
    nbytes: int
    streams: int
    #: reference only: its decoded latents {"y_hat", "z_hat"}, the context fed to the target
    latents: dict[str, torch.Tensor] | None = None
    #: target only: its decisions given the reference's context (symbols, indexes, y_minus_means, scales)
    in_reference_context: dict[str, torch.Tensor] | None = None


def rounding_margin(v: torch.Tensor) -> torch.Tensor:
    """Distance of each value from the nearest rounding boundary (a half-integer)."""
    return (v - (torch.floor(v) + 0.5)).abs()


def index_margin(scales: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Distance of each (bounded) scale from the nearest scale-table boundary."""
    return (scales.double()[..., None] - table.double()).abs().min(dim=-1).values


def entropy_tables_check(stored: Mapping[str, torch.Tensor], rebuilt: Mapping[str, torch.Tensor]) -> Check:
    """The checkpoint's own entropy tables (as loaded) against the ones ``update(force=True)`` rebuilds.

    Both sides code with the rebuilt tables.  Tables saved after ``update()`` are compared with them and
    the report says whether they agree: a checkpoint whose stored tables are stale codes differently
    under an eval script that keeps them (``update()`` without ``force``).
    """
    filled = {k: v for k, v in stored.items() if v.numel() > 0}
    if not filled:
        return Check("entropy tables", True, "the checkpoint holds none (as training saves it); both sides "
                     "build them with update(force=True)", {"stored": "empty", "used": "rebuilt"})
    differing = [k for k, v in filled.items() if k not in rebuilt or not _equal(v, rebuilt[k])]
    if not differing:
        return Check("entropy tables", True, f"the checkpoint's {len(filled)} filled tables equal the ones "
                     "update(force=True) rebuilds; both sides code with them", {"stored": "filled", "used": "rebuilt",
                                                                                  "differing": []})
    return Check("entropy tables", True,
                 f"{len(differing)} of the checkpoint's {len(filled)} filled tables differ from the rebuilt ones "
                 f"(e.g. {differing[0]}); both sides code with the rebuilt ones, while an eval that keeps the "
                 "stored tables (update() without force) would code differently", {"stored": "filled",
                                                                                    "used": "rebuilt",
                                                                                    "differing": differing})


def tier2(images, ref_sides: list[CodedSide], tgt_sides: list[CodedSide], num_slices: int | list[int],
          scale_table: torch.Tensor, tol: Tolerances) -> TierResult:
    """``num_slices``: the number of equal channel slices, or the list of slice widths."""
    result = TierResult("T2", "entropy coding")
    for img, ref, tgt in zip(images, ref_sides, tgt_sides):
        decisions = _compare_symbols(img.name, ref, tgt, num_slices, scale_table, tol)
        result.checks.extend(decisions)
        flipped = any(c.explained for c in decisions)  # every flip within the margin (others fail above)
        for side_name, side in (("reference", ref), ("target", tgt)):
            # compared with the forward x_hat clamped to [0, 1], or raw where the decoder does not clamp
            inside = bool(((side.decoded >= 0) & (side.decoded <= 1)).all())
            expected = side.forward_x_hat.clamp(0, 1) if inside else side.forward_x_hat
            err = float((side.decoded - expected).abs().max())
            detail = f"max |decompress(compress(x)) - forward x_hat| = {err:.3g}"
            near = err != 0.0 and bool(torch.allclose(side.decoded, expected, rtol=tol.forward_rtol,
                                                      atol=tol.forward_atol))
            if near:  # the same decisions, decoded through floating-point operations in another order
                detail += " (not bit-exact, within the forward tolerance)"
            result.checks.append(Check(f"{img.name}: {side_name} decodes its own streams", err == 0.0 or near,
                                       detail, {"max_abs": err}, explained=near))
        diff = float((ref.decoded - tgt.decoded).abs().max())
        rtol, atol = tol.forward_rtol, tol.forward_atol
        ok = bool(torch.allclose(tgt.decoded, ref.decoded, rtol=rtol, atol=atol))
        if ok or not flipped:
            result.checks.append(Check(f"{img.name}: decoded images", ok, f"max abs {diff:.3g}", {"max_abs": diff}))
        else:  # a flipped symbol decodes to a different value, which spreads through the synthesis
            result.checks.append(Check(
                f"{img.name}: decoded images", True,
                f"max abs {diff:.3g}: the coded symbols differ by the explained flips above, so the decoded "
                "images are not held to the forward tolerance", {"max_abs": diff}, explained=True))
        overhead = tol.stream_overhead_bytes * abs(tgt.streams - ref.streams)
        delta = tgt.nbytes - ref.nbytes
        result.checks.append(Check(
            f"{img.name}: bytes", abs(delta) <= overhead,
            f"{ref.nbytes} (reference, {ref.streams} streams) vs {tgt.nbytes} (target, {tgt.streams} streams), "
            f"difference {delta:+d} (allowed {overhead}: {tol.stream_overhead_bytes} per extra stream)",
            {"reference_bytes": ref.nbytes, "target_bytes": tgt.nbytes, "reference_streams": ref.streams,
             "target_streams": tgt.streams, "expected_stream_overhead_max": overhead},
        ))
    return result


def _compare_symbols(name, ref: CodedSide, tgt: CodedSide, num_slices, table, tol) -> list[Check]:
    """Decisions slice by slice.

    With the reference's context available (our re-implementation), each slice of the target is
    predicted from the reference's z_hat and decoded earlier slices, so every slice is judged on its
    own: a flip must sit within ``flip_margin`` of its boundary.  Without it (the authors' code run in a
    child process), slices are compared as coded; after the first explained divergence the later
    slices are knock-on effects and are not compared.
    """
    checks = []
    z_diff = ref.symbols_z != tgt.symbols_z
    z_ok = True
    if bool(z_diff.any()):
        margin = float(rounding_margin(ref.z_minus_medians)[z_diff].max())
        z_ok = margin <= tol.flip_margin
        checks.append(Check(f"{name}: z symbols", z_ok,
                            f"{int(z_diff.sum())} flipped, the farthest {margin:.2g} from its boundary "
                            f"(limit {tol.flip_margin:g})", {"flips": int(z_diff.sum()), "max_margin": margin},
                            explained=z_ok))
    else:
        checks.append(Check(f"{name}: z symbols", True, f"{ref.symbols_z.numel()} equal"))
    forced = tgt.in_reference_context
    if isinstance(num_slices, int):
        widths = [ref.symbols_y.shape[1] // num_slices] * num_slices
    else:
        widths, num_slices = [int(w) for w in num_slices], len(num_slices)
    starts = [sum(widths[:k]) for k in range(num_slices)]
    free_running_equal = bool((ref.symbols_y == tgt.symbols_y).all() and (ref.indexes_y == tgt.indexes_y).all())
    diverged_at = None
    for k in range(num_slices):
        sl = slice(starts[k], starts[k] + widths[k])
        label = f"{name}: slice {k} symbols and scale indexes"
        if forced is None and (diverged_at is not None or not z_ok or bool(z_diff.any())):
            checks.append(Check(label, z_ok and (diverged_at is None or checks[-1].passed),
                                "not compared: follows an explained divergence earlier in the coding order",
                                explained=True))
            continue
        symbols = forced["symbols"] if forced is not None else tgt.symbols_y
        indexes = forced["indexes"] if forced is not None else tgt.indexes_y
        y_flip = ref.symbols_y[:, sl] != symbols[:, sl]
        i_flip = ref.indexes_y[:, sl] != indexes[:, sl]
        context = "in the reference's context" if forced is not None else "as coded"
        if not bool(y_flip.any() or i_flip.any()):
            checks.append(Check(label, True, f"{int(y_flip.numel())} symbols and indexes equal ({context})"))
            continue
        diverged_at = k
        margins = []
        if bool(y_flip.any()):
            margins.append(float(rounding_margin(ref.y_minus_means[:, sl])[y_flip].max()))
        if bool(i_flip.any()):
            margins.append(float(index_margin(ref.scales[:, sl][i_flip], table).max()))
        worst = max(margins)
        ok = worst <= tol.flip_margin
        checks.append(Check(
            label, ok,
            f"{int(y_flip.sum())} rounding and {int(i_flip.sum())} index decisions flipped ({context}); the "
            f"farthest from its boundary by {worst:.2g} ({'within' if ok else 'beyond'} {tol.flip_margin:g}: "
            f"{'float noise' if ok else 'a real divergence'})",
            {"rounding_flips": int(y_flip.sum()), "index_flips": int(i_flip.sum()), "max_margin": worst},
            explained=ok,
        ))
    if forced is not None:
        checks.append(Check(f"{name}: coded symbols", True,
                            "identical to the reference's" if free_running_equal else
                            "differ after the explained flips above (each flip changes the context of what follows)",
                            {"identical": free_running_equal}, explained=not free_running_equal))
    return checks


# --- T3 ------------------------------------------------------------------------------------------


def quality(decoded: torch.Tensor, original: torch.Tensor) -> tuple[float, float]:
    """PSNR (dB) and MS-SSIM on 8-bit rounded images, as CompressAI's eval_model computes them."""
    from pytorch_msssim import ms_ssim

    a = (decoded.clamp(0, 1) * 255).round().double()
    b = (original.clamp(0, 1) * 255).round().double()
    mse = float(((a - b) ** 2).mean())
    p = float("inf") if mse == 0 else 20 * math.log10(255.0) - 10 * math.log10(mse)
    s = float(ms_ssim(a.float(), b.float(), data_range=255.0))
    return p, s


def tier3(images, ref_sides, tgt_sides, labels: tuple[str, str], tol: Tolerances) -> tuple[TierResult, dict]:
    result = TierResult("T3", "rate-distortion")
    per_side: dict[str, dict[str, list[float]]] = {labels[0]: {}, labels[1]: {}}
    for img, ref, tgt in zip(images, ref_sides, tgt_sides):
        x = img.unpad(img.x)
        row = {}
        for label, side in zip(labels, (ref, tgt)):
            p, s = quality(img.unpad(side.decoded), x)
            bpp = side.nbytes * 8.0 / img.num_pixels
            row[label] = {"psnr-rgb": p, "ms-ssim-rgb": s, "bpp": bpp}
            for k, v in row[label].items():
                per_side[label].setdefault(k, []).append(v)
        a, b = row[labels[0]], row[labels[1]]
        dp, ds = abs(a["psnr-rgb"] - b["psnr-rgb"]), abs(a["ms-ssim-rgb"] - b["ms-ssim-rgb"])
        overhead_bits = 8 * tol.stream_overhead_bytes * abs(tgt.streams - ref.streams)
        dbits = (tgt.nbytes - ref.nbytes) * 8
        bpp_ok = abs(dbits) <= overhead_bits
        ok = dp <= tol.metric_atol and ds <= tol.metric_atol and bpp_ok
        result.checks.append(Check(
            f"{img.name}: bpp / PSNR / MS-SSIM", ok,
            f"bpp {a['bpp']:.5f} vs {b['bpp']:.5f}, PSNR {a['psnr-rgb']:.4f} vs {b['psnr-rgb']:.4f} dB, "
            f"MS-SSIM {a['ms-ssim-rgb']:.6f} vs {b['ms-ssim-rgb']:.6f}",
            {"reference": a, "target": b, "psnr_abs_diff": dp, "ms_ssim_abs_diff": ds, "extra_bits": dbits,
             "allowed_stream_overhead_bits": overhead_bits},
        ))
    eval_json = {
        label: {
            "name": label,
            "description": "Inference (ans)",
            "results": {k: [float(np.mean(v))] for k, v in per_side[label].items()},
            "per_image": {img.name: {k: per_side[label][k][i] for k in per_side[label]} for i, img in enumerate(images)},
        }
        for label in labels
    }
    return result, eval_json
