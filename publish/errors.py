"""The one-line errors of ``lic-push`` and :func:`download_converted`.

Each is a :class:`~lic_checkpoints.convert.errors.LicError`, so the command prints it on one line
and exits with code 2.  Messages never carry a token.
"""

from __future__ import annotations

from lic_checkpoints.convert.errors import LicError


class PublishError(LicError):
    """The converted folder cannot be published as it is (files missing or inconsistent)."""


class ParityRefusedError(PublishError):
    """The parity report is missing or failed, and ``--allow-failing-parity`` was not given."""


class HubError(LicError):
    """The Hub refused or did not answer a request; the message names the step and what to do."""

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status


class DownloadError(HubError):
    """A converted repository could not be fetched from the Hub."""
