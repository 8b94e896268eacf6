"""The errors users see: each says what is wrong and what to do, in one line.

The CLI turns these into one line on stderr and exit code 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class LicError(Exception):
    """Base class of every error a user can act on."""

    exit_code = 2


class CheckpointError(LicError):
    """The input file cannot be read as a checkpoint (missing, broken, unsafe, not a state dict)."""


class MappingError(LicError):
    """A mapping YAML file is malformed; the message names the file, line and rule."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None, rule: str | None = None):
        where = ""
        if file:
            where = f"{file}:{line}" if line else file
            if rule:
                where += f" (rule {rule!r})"
            where += ": "
        super().__init__(where + message)
        self.file, self.line, self.rule = file, line, rule


class DetectionError(LicError):
    """No mapping, or more than one, recognises the checkpoint."""


class ConversionError(LicError):
    """The conversion plan is incomplete: keys unexpected, missing or of the wrong shape."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class OutputError(LicError):
    """The output cannot be written where the user asked."""
