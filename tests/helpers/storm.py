"""Crashing pipeline runs on a production-shaped stack and measuring their recoveries (tests/test_production.py
and benchmarks/storm.py share it).

A run's flow-run process is the pid its lineage journal records in ``run_started``; a crash is SIGKILL of that
process (and, for a lost worker, of the worker too). A recovery's time is split by what Prefect and the journal
record: ``detection`` (kill -> the run's Crashed state), ``trigger`` (Crashed -> the automation's recover run
exists), ``queue`` (-> Pending: a worker took it and it got one of the recover deployment's concurrency slots;
runs wait in AwaitingConcurrencySlot until then), ``start`` (-> Running: the flow-run process started),
``preflight`` (-> ``recovery_started`` in the journal), ``resume`` (-> the re-run pipeline's training step starts:
its finished steps reused), ``first_save`` (-> its first new checkpoint commits: the Checkpointer's restore, which
is not journaled apart, and the steps up to that checkpoint), ``training`` (-> ``run_finished``: the remaining
steps and saves) and ``finish`` (-> the recover run's Completed state).
"""

from __future__ import annotations

import os
import signal
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from helpers.live_prefect import api, wait_for
from helpers.production_stack import PIPELINE_DEPLOYMENT, RECOVER_DEPLOYMENT, ProductionStack

from prefect_recovery import CheckpointStore
from prefect_recovery.core.journal import Journal

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# s per optimizer step of the crashed runs (their recoveries train at full speed): every run must still be
# training when the last of them, started at the same time on two busy cores, commits its first checkpoint
STORM_PACE = 1.0
PHASES = ("detection", "trigger", "queue", "start", "preflight", "resume", "first_save", "training", "finish")
TRAINING_STEP = "fit"


def store_of(stack: ProductionStack) -> CheckpointStore:
    """The store the block names (the same two regions, opened directly: no API call needed)."""
    return CheckpointStore(regions=[str(r) for r in stack.regions], write_quorum=2)


