"""What a lineage's journal says happened to it, folded once into typed records.

The one answer to: which run wrote this lineage (and which run committed a given version), is it
finished (and with which final version and digest), where may an unfinished run or recovery
resume, and which runs and recoveries started and never ended (claims). ``recover``, ``demo``,
``history``, ``replay-check``, retention and the pipeline runtime all read these records instead
of walking raw events.

Folding is by ``seq`` only, never by ``time`` (FORMAT.md, "Journal"). Nothing here consults
Prefect: the journal is the source of truth (DESIGN.md invariant 8). This is not replay
*verification* (re-running training to test determinism, ``flows/replay.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field, JsonValue

from .errors import JournalError

if TYPE_CHECKING:  # the journal's I/O (core/journal.py) hands its events here; folding needs no I/O
    from .journal_format import JournalEvent

RunStatus = Literal["new", "running", "failed", "finished"]


def _version(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class RunRecord(BaseModel):
    """One ``run_started`` and how that run ended (if it did)."""

    run_id: str
    seq: int = Field(description="seq of its run_started.")
    data: dict[str, JsonValue] = Field(description="run_started data: pipeline, parameters, seed, environment...")
    finished: dict[str, JsonValue] | None = Field(default=None, description="data of its run_finished, if any.")
    failed: bool = Field(default=False, description="a final failure of this run was journaled.")

    @property
    def pipeline(self) -> str | None:
        value = self.data.get("pipeline")
        return value if isinstance(value, str) else None

    @property
    def parameters(self) -> dict[str, JsonValue]:
        value = self.data.get("parameters")
        return dict(value) if isinstance(value, dict) else {}

    @property
    def resume_version(self) -> int | None:
        """The version this run was told to resume from (a recovery's choice), if any."""
        return _version(self.data.get("resume_version"))


class RecoveryRecord(BaseModel):
    """One recovery: its ``recovery_started`` and ``recovery_finished`` (either may be missing)."""

    run_id: str
    started_seq: int | None = None
    started: dict[str, JsonValue] | None = None
    finished_seq: int | None = None
    finished: dict[str, JsonValue] | None = None

    @property
    def in_progress(self) -> bool:
        """Started and not finished (still running, or its process died)."""
        return self.finished_seq is None

    @property
    def checkpoint_version(self) -> int | None:
        """The version this recovery chose to resume from, as journaled when it started."""
        checkpoint = (self.started or {}).get("checkpoint")
        return _version(checkpoint.get("version")) if isinstance(checkpoint, dict) else None


class Claim(BaseModel):
    """A run or recovery that started on a lineage and has not ended in the journal."""

    run_id: str
    seq: int
    kind: Literal["run_started", "recovery_started"]
    process: JsonValue = None
    parent: str | None = Field(default=None, description="run_id of the recovery that started this run, if any.")


class LineageHistory(BaseModel):
    """What the journal says happened to a lineage (``fold_journal``), from the store alone.

    A process killed with SIGKILL writes no failure event, so its lineage stays ``running`` with
    ``interrupted_step`` set; the journal alone cannot tell a live run from a dead one (that is
    ``core.liveness``'s question about the open ``claims``).
    """

    lineage: str | None = None
    status: RunStatus = Field(
        default="new",
        description="new: no events; running: the last run started and has no failure/run_finished after it; "
        "failed: a failure after the last run_started and no run_finished after that; "
        "finished: a run_finished after the last run_started (and after any failure of that run).",
    )
    runs: list[str] = Field(default_factory=list, description="run_ids in the order of their first run_started.")
    current_run: str | None = Field(default=None, description="run_id of the last run_started.")
    run_starts: list[RunRecord] = Field(default_factory=list, description="Every run_started, by seq.")
    completed_steps: dict[str, dict[str, JsonValue]] = Field(
        default_factory=dict, description="step name -> data of its latest step_completed (over all runs)."
    )
    failed_step: str | None = Field(
        default=None, description="data['step'] of the last failure since the last run_started, if it names one."
    )
    interrupted_step: str | None = Field(
        default=None,
        description="The last step started in the current run with no step_completed after it (where a killed "
        "process died). None when the run finished.",
    )
    last_checkpoint: dict[str, JsonValue] | None = Field(
        default=None, description="data of the latest checkpoint_committed (version, step, trigger, regions)."
    )
    committed_by: dict[int, tuple[str, int]] = Field(
        default_factory=dict, description="version -> (run_id, seq) of the checkpoint_committed that names it."
    )
    recoveries: list[RecoveryRecord] = Field(default_factory=list, description="One per recovery, by seq.")
    claims: list[Claim] = Field(default_factory=list, description="Runs and recoveries started and not ended.")
    last_seq: int = Field(default=0, description="Highest seq folded (0 for none).")
    last_time: str | None = Field(default=None, description="Wall-clock time of the last event (for people).")

    # -- the questions ------------------------------------------------------------------------
    @property
    def current_run_start(self) -> RunRecord | None:
        """The last run_started: the run that wrote (or is writing) the lineage."""
        return self.run_starts[-1] if self.run_starts else None

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def unfinished(self) -> bool:
        """A run that has not finished, or a recovery in progress (or dead before it finished)."""
        return self.status in ("running", "failed") or any(r.in_progress for r in self.recoveries)

    @property
    def final(self) -> dict[str, JsonValue] | None:
        """``final_version`` and ``final_digest`` of the last ``run_finished``, or None."""
        for run in reversed(self.run_starts):
            if run.finished is not None:
                return {
                    "final_version": run.finished.get("final_version"),
                    "final_digest": run.finished.get("final_digest"),
                }
        return None

    def writer_of(self, version: int) -> RunRecord | None:
        """The run that committed ``version`` (its latest run_started before that commit), else the
        current run (a version saved outside a pipeline run has no journaled writer)."""
        commit = self.committed_by.get(version)
        if commit is not None:
            run_id, seq = commit
            own = [run for run in self.run_starts if run.run_id == run_id and run.seq < seq]
            if own:
                return own[-1]
        return self.current_run_start

    def resume_floor(self, latest: int | None) -> int | None:
        """The oldest version an unfinished run or recovery may still resume from: the latest
        consistent one, or an older one a run or a recovery in progress was told to use.
        None when nothing is unfinished (or no version is known)."""
        if not self.unfinished:
            return None
        candidates = [latest] if latest is not None else []
        current = self.current_run_start
        if current is not None and current.resume_version is not None:
            candidates.append(current.resume_version)
        candidates += [r.checkpoint_version for r in self.recoveries if r.in_progress and r.checkpoint_version]
        return min(candidates) if candidates else None


def fold_journal(events: Iterable[JournalEvent]) -> LineageHistory:
    """Fold journal events into a ``LineageHistory``. Ordering is by ``seq``, never by ``time``."""
    ordered = sorted(events, key=lambda event: event.seq)
    if not ordered:
        return LineageHistory()
    lineages = {event.lineage for event in ordered}
    if len(lineages) > 1:
        raise JournalError(f"cannot fold events of several lineages together: {sorted(lineages)}")
    seqs = [event.seq for event in ordered]
    if len(set(seqs)) != len(seqs):
        raise JournalError("cannot fold a journal with two events under one seq")

    history = LineageHistory(
        lineage=ordered[0].lineage, status="running", last_seq=ordered[-1].seq, last_time=ordered[-1].time
    )
    terminal: RunStatus | None = None
    open_steps: dict[str, int] = {}  # step -> seq of its step_started, in start order (current run)
    runs_by_id: dict[str, RunRecord] = {}
    claims: dict[str, Claim] = {}
    for event in ordered:
        step = event.data.get("step")
        step = step if isinstance(step, str) and step else None
        if event.kind == "run_started":
            run = RunRecord(run_id=event.run_id, seq=event.seq, data=dict(event.data))
            history.run_starts.append(run)
            if event.run_id not in history.runs:
                history.runs.append(event.run_id)
            history.current_run = event.run_id
            runs_by_id[event.run_id] = run
            terminal = None
            history.failed_step = None
            open_steps = {}
        elif event.kind == "step_started" and step is not None:
            open_steps.pop(step, None)
            open_steps[step] = event.seq
        elif event.kind == "step_completed" and step is not None:
            history.completed_steps[step] = dict(event.data)
            open_steps.pop(step, None)
        elif event.kind == "failure" and event.data.get("final", True) is not False:
            # A failed attempt that will be retried (final=False) does not end the run.
            terminal = "failed"
            history.failed_step = step
            if event.run_id in runs_by_id:
                runs_by_id[event.run_id].failed = True
        elif event.kind == "run_finished":
            terminal = "finished"
            if event.run_id in runs_by_id:
                runs_by_id[event.run_id].finished = dict(event.data)
        elif event.kind == "checkpoint_committed":
            history.last_checkpoint = dict(event.data)
            version = _version(event.data.get("version"))
            if version is not None:
                history.committed_by[version] = (event.run_id, event.seq)
        elif event.kind == "recovery_started":
            history.recoveries.append(
                RecoveryRecord(run_id=event.run_id, started_seq=event.seq, started=dict(event.data))
            )
        elif event.kind == "recovery_finished":
            pending = [r for r in history.recoveries if r.in_progress]
            same_run = [r for r in pending if r.run_id == event.run_id]
            target = (same_run or pending or [None])[-1]
            if target is None:  # its recovery_started never committed: still record it
                target = RecoveryRecord(run_id=event.run_id)
                history.recoveries.append(target)
            target.finished_seq = event.seq
            target.finished = dict(event.data)
        _track_claim(claims, event)
    history.status = terminal or "running"
    history.interrupted_step = None if terminal == "finished" else next(reversed(open_steps), None)
    history.claims = sorted(claims.values(), key=lambda claim: claim.seq)
    return history


def _track_claim(claims: dict[str, Claim], event: JournalEvent) -> None:
    """A run ends with ``run_finished`` or a final ``failure`` of the same run_id; a recovery with
    ``recovery_finished``. A process killed with SIGKILL never writes its end, so its claim stays
    open: whether it still holds the lineage is a question of liveness, not of the journal."""
    if event.kind in ("run_started", "recovery_started"):
        parent = event.data.get("recovery_run")
        claims[event.run_id] = Claim(
            run_id=event.run_id,
            seq=event.seq,
            kind=event.kind,
            process=event.data.get("process"),
            parent=parent if isinstance(parent, str) else None,
        )
    elif event.run_id in claims:
        kind = claims[event.run_id].kind
        ends_run = event.kind == "run_finished" or (
            event.kind == "failure" and event.data.get("final", True) is not False
        )
        if (kind == "run_started" and ends_run) or (kind == "recovery_started" and event.kind == "recovery_finished"):
            del claims[event.run_id]


def open_claims(events: Iterable[JournalEvent]) -> list[Claim]:
    """Runs and recoveries with a start event and no end event, by seq (any events, unchecked)."""
    claims: dict[str, Claim] = {}
    for event in sorted(events, key=lambda event: event.seq):
        _track_claim(claims, event)
    return sorted(claims.values(), key=lambda claim: claim.seq)
