"""Where the models run: ``--device auto|cpu|cuda``.

Both models always run on the same device.  On a device other than the CPU:

- the T1 forward runs there whole (inputs moved in, outputs moved back to the CPU before they are
  compared);
- for the coding tiers (T2, T3) each model runs on the CPU, where compressai's range coder runs,
  except its analysis and synthesis transforms (the model's ``analysis`` / ``synthesis`` methods,
  else ``g_a`` / ``g_s``: most of its work), which :func:`transforms_on` runs on the device with
  copies of their weights.  The forward that coding is compared with is computed the same way, so
  each side still decodes exactly to the forward output it coded from.
"""

from __future__ import annotations

import itertools
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator

import torch

from lic_checkpoints.convert.errors import LicError

from .reuse import entry_points, patched

CHOICES = ("auto", "cpu", "cuda")


def resolve(spec: str | torch.device | None) -> torch.device:
    """``auto`` (or None): CUDA when available, else the CPU; ``cuda`` without CUDA is a one-line error."""
    if spec is None or str(spec) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise LicError(f"unknown device {spec!r}; use one of {', '.join(CHOICES)}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LicError(f"--device {spec}: CUDA is not available on this machine (torch {torch.__version__}, "
                       f"built {'with' if torch.version.cuda else 'without'} CUDA); use --device cpu or auto")
    if device.type not in ("cpu", "cuda"):
        raise LicError(f"unsupported device {spec!r}; use one of {', '.join(CHOICES)}")
    return device


def off_cpu(device: torch.device | str | None) -> bool:
    return device is not None and torch.device(device).type != "cpu"


def to_cpu(value: Any) -> Any:
    """``value`` (tensors in nested dicts, lists, tuples) with every tensor on the CPU."""
    return to_device(value, torch.device("cpu"))


def forward_on(device: torch.device, reference, target, images, forward) -> tuple[list, list]:
    """Both models' forward outputs (on the CPU) for ``images``, computed on ``device``.

    ``forward(model, x, with_params)`` is the verifier's own forward call.  The models are moved to
    ``device`` and back to the CPU afterwards (entropy coding runs there).
    """
    try:
        reference.to(device)
        target.to(device)
        ref_out, tgt_out = [], []
        for img in images:
            x = img.x.to(device)
            ref_out.append(to_cpu(forward(reference, x, False)))
            tgt_out.append(to_cpu(forward(target, x, True)))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return ref_out, tgt_out
    finally:
        reference.to("cpu")
        target.to("cpu")


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` (tensors in nested dicts, lists, tuples) with every tensor on ``device``, detached."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


class _Holder(torch.nn.Module):
    """Calls ``function`` (one of ``owner``'s) so that ``functional_call`` can swap ``owner``'s weights."""

    def __init__(self, owner: torch.nn.Module, function) -> None:
        super().__init__()
        self.owner = owner
        object.__setattr__(self, "_function", function)  # a bound method, not a submodule

    def forward(self, *args, **kwargs):
        return self._function(*args, **kwargs)


def _weights_on(owner: torch.nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
    """Copies on ``device`` of ``owner``'s parameters and buffers, named as ``_Holder`` sees them,
    except its entropy models' (no transform calls them; some keep their weights in their own way)."""
    from compressai.entropy_models import EntropyModel

    skipped = tuple(f"{name}." for name, module in owner.named_modules() if name and isinstance(module, EntropyModel))
    named = itertools.chain(owner.named_parameters(remove_duplicate=False), owner.named_buffers(remove_duplicate=False))
    copies: dict[int, torch.Tensor] = {}  # a tensor shared under several names (tied) is copied once
    weights = {}
    for name, tensor in named:
        if not name.startswith(skipped):
            if id(tensor) not in copies:
                copies[id(tensor)] = tensor.detach().to(device)
            weights[f"owner.{name}"] = copies[id(tensor)]
    return weights


def on_device(owner: torch.nn.Module, function, device: torch.device, *, back: torch.device | None = None,
              weights: dict[str, torch.Tensor] | None = None):
    """``function`` (one of ``owner``'s, taking and returning tensors) computed on ``device`` with copies
    of ``owner``'s weights there (``weights``, made by ``_weights_on``, or made now): inputs are moved
    in and results moved to ``back`` (default: the CPU).  ``owner`` itself is not changed."""
    holder = _Holder(owner, function)
    weights = _weights_on(owner, device) if weights is None else weights
    back = torch.device("cpu") if back is None else back

    def call(*args, **kwargs):
        result = torch.func.functional_call(holder, weights, to_device(args, device), to_device(kwargs, device),
                                            strict=False)
        return result if back == device else to_device(result, back)

    call.device = device
    return call


@contextmanager
def transforms_on(device: torch.device, *models: torch.nn.Module) -> Iterator[None]:
    """While inside, each model's analysis and synthesis transforms run on ``device`` (the rest of the
    model stays where it is, on the CPU); the weights' copies there are freed on the way out."""
    with ExitStack() as stack:
        for model in models:
            entries = list(entry_points(model))
            owners = {name: owner for name, owner, _ in entries}
            copies: dict[int, dict[str, torch.Tensor]] = {}  # one copy per owner (a model may own both)

            def wrap(name, compute, owners=owners, copies=copies):
                owner = owners[name]
                if id(owner) not in copies:
                    copies[id(owner)] = _weights_on(owner, device)
                return on_device(owner, compute, device, weights=copies[id(owner)])

            stack.enter_context(patched(entries, wrap))
        yield


def runtime(device: torch.device, coding: bool) -> dict[str, Any]:
    """What the report records about where and how the models ran."""
    return {
        "device": str(device),
        "forward_device": str(device),
        "coding_device": "cpu" if coding else None,
        "coding_transforms_device": str(device) if coding else None,
        "dtype": str(torch.get_default_dtype()).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        **({"cuda_device_name": torch.cuda.get_device_name(device)} if device.type == "cuda" else {}),
    }
