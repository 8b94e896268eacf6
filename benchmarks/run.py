"""Performance benchmarks for lic-convert (and lic-verify when it is installed).

Run by hand, not by pytest::

    python benchmarks/run.py            # medians of 5 runs after a warm-up
    python benchmarks/run.py --quick    # 3 runs, fewer checkpoints

Every measured command runs in its own child process.  Wall time is taken around the child, peak
memory is the child's ``ru_maxrss`` as returned by ``os.wait4`` (so each number belongs to exactly one
process).  The parent imports nothing heavier than the standard library, so it never competes with
the children for memory.  Child roles (``--child ROLE``) live in this same file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

THIS = Path(__file__).resolve()
MB = 1e6


def _configurations_by_size() -> list[tuple[int, str, str]]:
    """(upstream bytes, configuration, family) of every registered configuration, smallest first."""
    from lic_checkpoints.convert import registry

    return sorted((c.upstream_bytes(), c.name, c.family.family) for c in registry.configurations())


_SIZED = _configurations_by_size()
#: the largest configuration of each family
FULL_SET = tuple(sorted({family: name for _, name, family in _SIZED}.values()))
SMALL, LARGE = _SIZED[0][1], _SIZED[-1][1]  # the two sizes of the scaling section
QUICK_SET = (LARGE,)
VERIFY_MODEL = SMALL  # the smallest model keeps the verify section inside the time budget

TARGETS = {
    "lic-convert wall / naive wall": 0.8,  # at most
    "conversion throughput / raw copy throughput": 0.5,  # at least
    "lic-convert peak RSS / naive peak RSS": 0.7,  # at most
    "lic-verify peak RSS / single-model peak RSS": 1.3,  # at most
    "lic-verify time / bare model runs": 1.15,  # at most
    "per-file speed-up of one call for many files": 1.2,  # at least
    "lic-convert wall / master converter wall": 1.0,  # at most
    "release: one call / separate lic-verify processes": 0.8,  # at most
    "release: one call / bare work": 1.2,  # at most
}
AT_LEAST = {"conversion throughput / raw copy throughput", "per-file speed-up of one call for many files"}


# --- measuring child processes ------------------------------------------------------------------


@dataclass
class Sample:
    """One child process: wall seconds, peak resident memory in MB, and the JSON line it printed (if any)."""

    wall: float
    peak_mb: float
    report: dict = field(default_factory=dict)


def run_child(argv: Sequence[str], *, env: dict | None = None) -> Sample:
    """Run ``argv`` to completion and return its own wall time and peak RSS (``wait4`` rusage)."""
    # Output goes to files, not pipes: the child is reaped with os.wait4 (not Popen.wait) to get its
    # own rusage, and nothing may block on a full pipe meanwhile.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({proc.returncode}):\n{stderr[-3000:]}")
    report = {}
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            report = json.loads(line)
            break
    return Sample(wall, usage.ru_maxrss / 1024, report)  # Linux reports ru_maxrss in KiB


def child_argv(role: str, *args: object) -> list[str]:
    return [sys.executable, str(THIS), "--child", role, *map(str, args)]


def interleaved(runs: int, makers: dict[str, Callable[[], Sample]],
                cleanup: Callable[[], None] = lambda: None) -> dict[str, list[Sample]]:
    """One unmeasured warm-up round, then ``runs`` rounds that run every maker once, in turn.

    Taking the commands in turn (a, b, c, a, b, c, ...) spreads any change in the machine's load
    over all of them instead of penalising whichever ran last.  ``cleanup`` runs, untimed, after each.
    """
    samples: dict[str, list[Sample]] = {name: [] for name in makers}
    for round_ in range(runs + 1):
        for name, make in makers.items():
            sample = make()
            cleanup()
            if round_:
                samples[name].append(sample)
    return samples


def median(samples: list[Sample], what: Callable[[Sample], float]) -> float:
    return statistics.median(what(s) for s in samples)


def fmt_runs(samples: list[Sample], what: Callable[[Sample], float], unit: str) -> str:
    values = " ".join(f"{what(s):.2f}" for s in samples)
    return f"median {median(samples, what):8.2f} {unit}  (runs: {values})"


def load_note() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


def console_script(name: str) -> str:
    """The real entry-point script (not a version-manager shim, whose start-up is not ours to measure)."""
    candidate = Path(sysconfig.get_path("scripts")) / name
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} is not installed; run pip install -e . first")
    return found


# --- child roles ------------------------------------------------------------------------------------


def child_synthesize(folder: str, *names: str) -> None:
    """Write the full-size demo checkpoints and two test images (256 and 512 pixels square)."""
    import torch
    from safetensors.torch import save_file

    from lic_checkpoints.convert import demo
    from lic_checkpoints.verify import images

    for name in names:
        path = Path(folder) / f"{name}.pth.tar"
        if not path.exists():
            demo.demo_checkpoint(name, path)
    for size in (256, 512):
        save_file({"x": images.synthetic(0, size, size)}, str(Path(folder) / f"image{size}.safetensors"))
    del torch


def child_naive(src: str, out_dir: str) -> None:
    """The obvious converter: load everything, rename in a dict, clone what the rules change, save_file."""
    import torch
    from safetensors.torch import save_file

    from lic_checkpoints.convert import api, engine
    from lic_checkpoints.convert.checkpoint import SourceCheckpoint

    checkpoint = torch.load(src, map_location="cpu", weights_only=True)
    state = {k.replace("module.", ""): v for k, v in checkpoint["state_dict"].items()}
    source = SourceCheckpoint(Path(src), state, "torch-zip", "state_dict")
    _, plan = api.plan_conversion(source)
    converted = {}
    for step in plan.steps:
        if step.action == "rename":
            converted[step.target] = state[step.sources[0]]
        else:
            converted[step.target] = engine.tensor(step, state).clone()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    save_file(converted, str(Path(out_dir) / "model.safetensors"), metadata={"format": "pt"})


def child_timed_convert(src: str, out_dir: str) -> None:
    """Time only ``api.convert_checkpoint`` (from opening the source to closing the output).

    The package is imported before the clock starts; like ``lic-convert`` it does not import torch.
    """
    from lic_checkpoints.convert import api

    started = time.perf_counter()
    result = api.convert_checkpoint(src, out_dir)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "bytes_written": result.bytes_written}))


def child_timed_copy(src: str, dst: str) -> None:
    """Time a raw copy of the file (``shutil.copyfile``) and, separately, the fsync that makes it durable."""
    started = time.perf_counter()
    shutil.copyfile(src, dst)
    copied = time.perf_counter() - started
    with open(dst, "rb") as fh:
        os.fsync(fh.fileno())
    print(json.dumps({"seconds": copied, "seconds_with_fsync": time.perf_counter() - started}))


def _family_of(name: str) -> str:
    from lic_checkpoints.convert import registry

    return registry.configuration(name).family.family


def child_bare_model(side: str, name: str, checkpoint: str, converted_dir: str, image: str) -> None:
    """Load one model the ordinary way (constructor + load_state_dict) and run one forward pass."""
    import importlib

    import torch

    importlib.import_module("compressai.models")  # before the clock starts, as lic-verify's child does
    from safetensors.torch import load_file

    from lic_checkpoints.convert import api
    from lic_checkpoints.convert.checkpoint import read_checkpoint
    from lic_checkpoints.verify.builders import canonical_upstream_names, upstream_class
    from lic_checkpoints.verify.models.compressai.installed import target_class

    torch.set_num_threads(2)
    x = load_file(image)["x"]
    family = _family_of(name)
    started = time.perf_counter()
    detection, _ = api.plan_conversion(read_checkpoint(checkpoint))
    if side == "upstream":
        model = upstream_class(family)(**detection.variant.upstream_kwargs)
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict(canonical_upstream_names(state))
    else:
        model = target_class(family)(**detection.variant.target_kwargs)
        model.load_state_dict(load_file(str(Path(converted_dir) / api.MODEL_FILE)))
    loaded = time.perf_counter()
    with torch.no_grad():
        model.eval()(x)
    done = time.perf_counter()
    print(json.dumps({"seconds": done - started, "load": loaded - started, "forward": done - loaded}))


def child_timed_verify(checkpoint: str, converted_dir: str, image: str, tiers: str) -> None:
    import torch

    from lic_checkpoints.verify.api import verify_checkpoint

    torch.set_num_threads(2)
    started = time.perf_counter()
    report = verify_checkpoint(checkpoint, converted_dir, images=image, tiers=tiers.split(","))
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "timings": getattr(report, "timings", {})}))


def child_master_loads(name: str, master_out: str, ours_dir: str) -> None:
    """Untimed: whether each converter's output loads strictly into CompressAI master's own class.

    Runs with the master folder first on ``sys.path``; prints whether both outputs hold the same keys
    and bit-identical tensors.
    """
    import torch

    from lic_checkpoints.convert import registry
    from lic_checkpoints.verify.loading import load_converted
    from lic_checkpoints.verify.models.compressai.installed import target_class

    import compressai

    conf = registry.configuration(name)
    result: dict = {"compressai": compressai.__version__}
    theirs = torch.load(master_out, map_location="cpu", weights_only=True)
    try:
        model = target_class(conf.family.family, source="installed")(**conf.target_kwargs)
        model.load_state_dict(theirs, strict=True)
        result["master_strict"] = True
    except Exception as exc:  # reported in the table, not raised: the benchmark goes on
        result["master_strict"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    try:
        ours = load_converted(ours_dir, source="installed", update=False).state_dict()
        result["ours_strict"] = True
    except Exception as exc:
        ours, result["ours_strict"] = {}, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    result["same_keys"] = bool(ours) and sorted(ours) == sorted(theirs)
    result["equal_tensors"] = sum(1 for k, v in theirs.items() if k in ours and torch.equal(ours[k], v))
    result["tensors"] = len(theirs)
    print(json.dumps(result))


def child_release_inputs(folder: str, name: str, count: str, pictures: str, height: str, width: str) -> None:
    """``count`` checkpoints of one configuration (seeds 0, 1, ...) and ``pictures`` PNG images of
    ``height`` x ``width`` (the synthetic test pattern, 8-bit) in ``folder``."""
    import numpy as np
    from PIL import Image

    from lic_checkpoints.convert import demo
    from lic_checkpoints.verify import images

    root = Path(folder)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for seed in range(int(count)):
        path = root / f"{name}_seed{seed}.pth.tar"
        if not path.exists():
            demo.demo_checkpoint(name, path, seed=seed)
    for i in range(int(pictures)):
        x = images.synthetic(i, int(height), int(width))[0].permute(1, 2, 0).numpy()
        Image.fromarray((np.clip(x, 0, 1) * 255).round().astype(np.uint8)).save(root / "images" / f"img{i}.png")


def child_bare_release(name: str, checkpoint: str, converted_dir: str, image_dir: str) -> None:
    """The bare work of verifying one checkpoint on a set of images: both models built the ordinary way
    (constructor + load_state_dict), then per image two forward passes and two compress/decompress."""
    import importlib

    import torch

    importlib.import_module("compressai.models")
    from safetensors.torch import load_file

    from lic_checkpoints.convert import api, registry
    from lic_checkpoints.convert.checkpoint import read_checkpoint
    from lic_checkpoints.verify import images
    from lic_checkpoints.verify.builders import canonical_upstream_names, upstream_class
    from lic_checkpoints.verify.models.compressai.installed import target_class

    torch.set_num_threads(2)
    facts = registry.configuration(name).family.extra.get("input", {})
    inputs = images.load(image_dir, **{k: facts[k] for k in ("multiple", "minimum") if k in facts})
    family = _family_of(name)
    started = time.perf_counter()
    detection, _ = api.plan_conversion(read_checkpoint(checkpoint))
    upstream = upstream_class(family)(**detection.variant.upstream_kwargs)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    upstream.load_state_dict(canonical_upstream_names({k.replace("module.", ""): v for k, v in state.items()}))
    target = target_class(family)(**detection.variant.target_kwargs)
    target.load_state_dict(load_file(str(Path(converted_dir) / api.MODEL_FILE)))
    with torch.no_grad():
        for model in (upstream.eval(), target.eval()):
            for img in inputs:
                model(img.x)
            model.update(force=True)
            for img in inputs:
                coded = model.compress(img.x)
                model.decompress(coded["strings"], coded["shape"])
    print(json.dumps({"seconds": time.perf_counter() - started}))


CHILD_ROLES = {
    "release-inputs": child_release_inputs,
    "bare-release": child_bare_release,
    "master-loads": child_master_loads,
    "synthesize": child_synthesize,
    "naive": child_naive,
    "timed-convert": child_timed_convert,
    "timed-copy": child_timed_copy,
    "bare-model": child_bare_model,
    "timed-verify": child_timed_verify,
}


# --- benchmark sections ---------------------------------------------------------------------------


class Bench:
    """Holds the work folder, the run count and every ratio measured, for the final summary."""

    def __init__(self, work: Path, runs: int) -> None:
        self.work = work
        self.runs = runs
        self.ratios: dict[str, list[tuple[str, float]]] = {}
        self.lic_convert = console_script("lic-convert")

    def checkpoint(self, name: str) -> Path:
        return self.work / f"{name}.pth.tar"

    def size_mb(self, name: str) -> float:
        return self.checkpoint(name).stat().st_size / MB

    def out(self, tag: str) -> Path:
        return self.work / "out" / tag

    def clean_out(self) -> None:
        shutil.rmtree(self.work / "out", ignore_errors=True)
        (self.work / "out").mkdir()

    def record(self, target: str, label: str, value: float) -> None:
        self.ratios.setdefault(target, []).append((label, value))

    def measure(self, commands: dict[str, Callable[[], list[str]]]) -> dict[str, list[Sample]]:
        makers = {name: (lambda argv_for=argv_for: run_child(argv_for())) for name, argv_for in commands.items()}
        return interleaved(self.runs, makers, self.clean_out)


def section_single_file(bench: Bench, name: str) -> dict[str, list[Sample]]:
    size = bench.size_mb(name)
    src = bench.checkpoint(name)
    print(f"\n== {name}: {size:.1f} MB  ({load_note()})")
    copy_cmd = (lambda: ["cp", str(src), str(bench.out("copy.bin"))]) if shutil.which("cp") else (
        lambda: child_argv("timed-copy", src, bench.out("copy.bin")))
    got = bench.measure({
        "copy": copy_cmd,
        "naive": lambda: child_argv("naive", src, bench.out("naive")),
        "ours": lambda: [bench.lic_convert, str(src), "-o", str(bench.out("lic"))],
        "inproc": lambda: child_argv("timed-convert", src, bench.out("inproc")),
        "raw": lambda: child_argv("timed-copy", src, bench.out("copy.bin")),
    })
    copy, naive, ours, inproc, raw = (got[k] for k in ("copy", "naive", "ours", "inproc", "raw"))
    wall, peak = (lambda s: s.wall), (lambda s: s.peak_mb)
    for label, samples in (("(a) raw copy (cp)", copy), ("(b) naive converter", naive), ("(c) lic-convert", ours)):
        print(f"  {label:24s} wall {fmt_runs(samples, wall, 's')}")
        print(f"  {'':24s} peak {fmt_runs(samples, peak, 'MB')}")
    for what, fn in (("wall", wall), ("peak RSS", peak)):
        c_a = median(ours, fn) / median(copy, fn)
        c_b = median(ours, fn) / median(naive, fn)
        print(f"  ratio {what:9s} (c)/(a) = {c_a:6.2f}   (c)/(b) = {c_b:5.2f}")
    bench.record("lic-convert wall / naive wall", name, median(ours, wall) / median(naive, wall))
    bench.record("lic-convert peak RSS / naive peak RSS", name, median(ours, peak) / median(naive, peak))

    seconds = lambda s: s.report["seconds"]  # noqa: E731
    synced = lambda s: s.report["seconds_with_fsync"]  # noqa: E731
    conv_rate = size / median(inproc, seconds)
    copy_rate, synced_rate = size / median(raw, seconds), size / median(raw, synced)
    print(f"  convert_checkpoint in-process  {fmt_runs(inproc, seconds, 's')}  -> {conv_rate:7.1f} MB/s")
    print(f"  copyfile in-process            {fmt_runs(raw, seconds, 's')}  -> {copy_rate:7.1f} MB/s")
    print(f"  copyfile + fsync in-process    {fmt_runs(raw, synced, 's')}  -> {synced_rate:7.1f} MB/s")
    print(f"  throughput ratio conversion / copy = {conv_rate / copy_rate:.2f}"
          f"   conversion / (copy + fsync) = {conv_rate / synced_rate:.2f}")
    bench.record("conversion throughput / raw copy throughput", name, conv_rate / copy_rate)
    return {"copy": copy, "naive": naive, "ours": ours, "inproc": inproc, "raw": raw}


def section_many_files(bench: Bench, names: Sequence[str]) -> None:
    folder = bench.work / "many"
    folder.mkdir(exist_ok=True)
    sources = []
    for i, name in enumerate(names):  # distinct file names, so each input gets its own output folder
        link = folder / f"{i}_{name}.pth.tar"
        if not link.exists():
            link.symlink_to(bench.checkpoint(name))
        sources.append(str(link))
    total_mb = sum(bench.size_mb(n) for n in names)
    print(f"\n== many files in one call: {', '.join(names)} ({total_mb:.0f} MB)  ({load_note()})")

    def separate() -> Sample:
        parts = [run_child([bench.lic_convert, s, "-o", str(bench.out(f"sep{i}"))]) for i, s in enumerate(sources)]
        return Sample(sum(p.wall for p in parts), max(p.peak_mb for p in parts))

    got = interleaved(bench.runs, {
        "one call": lambda: run_child([bench.lic_convert, *sources, "-o", str(bench.out("many"))]),
        "separate": separate,
    }, bench.clean_out)
    one_call, apart = got["one call"], got["separate"]
    per_one = median(one_call, lambda s: s.wall) / len(sources)
    per_apart = median(apart, lambda s: s.wall) / len(sources)
    print(f"  one call, {len(sources)} files     wall {fmt_runs(one_call, lambda s: s.wall, 's')}")
    print(f"  {len(sources)} separate processes   wall {fmt_runs(apart, lambda s: s.wall, 's')}")
    print(f"  per file: one call {per_one:.2f} s, separate {per_apart:.2f} s -> speed-up {per_apart / per_one:.2f}x")
    print(f"  peak RSS: one call {median(one_call, lambda s: s.peak_mb):.0f} MB, "
          f"largest separate {median(apart, lambda s: s.peak_mb):.0f} MB")
    bench.record("per-file speed-up of one call for many files", "+".join(names), per_apart / per_one)


def section_scaling(bench: Bench, inproc: dict[str, list[Sample]]) -> None:
    print(f"\n== time against work: {SMALL} vs {LARGE}  ({load_note()})")
    rows = []
    for name in (SMALL, LARGE):
        samples = inproc.get(name) or bench.measure(
            {name: lambda: child_argv("timed-convert", bench.checkpoint(name), bench.out("inproc"))})[name]
        seconds = median(samples, lambda s: s.report["seconds"])
        rows.append((name, bench.size_mb(name), seconds))
        print(f"  {name:9s} {bench.size_mb(name):7.1f} MB  convert_checkpoint {seconds:6.2f} s  "
              f"({bench.size_mb(name) / seconds:6.1f} MB/s)")
    (_, s1, t1), (_, s2, t2) = rows
    slope = (t2 - t1) / (s2 - s1)
    print(f"  marginal cost {slope * 1000:.2f} ms/MB ({1 / slope if slope > 0 else float('inf'):.0f} MB/s), "
          f"fixed cost {t1 - slope * s1:.2f} s; size x{s2 / s1:.2f} -> time x{t2 / t1:.2f}")


def verify_available() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import lic_checkpoints.verify.api"], capture_output=True)
    return probe.returncode == 0


def section_verify(bench: Bench, sizes: Sequence[int]) -> None:
    print(f"\n== lic-verify on {VERIFY_MODEL}  ({load_note()})")
    if not verify_available():
        print("  skipped: lic-verify not available")
        return
    src = bench.checkpoint(VERIFY_MODEL)
    converted = bench.work / f"{VERIFY_MODEL}-converted"
    if not converted.exists():
        run_child([bench.lic_convert, str(src), "-o", str(converted)])
    for size in sizes:
        image = bench.work / f"image{size}.safetensors"
        got = bench.measure({
            "verify": lambda: child_argv("timed-verify", src, converted, image, "T0,T1"),
            "upstream": lambda: child_argv("bare-model", "upstream", VERIFY_MODEL, src, converted, image),
            "target": lambda: child_argv("bare-model", "target", VERIFY_MODEL, src, converted, image),
        })
        verify, upstream, target = got["verify"], got["upstream"], got["target"]
        inside = lambda s: s.report["seconds"]  # noqa: E731
        print(f"  {size}x{size}, tiers T0,T1")
        for label, samples in (("lic-verify", verify), ("bare upstream model", upstream), ("bare target model", target)):
            print(f"    {label:20s} process wall {fmt_runs(samples, lambda s: s.wall, 's')}")
            print(f"    {'':20s} in-process   {fmt_runs(samples, inside, 's')}")
            print(f"    {'':20s} peak         {fmt_runs(samples, lambda s: s.peak_mb, 'MB')}")
        forward = lambda s: s.report["forward"]  # noqa: E731
        parts = verify[len(verify) // 2].report.get("timings") or {}
        if parts:
            print("    lic-verify's own timings (one run): " + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items()))
        print(f"    forward passes alone: upstream {fmt_runs(upstream, forward, 's')}")
        print(f"                          target   {fmt_runs(target, forward, 's')}")
        peak_ratio = median(verify, lambda s: s.peak_mb) / median(upstream, lambda s: s.peak_mb)
        loads_and_runs = median(upstream, inside) + median(target, inside)
        runs_only = median(upstream, forward) + median(target, forward)
        time_ratio = median(verify, inside) / runs_only
        process_ratio = median(verify, lambda s: s.wall) / (median(upstream, lambda s: s.wall) + median(target, lambda s: s.wall))
        print(f"    peak ratio lic-verify / single model = {peak_ratio:.2f}")
        print(f"    time ratio, in-process: lic-verify / (upstream + target forward passes) = {time_ratio:.2f}"
              f"   / (their loads + forward passes) = {median(verify, inside) / loads_and_runs:.2f}")
        print(f"    time ratio, whole processes: lic-verify / (bare upstream + bare target process) = {process_ratio:.2f}")
        bench.record("lic-verify peak RSS / single-model peak RSS", f"{VERIFY_MODEL} {size}px", peak_ratio)
        bench.record("lic-verify time / bare model runs", f"{VERIFY_MODEL} {size}px", time_ratio)
        bench.record("lic-verify time / bare model runs", f"{VERIFY_MODEL} {size}px (processes)", process_ratio)


def section_release(bench: Bench, name: str, checkpoints: int, pictures: int, height: int, width: int) -> None:
    """A release verified in one call against separate lic-verify processes and against the bare work;
    peak memory of one verification against one upstream forward pass at that image size.

    Each command runs once (no warm-up round: a round takes minutes), in turn.
    """
    folder = bench.work / "release"
    print(f"\n== a release: {checkpoints} checkpoints of {name} x {pictures} images of {width}x{height}, "
          f"every tier  ({load_note()})")
    run_child(child_argv("release-inputs", folder, name, checkpoints, pictures, height, width))
    sources = [folder / f"{name}_seed{i}.pth.tar" for i in range(checkpoints)]
    converted = [folder / f"converted{i}" for i in range(checkpoints)]
    for src, out in zip(sources, converted):  # untimed: the bare work starts from converted files
        if not out.exists():
            run_child([bench.lic_convert, str(src), "-o", str(out)])
    verify = console_script("lic-verify")
    image_dir = folder / "images"
    one_image = folder / "one.safetensors"
    run_child([sys.executable, "-c", "import sys; from safetensors.torch import save_file; "
               "from lic_checkpoints.verify import images; "
               "save_file({'x': images.load(sys.argv[1])[0].x}, sys.argv[2])", str(image_dir), str(one_image)])

    batched = run_child([verify, *map(str, sources), "--images", str(image_dir), "--out-dir", str(bench.out("release")),
                         "--quiet"])
    bench.clean_out()
    separate = [run_child([verify, str(s), "--images", str(image_dir), "--quiet"]) for s in sources]
    bare = [run_child(child_argv("bare-release", name, s, c, image_dir)) for s, c in zip(sources, converted)]
    forward = run_child(child_argv("bare-model", "upstream", name, sources[0], converted[0], one_image))
    pairs = checkpoints * pictures
    per = {"one call": batched.wall / pairs, "separate processes": sum(p.wall for p in separate) / pairs,
           "bare work (processes)": sum(p.wall for p in bare) / pairs,
           "bare work (in-process)": sum(p.report["seconds"] for p in bare) / pairs}
    for label, seconds in per.items():
        print(f"  {label:24s} {seconds:7.2f} s per checkpoint-image")
    print(f"  separate runs (wall): {' '.join(f'{p.wall:.1f}' for p in separate)}; "
          f"bare (wall): {' '.join(f'{p.wall:.1f}' for p in bare)}")
    ratio_separate = per["one call"] / per["separate processes"]
    ratio_bare = per["one call"] / per["bare work (processes)"]
    print(f"  one call / separate processes = {ratio_separate:.2f}   one call / bare work = {ratio_bare:.2f}"
          f"   (one call / bare in-process work = {per['one call'] / per['bare work (in-process)']:.2f})")
    single_peak = max(p.peak_mb for p in separate)
    print(f"  peak RSS: one call {batched.peak_mb:.0f} MB, one verification {single_peak:.0f} MB, "
          f"bare work {max(p.peak_mb for p in bare):.0f} MB, one upstream forward at {width}x{height} "
          f"{forward.peak_mb:.0f} MB -> one verification / one forward = {single_peak / forward.peak_mb:.2f}, "
          f"one call / one forward = {batched.peak_mb / forward.peak_mb:.2f}")
    bench.record("release: one call / separate lic-verify processes", name, ratio_separate)
    bench.record("release: one call / bare work", name, ratio_bare)
    bench.record("lic-verify peak RSS / single-model peak RSS", f"{name} {width}x{height} (one verification)",
                 single_peak / forward.peak_mb)


def _master_folder() -> tuple[Path | None, str]:
    """The CompressAI master build of ``tools/install_master.py``, or why there is none."""
    sys.path.insert(0, str(THIS.parent.parent / "tools"))
    try:
        import install_master
    finally:
        sys.path.pop(0)
    folder = install_master.default_dir()
    problem = install_master.usable(folder)
    return (None, problem) if problem else (folder, "")


def _master_converter(master: Path, name: str) -> Path | None:
    """Master's own converter script for a configuration: ``examples/convert_<module>_checkpoint.py``,
    ``<module>`` being the module of master's class the mapping names (``compressai.models.<module>``)."""
    from lic_checkpoints.convert import registry

    path = registry.configuration(name).family.target.get("compressai_class") or ""
    module = path.rpartition(":")[0] or path.rpartition(".")[0]
    script = master / "examples" / f"convert_{module.rpartition('.')[2]}_checkpoint.py"
    return script if module and script.is_file() else None


