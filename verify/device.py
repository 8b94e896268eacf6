"""Where the forward tier runs: ``--device auto|cpu|cuda``.

Both models always run on the same device.  On a device other than the CPU the T1 forward runs
there (inputs moved in, outputs moved back to the CPU before they are compared); entropy coding
(T2, T3) runs on the CPU, where compressai's range coder runs, from a forward computed on the CPU,
because each side must decode its streams exactly to the forward output it coded from.
"""

from __future__ import annotations

from typing import Any

import torch

from lic_checkpoints.convert.errors import LicError

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
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value


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


def runtime(device: torch.device, coding: bool) -> dict[str, Any]:
    """What the report records about where and how the models ran."""
    return {
        "device": str(device),
        "forward_device": str(device),
        "coding_device": "cpu" if coding else None,
        "dtype": str(torch.get_default_dtype()).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        **({"cuda_device_name": torch.cuda.get_device_name(device)} if device.type == "cuda" else {}),
    }
