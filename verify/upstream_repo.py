"""Use the authors' own code as the reference side (``lic-verify --upstream-repo PATH``).

Every upstream repository has a top-level package called ``models``, so the real class is imported in
a separate Python process with the user's clone first on ``sys.path``.  The parent writes the upstream
state dict and the images to a temporary folder; the child builds the class with the variant's kwargs,
loads the weights the way the authors' eval scripts do, runs forward, ``update(force=True)``, compress
and decompress, and writes everything back.  Nothing from the clone is imported into this process.
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

_PER_IMAGE = ("x_hat", "likelihoods_y", "likelihoods_z", "means", "scales", "y", "decoded",
              "symbols_y", "indexes_y", "symbols_z", "z_minus_medians", "scales_bounded")


def run_reference(repo: Path, module: str, class_name: str, kwargs: Mapping[str, Any],
                  state_dict: Mapping[str, torch.Tensor], images: Sequence, *, coding: bool,
                  threads: int | None = None) -> tuple[list[dict], list[CodedSide] | None]:
    """Forward (and coding) results of the authors' class, one entry per image."""
    from safetensors.torch import load_file, save_file

    repo = Path(repo)
    if not (repo / "models").is_dir():
        raise LicError(f"{repo}: no 'models' package here; give the root of your clone of the authors' repository")
    with tempfile.TemporaryDirectory(prefix="lic-upstream-") as tmp:
        tmp = Path(tmp)
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp / "weights.safetensors"))
        save_file({f"x{i}": img.x.contiguous() for i, img in enumerate(images)}, str(tmp / "images.safetensors"))
        job = {"repo": str(repo.resolve()), "module": module, "class": class_name, "kwargs": dict(kwargs),
               "coding": coding, "count": len(images), "threads": threads or torch.get_num_threads()}
        (tmp / "job.json").write_text(json.dumps(job))
        proc = subprocess.run([sys.executable, "-m", "lic_checkpoints.verify._upstream_worker", str(tmp)],
                              capture_output=True, text=True)
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
