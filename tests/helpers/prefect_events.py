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
