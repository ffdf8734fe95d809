"""A background writer for checkpoint saves, with bounded memory and backpressure.

The training thread takes a slot (waiting, or skipping the save, per policy), makes the
host-memory snapshot, and hands a job over; one writer thread hashes, writes and commits the
jobs in order, so versions increase with the step. At most ``max_in_flight`` snapshots exist
at once. A failed save is raised on the training thread at its next ``raise_errors()`` (the
Checkpointer calls it on every step) or at ``flush()``/``close()``; it never becomes latest,
because only a committed manifest is ever read.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Literal

from ..core.errors import CheckpointError
from ..core.models import CheckpointInfo
from ..core.progress import current_reporter, reporting


class SaveFailedError(CheckpointError):
    """A background checkpoint save failed; the previous committed version is still latest."""


class AsyncSaver:
    def __init__(self, max_in_flight: int = 2, on_backpressure: Literal["wait", "skip"] = "wait"):
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.max_in_flight = max_in_flight
        self.on_backpressure = on_backpressure
        self._lock = threading.Condition()
        self._jobs: deque[tuple[str, Callable[[], CheckpointInfo]]] = deque()
        self._in_flight = 0
        self._errors: list[tuple[str, BaseException]] = []
        self._closed = False
        self.committed: list[CheckpointInfo] = []
        self.skipped = 0
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def acquire(self) -> bool:
        """Take a slot for one save: True when granted, False when skipped by policy."""
        with self._lock:
            if self._closed:
                raise SaveFailedError("the checkpoint writer is closed")
            if self._in_flight >= self.max_in_flight:
                if self.on_backpressure == "skip":
                    self.skipped += 1
                    return False
                self._lock.wait_for(lambda: self._in_flight < self.max_in_flight)
            self._in_flight += 1
            return True

    def release(self) -> None:
        """Give back a slot taken with ``acquire`` whose job was never submitted."""
        with self._lock:
            self._in_flight -= 1
            self._lock.notify_all()

    def submit(self, label: str, job: Callable[[], CheckpointInfo]) -> None:
        """Queue ``job`` (a slot must have been acquired for it). It reports its progress where the
        submitting thread does (the CLI's bar on a terminal; core/progress.py)."""
        reporter = current_reporter()

        def reported() -> CheckpointInfo:
            if reporter is None:
                return job()
            with reporting(reporter):
                return job()

        with self._lock:
            self._jobs.append((label, reported))
            self._lock.notify_all()

    def _run(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: bool(self._jobs) or self._closed)
                if not self._jobs:
                    return
                label, job = self._jobs.popleft()
            try:
                info = job()
            except BaseException as exc:  # surfaced on the training thread, never lost
                with self._lock:
                    self._errors.append((label, exc))
            else:
                with self._lock:
                    self.committed.append(info)
            finally:
                with self._lock:
                    self._in_flight -= 1
                    self._lock.notify_all()

    def raise_errors(self) -> None:
        with self._lock:
            if not self._errors:
                return
            label, exc = self._errors.pop(0)
            more = len(self._errors)
            self._errors.clear()
        suffix = f" (and {more} later saves failed too)" if more else ""
        raise SaveFailedError(
            f"background checkpoint save '{label}' failed{suffix}: {type(exc).__name__}: {exc}. "
            "The previous committed checkpoint is still the latest."
        ) from exc

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued save finished; raise the first failure. False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._in_flight:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._lock.wait(remaining)
        self.raise_errors()
        return True

    def close(self, timeout: float | None = None) -> None:
        try:
            self.flush(timeout)
        finally:
            with self._lock:
                self._closed = True
                self._lock.notify_all()
            self._thread.join(timeout=1.0)
