"""Where a lineage stands, from the store alone: new, unfinished (resumable) or finished.

Generic over pipelines: "finished" is the journal's ``run_finished`` record (with the final
version and state digest the pipeline run wrote), whatever the pipeline. ``recover``, ``demo``
and every pipeline use these; nothing here knows the example pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..blocks import CheckpointStore
from ..blocks import open_store as open_store  # re-exported for pipelines that import it from here
from ..core.journal import Journal
from ..core.journal_format import JournalEvent
from ..core.lineage_history import LineageHistory, fold_journal
from ..core.models import CheckpointInfo
from ..tasks.pipeline_run import state_digest

# Lineages written before the journal existed (0.1 alpha) marked their end with this checkpoint
# trigger; they still count as finished.
LEGACY_FINAL_TRIGGER = "milestone:final"


@dataclass(frozen=True)
class LineageStatus:
    """Where a lineage stands, read once: its journal (events and their fold) and its checkpoints."""

    lineage: str
    status: Literal["new", "unfinished", "finished"]
    history: LineageHistory
    events: list[JournalEvent]
    latest: CheckpointInfo | None  # the newest checkpoint (what an unfinished run resumes from)
    final: CheckpointInfo | None  # a pre-journal lineage's ``final`` milestone checkpoint


def lineage_status(store: CheckpointStore, lineage: str) -> LineageStatus:
    """``finished`` (its journal ends with a finished run), ``unfinished`` or ``new``.

    Lineages written before the journal existed count as finished when they hold a ``final``
    milestone checkpoint.
    """
    events = Journal(store.core, lineage).events()
    history = fold_journal(events)
    infos = store.list(lineage)
    finals = [info for info in infos if info.metadata.get("trigger") == LEGACY_FINAL_TRIGGER]
    if history.finished or (history.status == "new" and finals):
        status: Literal["new", "unfinished", "finished"] = "finished"
    elif history.status != "new" or infos:
        status = "unfinished"
    else:
        status = "new"
    return LineageStatus(
        lineage=lineage,
        status=status,
        history=history,
        events=events,
        latest=infos[-1] if infos else None,
        final=finals[-1] if finals else None,
    )


def finished_result(store: CheckpointStore, status: LineageStatus) -> dict[str, Any]:
    """What ``demo`` and ``recover`` report for a finished lineage, from the store alone: the
    journal's ``run_finished`` (its final version and state digest), else the ``final`` milestone."""
    lineage, final = status.lineage, status.final
    outputs: dict[str, Any] | None = status.history.final
    if outputs is None or (outputs.get("final_version") is None and final is not None):
        outputs = {
            "final_version": final.version if final else None,
            "final_digest": state_digest(store, lineage, final.version) if final else None,
        }
    if outputs.get("final_digest") is None and isinstance(outputs.get("final_version"), int):
        outputs["final_digest"] = state_digest(store, lineage, outputs["final_version"])
    return {"lineage": lineage, "status": "finished", **outputs, "resumed_from": None}
