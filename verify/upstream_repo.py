"""Use the authors' own code as the reference side (``lic-verify --upstream-repo PATH``).

Upstream repositories have top-level packages with common names (``models``, or a bundled
``compressai``), so the real class is imported in a separate Python process with the user's clone
first on ``sys.path``.  The parent writes the upstream state dict and the images to a temporary
folder; the child builds the class with the variant's kwargs, loads the weights the way the authors'
eval scripts do, runs forward, ``update(force=True)``, compress and decompress, and writes everything
back.  Nothing from the clone is imported into this process.

A mapping's ``upstream.run`` section says what the child needs to know of a repository that differs
from the common shape (every key optional)::

    run:
      path: Code                         # the clone's folder that holds the module's package ("" = its root)
      shims: [ste_round, cuda_synchronize]   # run-time stand-ins, the clone is never edited
      wrap_kwargs: {config: "utils.utils:Config"}   # a kwarg the class takes as an object of the clone's
      likelihoods: {y: y_likelihoods, z: z_likelihoods}   # forward()'s likelihood names
      entropy_bottleneck: z_entropy_bottleneck   # attribute names (defaults: entropy_bottleneck,
      hyper_analysis: h_a                         #   h_a, gaussian_conditional)
      gaussian_conditional: gaussian_conditional

Shims: ``ste_round`` gives ``compressai.ops`` the name compressai <= 1.2.6 used for ``quantize_ste``;
``cuda_synchronize`` makes ``torch.cuda.synchronize`` a no-op where there is no CUDA (code that calls
it around coding for timing).  A clone that bundles its own ``compressai`` sources gets the
installed compressai's compiled ``ans``/``_CXX`` modules, as its own are never built by a clone.
When the forward does not return ``para`` (y, means, scales), they are read from the inputs of the
model's ``gaussian_conditional`` calls during that forward, concatenated in call order.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from lic_checkpoints.convert.errors import LicError

from .tiers import CodedSide


_RUN_KEYS = {"path", "shims", "wrap_kwargs", "likelihoods", "entropy_bottleneck", "hyper_analysis",
             "gaussian_conditional"}
_SHIMS = {"ste_round", "cuda_synchronize"}


def run_spec(upstream: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The child's instructions from a mapping's ``upstream`` section; a one-line error if malformed."""
    run = upstream.get("run") or {}

    def bad(what: str) -> LicError:
        return LicError(f"{where}: upstream.run {what}; fix the mapping")

    if not isinstance(run, Mapping):
        raise bad("is not a mapping")
    unknown = sorted(set(run) - _RUN_KEYS)
    if unknown:
        raise bad(f"has an unknown key {unknown[0]!r} (known: {', '.join(sorted(_RUN_KEYS))})")
    shims, wrap, likelihoods = run.get("shims", []), run.get("wrap_kwargs", {}), run.get("likelihoods", {})
    if not isinstance(shims, list) or not all(isinstance(s, str) and s in _SHIMS for s in shims):
        raise bad(f"shims must be a list of names from {sorted(_SHIMS)}")
    if not isinstance(wrap, Mapping) or not all(isinstance(v, str) and ":" in v for v in wrap.values()):
        raise bad("wrap_kwargs must map kwargs to 'module:Class'")
    if not isinstance(likelihoods, Mapping) or set(likelihoods) - {"y", "z"}:
        raise bad("likelihoods may only rename 'y' and 'z'")
    names = {"likelihoods_y": likelihoods.get("y", "y"), "likelihoods_z": likelihoods.get("z", "z")}
    for key, default in (("entropy_bottleneck", "entropy_bottleneck"), ("hyper_analysis", "h_a"),
                         ("gaussian_conditional", "gaussian_conditional")):
        names[key] = run.get(key, default)
    if not all(isinstance(v, str) and v for v in names.values()):
        raise bad("names must be non-empty strings")
    path = run.get("path", "")
    if not isinstance(path, str) or Path(path).is_absolute() or ".." in Path(path).parts:
        raise bad("path must be a folder inside the clone")
    return {"path": path, "shims": list(shims), "wrap_kwargs": dict(wrap), "names": names}


def run_reference(repo: Path, module: str, class_name: str, kwargs: Mapping[str, Any],
                  state_dict: Mapping[str, torch.Tensor], images: Sequence, *, coding: bool,
                  threads: int | None = None, spec: Mapping[str, Any] | None = None) -> tuple[list[dict], list[CodedSide] | None]:
    """Forward (and coding) results of the authors' class, one entry per image."""
    from safetensors.torch import load_file, save_file

    spec = dict(spec or run_spec({}, "the mapping"))
    repo = Path(repo)
    root = repo / spec["path"]
    package = module.split(".")[0]
    if spec["path"] and not (root / package).is_dir() and (repo / package).is_dir():
        root = repo  # the user gave the sub-folder itself
    if not (root / package).is_dir():
        where = f"{spec['path']}/{package}" if spec["path"] else package
        raise LicError(f"{repo}: no '{where}' package here; give the root of your clone of the authors' repository")
    with tempfile.TemporaryDirectory(prefix="lic-upstream-") as tmp:
        tmp = Path(tmp)
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp / "weights.safetensors"))
        save_file({f"x{i}": img.x.contiguous() for i, img in enumerate(images)}, str(tmp / "images.safetensors"))
        job = {"root": str(root.resolve()), "module": module, "class": class_name, "kwargs": dict(kwargs),
               "coding": coding, "count": len(images), "threads": threads or torch.get_num_threads(),
               "shims": spec["shims"], "wrap_kwargs": spec["wrap_kwargs"], "names": spec["names"]}
        (tmp / "job.json").write_text(json.dumps(job))
        # run from the job folder: the user's working folder (maybe the clone itself) is not on the child's path
        proc = subprocess.run([sys.executable, "-m", "lic_checkpoints.verify._upstream_worker", str(tmp)],
                              capture_output=True, text=True, cwd=tmp)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise LicError(f"the upstream code in {repo} failed: {last}")
        data = load_file(str(tmp / "out.safetensors"))
        meta = json.loads((tmp / "out.json").read_text())
    outputs, sides = [], [] if coding else None
    for i in range(len(images)):
        get = lambda name: data[f"{name}.{i}"]  # noqa: E731
        outputs.append({"x_hat": get("x_hat"), "likelihoods": {"y": get("likelihoods_y"), "z": get("likelihoods_z")},
                        "para": {"means": get("means"), "scales": get("scales"), "y": get("y")}})
        if coding:
            sides.append(CodedSide(
                symbols_y=get("symbols_y"), indexes_y=get("indexes_y"), symbols_z=get("symbols_z"),
                y_minus_means=get("y") - get("means"), scales=get("scales_bounded"),
                z_minus_medians=get("z_minus_medians"), decoded=get("decoded"), forward_x_hat=get("x_hat"),
                nbytes=meta["nbytes"][i], streams=meta["streams"][i],
            ))
    return outputs, sides
