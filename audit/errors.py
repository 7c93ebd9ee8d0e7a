"""Domain errors. The CLI maps them to exit codes in one place (cli.py)."""

from __future__ import annotations


class AuditError(Exception):
    """Base class: a problem the user can fix; printed as one line, never as a traceback."""

    exit_code = 1


class InputError(AuditError):
    """Bad input data: an unreadable image, a malformed metadata line, an empty caption."""


class UsageError(AuditError):
    """Bad command-line usage or an invalid option value."""

    exit_code = 2


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
