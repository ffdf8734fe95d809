"""``recover`` end to end: real pipeline processes killed with SIGKILL, then ``prefect-recovery recover --json``.

Every pipeline run and every recovery is a real subprocess talking to the one session-wide Prefect server
(``prefect_server``). ``helpers/recover_pipeline.py`` (load -> transform -> fit -> report) is registered with
``register_pipeline`` and found by ``recover`` through ``PREFECT_RECOVERY_PIPELINES``; its steps append their
names to a trace file, so a test sees exactly which step code ran in the killed run and in the recovery. A
run is killed while it blocks in ``fit`` (the whole process group, SIGKILL: no failure event is written). Tests
that need nothing but such a crashed lineage get a copy of the files one killed run left behind (``crashed``),
which spares a pipeline process per test; the others kill their own run.

Preflight failures are each provoked for real (a journal that records another torch version, a region that
is gone from a quorum-2 store, an input file changed or missing, too little disk headroom, a live run that
holds the lineage) and must stop a strict recovery with a message naming the check, without writing a
single journal event. The example pipeline (``prefect-recovery demo``) killed mid-training and recovered
must end bit-identical to an uninterrupted reference run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CLI, REPO
from helpers import recover_pipeline
from helpers.prefect_events import read_lineage_events
from helpers.recover_pipeline import BLOCK_ENV, HOLD_ENV, MODULE, PIPELINE, TRACE_ENV, save_numbers
from helpers.rounding import checkpoints, fail_if_rounding
from helpers.snapshot import snapshot
from helpers.step_values import differing_leaves

from prefect_recovery import CheckpointStore
from prefect_recovery.core.journal import Journal, JournalEvent
from prefect_recovery.tasks.pipeline_run import environment
from prefect_recovery.tasks.step import value_digest

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
RUN_TIMEOUT = 300
POLL = 0.05
DEMO_STEPS = 150  # heavy checkpoints at 50, 100, 150, then milestone:train_end and milestone:final
DEMO_SEED = 7


@pytest.fixture(scope="module")
def api_url(prefect_server) -> str:
    """The session server's API URL, handed to every subprocess (no temporary server per process)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    assert url and url.startswith("http"), url
    return url


