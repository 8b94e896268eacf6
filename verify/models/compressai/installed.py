"""Choose the CompressAI-layout model class: ours, or the installed compressai's own.

Each mapping file names both: ``target.ours`` (our re-implementation, holding CompressAI master's
keys) and ``target.compressai_class`` (master's own class, after PRs #355/#356; PyPI compressai
1.2.8 lacks them). By default the verifier uses ours; when the installed compressai has the class,
:func:`target_class` can hand it out instead (to check a converted file against CompressAI itself).
Both are imported only on request.

Running master's classes unmodified: :class:`MasterView` observes the tensors the parity report
compares while master's own ``forward``/``compress`` run, and :data:`KNOWN_DIFFERENCES` records where
master's port of a family is known to compute differently from the authors' code (the report quotes
the cause when it finds the divergence there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lic_checkpoints.convert import registry
from lic_checkpoints.convert.errors import LicError

__all__ = [
    "KNOWN_DIFFERENCES", "KnownDifference", "MasterView", "MissingTargetClassError", "installed_classes",
    "known_difference", "target_class",
]

Source = Literal["ours", "installed"]


class MissingTargetClassError(LicError):
    """The requested CompressAI-layout model class cannot be imported."""


def _class_path(family: str, source: Source) -> str:
    """Where ``family``'s class lives for ``source``, as its mapping file declares it."""
    try:
        target = registry.family(family).target
    except LicError as error:
        raise MissingTargetClassError(str(error)) from None
    if source == "ours":
        return target["ours"]
    return target.get("compressai_class") or ""


def _load_class(family: str, source: Source) -> type:
    path = _class_path(family, source)
    if not path:
        raise MissingTargetClassError(f"the {family} mapping names no CompressAI class")
    try:
        return registry.import_class(path)
    except LicError as error:
        raise MissingTargetClassError(str(error)) from None


def installed_classes() -> dict[str, type]:
    """The installed compressai's own classes, keyed by family.

    Families whose class the installed compressai lacks (all of them in 1.2.8) are left out.
    """
    found: dict[str, type] = {}
    for family in registry.family_names():
        try:
            found[family] = _load_class(family, "installed")
        except MissingTargetClassError:
            continue
    return found


def target_class(family: str, source: Source = "ours") -> type:
    """The CompressAI-layout model class for ``family`` from ``source``.

    ``"ours"`` imports our re-implementation, ``"installed"`` the installed compressai's class;
    either raises :class:`MissingTargetClassError` naming the class when it is not available.
    """
    if source == "ours":
        return _load_class(family, "ours")
    if source == "installed":
        try:
            return _load_class(family, "installed")
        except MissingTargetClassError as error:
            import compressai

            raise MissingTargetClassError(
                f"{error} (installed compressai {compressai.__version__} does not ship it; use our class, the "
                f"default target, or install CompressAI master: pip install compressai-temp, or a folder of its "
                f"own with tools/install_master.py)"
            ) from error
    raise ValueError(f"source must be 'ours' or 'installed', got {source!r}")


# --- running the installed compressai's own classes ------------------------------------------------
#
# CompressAI master's models (after PRs #355-#357) return only ``x_hat`` and ``likelihoods`` from
# ``forward`` and take no ``return_params``/``return_symbols`` arguments.  We never patch them: the
# tensors the parity report compares (``y``, each slice's ``means`` and ``scales``, each slice's
# decoded ``y_hat``) are *observed* with forward hooks on the public modules every master model of
# these families is built from:
#
#     model.latent_codec                       HyperpriorLatentCodec: h_a, z (entropy bottleneck), y
#     model.latent_codec.h_a                   called with y in forward and compress: y and z
#     model.latent_codec.y.groups              slice widths
#     model.latent_codec.y.latent_codec["y{k}"]               slice k's Gaussian-conditional leaf
#     model.latent_codec.y.latent_codec["y{k}"].entropy_parameters   called with the slice's
#                                              Gaussian parameters (``chunks`` names their order)
#                                              in forward, compress and decompress
#
# or, for a two-pass checkerboard leaf (anchors, then non-anchors: MultiContextCheckerboardLatentCodec):
#
#     leaf.y                                   its Gaussian-conditional codec, called in forward with
#                                              the parameters of both passes in place (``chunks``)
#     leaf.entropy_parameters_anchor / _nonanchor   called once each in compress, with the parameters
#                                              of that pass's positions packed to half width; put back
#                                              in place with master's own checkerboard ``embed``
#
# A model that lacks this structure still runs through every tier; the rows it cannot give are
# reported as not compared.


