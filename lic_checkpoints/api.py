"""The public functions, flat: ``import lic_checkpoints as lic`` and call ``lic.convert`` and friends.

Each one is a thin door onto the module that does the work (``convert/``, ``verify/``, ``publish/``);
the command-line tools go through the same modules.  Heavy packages (torch, compressai,
huggingface_hub) are imported only when a function that needs them is called.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lic_checkpoints.convert.errors import LicError

if TYPE_CHECKING:
    from torch import nn

    from lic_checkpoints.convert.api import ConversionResult, RestoreResult
    from lic_checkpoints.publish.hub import PushResult
    from lic_checkpoints.verify.release import ReleaseReport
    from lic_checkpoints.verify.report import ParityReport

__all__ = ["LicError", "convert", "load", "push", "restore", "verify", "verify_release"]

HF_SCHEME = "hf://"


def convert(src: str | Path, out_dir: str | Path, *, family: str | None = None, output_format: str = "safetensors",
            trust_pickle: bool = False) -> ConversionResult:
    """Convert an upstream checkpoint into ``out_dir`` (``model.safetensors`` + ``config.json``).

    The family and variant are detected from the keys and shapes (``family`` skips detection).
    Nothing is written unless every source key is used once and every key of the CompressAI layout
    is produced with the expected shape; each file appears complete or not at all.

    >>> import lic_checkpoints as lic
    >>> result = lic.convert("checkpoint_best.pth.tar", "converted/")  # doctest: +SKIP
    >>> [f.name for f in result.files]  # doctest: +SKIP
    ['model.safetensors', 'config.json']

    ``trust_pickle=True`` fully unpickles the file, which can run code stored in it: only for files
    from a source you trust that torch's safe loader refuses.
    """
    from lic_checkpoints.convert.api import convert_checkpoint

    return convert_checkpoint(src, out_dir, family=family, output_format=output_format, trust_pickle=trust_pickle)


def restore(converted: str | Path, out_path: str | Path, *, canonical: bool = False, family: str | None = None,
            variant: str | None = None, without_dropped: bool = False) -> RestoreResult:
    """Write a converted folder (or ``model.safetensors``) back in the authors' layout.

    By default the keys are spelled as the original file spelled them (``module.`` prefixes, legacy
    entropy-bottleneck names, the container entry), so upstream -> CompressAI -> upstream gives back
    the same keys and bit-identical tensors; ``canonical=True`` writes upstream's plain names.  When
    the conversion dropped keys no rule can give back (a training-only branch), this refuses unless
    ``without_dropped=True`` asks for the checkpoint without them (what the authors' eval code loads).

    >>> import lic_checkpoints as lic
    >>> result = lic.restore("converted/", "upstream.pth.tar")  # doctest: +SKIP
    >>> len(result.state_dict)  # doctest: +SKIP
    1293
    """
    from lic_checkpoints.convert.api import restore_checkpoint

    return restore_checkpoint(converted, out_path, canonical=canonical, family=family, variant=variant,
                              without_dropped=without_dropped)


def verify(src: str | Path, converted: str | Path | None = None, **options: Any) -> ParityReport:
    """Run the parity tiers T0-T3 on an upstream checkpoint and its conversion.

    ``converted`` is a ``lic-convert`` output folder or file (``None``: convert in memory).  Options
    are those of :func:`lic_checkpoints.verify.api.verify_checkpoint` (``images``, ``tiers``,
    ``tolerances``, ``target="installed"``, ``upstream_repo``, ...).

    >>> import lic_checkpoints as lic
    >>> report = lic.verify("checkpoint_best.pth.tar", "converted/")  # doctest: +SKIP
    >>> report.passed  # doctest: +SKIP
    True
    >>> print(report.to_markdown())  # doctest: +SKIP
    """
    from lic_checkpoints.verify.api import verify_checkpoint

    return verify_checkpoint(src, converted, **options)


def verify_release(sources: list[str | Path], out_dir: str | Path, **options: Any) -> ReleaseReport:
    """Convert and verify every checkpoint of a release in one process (``lic-verify A B ... --out-dir OUT``).

    Each checkpoint is converted into ``out_dir/<name>/`` (a valid conversion of the same source
    already there is reused) and gets its parity report there; the set's report goes to
    ``out_dir/release_report.json`` / ``.md`` and its rate-distortion plot to ``out_dir/rd.png``.
    Checkpoints of one configuration share their models (weights reassigned, not rebuilt); one that
    fails or cannot be read is reported in its row and the others still run.  Options are those of
    :func:`lic_checkpoints.verify.release.verify_release` (``images``, ``tiers``, ``device``, ...).

    >>> import lic_checkpoints as lic
    >>> release = lic.verify_release(["q1.pth.tar", "q2.pth.tar"], "release/", images="kodak/")  # doctest: +SKIP
    >>> release.passed, [row.verdict for row in release.rows]  # doctest: +SKIP
    (True, ['passed', 'passed'])
    """
    from lic_checkpoints.verify.release import verify_release as run

    return run(sources, out_dir, **options)


def load(path_or_hub_id: str | Path, *, target: str = "ours", revision: str | None = None,
         update: bool = True, check_integrity: bool = True) -> nn.Module:
    """The CompressAI-layout model of a conversion, ready to run.

    ``path_or_hub_id`` is a ``lic-convert`` output folder, its ``model.safetensors`` (with
    ``config.json`` beside it), or a Hugging Face Hub repository (``"owner/name"`` or
    ``"hf://owner/name@revision"``) published with ``lic-push``.  The weights are loaded strictly,
    the model is in eval mode and (unless ``update=False``) its entropy tables are built, so
    ``compress``/``decompress`` work at once.  ``target="installed"`` uses the installed compressai's own
    class (CompressAI master) instead of ours.  ``model.safetensors`` must hash to the sha256 its
    ``config.json`` records (a file changed after conversion raises :class:`LicError`);
    ``check_integrity=False`` skips that check.

    >>> import lic_checkpoints as lic
    >>> net = lic.load("converted/")  # doctest: +SKIP
    >>> net = lic.load("owner/name", revision="main")  # doctest: +SKIP
    >>> x_hat = net(x)["x_hat"]  # doctest: +SKIP
    """
    from lic_checkpoints.verify.loading import load_converted

    return load_converted(_local_folder(path_or_hub_id, revision), source=target, update=update,
                          check_integrity=check_integrity)


def _local_folder(path_or_hub_id: str | Path, revision: str | None) -> Path:
    """A local folder holding ``model.safetensors`` and ``config.json``, downloading from the Hub if needed."""
    text = str(path_or_hub_id)
    path = Path(text)
    if not text.startswith(HF_SCHEME) and path.exists():
        return path.parent if path.is_file() else path
    repo_id = text[len(HF_SCHEME):] if text.startswith(HF_SCHEME) else text
    repo_id, _, pinned = repo_id.partition("@")
    if repo_id.count("/") != 1 or text.startswith((".", "/", "~")):
        raise LicError(f"{text}: no such file or folder, and not a Hub repository id (owner/name)")
    from lic_checkpoints.publish.hub import download_converted

    return download_converted(repo_id, revision=revision or pinned or None)


def push(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, allow_failing_parity: bool = False,
         token: str | None = None) -> PushResult:
    """Publish a converted, verified folder to the Hub as one commit.

    The commit holds ``model.safetensors``, ``config.json``, ``parity_report.json`` and a model card
    (``README.md``) carrying the parity report.  A folder whose report is missing or failing is refused
    unless ``allow_failing_parity=True`` (the card then opens with a warning).  The token comes from
    ``token``, ``HF_TOKEN`` or the ``huggingface_hub`` login.

    >>> import lic_checkpoints as lic
    >>> lic.push("converted/", "your-name/model-name")  # doctest: +SKIP
    PushResult(repo_url='https://huggingface.co/your-name/model-name', ...)
    """
    from lic_checkpoints.publish import bundle as bundle_mod
    from lic_checkpoints.publish import hub

    hub.check_repo_id(repo_id)
    bundle = bundle_mod.collect(folder, repo_id, allow_failing_parity=allow_failing_parity)
    return hub.push(bundle, repo_id, private=private, revision=revision, commit_message=commit_message,
                    token=token)
