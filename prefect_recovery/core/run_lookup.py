"""Which lineage a run worked on, from the journals alone (what auto-recovery of any pipeline relies on).

A crashed flow run is known to the orchestrator by its run id; what it was working on is recorded in the
store: every journal event carries the ``run_id`` of the run that wrote it (``run_started`` of a pipeline
run, ``recovery_started`` of a recovery, its steps and checkpoints). So the lineage of a run is the lineage
whose journal holds an event of that run, whatever the pipeline named its lineage parameter or however it
derived the lineage from its parameters. Nothing is guessed: a run that journaled nothing has no lineage.

``candidates`` (e.g. the string parameters of the run, which the orchestrator knows) are checked first: one
journal read each. Only when none of them holds the run are the journals of every base lineage in the store
read (derived ``.light``/``.steps`` lineages and Prefect results never hold run events), in parallel.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .errors import CheckpointError, InvalidNameError
from .journal import Journal
from .journal_format import JournalEvent
from .layout import DERIVED_SUFFIXES, RESULT_PREFIX, check_base_lineage
from .store import Store

__all__ = ["RunLookup", "lineages_of_run"]


@dataclass
class RunLookup:
    """Where run ``run_id`` left events: lineage -> the kinds of its events there, in journal order."""

    run_id: str
    found: dict[str, list[str]] = field(default_factory=dict)
    searched: int = 0  # journals read
    scanned_all: bool = False  # every lineage of the store was read (no candidate held the run)
    unreadable: dict[str, str] = field(default_factory=dict)  # lineage -> why its journal could not be read

    @property
    def lineages(self) -> list[str]:
        return sorted(self.found)


def _events_of(store: Store, lineage: str, run_id: str) -> list[JournalEvent]:
    return [event for event in Journal(store, lineage).events() if event.run_id == run_id]


def _base(name: object) -> str | None:
    if not isinstance(name, str):
        return None
    try:
        return check_base_lineage(name)
    except InvalidNameError:
        return None


def lineages_of_run(store: Store, run_id: str, candidates: Iterable[object] = (), workers: int = 8) -> RunLookup:
    """The lineages whose journal holds an event written by ``run_id`` (see the module docstring).

    ``candidates`` are tried first (values that are no valid base lineage name are ignored); the whole store
    is read only when none of them holds the run. A journal that cannot be read is reported in
    ``unreadable``, never taken as "not this run's".
    """
    result = RunLookup(run_id=run_id)

    def check(lineages: list[str]) -> None:
        def one(lineage: str) -> tuple[str, list[JournalEvent] | str]:
            try:
                return lineage, _events_of(store, lineage, run_id)
            except (CheckpointError, OSError) as exc:
                return lineage, f"{type(exc).__name__}: {exc}"

        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(lineages)))) as pool:
            for lineage, events in pool.map(one, lineages):
                result.searched += 1
                if isinstance(events, str):
                    result.unreadable[lineage] = events
                elif events:
                    result.found[lineage] = [event.kind for event in events]

    first = list(dict.fromkeys(filter(None, (_base(c) for c in candidates))))
    existing = set(store.lineages())
    first = [lineage for lineage in first if lineage in existing]
    if first:
        check(first)
    if not result.found:
        rest = [
            lineage
            for lineage in sorted(existing - set(first))
            if not lineage.endswith(DERIVED_SUFFIXES) and not lineage.startswith(RESULT_PREFIX)
        ]
        if rest:
            check(rest)
        result.scanned_all = True
    return result
