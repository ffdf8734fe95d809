"""Progress of long store operations (verify, the audit's scrub, reads of a checkpoint's chunks, a save's chunk
copies written), for whoever shows it.

The core knows no UI: a caller that wants progress (the CLI's rich bars, on a terminal only) sets a
reporter for the duration of the call with ``reporting(fn)``; the operation calls ``advance`` as it
goes. Without a reporter ``advance`` does nothing. A context variable, not a parameter, so the
operations' signatures and every layer between the CLI and the loop stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

# (operation, done, total): e.g. ("verify", 120, 4000) after the 120th of 4000 blobs, ("read", 3, 40) after
# the 3rd of 40 chunks of a load. A total of 0 means open-ended: ("step", 1200, 0) is the training's step
# count, which only a caller that knows the last step (a replay, to its target step) can show as a bar.
ProgressReporter = Callable[[str, int, int], None]

_reporter: ContextVar[ProgressReporter | None] = ContextVar("prefect_recovery_progress", default=None)


@contextmanager
def reporting(reporter: ProgressReporter) -> Iterator[None]:
    """Send the progress of store operations run inside the block to ``reporter``."""
    token = _reporter.set(reporter)
    try:
        yield
    finally:
        _reporter.reset(token)


def current_reporter() -> ProgressReporter | None:
    """The reporter set for this context, for work handed to another thread (a background checkpoint
    writer) to report to as well: ``with reporting(reporter): ...`` there."""
    return _reporter.get()


def advance(operation: str, done: int, total: int) -> None:
    """Tell the current reporter, if any, that ``done`` of ``total`` units of ``operation`` are through."""
    reporter = _reporter.get()
    if reporter is not None:
        reporter(operation, done, total)


__all__ = ["ProgressReporter", "advance", "current_reporter", "reporting"]
