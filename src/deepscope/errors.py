"""User-facing errors.

Every problem a user can cause (bad data, bad flags, wrong checkpoint) raises
:class:`DeepscopeError` with a one-line message naming the file and the problem.
The CLI prints that line and exits with status 2 instead of showing a traceback.
"""

from __future__ import annotations


class DeepscopeError(Exception):
    """An error caused by the input, explained in one line."""


class DataError(DeepscopeError):
    """Unreadable, missing or inconsistent data."""


class CheckpointError(DeepscopeError):
    """A checkpoint that is missing, corrupt, or belongs to another model or task."""


class TrainingError(DeepscopeError):
    """Training could not go on (for example a non-finite loss)."""