class MasterView:
    """Observe an installed compressai model while its own ``forward``/``compress`` run."""

    def __init__(self, model) -> None:
        self.model = model
        self.missing = _structure_problem(model)
        if self.missing is None:
            codec = model.latent_codec
            self.codec = codec
            self.groups = [int(g) for g in codec.y.groups]
            self.leaves = [codec.y.latent_codec[f"y{k}"] for k in range(len(self.groups))]
            #: where each slice's GaussianConditional and its parameter order live
            self.gaussians = [_gaussian_codec(leaf).gaussian_conditional for leaf in self.leaves]

    @property
    def observable(self) -> bool:
        return self.missing is None

    def _record(self, mode: str = "forward"):
        """A context manager collecting, while it is open, what the observed modules see while the
        model's ``mode`` (``forward`` or ``compress``) runs."""
        import contextlib

        seen: dict[str, list] = {"y": [], "z": [], "params": [[] for _ in self.leaves],
                                 "y_hat": [[] for _ in self.leaves], "passes": [[] for _ in self.leaves]}

        # every hook returns None: the observed modules' outputs are left exactly as they are
        def hyper_analysis(module, args, output) -> None:
            seen["y"].append(args[0])
            seen["z"].append(output)

        def gaussian_parameters(k: int):
            def hook(module, args, output) -> None:
                seen["params"][k].append(output)
            return hook

        def decoded_slice(k: int):
            def hook(module, args, output) -> None:
                seen["y_hat"][k].append(output["y_hat"])
            return hook

        def parameters_in_place(k: int):
            def hook(module, args, output) -> None:
                seen["params"][k].append(args[1])
            return hook

        def packed_pass(k: int):
            def hook(module, args, output) -> None:
                seen["passes"][k].append(output)
            return hook

        @contextlib.contextmanager
        def recording():
            handles = [self.codec.h_a.register_forward_hook(hyper_analysis)]
            for k, leaf in enumerate(self.leaves):
                if not _is_checkerboard(leaf):
                    handles.append(leaf.entropy_parameters.register_forward_hook(gaussian_parameters(k)))
                elif mode == "forward":
                    handles.append(leaf.y.register_forward_hook(parameters_in_place(k)))
                else:
                    for head in (leaf.entropy_parameters_anchor, leaf.entropy_parameters_nonanchor):
                        handles.append(head.register_forward_hook(packed_pass(k)))
                handles.append(leaf.register_forward_hook(decoded_slice(k)))
            try:
                yield seen
            finally:
                for handle in handles:
                    handle.remove()

        return recording()

    def split(self, k: int, params) -> dict:
        """Slice ``k``'s Gaussian parameters by name (``scales``, ``means``), in the leaf's order."""
        names = tuple(getattr(_gaussian_codec(self.leaves[k]), "chunks", ("scales", "means")))
        return dict(zip(names, params.chunk(len(names), dim=1)))

    def _collected(self, seen) -> list:
        """Each slice's parameters in place: the one call seen, or a checkerboard leaf's two packed
        passes (anchors, non-anchors) put back in place by master's own ``embed``."""
        import torch

        out = []
        for k, leaf in enumerate(self.leaves):
            passes = seen["passes"][k]
            if passes:
                from compressai.latent_codecs import checkerboard

                if len(passes) != 2:
                    raise LicError(f"{type(self.model).__name__}.compress did not run slice {k}'s two passes once")
                out.append(checkerboard.embed(torch.stack(passes), anchor_parity=leaf.anchor_parity))
            elif len(seen["params"][k]) == 1:
                out.append(seen["params"][k][0])
            else:
                raise LicError(f"{type(self.model).__name__} did not compute slice {k}'s parameters once")
        return out

    def forward(self, x) -> dict:
        """The model's own forward, plus what the report compares: ``para`` (``y``, ``means``,
        ``scales`` in slice order) and ``slices`` (each slice's decoded ``y_hat``), when observable."""
        import torch

        with torch.no_grad():
            if not self.observable:
                out = self.model(x)
                return {"x_hat": out["x_hat"], "likelihoods": dict(out["likelihoods"])}
            with self._record("forward") as seen:
                out = self.model(x)
        if len(seen["y"]) != 1:
            raise LicError(f"{type(self.model).__name__}.forward did not run each observed module once")
        parts = [self.split(k, p) for k, p in enumerate(self._collected(seen))]
        return {
            "x_hat": out["x_hat"],
            "likelihoods": dict(out["likelihoods"]),
            "para": {"y": seen["y"][0], "means": torch.cat([p["means"] for p in parts], dim=1),
                     "scales": torch.cat([p["scales"] for p in parts], dim=1)},
            "slices": {"y_hat": [h[0] for h in seen["y_hat"]]},
        }

    def compress(self, x) -> dict:
        """The model's own ``compress``, plus the decisions it coded: per slice the ``y`` it coded and
        the ``means``/``scales`` it coded them with, and the hyper-latent ``z``."""
        import torch

        if not self.observable:
            raise LicError(f"cannot observe {type(self.model).__name__}: {self.missing}")
        with torch.no_grad(), self._record("compress") as seen:
            enc = self.model.compress(x)
        if len(seen["y"]) != 1:
            raise LicError(f"{type(self.model).__name__}.compress did not run each observed module once")
        parts = [self.split(k, p) for k, p in enumerate(self._collected(seen))]
        return {"strings": enc["strings"], "shape": enc["shape"], "y": seen["y"][0], "z": seen["z"][0],
                "means": [p["means"] for p in parts], "scales": [p["scales"] for p in parts]}


