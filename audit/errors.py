"""Domain errors, and the one table that maps each to an exit code (the CLI) and an HTTP status (the service).

Both front doors read ``ERRORS`` through ``error_codes``; nothing else decides an exit code or a status.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from pathlib import Path


class AuditError(Exception):
    """Base class: a problem the user can fix; printed as one line, never as a traceback."""

    exit_code = 1
    http_status = 400


class InputError(AuditError):
    """Bad input data: an unreadable image, a malformed metadata line, an empty caption."""


class UsageError(AuditError):
    """Bad command-line usage or an invalid option value."""


class UnknownNameError(UsageError):
    """A registry lookup failed; the message lists the valid names."""


class ArtifactError(AuditError):
    """An artifact (export folder, feature store, heads) is missing, corrupt, or made for another target/schema."""


class ModelNotFoundError(AuditError):
    """Weights are not available locally (no network here); the message says how to fetch them."""


class UnsafeWeightsError(AuditError):
    """Only pickle weights were found and the user did not pass --allow-pickle."""


class ClusterError(AuditError):
    """A Ray cluster that cannot be reached or lacks what the run needs, or a worker that failed there: the message
    names the node (and the batch's rows) and the worker's own one-line error; the exit code is that error's."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


# Exit codes that are not domain errors.
EXIT_MEMBER_FOUND = 3  # --fail-on-member and a `member` verdict
EXIT_UNEXPECTED = 70  # a bug, not the user's input (sysexits EX_SOFTWARE)
EXIT_INTERRUPTED = 130

# The one table: (exit code, HTTP status) per domain error; the most specific class listed wins.
ERRORS: dict[type[AuditError], tuple[int, int]] = {
    InputError: (1, 422),
    UsageError: (2, 400),
    UnknownNameError: (2, 404),
    ArtifactError: (1, 422),
    ModelNotFoundError: (1, 404),
    UnsafeWeightsError: (1, 403),
    ClusterError: (1, 503),
    AuditError: (1, 400),
}


def error_codes(exc: BaseException) -> tuple[int, int]:
    """(exit code, HTTP status) for ``exc``: a domain error by the table (a ClusterError keeps its worker's exit
    code); anything else is unexpected: (70, 500)."""
    for cls in type(exc).__mro__:
        if cls in ERRORS:
            code, status = ERRORS[cls]
            if isinstance(exc, ClusterError):
                code = exc.exit_code
            return code, status
    return EXIT_UNEXPECTED, 500


def write_traceback(exc: BaseException) -> Path | None:
    """Write ``exc``'s full traceback to a new file under $AUDIT_HOME/logs (else the temp folder) and return its
    path (None where neither is writable): an unexpected error is reported in one line that points here."""
    from .config import audit_home  # config imports this module

    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    name = f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    for folder in (audit_home() / "logs", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_text(text, encoding="utf-8")
            return path
        except OSError:
            continue
    return None


def unexpected_message(exc: BaseException, where: str) -> str:
    """One line for a bug: what failed, and where its traceback was written."""
    first = (str(exc).strip().splitlines() or [""])[0]
    what = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    path = write_traceback(exc)
    kept = f"full traceback in {path}" if path else "no folder was writable for its traceback"
    return f"internal error in {where}: {what} (a bug, not your input; {kept})"


for _cls, (_code, _status) in ERRORS.items():
    _cls.exit_code, _cls.http_status = _code, _status