# -- processes ---------------------------------------------------------------------------------------------------
@dataclass
class Proc:
    what: str
    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    def tail(self) -> str:
        return (
            f"{self.what} (rc={self.process.returncode})\nstdout:\n{self.stdout.read_text()[-3000:]}\n"
            f"stderr:\n{self.stderr.read_text()[-5000:]}"
        )

    def kill(self) -> None:
        """SIGKILL the whole process group (like a lost node) and reap it."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def wait(self, timeout: float = RUN_TIMEOUT) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.what} did not finish in {timeout}s\n{self.tail()}")

    def json(self) -> Any:
        try:
            return json.loads(self.stdout.read_text())
        except json.JSONDecodeError:
            pytest.fail(f"{self.what} printed no JSON\n{self.tail()}")


class Env:
    """Starts pipeline runs and CLI commands on one PREFECT_RECOVERY_HOME; kills what is left at the end."""

    def __init__(self, home: Path, api_url: str, logs: Path):
        self.home = home
        self.logs = logs
        self.trace = logs / "trace.txt"
        self.api_url = api_url
        self.started: list[Proc] = []
        logs.mkdir(parents=True, exist_ok=True)

    def environ(self, **extra: str) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if key not in (BLOCK_ENV, HOLD_ENV)}
        pythonpath = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
        env.update(
            PREFECT_RECOVERY_HOME=str(self.home),
            PREFECT_API_URL=self.api_url,
            PREFECT_RECOVERY_PIPELINES=MODULE,
            PYTHONPATH=pythonpath,
            **{TRACE_ENV: str(self.trace)},
        )
        env.update(extra)
        return env

    def start(self, what: str, args: list[str], **extra: str) -> Proc:
        name = f"{re.sub(r'[^a-z0-9]+', '-', what.lower())}-{uuid.uuid4().hex[:6]}"
        stdout, stderr = self.logs / f"{name}.out", self.logs / f"{name}.err"
        with open(stdout, "wb") as out, open(stderr, "wb") as err:
            process = subprocess.Popen(
                args, stdout=out, stderr=err, env=self.environ(**extra), cwd=REPO, start_new_session=True
            )
        proc = Proc(what, process, stdout, stderr)
        self.started.append(proc)
        return proc

    def pipeline(self, lineage: str, *options: str, **extra: str) -> Proc:
        return self.start(f"pipeline {lineage}", [*CLI[:1], "-m", MODULE, lineage, *options], **extra)

    def cli(self, *args: str, **extra: str) -> Proc:
        return self.start(f"prefect-recovery {' '.join(args)}", [*CLI, *args], **extra)

    def run_cli(self, *args: str, **extra: str) -> tuple[int, Any, Proc]:
        """Run a ``--json`` command to its end: (exit code, printed JSON, the process)."""
        proc = self.cli(*args, "--json", **extra)
        code = proc.wait()
        return code, proc.json(), proc

    def recover(self, *args: str, **extra: str) -> dict[str, Any]:
        """A recovery that must succeed."""
        code, payload, proc = self.run_cli("recover", *args, **extra)
        assert code == 0, proc.tail()
        return payload

    def refused(self, *args: str, **extra: str) -> str:
        """A recovery that must be refused: its error message."""
        code, payload, proc = self.run_cli("recover", *args, **extra)
        assert code != 0, f"the recovery was not refused\n{proc.tail()}"
        assert set(payload) == {"error"}, proc.tail()
        return payload["error"]

    def traced(self) -> list[str]:
        return self.trace.read_text().split() if self.trace.exists() else []

    def wait_for(self, proc: Proc, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not condition():
            if proc.process.poll() is not None:
                pytest.fail(f"{proc.what} exited before {what}\n{proc.tail()}")
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"timed out waiting for {what}\n{proc.tail()}")
            time.sleep(POLL)

    def blocked_run(self, lineage: str, *options: str, step: str = "fit") -> Proc:
        """A pipeline run blocking in ``step`` (alive, holding its lineage)."""
        proc = self.pipeline(lineage, *options, **{BLOCK_ENV: step})
        self.wait_for(proc, lambda: f"{step}:blocking" in self.traced(), f"step {step} to start")
        return proc

    def killed_run(self, lineage: str, *options: str, step: str = "fit") -> None:
        """A pipeline run SIGKILLed in ``step``; steps before it finished."""
        self.blocked_run(lineage, *options, step=step).kill()

    def close(self) -> None:
        for proc in self.started:
            proc.kill()


@pytest.fixture
def env(api_url, recovery_home, tmp_path) -> Any:
    environment_ = Env(recovery_home, api_url, tmp_path / "logs")
    try:
        yield environment_
    finally:
        environment_.close()


def events(lineage: str, store: CheckpointStore | None = None) -> list[JournalEvent]:
    return Journal((store or CheckpointStore.default()).core, lineage).events()


def kinds(journal_events: list[JournalEvent]) -> list[str]:
    return [event.kind for event in journal_events]


def check_row(payload_or_rows: Any, check: str) -> dict[str, str]:
    rows = payload_or_rows["preflight"] if isinstance(payload_or_rows, dict) else payload_or_rows
    [row] = [row for row in rows if row["check"] == check]
    return row


# -- the helper pipeline's expected result and one killed run ---------------------------------------------------------
@pytest.fixture(scope="module")
def expected_digest() -> str:
    """The helper pipeline's final digest, computed by its step functions called directly (seed 0)."""
    x = recover_pipeline.load.fn(0)
    summary = recover_pipeline.report.fn(recover_pipeline.fit.fn(recover_pipeline.transform.fn(x), 0))
    return value_digest(summary)


