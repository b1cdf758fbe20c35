"""The thread that writes files behind the page's edits: the label store's label images and the instance editor's
masks. An edit marks its item dirty and returns; the thread writes the newest state of each dirty item (a burst of
edits shares one write) outside the lock, so edits go on while a file is written, and ``flush`` waits until every
file holds what was marked.

A write that fails (the disk is full, the folder became read-only) leaves the previous file intact (each write is
atomic) and the item's live state in memory; the failure is logged in one line, kept for the page to show
(``write_error``), and the write is tried again by the item's next change and by every ``flush``, so the file
catches up as soon as writing works again."""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from typing import Any

from deepscope.atomic import WriteError
from deepscope.errors import DeepscopeError

log = logging.getLogger(__name__)


class BackgroundWriter(ABC):
    """Dirty items, written one at a time by a thread of their own. ``_changed`` guards the subclass's state too."""

    def __init__(self, thread_name: str, files: str) -> None:
        self._files = files  # what the files are, for the flush timeout's message
        self._changed = threading.Condition(threading.RLock())
        self._dirty: set[str] = set()  # items whose file is behind their live state
        self._writing = False
        self._closing = False
        self._failed: dict[str, str] = {}  # item -> why its last write failed, in one line
        self._writer = threading.Thread(target=self._write_loop, name=thread_name, daemon=True)
        self._writer.start()

    @abstractmethod
    def _snapshot(self, key: str) -> Any:
        """What to write for item ``key``: a copy of its live state (called holding the lock)."""

    @abstractmethod
    def _write(self, snapshot: Any) -> None:
        """Write the file of a snapshot atomically (called without the lock)."""

    def _written(self, snapshot: Any, error: Exception | None) -> None:
        """How a write ended, for the subclass's own records (called holding the lock)."""

    def _mark(self, key: str) -> None:
        """Item ``key`` changed: its file is to be written (call holding the lock)."""
        self._dirty.add(key)
        self._changed.notify_all()

    def write_error(self, key: str) -> str | None:
        """Why the file of item ``key`` could not be written the last time it was tried; None when it was."""
        with self._changed:
            return self._failed.get(key)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every file holds what was marked, trying the failed writes again; WriteError (one line, the
        previous file is intact) while one still fails, DeepscopeError after ``timeout`` seconds."""
        with self._changed:
            for key in self._failed:
                self._mark(key)
            if not self._changed.wait_for(lambda: not self._dirty and not self._writing, timeout):
                raise DeepscopeError(f"{self._files} still being written after {timeout} s")
            failures = list(self._failed.values())
        if failures:
            raise WriteError(failures[0] + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""))

    def close(self) -> None:
        """Write every file and stop the thread."""
        try:
            self.flush()
        finally:
            with self._changed:
                self._closing = True
                self._changed.notify_all()
            self._writer.join()

    def _write_loop(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._dirty or self._closing)
                if not self._dirty:
                    return
                key = self._dirty.pop()
                snapshot = self._snapshot(key)
                self._writing = True
            error = None
            try:
                self._write(snapshot)
            except Exception as exc:
                error = exc
            with self._changed:
                self._writing = False
                self._record(key, error)
                self._written(snapshot, error)
                self._changed.notify_all()

    def _record(self, key: str, error: Exception | None) -> None:
        """Keep (and log, when it is new) the failure of item ``key``'s write, or forget it (call holding the lock)."""
        if error is None:
            if self._failed.pop(key, None) is not None:
                log.warning("%s: %s written again", self._files, key)
            return
        detail = str(error) if isinstance(error, DeepscopeError) else f"{self._files}: {type(error).__name__}: {error}"
        message = next((line for line in detail.splitlines() if line.strip()), f"{self._files}: {type(error).__name__}")
        if self._failed.get(key) != message:
            log.warning("%s", message)
        self._failed[key] = message
