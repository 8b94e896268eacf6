"""Child process of ``--upstream-repo``: run the authors' class on the job in the given folder.

Imports only torch, safetensors and the user's clone (and, for clones written against an older
compressai, the installed compressai the clone's own code imports), never our models.  What the
mapping's ``upstream.run`` section says (see :mod:`.upstream_repo`) arrives in ``job.json``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

#: compressai's compiled modules; a clone that bundles compressai's sources has none of them built
_COMPILED = ("ans", "_CXX")
#: compressai <= 1.2.6 spelling of the entropy-bottleneck parameters (the job's weights use the current one)
_LEGACY_EB = {"matrices": "_matrix", "biases": "_bias", "factors": "_factor"}


class _BorrowedExtensions(importlib.abc.MetaPathFinder):
    """Finds ``compressai.ans`` / ``compressai._CXX`` in the installed compressai for a clone whose own
    ``compressai`` package ships only the sources (its extensions are never built by a plain clone)."""

    def __init__(self, folder: Path) -> None:
        self.files = {}
        for name in _COMPILED:
            found = [p for suffix in importlib.machinery.EXTENSION_SUFFIXES for p in folder.glob(name + suffix)]
            if found:
                self.files[f"compressai.{name}"] = found[0]

    def find_spec(self, fullname, path=None, target=None):
        where = self.files.get(fullname)
        if where is None:
            return None
        return importlib.util.spec_from_file_location(fullname, where,
                                                      loader=importlib.machinery.ExtensionFileLoader(fullname, str(where)))


def _borrow_compiled_modules(root: Path) -> None:
    """Before the clone's ``compressai`` is importable: let it load the installed compressai's compiled modules."""
    bundled = root / "compressai"
    if any((bundled / (name + suffix)).exists() for name in _COMPILED for suffix in importlib.machinery.EXTENSION_SUFFIXES):
        return
    installed = importlib.util.find_spec("compressai")
    if installed is None or not installed.submodule_search_locations:
        return
    sys.meta_path.insert(0, _BorrowedExtensions(Path(list(installed.submodule_search_locations)[0])))


def _apply_shims(shims: list[str]) -> None:
    """Run-time stand-ins for what an old clone expects of today's packages; the clone is not edited."""
    for shim in shims:
        if shim == "ste_round":  # compressai >= 1.2.7 calls it quantize_ste (the same arithmetic)
            import compressai.ops

            if not hasattr(compressai.ops, "ste_round"):
                compressai.ops.ste_round = compressai.ops.quantize_ste
        elif shim == "cuda_synchronize":  # called around compress/decompress for timing only
            if not torch.cuda.is_available():
                torch.cuda.synchronize = lambda *args, **kwargs: None
        else:
            raise ValueError(f"unknown shim {shim!r}")


def _resolve(value: Any) -> Any:
    """``"torch.nn.GELU"``-style values name a torch.nn class (how mappings write activations)."""
    if isinstance(value, str) and value.startswith("torch.nn."):
        found = getattr(torch.nn, value.removeprefix("torch.nn."), None)
        if isinstance(found, type):
            return found
    if isinstance(value, dict):
        return {k: _resolve(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v) for v in value]
    return value


def _import(name: str) -> Any:
    module, _, attribute = name.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _in_the_models_spelling(net: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The job's weights with the entropy-bottleneck names the authors' model registers (an old bundled
    compressai registers ``_matrix0``, ...)."""
    own = set(net.state_dict())
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if key not in own and len(parts) >= 3 and parts[-2] in _LEGACY_EB and parts[-1].isdigit():
            legacy = ".".join(parts[:-2] + [_LEGACY_EB[parts[-2]] + parts[-1]])
            if legacy in own:
                key = legacy
        out[key] = value
    return out


class _GaussianInputs:
    """What the model hands its main GaussianConditional in forward, call by call: the slices of y,
    their scales and their means (for models whose forward does not return them)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self.handle = module.register_forward_pre_hook(self._seen, with_kwargs=True)

    def _seen(self, module, args, kwargs):
        values = list(args) + [kwargs[k] for k in ("inputs", "scales", "means") if k in kwargs]
        means = values[2] if len(values) > 2 else None
        self.calls.append((values[0].detach(), values[1].detach(), None if means is None else means.detach()))

    def take(self) -> dict[str, torch.Tensor]:
        calls, self.calls = self.calls, []
        if not calls:
            raise RuntimeError("the model's forward never called its gaussian_conditional")
        y = torch.cat([c[0] for c in calls], dim=1)
        scales = torch.cat([c[1] for c in calls], dim=1)
        means = torch.cat([c[2] if c[2] is not None else torch.zeros_like(c[0]) for c in calls], dim=1)
        return {"y": y, "means": means, "scales": scales}

    def close(self) -> None:
        self.handle.remove()


def main(folder: str) -> None:
    work = Path(folder)
    job = json.loads((work / "job.json").read_text())
    torch.set_num_threads(job["threads"])
    root = Path(job["root"])
    if job["module"].split(".")[0] == "compressai":
        _borrow_compiled_modules(root)
    sys.path.insert(0, str(root))
    _apply_shims(job["shims"])
    cls = _import(f"{job['module']}:{job['class']}")
    kwargs = _resolve(job["kwargs"])
    for name, wrapper in job["wrap_kwargs"].items():
        kwargs[name] = _import(wrapper)(kwargs[name])
    net = cls(**kwargs)
    state = _in_the_models_spelling(net, load_file(str(work / "weights.safetensors")))
    net.load_state_dict(state)  # positional only: some authors' classes override it without a 'strict' argument
    net.eval()
    names = job["names"]
    gc, eb = getattr(net, names["gaussian_conditional"]), getattr(net, names["entropy_bottleneck"])
    hyper_analysis = getattr(net, names["hyper_analysis"])
    images = load_file(str(work / "images.safetensors"))
    out: dict[str, torch.Tensor] = {}
    nbytes, streams = [], []
    with torch.no_grad():
        watch = _GaussianInputs(gc)
        forwards = []
        for i in range(job["count"]):
            fwd = net(images[f"x{i}"])
            seen = watch.take()
            forwards.append((fwd, fwd.get("para") or seen))
        watch.close()
        if job["coding"]:
            net.update(force=True)
        for i, (fwd, para) in enumerate(forwards):
            likelihoods = fwd["likelihoods"]
            out.update({f"x_hat.{i}": fwd["x_hat"], f"likelihoods_y.{i}": likelihoods[names["likelihoods_y"]],
                        f"likelihoods_z.{i}": likelihoods[names["likelihoods_z"]], f"means.{i}": para["means"],
                        f"scales.{i}": para["scales"], f"y.{i}": para["y"]})
            if not job["coding"]:
                continue
            x = images[f"x{i}"]
            enc = net.compress(x)
            dec = net.decompress(enc["strings"], enc["shape"])["x_hat"]
            z = hyper_analysis(para["y"])
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
