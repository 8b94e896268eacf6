"""The seal of a converted file: the sha256 of its tensor data, recorded in ``config.json``.

A safetensors file is an 8-byte header length, a JSON header, then the tensor data. ``lic-convert``
hashes the data while it writes it and records the digest in ``config.json`` under
``output.tensor_data_sha256``; ``lic.load``, ``lic-verify`` and ``lic-push`` recompute it before they
use the file, so a file changed after conversion (a flipped bit on disk, a partial copy, a hand edit)
is refused in one line instead of loading silently. The header is not part of the digest: its
metadata is rewritten once the source's own scan has finished, and its tensor table is checked by the
strict load itself (names, shapes and dtypes of every tensor).

The writer computes the digest while it writes: a background thread reads back what is already in
the file and hashes it (and checks it for NaN and Inf) while the next tensors are copied; see
:mod:`.readback`.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Any, Mapping

from .errors import CheckpointError

__all__ = ["SealMismatchError", "check_seal", "tensor_data_sha256", "recorded_seal"]

#: where ``config.json`` records the digest
SEAL_SECTION, SEAL_KEY = "output", "tensor_data_sha256"
#: read buffer of the check: 1 MiB keeps memory small and hashlib at full speed
_CHUNK = 1 << 20


class SealMismatchError(CheckpointError):
    """A converted file's tensor data does not hash to what its ``config.json`` records."""


def tensor_data_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a safetensors file's tensor data (everything after its header)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) != 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than its header length)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > os.fstat(fh.fileno()).st_size - 8:
                raise CheckpointError(f"{path}: not a safetensors file (its header length exceeds the file)")
            fh.seek(8 + header_len)
            digest = hashlib.sha256()
            buffer = bytearray(_CHUNK)
            while n := fh.readinto(buffer):
                digest.update(memoryview(buffer)[:n])
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    return digest.hexdigest()


def recorded_seal(config: Mapping[str, Any]) -> str | None:
    """The digest a ``config.json`` records for its model file (None for files written before seals)."""
    section = config.get(SEAL_SECTION)
    return section.get(SEAL_KEY) if isinstance(section, Mapping) else None


def check_seal(model_path: str | os.PathLike, config: Mapping[str, Any], *, skip_hint: str | None = None) -> str | None:
    """Recompute ``model_path``'s digest and compare it with ``config``'s record.

    Returns the digest (None when the config records none); raises :class:`SealMismatchError`, one
    line naming the file, when they differ.  ``skip_hint`` says how the caller's user skips the check
    (None: the caller offers no way to).
    """
    expected = recorded_seal(config)
    if expected is None:
        return None
    actual = tensor_data_sha256(model_path)
    if actual != expected:
        raise SealMismatchError(
            f"{model_path}: its tensor data does not match the sha256 recorded in config.json "
            f"({actual[:12]}… instead of {expected[:12]}…): the file changed after conversion; "
            f"convert the source again" + (f", or {skip_hint} to use it anyway" if skip_hint else "")
        )
    return actual
