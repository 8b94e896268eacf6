"""Build the two models a parity check compares, from a family name and variant.

The reference side is our re-implementation of the authors' class (``models/upstream``); the target
side is the CompressAI-layout class (``models/compressai``, or the installed compressai's own).  Both
are built with their parameters on the meta device and their initialisers skipped (the values would
be replaced anyway; buffers stay real, so derived non-persistent buffers keep their values) and then
take their tensors from the state dicts with ``assign=True``: every
tensor the mapping only renames is the *same* storage in both models (and the same memory-mapped
pages of the checkpoint file).
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping

import torch
from torch import nn

from lic_checkpoints.convert import registry
from lic_checkpoints.convert.errors import LicError

_LEGACY_EB = {"_matrix": "matrices", "_bias": "biases", "_factor": "factors"}


def upstream_class(family: str) -> type[nn.Module]:
    """Our re-implementation of the authors' class for ``family`` (its mapping's ``upstream.ours``)."""
    return registry.import_class(registry.family(family).upstream["ours"])


def canonical_upstream_names(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Current compressai names for a state dict that may use the <= 1.2.6 entropy-bottleneck ones."""
    out = {}
    for key, value in state_dict.items():
        head, _, leaf = key.rpartition(".")
        if head.endswith("entropy_bottleneck"):
            for old, new in _LEGACY_EB.items():
                if leaf.startswith(old) and leaf[len(old):].isdigit():
                    key = f"{head}.{new}.{leaf[len(old):]}"
        out[key] = value
    return out