@pytest.fixture(scope="module")
def killed_home(api_url, tmp_path_factory) -> Path:
    """A home whose lineage ``crashed`` was SIGKILLed in ``fit`` (``load`` and ``transform`` finished).

    Tests that need nothing else get a copy of it (``crashed``): the exact files the killed run left behind,
    without paying for another pipeline process each.
    """
    home = tmp_path_factory.mktemp("killed-home")
    killer = Env(home, api_url, tmp_path_factory.mktemp("killed-logs"))
    try:
        killer.killed_run("crashed")
    finally:
        killer.close()
    assert killer.traced() == ["load", "transform", "fit", "fit:blocking"]
    return home


@pytest.fixture
def crashed(killed_home, recovery_home) -> str:
    """The killed lineage, copied into this test's home; returns its name."""
    shutil.copytree(killed_home, recovery_home)
    history = Journal(CheckpointStore.default().core, "crashed").history()
    assert history.status == "running" and history.interrupted_step == "fit"
    assert set(history.completed_steps) == {"load", "transform"}
    return "crashed"


# -- recovery reuses the steps that finished -----------------------------------------------------------------------
def test_recover_reruns_only_the_killed_step_and_the_ones_after(env, crashed, expected_digest):
    before = events(crashed)
    [started] = [event for event in before if event.kind == "run_started"]
    assert started.data["pipeline"] == PIPELINE

    result = env.recover("--lineage", crashed)

    assert env.traced() == ["fit", "report"], "a finished step ran again, or a later one did not run"
    assert result["status"] == "recovered" and result["lineage"] == crashed
    assert result["failed_step"] == "fit"
    assert result["reused_steps"] == ["load", "transform"]
    assert result["resumed_from"] is None  # this pipeline keeps no training checkpoints
    assert result["final_digest"] == expected_digest
    assert {row["status"] for row in result["preflight"]} <= {"pass", "warn"}
    assert check_row(result, "lineage lock")["status"] == "pass"
    # The recovery told the Prefect server, for automations: started, then finished with outcome ok.
    sent = read_lineage_events(crashed, {"prefect-recovery.recovery.started", "prefect-recovery.recovery.finished"})
    finished = sent["prefect-recovery.recovery.finished"]
    assert finished.resource["prefect-recovery.outcome"] == "ok"
    assert finished.payload["lineage"] == crashed and finished.payload["reused_steps"] == ["load", "transform"]
    assert sent["prefect-recovery.recovery.started"].payload["failed_step"] == "fit"

    after = events(crashed)
    assert after[: len(before)] == before, "the recovery rewrote history"
    new = after[len(before) :]
    assert kinds(new)[:2] == ["recovery_started", "run_started"] and kinds(new)[-1] == "recovery_finished"
    recovery_run = new[0].run_id
    assert new[0].data["failed_step"] == "fit" and new[0].data["preflight"] == "strict"
    assert new[1].data["recovery_run"] == recovery_run and new[1].data["parameters"] == started.data["parameters"]
    assert new[-1].run_id == recovery_run and new[-1].data["status"] == "completed"
    assert new[-1].data["reused_steps"] == ["load", "transform"]
    steps = [(e.data["step"], e.data["reused"]) for e in new if e.kind == "step_completed"]
    assert steps == [("load", True), ("transform", True), ("fit", False), ("report", False)]
    history = Journal(CheckpointStore.default().core, crashed).history()
    assert history.status == "finished" and history.interrupted_step is None
    assert [r.run_id for r in history.recoveries] == [recovery_run]
    assert len(history.runs) == 2

    # The lineage is finished now: recovering it again says so and changes nothing.
    files = snapshot(env.home)
    again = env.recover("--lineage", crashed)
    assert again["status"] == "finished" and again["lineage"] == crashed and again["resumed_from"] is None
    assert "reused_steps" not in again
    assert events(crashed) == after, "recovering a finished lineage journaled something"
    assert snapshot(env.home) == files
    assert env.traced() == ["fit", "report"]
    # and without --lineage there is nothing left to pick
    code, payload, _proc = env.run_cli("recover")
    assert code == 1 and "no unfinished lineage" in payload["error"]