def at(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def flow_run_process(store: CheckpointStore, lineage: str, run_id: str) -> dict[str, Any] | None:
    """The ``process`` (pid, start time) the flow run journaled in ``run_started``, once it has."""
    for event in Journal(store.core, lineage).events():
        if event.kind == "run_started" and event.run_id == run_id:
            return event.data["process"]  # type: ignore[return-value]
    return None


def heavy_checkpoints(stack: ProductionStack, lineage: str) -> int:
    """Committed heavy checkpoints in region-a: a directory listing, cheap enough for tight polling."""
    directory = stack.regions[0] / "lineages" / lineage / "manifests"
    try:
        return sum(1 for p in directory.iterdir() if p.name.endswith(".json") and not p.name.startswith("."))
    except FileNotFoundError:
        return 0


def states(stack: ProductionStack, run_id: str) -> list[dict[str, Any]]:
    found = api(stack.server, "GET", f"/flow_run_states/?flow_run_id={run_id}")
    return sorted(found, key=lambda s: s["timestamp"])  # type: ignore[arg-type]


def first_state(history: list[dict[str, Any]], kind: str) -> float | None:
    return next((at(s["timestamp"]) for s in history if s["type"] == kind), None)


def recover_runs(stack: ProductionStack, crashed_run: str) -> list[dict[str, Any]]:
    """The recover runs started for crashed flow run ``crashed_run`` (the automation passes its id)."""
    body = {
        "deployments": {"id": {"any_": [stack.deployment_id(RECOVER_DEPLOYMENT)]}},
        "sort": "EXPECTED_START_TIME_ASC",
        "limit": 200,
    }
    runs = api(stack.server, "POST", "/flow_runs/filter", body)
    return [r for r in runs if r["parameters"].get("crashed_run") == crashed_run]  # type: ignore[union-attr]


def wait_final(stack: ProductionStack, run_id: str, timeout: float, what: str) -> dict[str, Any]:
    return wait_for(
        lambda: (run := stack.flow_run(run_id))["state_type"] in TERMINAL and run, timeout, what, interval=1
    )


@dataclass
class Crash:
    """One killed pipeline run and its recovery."""

    lineage: str
    run_id: str
    pid: int
    killed_at: float = 0.0
    killed_version: int = 0  # the last heavy checkpoint committed before the kill
    recovery: dict[str, Any] | None = None  # the recover run, once finished
    phases: dict[str, float] = field(default_factory=dict)
    running: tuple[float, float] | None = None  # when the recover run held a concurrency slot
    created: float = 0.0  # when the automation created the recover run


def start_runs(stack: ProductionStack, lineages: list[str], **parameters: Any) -> dict[str, str]:
    return {lineage: stack.run_deployment(PIPELINE_DEPLOYMENT, lineage=lineage, **parameters) for lineage in lineages}


def wait_mid_training(stack: ProductionStack, runs: dict[str, str], timeout: float = 300) -> list[Crash]:
    """Each run once its flow-run process journaled ``run_started`` and committed a heavy checkpoint."""
    store = store_of(stack)
    crashes: dict[str, Crash] = {}
    deadline = time.monotonic() + timeout
    while len(crashes) < len(runs) or any(heavy_checkpoints(stack, c.lineage) < 1 for c in crashes.values()):
        assert time.monotonic() < deadline, f"runs not mid-training after {timeout} s: {sorted(crashes)}"
        for lineage, run_id in runs.items():
            if lineage not in crashes and (process := flow_run_process(store, lineage, run_id)):
                crashes[lineage] = Crash(lineage, run_id, process["pid"])
            state = stack.flow_run(run_id)["state_type"]
            assert state not in TERMINAL, f"{lineage} ended {state} before it was killed"
        time.sleep(0.2)
    return [crashes[lineage] for lineage in runs]


def kill(crashes: list[Crash], *also: int) -> None:
    """SIGKILL every crash's flow-run process (and the pids in ``also``) at once."""
    for pid in [*also, *(c.pid for c in crashes)]:
        os.kill(pid, signal.SIGKILL)
    now = time.time()
    for crash in crashes:
        crash.killed_at = now


def record_killed_versions(stack: ProductionStack, crashes: list[Crash]) -> None:
    store = store_of(stack)
    for crash in crashes:
        history = Journal(store.core, crash.lineage).history()
        assert history.status == "running", f"{crash.lineage} had finished before the kill landed"
        crash.killed_version = store.latest(crash.lineage).version


def wait_recovered(stack: ProductionStack, crashes: list[Crash], timeout: float) -> None:
    """Every crash's run Crashed, one automation-started recover run for each, all Completed; then its phases."""
    deadline = time.monotonic() + timeout
    pending = {c.lineage: c for c in crashes}
    while pending:
        assert time.monotonic() < deadline, f"not recovered after {timeout} s: {sorted(pending)}"
        for lineage, crash in list(pending.items()):
            runs = recover_runs(stack, crash.run_id)
            assert len(runs) <= 1, f"{lineage}: more than one recovery started: {[r['id'] for r in runs]}"
            if runs and runs[0]["state_type"] in TERMINAL:
                assert runs[0]["state_type"] == "COMPLETED", (lineage, runs[0]["state"])
                crash.recovery = runs[0]
                del pending[lineage]
        time.sleep(1)
    for crash in crashes:
        measure(stack, crash)


def measure(stack: ProductionStack, crash: Crash) -> None:
    assert crash.recovery is not None
    store = store_of(stack)
    crashed = first_state(states(stack, crash.run_id), "CRASHED")
    recovery = states(stack, crash.recovery["id"])
    created = at(crash.recovery["created"])
    pending, running, completed = (first_state(recovery, k) for k in ("PENDING", "RUNNING", "COMPLETED"))
    events = Journal(store.core, crash.lineage).events()
    started = next(at(e.time) for e in events if e.kind == "recovery_started" and e.run_id == crash.recovery["id"])
    finished = [at(e.time) for e in events if e.kind == "run_finished"][-1]
    # the resumed pipeline reaches its training step (its finished steps were reused); the Checkpointer's restore
    # is the first thing that step does and is not journaled apart (a few ms for this model's 37 KB)
    resumed = next(
        at(e.time)
        for e in events
        if e.kind == "step_started" and e.data.get("step") == TRAINING_STEP and at(e.time) > started
    )
    first_save = next(at(e.time) for e in events if e.kind == "checkpoint_committed" and at(e.time) > resumed)
    marks = [crash.killed_at, crashed, created, pending, running, started, resumed, first_save, finished, completed]
    assert None not in marks, (crash.lineage, marks)
    crash.phases = {phase: round(b - a, 2) for phase, a, b in zip(PHASES, marks[:-1], marks[1:], strict=True)}
    crash.phases["total"] = round(completed - crash.killed_at, 2)  # type: ignore[operator]
    crash.running = (pending, completed)  # type: ignore[assignment]
    crash.created = created


def max_concurrent(intervals: list[tuple[float, float]], tolerance: float = 1.0) -> int:
    """The most intervals that overlap at one instant, by more than ``tolerance`` seconds.

    A state's timestamp is the proposer's clock when it proposed the state, not when the server accepted it: on
    a loaded machine a run's Pending can carry a time a few tenths of a second before the Completed of the run
    whose slot it got (seen: 0.13 and 0.38 s in a storm of 20). Such an overlap is not two runs holding a slot.
    """
    edges = sorted([(start + tolerance, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    best = current = 0
    for _, step in edges:
        current += step
        best = max(best, current)
    return best


def summary(crashes: list[Crash]) -> dict[str, Any]:
    """Median and p95 of crash -> recovered, and the median of each phase."""

    def p95(values: list[float]) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]

    totals = [c.phases["total"] for c in crashes]
    return {
        "lineages": len(crashes),
        "crash_to_recovered_s": {"median": round(statistics.median(totals), 2), "p95": p95(totals), "max": max(totals)},
        "phase_median_s": {p: round(statistics.median(c.phases[p] for c in crashes), 2) for p in PHASES},
        "phase_p95_s": {p: p95([c.phases[p] for c in crashes]) for p in PHASES},
        "max_concurrent_recoveries": max_concurrent([c.running for c in crashes if c.running]),
        # pairs of recoveries that got their slot in the opposite order of their creation (0: first come, first served)
        "slot_order_inversions": sum(
            1
            for a in crashes
            for b in crashes
            if a.created < b.created and a.running and b.running and a.running[0] > b.running[0]
        ),
        "per_lineage": {c.lineage: c.phases for c in crashes},
    }


__all__ = ["PHASES", "Crash", "kill", "start_runs", "store_of", "summary", "wait_mid_training"]


def crash_storm(
    stack: ProductionStack, lineages: list[str], *, seed: int, epochs: int, pace: float, timeout: float
) -> list[Crash]:
    """Start a pipeline run per lineage, SIGKILL all their flow-run processes at once when each is training
    (a checkpoint committed), and wait until the automation's recover runs completed; each Crash is measured."""
    runs = start_runs(stack, lineages, seed=seed, epochs=epochs, pace=pace)
    crashes = wait_mid_training(stack, runs, timeout)
    kill(crashes)
    record_killed_versions(stack, crashes)
    wait_recovered(stack, crashes, timeout)
    return crashes


def final_digest(store: CheckpointStore, lineage: str) -> str:
    """The state digest the lineage's last ``run_finished`` recorded."""
    finished = [e for e in Journal(store.core, lineage).events() if e.kind == "run_finished"]
    assert finished, f"{lineage} has no run_finished"
    return finished[-1].data["final_digest"]