def _as_the_model_holds(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` made loadable the way ``load_state_dict`` without ``assign`` would take it.

    * A floating tensor of another dtype (a float16 or bfloat16 checkpoint) is cast to the model's
      dtype, as copying it into the model's float32 parameter does in the authors' eval scripts.
    * An empty buffer of the model (an entropy table before ``update()``) takes the checkpoint's
      shape when the checkpoint holds it filled, as CompressAI's own loading resizes them.
    """
    parameters = dict(model.named_parameters())
    own = {**parameters, **dict(model.named_buffers())}
    out = dict(state_dict)
    for key, value in state_dict.items():
        mine = own.get(key)
        if mine is None:
            continue  # strict loading names it
        if value.is_floating_point() and mine.is_floating_point() and value.dtype != mine.dtype:
            out[key] = value.to(mine.dtype)
        if mine.numel() == 0 and value.shape != mine.shape and key not in parameters:
            owner, _, leaf = key.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            module._buffers[leaf] = torch.empty(value.shape, dtype=mine.dtype, device=mine.device)
    return out


def _materialize(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load ``state_dict`` by assignment (sharing storage), strictly, into a meta-built model."""
    result = nn.Module.load_state_dict(model, _as_the_model_holds(model, state_dict), strict=True, assign=True)
    del result
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:
        raise LicError(f"{type(model).__name__}: {leftovers[0]} was not in the state dict")
    return model.eval()


#: parameters smaller than this stay real while a model is built (some constructors, e.g.
#: compressai's EntropyBottleneck, assign to ``param.data`` afterwards); they are replaced on loading
SMALL_PARAMETER = 1 << 16


#: the in-place initialisers of ``torch.nn.init`` that modules call from ``__init__`` /
#: ``reset_parameters``; while a model is built for loading they leave parameters alone
INITIALISERS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_",
)


def _skipping_parameters(initialiser):
    def initialise(tensor, *args, **kwargs):
        if isinstance(tensor, nn.Parameter):  # replaced by the state dict's tensor on loading
            return tensor
        return initialiser(tensor, *args, **kwargs)  # buffers and plain tensors keep their values

    return initialise


@contextlib.contextmanager
def parameters_on_meta():
    """Inside, every parameter a module registers is moved to the meta device right away, and the
    ``torch.nn.init`` initialisers skip parameters (their values would be replaced on loading).

    Buffers, and tensors a constructor fills before wrapping them as parameters, keep their values.
    Only for building models that :func:`_materialize` then loads strictly: every parameter must come
    from the state dict.
    """
    original = nn.Module.register_parameter
    initialisers = {name: getattr(nn.init, name) for name in INITIALISERS if hasattr(nn.init, name)}

    def register(module: nn.Module, name: str, param) -> None:
        if param is not None and not param.is_meta and param.numel() >= SMALL_PARAMETER:
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    for name, initialiser in initialisers.items():
        setattr(nn.init, name, _skipping_parameters(initialiser))
    try:
        yield
    finally:
        nn.Module.register_parameter = original
        for name, initialiser in initialisers.items():
            setattr(nn.init, name, initialiser)


def build_on_meta(cls: type[nn.Module], kwargs: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    with parameters_on_meta():
        model = cls(**kwargs)
    return _materialize(model, state_dict)


def build_upstream(family: str, kwargs: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Our re-implementation of the authors' model, holding ``state_dict`` (upstream key names)."""
    return build_on_meta(upstream_class(family), kwargs, canonical_upstream_names(state_dict))


def build_target(family: str, kwargs: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor],
                 source: str = "ours") -> nn.Module:
    """The CompressAI-layout model (ours, or the installed compressai's), holding ``state_dict``."""
    from .models.compressai.installed import target_class

    cls = target_class(family, source=source)
    if source == "installed":
        return load_installed(cls, kwargs, state_dict)
    return build_on_meta(cls, kwargs, state_dict)


def strict_load_problem(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``state_dict`` would not load strictly into ``model`` (keys and shapes), or None."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    # an empty entropy table takes the checkpoint's shape on loading (compressai resizes it)
    mismatched = [k for k in own if k in state_dict and own[k].numel() and own[k].shape != state_dict[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if mismatched:
        k = mismatched[0]
        problems.append(f"{len(mismatched)} of another shape (e.g. {k}: {list(state_dict[k].shape)} where the "
                        f"class holds {list(own[k].shape)})")
    return "; ".join(problems) or None


def load_installed(cls: type[nn.Module], kwargs: Mapping[str, Any],
                   state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """An installed compressai class built with ``kwargs``, loaded strictly through its own
    ``load_state_dict`` (the way a CompressAI user loads it); a one-line :class:`LicError` if the
    keys or shapes do not match."""
    name = f"{cls.__module__}.{cls.__qualname__}"
    try:
        model = cls(**kwargs)
    except Exception as error:  # noqa: BLE001 - any constructor failure is reported the same way
        raise LicError(f"{name}({_kwargs_text(kwargs)}) cannot be built: {type(error).__name__}: "
                       f"{str(error).splitlines()[0] if str(error) else ''}") from error
    problem = strict_load_problem(model, state_dict)
    if problem is None:
        try:
            model.load_state_dict(dict(state_dict), strict=True)
        except RuntimeError as error:
            problem = " ".join(str(error).split())
    if problem is not None:
        raise LicError(f"the converted weights do not load strictly into {name}({_kwargs_text(kwargs)}): {problem}")
    return model.eval()


def _kwargs_text(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def reassign(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Give a model built by :func:`build_on_meta` another checkpoint's tensors (same configuration):
    strict ``load_state_dict`` by assignment, as the first load, without rebuilding the model.

    Entropy tables ``update()`` filled for the previous checkpoint take the new state dict's shape
    first (empty, as training saves them, or filled), as a freshly built model would hold them.
    """
    own = dict(model.named_buffers())
    for key, value in state_dict.items():
        mine = own.get(key)
        if mine is not None and mine.shape != value.shape and (mine.numel() == 0 or value.numel() == 0):
            owner, _, leaf = key.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            module._buffers[leaf] = torch.empty(value.shape, dtype=mine.dtype, device=mine.device)
    return _materialize(model, state_dict)


class ModelCache:
    """The two models of each configuration, built once and given each checkpoint's weights in turn
    (:func:`reassign`): for verifying many checkpoints of one release in one process.

    ``builds`` counts the models built (not reassigned).  Only our own classes are cached; the
    installed compressai's are loaded through their own ``load_state_dict`` every time.
    """

    def __init__(self) -> None:
        self._models: dict[tuple, nn.Module] = {}
        self.builds = 0

    @staticmethod
    def _key(side: str, family: str, kwargs: Mapping[str, Any]) -> tuple:
        return side, family, tuple(sorted((k, repr(v)) for k, v in kwargs.items()))

    def _get(self, key: tuple, state_dict: Mapping[str, torch.Tensor], build) -> nn.Module:
        model = self._models.get(key)
        if model is None:
            model = build()
            self.builds += 1
            self._models[key] = model
            return model
        try:
            return reassign(model, state_dict)
        except BaseException:
            self._models.pop(key, None)  # half-assigned: build afresh next time
            raise

    def reference(self, family: str, kwargs: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
        """Our re-implementation of the authors' model of this configuration, holding ``state_dict``."""
        names = canonical_upstream_names(state_dict)
        return self._get(self._key("reference", family, kwargs), names,
                         lambda: build_upstream(family, kwargs, state_dict))

    def target(self, family: str, kwargs: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor],
               source: str = "ours") -> nn.Module:
        """The CompressAI-layout model of this configuration, holding ``state_dict``."""
        if source != "ours":
            return build_target(family, kwargs, state_dict, source=source)
        return self._get(self._key("target", family, kwargs), state_dict,
                         lambda: build_target(family, kwargs, state_dict, source=source))
