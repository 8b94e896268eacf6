"""Talking to the Hugging Face Hub: one atomic commit up, one snapshot down.

Everything goes through ``huggingface_hub``.  :func:`push` creates the repository (and branch) if
needed, uploads the large files, then sends every file in a single ``create_commit``: the Hub
applies a commit whole or not at all, so a failure leaves the branch as it was.  Failures become a
:class:`HubError` with one line that names the step; tokens never appear in messages.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx2
from huggingface_hub import CommitOperationAdd, HfApi, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_token, validate_repo_id

from lic_checkpoints import __version__
from lic_checkpoints.convert.api import CONFIG_FILE, MODEL_FILE

from .bundle import Bundle
from .errors import DownloadError, HubError

LIBRARY = "lic-checkpoints"
MIN_SECRET_LENGTH = 8  # shorter strings are not real tokens, and replacing them would garble words
#: What the client raises when the Hub says no or cannot be reached (LFS upload errors arrive wrapped).
KNOWN_FAILURES = (HfHubHTTPError, httpx2.TransportError, OfflineModeIsEnabled)


@dataclass(frozen=True)
class PushResult:
    """Where a successful push landed."""

    repo_url: str
    commit_url: str
    commit_oid: str
    revision: str


def _scrub(text: str, token: str | None) -> str:
    """``text`` with any token replaced, whatever its origin (server echo, URL, exception)."""
    for secret in {token, get_token()}:
        if secret and len(secret) >= MIN_SECRET_LENGTH:
            text = text.replace(secret, "***")
    return text


def _server_message(exc: HfHubHTTPError) -> str:
    detail = getattr(exc, "server_message", None) or ""
    first = detail.strip().splitlines()[0] if detail.strip() else ""
    return f": {first}" if first else ""


def _http_message(exc: HfHubHTTPError, step: str, target: str, after: str,
                  sent_after: str | None) -> tuple[str, int | None]:
    status = exc.response.status_code if exc.response is not None else None
    if isinstance(exc, RevisionNotFoundError):
        return f"{target}: revision not found (404) while {step}; {after}", status
    if status == 401:
        return (f"the Hub rejected the credentials (401) while {step}; set HF_TOKEN, run `hf auth login` "
                f"or pass a valid token; {after}"), status
    if status == 403 or isinstance(exc, GatedRepoError):
        return (f"the token may not access {target} (403 Forbidden) while {step}; use a token with the "
                f"needed access (write, to push); {after}"), status
    if status == 404 or isinstance(exc, RepositoryNotFoundError):
        return (f"{target}: not found ({status}) while {step}; check the name (or the token, for a private "
                f"repo); {after}"), status
    if status is not None and status >= 500:
        # a gateway error (502/504) can hide a request the server did finish: say so where it matters
        advice = sent_after or f"{after}; try again later"
        return f"the Hub failed with HTTP {status} while {step}; {advice}", status
    return f"the Hub answered HTTP {status} while {step}{_server_message(exc)}; {after}", status


def _known_cause(exc: BaseException) -> BaseException | None:
    """The Hub failure behind ``exc``: huggingface_hub wraps LFS upload errors in a RuntimeError."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, KNOWN_FAILURES):
            return exc
        exc, seen = exc.__cause__, seen + 1
    return None


def _describe(exc: BaseException, step: str, target: str, after: str, sent_after: str | None) -> tuple[str, int | None]:
    if isinstance(exc, HfHubHTTPError):
        return _http_message(exc, step, target, after, sent_after)
    if isinstance(exc, httpx2.TimeoutException):
        return f"the Hub did not answer in time while {step}; {sent_after or after}", None
    if isinstance(exc, OfflineModeIsEnabled):
        return f"HF_HUB_OFFLINE is set, so {step} is impossible; unset it to reach the Hub", None
    return (f"the connection to the Hub failed ({exc.__class__.__name__}) while {step}; "
            f"{sent_after or after}"), None