def section_master(bench: Bench, names: Sequence[str]) -> None:
    """CompressAI master's converters, run as shipped, against lic-convert on the same files."""
    print(f"\n== CompressAI master's converters against lic-convert  ({load_note()})")
    master, problem = _master_folder()
    if master is None:
        print(f"  skipped: {problem} (build it with: python tools/install_master.py)")
        return
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(master), os.environ.get("PYTHONPATH")))))
    for name in names:
        script = _master_converter(master, name)
        if script is None:
            print(f"  {name}: master ships no converter for this family")
            continue
        src = bench.checkpoint(name)
        theirs, ours = bench.out("master.pth"), bench.out("lic")
        try:  # as shipped, on the file an upstream training script writes
            run_child([sys.executable, str(script), "--src", str(src), "--dst", str(theirs)], env=env)
        except RuntimeError as exc:
            last = [line for line in str(exc).splitlines() if line.strip()][-1]
            print(f"  {name} ({bench.size_mb(name):.1f} MB): master's {script.name} fails on it: {last[:200]}")
            bench.clean_out()
            continue
        got = interleaved(bench.runs, {
            "master": lambda: run_child([sys.executable, str(script), "--src", str(src), "--dst", str(theirs)], env=env),
            "ours": lambda: run_child([bench.lic_convert, str(src), "-o", str(ours)]),
        }, bench.clean_out)
        # one more untimed run of each, kept, for the strict-load check in master's environment
        run_child([sys.executable, str(script), "--src", str(src), "--dst", str(theirs)], env=env)
        run_child([bench.lic_convert, str(src), "-o", str(ours)])
        loads = run_child(child_argv("master-loads", name, theirs, ours), env=env).report
        bench.clean_out()
        wall, peak = (lambda s: s.wall), (lambda s: s.peak_mb)
        print(f"  {name} ({bench.size_mb(name):.1f} MB), master's {script.name} (compressai {loads.get('compressai')})")
        for label, samples in (("master's converter", got["master"]), ("lic-convert", got["ours"])):
            print(f"    {label:20s} wall {fmt_runs(samples, wall, 's')}")
            print(f"    {'':20s} peak {fmt_runs(samples, peak, 'MB')}")
        print(f"    ratio lic-convert / master: wall {median(got['ours'], wall) / median(got['master'], wall):.2f}"
              f"   peak {median(got['ours'], peak) / median(got['master'], peak):.2f}")
        print(f"    strict load into master's class: master's output {loads.get('master_strict')}, "
              f"lic-convert's output {loads.get('ours_strict')}; same keys {loads.get('same_keys')}, "
              f"{loads.get('equal_tensors')} of {loads.get('tensors')} tensors bit-identical")
        bench.record("lic-convert wall / master converter wall", name,
                     median(got["ours"], wall) / median(got["master"], wall))


