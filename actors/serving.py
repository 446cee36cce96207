"""One engine's generation calls against its weight switches (`Serving`), shared by both backends."""

from __future__ import annotations

import threading
from contextlib import contextmanager


class Serving:
    """Generation calls vs weight switches in one engine, when updates run in a thread of their own.

    A call holds `lock` from start to end, and a switch takes it, so a call sees one version.
    While an update is under way, calls that have not started yet wait for it: a call made after
    an update sees it (as when calls and updates ran one at a time), while the call already
    running overlaps the update's transfer.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self._open = threading.Event()
        self._open.set()
        self._held = False

    @contextmanager
    def call(self):
        self._open.wait()
        with self.lock:
            yield

    @contextmanager
    def updating(self):
        self._open.clear()
        try:
            yield
        finally:
            self._open.set()

    def hold(self) -> None:
        """Stop new calls and wait for the running one to end, keeping the lock for an update to come: the first
        phase of a broadcast push (`WeightSync`), taken by every engine before any learner rank sends."""
        if not self._held:
            self._open.clear()
            self.lock.acquire()
            self._held = True

    def release(self) -> None:
        """End a hold: after its update, or when the push it was taken for is given up."""
        if self._held:
            self._held = False
            self.lock.release()
            self._open.set()

    @contextmanager
    def switching(self):
        """An update that switches weights as it receives them: under the hold taken for it, or one taken now."""
        self.hold()
        try:
            yield
        finally:
            self.release()
