"""Child process of ``--upstream-repo``: run the authors' class on the job in the given folder.

Imports only torch, safetensors and the user's clone (its ``models`` package), never our models.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def main(folder: str) -> None:
    work = Path(folder)
    job = json.loads((work / "job.json").read_text())
    torch.set_num_threads(job["threads"])
    sys.path.insert(0, job["repo"])
    cls = getattr(importlib.import_module(job["module"]), job["class"])
    net = cls(**job["kwargs"])
    state = load_file(str(work / "weights.safetensors"))
    net.load_state_dict(state)  # positional only: some authors' classes override it without a 'strict' argument
    net.eval()
    images = load_file(str(work / "images.safetensors"))
    out: dict[str, torch.Tensor] = {}
    nbytes, streams = [], []
    with torch.no_grad():
        forwards = [net(images[f"x{i}"]) for i in range(job["count"])]
        if job["coding"]:
            net.update(force=True)
        for i, fwd in enumerate(forwards):
            para = fwd["para"]
            out.update({f"x_hat.{i}": fwd["x_hat"], f"likelihoods_y.{i}": fwd["likelihoods"]["y"],
                        f"likelihoods_z.{i}": fwd["likelihoods"]["z"], f"means.{i}": para["means"],
                        f"scales.{i}": para["scales"], f"y.{i}": para["y"]})
            if not job["coding"]:
                continue
            x = images[f"x{i}"]
            enc = net.compress(x)
            dec = net.decompress(enc["strings"], enc["shape"])["x_hat"]
            gc, eb = net.gaussian_conditional, net.entropy_bottleneck
            z = net.h_a(para["y"])
            medians = eb._get_medians()
            out.update({
                f"decoded.{i}": dec,
                f"symbols_y.{i}": torch.round(para["y"] - para["means"]).int(),
                f"indexes_y.{i}": gc.build_indexes(para["scales"]).int(),
                f"symbols_z.{i}": torch.round(z - medians).int(),
                f"z_minus_medians.{i}": z - medians,
                f"scales_bounded.{i}": gc.lower_bound_scale(para["scales"]),
            })
            nbytes.append(sum(len(s) for group in enc["strings"] for s in group))
            streams.append(sum(len(group) for group in enc["strings"]))
    save_file({k: v.detach().contiguous() for k, v in out.items()}, str(work / "out.safetensors"))
    (work / "out.json").write_text(json.dumps({"nbytes": nbytes, "streams": streams}))


if __name__ == "__main__":
    main(sys.argv[1])
