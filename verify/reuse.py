"""Reusing the forward pass's analysis and synthesis outputs in the coding tiers.

For every image, T1 runs each model's ``forward`` and T2/T3 its ``compress`` and ``decompress``.  Both
paths start with the analysis transform on the same image, and ``decompress`` ends with the synthesis
transform on the latents it decoded, which equal the forward's quantized latents whenever the two
sides agree.  These transforms are most of a model's work, so running them twice per image roughly
doubles a verification's time.

:class:`TransformReuse` remembers, per image, what the model's analysis and synthesis (its
``analysis`` / ``synthesis`` methods where it has them, else ``g_a`` / ``g_s``) received and returned
in the forward pass.  During coding, a call that receives a tensor bit-identical to the one
recorded gets a copy of the recorded result instead of recomputing it: the same module on the same
input, evaluated deterministically (eval mode, no gradients, same device and threads).  Any other call
runs the module.  A record is not used if either of its tensors was changed in place since (their
version counters), and nothing is recorded for a call with more than one argument.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["TransformReuse", "TRANSFORMS", "entry_points", "patched"]

#: the transforms offered to the coding path: the model's method where it has one (it may run an
#: auxiliary branch beside the submodule), else the submodule itself
TRANSFORMS = (("analysis", "g_a"), ("synthesis", "g_s"))


class _Record:
    __slots__ = ("given", "given_version", "result", "result_version")

    def __init__(self, given: torch.Tensor, result: torch.Tensor) -> None:
        self.given, self.given_version = given, given._version
        self.result, self.result_version = result, result._version

    def answers(self, given: torch.Tensor) -> bool:
        return (self.given._version == self.given_version and self.result._version == self.result_version
                and given.shape == self.given.shape and given.dtype == self.given.dtype
                and given.device == self.given.device and torch.equal(given, self.given))


def _one_tensor(args, kwargs) -> bool:
    return len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)


def entry_points(model: torch.nn.Module) -> Iterator[tuple[str, object, str]]:
    """``(transform, owner, attribute)``: where each transform is called on ``model``."""
    for method, module_name in TRANSFORMS:
        if callable(getattr(type(model), method, None)):
            yield method, model, method
        elif isinstance(module := getattr(model, module_name, None), torch.nn.Module):
            yield method, module, "forward"


class TransformReuse:
    """Per image, the forward's analysis and synthesis calls of one model, offered back to its coding path."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._entries = list(entry_points(model))
        self._records: dict[tuple[int, str], list[_Record]] = {}
        self.reused = 0  # calls answered from a record
        self.computed = 0  # calls of the coding path that ran the transform

    @contextmanager
    def recording(self, image: int) -> Iterator[None]:
        """Record the transforms' calls while the model's forward runs on image ``image``."""

        def recorder(name, compute):
            def call(*args, **kwargs):
                result = compute(*args, **kwargs)
                if _one_tensor(args, kwargs) and isinstance(result, torch.Tensor):
                    self._records.setdefault((image, name), []).append(_Record(args[0], result))
                return result

            return call

        with patched(self._entries, recorder):
            yield

    @contextmanager
    def replaying(self, image: int) -> Iterator[None]:
        """While the coding path runs on image ``image``, answer calls that match a record."""

        def answerer(name, compute):
            records = self._records.get((image, name), [])

            def call(*args, **kwargs):
                if _one_tensor(args, kwargs):
                    for record in records:
                        if record.answers(args[0]):
                            self.reused += 1
                            return record.result.clone()  # the caller may change it in place (clamp_)
                self.computed += 1
                return compute(*args, **kwargs)

            return call

        with patched(self._entries, answerer):
            yield

    def forget(self, image: int) -> None:
        """Drop image ``image``'s records (its coding is done)."""
        for name, _, _ in self._entries:
            self._records.pop((image, name), None)


@contextmanager
def patched(entries, wrap) -> Iterator[None]:
    """Replace each entry point's call by ``wrap(transform, compute)`` while inside.  ``compute`` is what
    the call was before (an outer replacement, e.g. running on a device, or the class's own function);
    it is put back on the way out."""
    before = []
    for name, owner, attribute in entries:
        previous = owner.__dict__.get(attribute)
        before.append((owner, attribute, previous))
        compute = previous if previous is not None else getattr(type(owner), attribute).__get__(owner)
        owner.__dict__[attribute] = wrap(name, compute)
    try:
        yield
    finally:
        for owner, attribute, previous in reversed(before):
            if previous is None:
                owner.__dict__.pop(attribute, None)
            else:
                owner.__dict__[attribute] = previous
