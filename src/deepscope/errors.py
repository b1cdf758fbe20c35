"""User-facing errors.

Every problem a user can cause (bad data, bad flags, wrong checkpoint) raises
:class:`DeepscopeError` with a one-line message naming the file and the problem.
The CLI prints that line and exits with status 2 instead of showing a traceback.
"""

from __future__ import annotations

import reprlib

SHORT_REPR = reprlib.Repr()  # see shown(): two levels of nesting, four items each, 80 characters of a string
SHORT_REPR.maxlevel = 2
SHORT_REPR.maxlist = SHORT_REPR.maxtuple = SHORT_REPR.maxdict = SHORT_REPR.maxset = 4
SHORT_REPR.maxstring = SHORT_REPR.maxother = SHORT_REPR.maxlong = 80


class DeepscopeError(Exception):
    """An error caused by the input, explained in one line."""


class DataError(DeepscopeError):
    """Unreadable, missing or inconsistent data."""


class CheckpointError(DeepscopeError):
    """A checkpoint that is missing, corrupt, or belongs to another model or task."""


class TrainingError(DeepscopeError):
    """Training could not go on (for example a non-finite loss)."""


def shown(value: object) -> str:
    """``repr(value)`` cut to a few items and characters, for a message that quotes what it refuses: a value read from
    a file or sent in a request may be a megabyte of text, or a list nested a billion items deep through YAML aliases."""
    return SHORT_REPR.repr(value)


def plain(value: object) -> str:
    """``value`` as it is when it is short printable text (a file or setting name), else :func:`shown`."""
    return value if isinstance(value, str) and value.isprintable() and len(value) <= 80 else shown(value)


def one_line(message: str) -> str:
    """``message`` on one line: it may quote what a file or a request held, line breaks included."""
    return " ".join(message.split())


def exception_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: message`` of a library's exception on one line of at most ``limit`` characters of message: parsers
    quote the input they choke on, and that may be a megabyte or hold newlines."""
    return f"{type(exc).__name__}: {one_line(str(exc))[:limit]}"
