"""One server per folder: a second ``deepscope serve`` on a folder already served is refused, naming the first.

Two servers on one folder would both write its label files, masks and journals, each from its own memory, and the
last write would silently undo the other's strokes. The first server holds an exclusive ``flock`` on
``FOLDER/.deepscope/server.lock`` while it runs; the kernel releases it when the process ends in any way (``kill
-9`` included), so a killed server never blocks the next one. Beside it, ``server.json`` says where the holder
listens (written atomically, removed on a clean exit; one left by a killed server is simply overwritten), which the
refusal repeats so the user can go to the running server. The token of a server that has one is not written there:
whoever can read the folder must not get access to the server with it.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from deepscope.atomic import atomic_write
from deepscope.errors import DeepscopeError
from deepscope.serve.folder import STATE_DIR

LOCK_FILE = "server.lock"  # in STATE_DIR; never removed, so that every server locks the same file
INFO_FILE = "server.json"  # in STATE_DIR: {"url": ..., "pid": ...} of the server holding the lock


class FolderServedError(DeepscopeError):
    """The folder is served by another running server."""


def holder(root: Path) -> str:
    """Who holds the folder, from its ``server.json``: "http://...:port/ (pid N)", or a vaguer phrase while the
    holder has not written it yet (it is starting) or when it is unreadable."""
    try:
        info = json.loads((root / STATE_DIR / INFO_FILE).read_text())
        return f"{info['url']} (pid {int(info['pid'])})"
    except (OSError, ValueError, TypeError, KeyError):
        return "another deepscope serve that is starting"


@contextmanager
def claim_folder(root: Path) -> Iterator[Callable[[str], None]]:
    """Hold ``root`` for this process while in the block, which receives ``announce(url)`` to record where this
    server listens; FolderServedError naming the holder when another process holds it."""
    state = root / STATE_DIR
    try:
        state.mkdir(exist_ok=True)
        handle = os.open(state / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by the jobs' processes
    except OSError as exc:
        raise DeepscopeError(
            f"{state}: cannot create the server's state folder ({exc.strerror or exc}); serve a folder you can write to"
        ) from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderServedError(
                f"{root} is already served by {holder(root)}; open that address, or stop that server first"
            ) from None
        info = state / INFO_FILE

        def announce(url: str) -> None:
            text = json.dumps({"url": url, "pid": os.getpid()}).encode()
            atomic_write(info, lambda file: file.write(text), "server address")

        try:
            yield announce
        finally:
            info.unlink(missing_ok=True)  # while still locked: a server starting now writes its own after this
    finally:
        os.close(handle)  # releases the lock