def print_summary(bench: Bench) -> None:
    print(f"\n== targets  ({load_note()})")
    for target, limit in TARGETS.items():
        got = bench.ratios.get(target)
        if not got:
            print(f"  {target:48s} not measured")
            continue
        at_least = target in AT_LEAST
        for label, value in got:
            met = value >= limit if at_least else value <= limit
            sign = ">=" if at_least else "<="
            print(f"  {target:48s} {label:18s} {value:6.2f}  (target {sign} {limit})  {'met' if met else 'NOT MET'}")


def describe_machine() -> None:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), "0")
    versions = subprocess.run(
        [sys.executable, "-c", "import torch, compressai, safetensors, platform; "
         "print(platform.python_version(), torch.__version__, compressai.__version__, safetensors.__version__)"],
        capture_output=True, text=True).stdout.split()
    print(f"machine: {os.cpu_count()} CPUs ({cpu}), {int(mem) / 1024 / 1024:.1f} GiB memory")
    if len(versions) == 4:
        print("python {} torch {} compressai {} safetensors {}".format(*versions))
    print(load_note())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 runs, only the largest configuration for the single-file section, verify at 256 px only")
    parser.add_argument("--runs", type=int, default=None, help="measured runs per number (default 5; 3 with --quick)")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--configurations", default=None,
                        help="comma-separated configurations for the single-file and master sections "
                             "(default: the largest of each family; with --quick the largest of all)")
    parser.add_argument("--sections", default="single,many,scaling,verify,master",
                        help="comma-separated subset of single,many,scaling,verify,master,release "
                             "(release, a whole release verified at Kodak size, takes long: ask for it)")
    parser.add_argument("--release", default=f"{VERIFY_MODEL}:4x4:512x768", metavar="CONF:NxM:HxW",
                        help="the release section's configuration, checkpoints x images, and image size")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress shows up even when the output goes to a file
    runs = args.runs or (3 if args.quick else 5)
    sections = set(args.sections.split(","))
    started = time.perf_counter()
    describe_machine()
    with tempfile.TemporaryDirectory(prefix="lic-bench-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        bench = Bench(work, runs)
        bench.clean_out()
        single = tuple(args.configurations.split(",")) if args.configurations else QUICK_SET if args.quick else FULL_SET
        many = (SMALL,) * 4  # per-process costs are what this section measures: the smallest file shows them best
        needed = {*(single if sections & {"single", "master"} else ()), *(many if "many" in sections else ()),
                  *((SMALL, LARGE) if "scaling" in sections else ()), *((VERIFY_MODEL,) if "verify" in sections else ())}
        if needed:
            print(f"synthesizing {', '.join(sorted(needed))} into {work} ...")
            run_child(child_argv("synthesize", work, *sorted(needed)))
        print(f"runs per number: {runs} (after one warm-up)")
        inproc: dict[str, list[Sample]] = {}
        section_started = time.perf_counter()

        def done(section: str) -> None:
            nonlocal section_started
            print(f"  [{section}: {time.perf_counter() - section_started:.0f} s]")
            section_started = time.perf_counter()

        if "single" in sections:
            for name in single:
                inproc[name] = section_single_file(bench, name)["inproc"]
                done(name)
        if "many" in sections:
            section_many_files(bench, many)
            done("many files")
        if "scaling" in sections:
            section_scaling(bench, inproc)
            done("scaling")
        if "verify" in sections:
            try:
                section_verify(bench, (256,) if args.quick else (256, 512))
            except RuntimeError as exc:  # lic-verify is importable but failed: report it, keep the rest
                print(f"  lic-verify failed, section not measured: {str(exc).strip().splitlines()[-1]}")
            done("verify")
        if "master" in sections:
            section_master(bench, single)
            done("master")
        if "release" in sections:
            conf, counts, size = args.release.split(":")
            checkpoints, pictures = (int(v) for v in counts.split("x"))
            height, width = (int(v) for v in size.split("x"))
            section_release(bench, conf, checkpoints, pictures, height, width)
            done("release")
        print_summary(bench)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        CHILD_ROLES[sys.argv[2]](*sys.argv[3:])
    else:
        main()