# -- preflight: each check stops a strict recovery for its own reason ------------------------------------------------
def assert_refused_by(message: str, lineage: str, check: str, *fragments: str, mode: str = "strict") -> None:
    assert message.startswith(f"recovery of lineage {lineage!r} stopped by preflight ({mode}): "), message
    reasons = message.split(": ", 1)[1]
    assert reasons.startswith(f"{check}: ") or f"; {check}: " in reasons, message
    for fragment in fragments:
        assert fragment in message, message


def test_preflight_refuses_when_the_run_used_other_library_versions(env, crashed):
    """The journal says the crashed run had torch 0.0.1: its run_started, as a machine with that torch wrote it."""
    [started] = [event for event in events(crashed) if event.kind == "run_started"]
    recorded = json.loads(json.dumps(started.data))
    recorded["environment"]["packages"]["torch"] = "0.0.1"
    Journal(CheckpointStore.default().core, crashed).append("run_started", run_id=started.run_id, data=recorded)
    before = events(crashed)

    message = env.refused("--lineage", crashed)

    installed = environment()["packages"]["torch"]
    assert_refused_by(message, crashed, "environment", f"torch {installed} installed, the run used 0.0.1")
    assert "numpy" not in message and "lineage lock" not in message
    assert events(crashed) == before, "a refused recovery journaled something"
    assert env.traced() == []


def test_preflight_refuses_when_a_region_is_down_and_the_quorum_cannot_be_met(env, tmp_path, expected_digest):
    lineage = "region-down"
    regions = [tmp_path / "quorum" / "region-1", tmp_path / "quorum" / "region-2"]
    block = f"recover-test-q2-{uuid.uuid4().hex[:8]}"
    store = CheckpointStore(regions=[str(path) for path in regions], write_quorum=2)
    for path in regions:
        path.mkdir(parents=True)
    store.save(block)
    env.killed_run(lineage, "--store-block", block)
    before = events(lineage, store)
    assert kinds(before)[0] == "run_started" and before[0].data["parameters"]["store_block"] == block
    gone = regions[1].with_name("region-2.gone")
    regions[1].rename(gone)

    message = env.refused("--lineage", lineage, "--store", block)

    assert_refused_by(
        message,
        lineage,
        "storage",
        f"region {regions[1]}",
        "does not exist",
        "only 1 of 2 regions usable, the write quorum is 2",
    )
    gone.rename(regions[1])
    assert events(lineage, store) == before, "a refused recovery journaled something"

    # With the region back the recovery goes through (here re-running transform and every later step).
    result = env.recover("--lineage", lineage, "--store", block, "--from-step", "transform")
    assert result["status"] == "recovered" and result["reused_steps"] == ["load"]
    assert check_row(result, "storage")["status"] == "pass"
    assert result["final_digest"] == expected_digest
    assert env.traced()[4:] == ["transform", "fit", "report"]
    assert Journal(store.core, lineage).history().status == "finished"
    assert not (env.home / "regions").exists(), "the recovery wrote to the default store instead of the block's"


