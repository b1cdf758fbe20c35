"""The thread that writes files behind the page's edits: the label store's label images and the instance editor's
masks. An edit marks its item dirty and returns; the thread writes the newest state of each dirty item (a burst of
edits shares one write) outside the lock, so edits go on while a file is written, and ``flush`` waits until every
file holds what was marked."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Any

from deepscope.errors import DeepscopeError


class BackgroundWriter(ABC):
    """Dirty items, written one at a time by a thread of their own. ``_changed`` guards the subclass's state too."""

    def __init__(self, thread_name: str, files: str) -> None:
        self._files = files  # what the files are, for the flush timeout's message
        self._changed = threading.Condition(threading.RLock())
        self._dirty: set[str] = set()  # items whose file is behind their live state
        self._writing = False
        self._closing = False
        self._error: Exception | None = None
        self._writer = threading.Thread(target=self._write_loop, name=thread_name, daemon=True)
        self._writer.start()

    @abstractmethod
    def _snapshot(self, key: str) -> Any:
        """What to write for item ``key``: a copy of its live state (called holding the lock)."""

    @abstractmethod
    def _write(self, snapshot: Any) -> None:
        """Write the file of a snapshot atomically (called without the lock)."""

    def _written(self, snapshot: Any, error: Exception | None) -> None:
        """Record how a write ended (called holding the lock); ``flush`` raises the last error."""
        if error is not None:
            self._error = error

    def _mark(self, key: str) -> None:
        """Item ``key`` changed: its file is to be written (call holding the lock)."""
        self._dirty.add(key)
        self._changed.notify_all()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every file holds what was marked; raises the last write error, or DeepscopeError after
        ``timeout`` seconds."""
        with self._changed:
            if not self._changed.wait_for(lambda: not self._dirty and not self._writing, timeout):
                raise DeepscopeError(f"{self._files} still being written after {timeout} s")
            error, self._error = self._error, None
        if error is not None:
            raise error

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
                snapshot = self._snapshot(self._dirty.pop())
                self._writing = True
            error = None
            try:
                self._write(snapshot)
            except Exception as exc:  # noqa: BLE001 (the writer must outlive any failure; flush() reports it)
                error = exc
            with self._changed:
                self._writing = False
                self._written(snapshot, error)
                self._changed.notify_all()
