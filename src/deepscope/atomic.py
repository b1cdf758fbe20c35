"""Files replaced atomically: a process killed, or a disk filling up, while writing leaves the previous file intact.

The one writer for every file deepscope must not leave half written: checkpoints, classifiers, configs, metrics,
progress files, predictions and serve's labels.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from deepscope.errors import DeepscopeError


class WriteError(DeepscopeError):
    """A file could not be written; the previous version of it, if any, is intact."""


def temporary(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place: beside it (the rename must not cross file systems),
    hidden (readers of the folder skip it), named by the writing process (two writers never share one)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def leftovers(folder: Path, name: str = "*") -> list[Path]:
    """The temporary files (:func:`temporary`) of files named ``name`` in ``folder`` that writes killed before their
    rename left behind: nothing reads them."""
    return list(folder.glob(f".{name}.tmp-*"))


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any], what: str = "file") -> None:
    """Call ``write(handle)`` on a temporary file beside ``path``, then rename it over ``path``: a process killed, or a
    disk filling up, while writing leaves the previous file intact. Fails with one line naming ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if not isinstance(exc, OSError):
            raise
        kept = f"the previous {what} is intact" if path.exists() else f"no earlier {what} existed"
        raise WriteError(f"{path}: could not write {what} ({exc.strerror or exc}); {kept}") from None


def write_text(path: Path, text: str, what: str = "file") -> None:
    """:func:`atomic_write` of a text file (UTF-8)."""
    data = text.encode()
    atomic_write(path, lambda handle: handle.write(data), what)


def write_tiff(path: Path, array: Any, what: str = "image", **options: Any) -> None:
    """:func:`atomic_write` of a TIFF file (``options`` go to ``tifffile.imwrite``)."""
    import tifffile  # only the commands that write images pay its import

    atomic_write(path, lambda handle: tifffile.imwrite(handle, array, **options), what)
