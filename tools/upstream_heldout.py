"""Held-out checkpoints against the authors' own code; writes a Markdown table (docs/upstream-parity.md).

    python tools/upstream_heldout.py CONFIGURATION=CLONE [CONFIGURATION=CLONE ...]
                                     [--seeds 7,11] [--size 192x320] [--out docs/upstream-parity.md]

For each configuration and seed, an upstream-format checkpoint no test saw is synthesized from the
shipped layout (the fixture recipe with another seed), spelled as published files are: every key
behind ``module.`` and the compressai <= 1.2.6 entropy-bottleneck names.  Then, on one synthetic image
of ``--size``:

1. ``lic-verify CKPT --upstream-repo CLONE`` (the reference side is the authors' class, imported from
   the clone in its own process) runs every tier against our CompressAI-layout model;
2. ``lic-verify CKPT`` runs every tier with our re-implementation as the reference side;
3. both runs save their outputs (``--save-outputs``), and our reference's are compared with the
   authors' directly: x_hat, y, means, scales, both likelihoods and the decoded image.

CLONE is a checkout of the repository the configuration's mapping names (``upstream.repo`` at
``upstream.commit``); nothing in it is edited (see ``verify/upstream_repo.py`` for what is provided at
run time).  Every number in the page comes from this run.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lic_checkpoints.convert import layouts, registry, synth
from lic_checkpoints.verify import images

COMPARED = ("x_hat", "y", "means", "scales", "likelihoods_y", "likelihoods_z", "decoded_x_hat")


def heldout_checkpoint(name: str, seed: int, path: Path) -> Path:
    layout = layouts.load(name, "upstream")
    manifest = {"recipe": layout.meta["recipe"],
                "state_dict": [[e.key, list(e.shape), e.dtype, e.kind] for e in layout.entries]}
    state = synth.state_dict_from_manifest(manifest, layouts.upstream_constants(name), seed=seed)
    container = synth.checkpoint_container(state, layout.meta["checkpoint_container"]["top_level_keys"],
                                           key_prefix="module.", legacy_entropy_bottleneck=True)
    torch.save(container, path)
    return path


def verify(ckpt: Path, image: Path, out: Path, extra: list[str]) -> dict:
    started = time.perf_counter()
    proc = subprocess.run(["lic-verify", str(ckpt), "--images", str(image), "--json", str(out) + ".json",
                           "--save-outputs", str(out), *extra], capture_output=True, text=True)
    report = json.loads(Path(str(out) + ".json").read_text()) if Path(str(out) + ".json").exists() else {}
    failures = [f"{tier} {c['name']}" for tier, t in (report.get("tiers") or {}).items()
                for c in t["checks"] if not c["passed"]]
    return {"exit": proc.returncode, "seconds": round(time.perf_counter() - started, 1), "failures": failures,
            "traceback": "Traceback" in proc.stdout + proc.stderr,
            "tiers": sorted(t for t, v in (report.get("tiers") or {}).items() if v.get("passed"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clones", nargs="+", metavar="CONFIGURATION=CLONE")
    parser.add_argument("--seeds", default="7,11")
    parser.add_argument("--size", default="192x320", help="HxW of the synthetic image")
    parser.add_argument("--out", type=Path, default=Path("docs/upstream-parity.md"))
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="lic-heldout-") as tmp:
        work = Path(tmp)
        image = work / "image.safetensors"
        save_file({"x": images.synthetic(3, height, width)}, str(image))
        for item in args.clones:
            name, _, clone = item.partition("=")
            conf = registry.configuration(name)
            for seed in seeds:
                ckpt = heldout_checkpoint(conf.name, seed, work / f"{conf.name}_seed{seed}.pth.tar")
                authors = verify(ckpt, image, work / "authors", ["--upstream-repo", clone])
                ours = verify(ckpt, image, work / "ours", [])
                theirs = load_file(str(work / "authors" / "reference.safetensors"))
                mine = load_file(str(work / "ours" / "reference.safetensors"))
                diffs = {k: float((theirs[k].double() - mine[k].double()).abs().max()) for k in COMPARED}
                rows.append({"configuration": conf.name, "seed": seed, "authors": authors, "ours": ours,
                             "reference_vs_authors": diffs})
                print(json.dumps(rows[-1]), flush=True)
                ckpt.unlink()
    lines = [
        "# Held-out checkpoints against the authors' code",
        "",
        f"Written by `python tools/upstream_heldout.py` on {time.strftime('%Y-%m-%d', time.gmtime())} "
        f"({platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, CPU). Each checkpoint is "
        "synthesized with a seed no test uses, spelled as published files are (`module.` before every key, "
        f"legacy entropy-bottleneck names); one synthetic {width}x{height} image.",
        "",
        "- **authors vs target**: `lic-verify CKPT --upstream-repo CLONE`, every tier, the authors' class as "
        "the reference side;",
        "- **ours vs target**: `lic-verify CKPT`, every tier, our re-implementation as the reference side;",
        "- **our reference vs the authors'**: the largest absolute difference of each saved output.",
        "",
        "| configuration | seed | authors vs target | ours vs target | our reference vs the authors' "
        "(x_hat, y, means, scales, likelihoods y / z, decoded) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        def verdict(run: dict) -> str:
            ok = run["exit"] == 0 and not run["failures"] and not run["traceback"]
            return (f"exit {run['exit']}, {'/'.join(run['tiers'])} passed ({run['seconds']} s)" if ok
                    else f"exit {run['exit']}: {', '.join(run['failures']) or 'see the log'}")
        diffs = ", ".join(f"{r['reference_vs_authors'][k]:.1e}" if r["reference_vs_authors"][k] else "0"
                          for k in COMPARED)
        lines.append(f"| {r['configuration']} | {r['seed']} | {verdict(r['authors'])} | {verdict(r['ours'])} | "
                     f"{diffs} |")
    lines += ["", "Clones used (the repository and commit each mapping names):", ""]
    for item in args.clones:
        name, _, clone = item.partition("=")
        upstream = registry.configuration(name).family.upstream
        lines.append(f"- {name}: `{clone}`, {upstream.get('repo')} at `{str(upstream.get('commit'))[:12]}`")
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    if any(r["authors"]["exit"] or r["ours"]["exit"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
