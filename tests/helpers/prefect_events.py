"""Reading prefect-recovery's Prefect events back from the server the test process talks to."""

from __future__ import annotations

import time


def read_lineage_events(lineage: str, expected: set[str], timeout: float = 60) -> dict[str, object]:
    """The server's events about ``lineage``, by name, once every name in ``expected`` has arrived."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=30)  # the worker sends from its own thread; wait for its queue to empty
    deadline = time.monotonic() + timeout
    found: dict[str, object] = {}
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            page = client.read_events(
                filter=EventFilter(
                    event=EventNameFilter(prefix=["prefect-recovery."]),
                    resource=EventResourceFilter(id=[f"prefect-recovery.lineage.{lineage}"]),
                ),
                limit=50,
            )
            found = {event.event: event for event in page.events}
            if expected <= found.keys():
                return found
            time.sleep(0.5)
    raise AssertionError(f"events {sorted(expected - found.keys())} of {lineage} never arrived; got {sorted(found)}")


# A CLI process with a certain events backlog at exit: ``python -c BACKLOG_CLI.format(patch=...) ARGS...`` queues
# 3000 events, then runs ``prefect-recovery ARGS...`` (test_quiet_cli.py, test_production_outside.py). ``patch`` is
# Python run first (e.g. switching the CLI's queue filter off, for the control run that must show the noise).
BACKLOG_CLI = """
import sys
import prefect_recovery.cli as cli
from prefect.events import emit_event
{patch}
for i in range(3000):  # far more than the websocket sends before the command exits
    emit_event(event="test.backlog", resource={{"prefect.resource.id": f"test.backlog.{{i}}"}})
sys.argv = ["prefect-recovery", *sys.argv[1:]]
try:
    cli.main()
except SystemExit as done:
    # The exit drain sends every queued event before the process ends (minutes on a busy machine); the line
    # in question comes at its start. End the process a few seconds into the drain, keeping the exit code.
    import os, threading, time

    def cut(code=done.code or 0):
        time.sleep(3)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    threading.Thread(target=cut, daemon=True).start()
    raise
"""