@contextlib.contextmanager
def _step(step: str, target: str, *, token: str | None, after: str, sent_after: str | None = None,
          error: type[HubError] = HubError) -> Iterator[None]:
    """Turn the client's exceptions raised during ``step`` into one-line :class:`HubError`s.

    ``after`` says what state the failure leaves; ``sent_after`` replaces it when the request may
    have reached the server (a timeout or dropped connection after sending).  Other exceptions are
    bugs and keep their traceback.
    """
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - filtered just below
        cause = _known_cause(exc)
        if cause is None or isinstance(exc, HubError):
            raise
        message, status = _describe(cause, step, target, after, sent_after)
        raise error(_scrub(message, token), status=status) from None


def check_repo_id(repo_id: str, *, namespace: bool = True, error: type[HubError] = HubError) -> None:
    """Refuse a malformed repository id (or, with ``namespace``, one without NAMESPACE/) before any request."""
    try:
        validate_repo_id(repo_id)
    except ValueError as exc:
        reason = str(exc).strip().splitlines()[0]
        raise error(f"{repo_id!r} is not a valid Hub repository id ({reason}); use NAMESPACE/NAME") from None
    if namespace and "/" not in repo_id:
        raise error(f"{repo_id!r} has no namespace; use NAMESPACE/NAME (your user or organisation name)")


def _api(token: str | None, endpoint: str | None) -> HfApi:
    return HfApi(endpoint=endpoint, token=token, library_name=LIBRARY, library_version=__version__)


def default_commit_message(bundle: Bundle) -> str:
    verdict = "parity passed" if bundle.parity_passed else "parity NOT proven"
    return f"Upload {bundle.family} {bundle.config['variant']} in the CompressAI layout ({verdict})"


def push(bundle: Bundle, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, token: str | None = None, endpoint: str | None = None) -> PushResult:
    """Publish ``bundle`` to the model repository ``repo_id`` as one commit on ``revision`` (default: main)."""
    api = _api(token, endpoint)
    branch = revision or "main"
    nothing = "no commit was made"
    with _step(f"creating the repository {repo_id}", repo_id, token=token, after=nothing):
        # private=None (not False) lets an organisation's default visibility apply
        repo_url = api.create_repo(repo_id, repo_type="model", private=True if private else None, exist_ok=True)
    if revision:
        with _step(f"creating the branch {revision!r}", repo_id, token=token, after=nothing):
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=f.name, path_or_fileobj=f.payload()) for f in bundle.files]
    with _step("uploading the files", repo_id, token=token, after=nothing):
        api.preupload_lfs_files(repo_id, additions=operations, repo_type="model", revision=revision,
                                free_memory=False)
    unknown = (f"the commit may or may not have landed (it is all-or-nothing); look at {repo_url} "
               f"before pushing again")
    with _step(f"committing to {branch!r}", repo_id, token=token,
               after="the commit was refused and the branch is unchanged", sent_after=unknown):
        info = api.create_commit(repo_id, operations=operations, repo_type="model", revision=revision,
                                 commit_message=commit_message or default_commit_message(bundle))
    return PushResult(str(repo_url), info.commit_url, info.oid, branch)


def download_converted(repo_id: str, revision: str | None = None, token: str | None = None,
                       endpoint: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """Fetch a published converted checkpoint into the local cache and return its folder."""
    check_repo_id(repo_id, namespace=False, error=DownloadError)
    target = repo_id if revision is None else f"{repo_id}@{revision}"
    with _step(f"downloading {target}", target, token=token, after="nothing was downloaded", error=DownloadError):
        try:
            folder = snapshot_download(repo_id, repo_type="model", revision=revision, token=token,
                                       endpoint=endpoint, cache_dir=cache_dir, library_name=LIBRARY,
                                       library_version=__version__)
        except LocalEntryNotFoundError:
            raise DownloadError(f"cannot reach the Hub for {target} and it is not in the local cache; "
                                "check the connection and try again") from None
    folder = Path(folder)
    missing = [name for name in (MODEL_FILE, CONFIG_FILE) if not (folder / name).is_file()]
    if missing:
        raise DownloadError(f"{target}: the repository has no {', '.join(missing)}; "
                            "it was not published by lic-push")
    return folder