def test_preflight_refuses_when_an_input_file_changed_or_is_missing(env, tmp_path):
    lineage = "changed-input"
    data = tmp_path / "numbers.safetensors"
    original = torch.linspace(-2, 2, 128, dtype=torch.float64)
    save_numbers(data, original)
    env.killed_run(lineage, "--data-path", str(data))
    before = events(lineage)
    assert before[0].data["inputs"]["numbers"]["uri"] == str(data)

    changed = original.clone()
    changed[5] += 1e-12
    save_numbers(data, changed)
    message = env.refused("--lineage", lineage)
    assert_refused_by(message, lineage, "data", f"input 'numbers' at {data} changed since the run")

    data.unlink()
    message = env.refused("--lineage", lineage)
    assert_refused_by(message, lineage, "data", f"input 'numbers' at {data} cannot be read", "FileNotFoundError")
    assert events(lineage) == before, "a refused recovery journaled something"

    # The original bytes back: the recovery goes through, and the load step is reused.
    save_numbers(data, original)
    result = env.recover("--lineage", lineage)
    assert check_row(result, "data")["status"] == "pass"
    assert result["reused_steps"] == ["load", "transform"]
    assert env.traced()[4:] == ["fit", "report"]


def test_preflight_refuses_without_disk_headroom_and_warn_mode_goes_on(env, crashed, expected_digest):
    before = events(crashed)
    huge = str(2**62)

    message = env.refused("--lineage", crashed, PREFECT_RECOVERY_MIN_FREE_BYTES=huge)

    assert_refused_by(message, crashed, "disk", "PREFECT_RECOVERY_MIN_FREE_BYTES", f"{2**62:,} headroom")
    assert events(crashed) == before, "a refused recovery journaled something"
    assert env.traced() == []

    # --preflight warn reports the failed check and goes on
    result = env.recover("--lineage", crashed, "--preflight", "warn", PREFECT_RECOVERY_MIN_FREE_BYTES=huge)
    assert result["status"] == "recovered"
    assert check_row(result, "disk")["status"] == "fail"
    assert result["final_digest"] == expected_digest
    assert env.traced() == ["fit", "report"]
    [started] = [e for e in events(crashed) if e.kind == "recovery_started"]
    assert started.data["preflight"] == "warn" and started.data["checks"]["disk"] == "fail"


def test_preflight_refuses_while_a_live_run_holds_the_lineage_even_in_warn_mode(env):
    lineage = "held"
    holder = env.blocked_run(lineage)
    before = events(lineage)
    holder_run = before[0].run_id

    attempts = {
        mode: env.cli("recover", "--lineage", lineage, "--json", "--preflight", mode) for mode in ("strict", "warn")
    }
    for mode, proc in attempts.items():
        assert proc.wait() != 0, proc.tail()
        message = proc.json()["error"]
        assert_refused_by(
            message, lineage, "lineage lock", f"run {holder_run} (pid {holder.process.pid} on", "is still running",
            mode=mode,
        )  # fmt: skip
    assert events(lineage) == before, "a refused recovery journaled something"
    assert holder.process.poll() is None, "the live run was disturbed"

    # once the holder is gone, the lineage can be recovered
    holder.kill()
    result = env.recover("--lineage", lineage)
    assert result["status"] == "recovered" and result["reused_steps"] == ["load", "transform"]


# -- two recoveries at once -----------------------------------------------------------------------------------------
def test_two_recoveries_started_together_one_proceeds(env, crashed, expected_digest, tmp_path):
    release = tmp_path / "release"
    hold = {HOLD_ENV: f"fit:{release}"}  # whichever recovery wins waits in fit until the other has exited

    racers = [env.cli("recover", "--lineage", crashed, "--json", **hold) for _ in range(2)]
    deadline = time.monotonic() + RUN_TIMEOUT
    while all(proc.process.poll() is None for proc in racers):
        assert time.monotonic() < deadline, "\n".join(proc.tail() for proc in racers)
        time.sleep(POLL)
    [loser] = [proc for proc in racers if proc.process.poll() is not None]
    [winner] = [proc for proc in racers if proc is not loser]
    release.touch()

    assert loser.wait() != 0, loser.tail()
    error = loser.json()["error"]
    assert re.search(r"held by another live run or recovery|lineage lock: recovery \S+ .* is still running", error), (
        error
    )
    assert winner.wait() == 0, winner.tail()
    result = winner.json()
    assert result["status"] == "recovered" and result["reused_steps"] == ["load", "transform"]
    assert result["final_digest"] == expected_digest
    assert env.traced() == ["fit", "fit:holding", "report"], "the steps ran more than once"

    history = Journal(CheckpointStore.default().core, crashed).history()
    assert history.status == "finished"
    finished = [r.finished["status"] for r in history.recoveries]
    assert finished.count("completed") == 1 and set(finished) <= {"completed", "aborted"}, history.recoveries


