"""Where a lineage stands, from the store alone: new, unfinished (resumable) or finished.

Generic over pipelines: "finished" is the journal's ``run_finished`` record (with the final
version and state digest the pipeline run wrote), whatever the pipeline. ``recover``, ``demo``
and every pipeline use these; nothing here knows the example pipeline.
"""

from __future__ import annotations

from typing import Any

from ..blocks import CheckpointStore
from ..blocks import open_store as open_store  # re-exported for pipelines that import it from here
from ..core.journal import Journal, JournalEvent, replay
from ..tasks.pipeline_run import state_digest

# Lineages written before the journal existed (0.1 alpha) marked their end with this checkpoint
# trigger; they still count as finished.
LEGACY_FINAL_TRIGGER = "milestone:final"


def lineage_status(store: CheckpointStore, lineage: str) -> dict[str, Any]:
    """``finished`` (its journal ends with a finished run), ``unfinished`` or ``new``.

    Lineages written before the journal existed count as finished when they hold a ``final``
    milestone checkpoint.
    """
    journal = Journal(store.core, lineage)
    events = journal.events()
    history = replay(events)
    infos = store.list(lineage)
    finals = [info for info in infos if info.metadata.get("trigger") == LEGACY_FINAL_TRIGGER]
    if history.status == "finished" or (history.status == "new" and finals):
        return {
            "status": "finished",
            "final": finals[-1] if finals else None,
            "history": history,
            "history_events": events,
        }
    if history.status != "new" or infos:
        return {"status": "unfinished", "latest": infos[-1] if infos else None, "history": history}
    return {"status": "new", "history": history}


def finished_outputs(events: list[JournalEvent]) -> dict[str, Any] | None:
    """``final_version`` and ``final_digest`` of the last ``run_finished`` in ``events``, or None."""
    for event in reversed(events):
        if event.kind == "run_finished":
            return {"final_version": event.data.get("final_version"), "final_digest": event.data.get("final_digest")}
    return None


def finished_result(store: CheckpointStore, lineage: str, status: dict[str, Any]) -> dict[str, Any]:
    """What ``demo`` and ``recover`` report for a finished lineage, from the store alone: the
    journal's ``run_finished`` (its final version and state digest), else the ``final`` milestone."""
    outputs = finished_outputs(status["history_events"]) if status.get("history_events") else None
    final = status["final"]
    if outputs is None or (outputs.get("final_version") is None and final is not None):
        outputs = {
            "final_version": final.version if final else None,
            "final_digest": state_digest(store, lineage, final.version) if final else None,
        }
    if outputs.get("final_digest") is None and isinstance(outputs.get("final_version"), int):
        outputs["final_digest"] = state_digest(store, lineage, outputs["final_version"])
    return {"lineage": lineage, "status": "finished", **outputs, "resumed_from": None}
