"""The seal of a converted file: the sha256 of its tensor data, recorded in ``config.json``.

A safetensors file is an 8-byte header length, a JSON header, then the tensor data. ``lic-convert``
hashes the data while it writes it and records the digest in ``config.json`` under
``output.tensor_data_sha256``; ``lic.load``, ``lic-verify`` and ``lic-push`` recompute it before they
use the file, so a file changed after conversion (a flipped bit on disk, a partial copy, a hand edit)
is refused in one line instead of loading silently. The header is not part of the digest: its
metadata is rewritten once the source's own scan has finished, and its tensor table is checked by the
strict load itself (names, shapes and dtypes of every tensor).

Hashing follows the writer: a background thread reads back what has already been written (it is
still in the page cache) and hashes it while the writer copies the next tensors and while the file is
flushed to disk, so the digest costs little wall time on a machine with a second core.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from pathlib import Path
from typing import Any, Mapping

from .errors import CheckpointError

__all__ = ["SealMismatchError", "DataHasher", "check_seal", "tensor_data_sha256", "recorded_seal"]

#: where ``config.json`` records the digest
SEAL_SECTION, SEAL_KEY = "output", "tensor_data_sha256"
#: read-back buffer of the hashing thread: 1 MiB keeps its memory small and hashlib at full speed
_CHUNK = 1 << 20


class SealMismatchError(CheckpointError):
    """A converted file's tensor data does not hash to what its ``config.json`` records."""


class DataHasher:
    """sha256 of bytes ``[start, start + total)`` of a file being written, computed as they appear.

    The writer calls :meth:`written` with how many data bytes are in the file so far, and
    :meth:`finish` with the total once it is done; :meth:`result` waits for the digest.
    """

    def __init__(self, path: str | os.PathLike, start: int):
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._start = start
        self._available = 0
        self._total: int | None = None
        self._error: BaseException | None = None
        self._digest: str | None = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="seal", daemon=True)
        self._thread.start()

    def written(self, nbytes: int) -> None:
        with self._changed:
            self._available = nbytes
            self._changed.notify()

    def finish(self, total: int) -> None:
        with self._changed:
            self._available = self._total = total
            self._changed.notify()

    def cancel(self) -> None:
        """Stop hashing (the file is being abandoned)."""
        self.finish(-1)
        self._thread.join()

    def result(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._digest is not None
        return self._digest

    def _run(self) -> None:
        digest = hashlib.sha256()
        done = 0
        buffer = bytearray(_CHUNK)
        try:
            while True:
                with self._changed:
                    while self._available <= done and self._total is None:
                        self._changed.wait()
                    available, total = self._available, self._total
                if total == -1:
                    return
                while done < available:
                    want = min(_CHUNK, available - done)
                    got = os.preadv(self._fd, [memoryview(buffer)[:want]], self._start + done)
                    if got == 0:
                        raise OSError(f"the output ended after {done} of {available} data bytes")
                    digest.update(memoryview(buffer)[:got])
                    done += got
                if total is not None and done >= total:
                    self._digest = digest.hexdigest()
                    return
        except BaseException as exc:  # handed to the thread that asks for the result
            self._error = exc
        finally:
            os.close(self._fd)


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