def _is_checkerboard(leaf) -> bool:
    """A two-pass checkerboard leaf: a head per pass and a Gaussian-conditional codec at ``leaf.y``."""
    return (all(hasattr(leaf, a) for a in ("entropy_parameters_anchor", "entropy_parameters_nonanchor", "anchor_parity"))
            and hasattr(getattr(leaf, "y", None), "gaussian_conditional"))


def _gaussian_codec(leaf):
    """The module holding a leaf's ``gaussian_conditional`` (and its ``chunks``)."""
    return leaf.y if _is_checkerboard(leaf) else leaf


def _structure_problem(model) -> str | None:
    """Why ``model`` cannot be observed as :class:`MasterView` expects (None: it can)."""
    codec = getattr(model, "latent_codec", None)
    if codec is None or not hasattr(codec, "h_a"):
        return "no latent_codec.h_a"
    y = getattr(codec, "y", None)
    leaves = getattr(y, "latent_codec", None)
    if y is None or not hasattr(y, "groups") or leaves is None:
        return "no channel-groups codec at latent_codec.y"
    for k in range(len(y.groups)):
        leaf = leaves[f"y{k}"] if f"y{k}" in leaves else None
        plain = hasattr(leaf, "entropy_parameters") and hasattr(leaf, "gaussian_conditional")
        if leaf is None or not (plain or _is_checkerboard(leaf)):
            return f"latent_codec.y.latent_codec.y{k} is neither a Gaussian-conditional nor a two-pass checkerboard leaf"
    if not hasattr(getattr(codec, "z", None), "entropy_bottleneck"):
        return "no entropy bottleneck at latent_codec.z"
    return None


# --- where CompressAI master's own ports are known to differ from the authors' code ----------------


@dataclass(frozen=True)
class KnownDifference:
    """A measured difference of master's port of a family from the authors' code.

    ``row`` is the first T1 row the difference makes fail, ``step`` the first tensor in data-flow
    order that differs (as :func:`lic_checkpoints.verify.api` names it), ``cause`` what master does
    differently.  The report quotes ``cause`` only when the step it finds is ``step``; it never skips
    or relaxes a check because of an entry here.
    """

    row: str
    step: str
    cause: str


_LRP_INPUT = KnownDifference(
    "means", "y_hat of slice 0", "master feeds the pre-attention mean support to the LRP (upstream: the post-attention one)")

#: by family; a family not listed is expected to match the authors' code.  Causes established by the
#: project's ablations of master's classes against the authors' code (docs/compressai-master.md).
KNOWN_DIFFERENCES: dict[str, KnownDifference] = {
    "saaf": KnownDifference(
        "y", "y", "master resizes only a copy of the auxiliary stream at each merge (upstream keeps the resized "
        "stream) and scales the global-token query (upstream does not)"),
    "tcm": _LRP_INPUT,
    "tcm_auxt": _LRP_INPUT,
}


def known_difference(family: str) -> KnownDifference | None:
    """How the installed compressai's class of ``family`` is known to differ from upstream (None: it matches)."""
    return KNOWN_DIFFERENCES.get(family)