# -- the example pipeline: killed mid-training, recovered bit-identical ------------------------------------------------
@dataclass
class DemoReference:
    home: Path
    result: dict[str, Any]
    state: Any


def demo_args(lineage: str) -> list[str]:
    return ["demo", "--json", "--lineage", lineage, "--steps", str(DEMO_STEPS), "--seed", str(DEMO_SEED)]


def final_state(home: Path, lineage: str) -> tuple[Any, Any]:
    store = CheckpointStore.default(home)
    final = store.latest(lineage)
    assert final is not None and final.metadata["trigger"] == "milestone:final", final
    return store.load(lineage=lineage, version=final.version), final


@pytest.fixture(scope="module")
def demo_reference(api_url, tmp_path_factory) -> DemoReference:
    home = tmp_path_factory.mktemp("demo-reference-home")
    reference = Env(home, api_url, tmp_path_factory.mktemp("demo-reference-logs"))
    try:
        proc = reference.cli(*demo_args("reference"))
        assert proc.wait() == 0, proc.tail()
        result = proc.json()
    finally:
        reference.close()
    assert result["status"] == "completed" and result["resumed_from"] is None, result
    state, _info = final_state(home, "reference")
    assert state["counters"]["step"] == DEMO_STEPS
    return DemoReference(home, result, state)


def test_example_pipeline_killed_mid_training_is_recovered_bit_identical(env, demo_reference):
    lineage = "demo-killed"
    store = CheckpointStore.default()
    run = env.cli(*demo_args(lineage))
    env.wait_for(run, lambda: len(store.list(lineage)) >= 1, "the first committed checkpoint")
    run.kill()
    before = set(checkpoints(store, lineage))  # written by the uninterrupted process
    latest = store.latest(lineage)
    assert latest.metadata["trigger"] == "every_n_steps" and latest.step < DEMO_STEPS
    history = Journal(store.core, lineage).history()
    assert history.status == "running" and history.interrupted_step == "train"

    result = env.recover()  # no --lineage: the latest unfinished lineage

    assert result["lineage"] == lineage and result["status"] == "recovered"
    assert result["failed_step"] == "train"
    assert result["reused_steps"] == ["prepare-data"]
    assert result["resumed_from"] == {"version": latest.version, "step": latest.step}
    if result["final_digest"] != demo_reference.result["final_digest"]:  # issue 18's, before the kill: its figures
        fail_if_rounding(lineage, (demo_reference.home, "reference"), (store, lineage), uninterrupted=before)
    assert result["final_digest"] == demo_reference.result["final_digest"]
    state, info = final_state(env.home, lineage)
    assert info.version == result["final_version"]
    assert differing_leaves(demo_reference.state, state) == []
    assert Journal(store.core, lineage).history().status == "finished"


def test_recovering_the_finished_example_lineage_reports_it_and_changes_nothing(api_url, demo_reference, tmp_path):
    reference = Env(demo_reference.home, api_url, tmp_path / "logs")
    before, files_before = events("reference", CheckpointStore.default(demo_reference.home)), snapshot(reference.home)
    try:
        result = reference.recover("--lineage", "reference")
    finally:
        reference.close()

    assert result["status"] == "finished"
    assert result["final_version"] == demo_reference.result["final_version"]
    assert result["final_digest"] == demo_reference.result["final_digest"]
    assert events("reference", CheckpointStore.default(demo_reference.home)) == before
    assert snapshot(reference.home) == files_before
