"""The product's promise, end to end: ``prefect-recovery demo`` killed at any point and run again finishes
with exactly the bytes of a run that never failed.

Every run is a real subprocess (``start_new_session=True``) talking to the one session-wide Prefect server
(``prefect_server``), so no subprocess starts its own temporary server. A module-scoped reference lineage
runs uninterrupted once; each test kills a fresh lineage at one point (SIGKILL of the whole process group,
like a lost node, or SIGTERM, like a preempted VM), runs ``demo`` again on it and compares with the
reference: the JSON ``final_digest`` and then every tensor and value of both final checkpoints.

``test_python_rng_is_not_polluted_by_prefect_keepalive`` pauses a run across a websocket keepalive of
Prefect's events client, whose library draws from Python's global RNG on a background thread; the
Checkpointer gives such libraries a private RNG, so the run still matches.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import CLI, REPO
from helpers.rounding import checkpoints, fail_if_rounding
from helpers.step_values import differing_leaves, final_state

from prefect_recovery import CheckpointStore
from prefect_recovery.core.journal import Journal
from prefect_recovery.core.layout import blob_key
from prefect_recovery.training.checkpointer import LIGHT_SUFFIX, PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slow

STEPS = 150  # heavy checkpoints at 50, 100, 150, then milestone:train_end and milestone:final
SEED = 7
DEMO = CLI
RUN_TIMEOUT = 500
FAST_POLL = 0.002  # for short windows (a save in flight, evaluation): cheap directory listings only
POLL = 0.05  # for conditions that read the store (CheckpointStore.list re-reads every manifest)


# -- running the demo ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def api_url(prefect_server) -> str:
    """The session server's API URL, handed to every subprocess (no temporary server per process)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    assert url and url.startswith("http"), url
    return url


def demo_env(home: Path, api_url: str) -> dict[str, str]:
    return {**os.environ, "PREFECT_RECOVERY_HOME": str(home), "PREFECT_API_URL": api_url}


@dataclass
class Run:
    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    def tail(self) -> str:
        return f"stdout:\n{self.stdout.read_text()[-2000:]}\nstderr:\n{self.stderr.read_text()[-4000:]}"

    def result(self, timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            pytest.fail(f"demo did not finish in {timeout}s\n{self.tail()}")
        if self.process.returncode != 0:
            pytest.fail(f"demo failed with exit code {self.process.returncode}\n{self.tail()}")
        try:
            return json.loads(self.stdout.read_text())
        except json.JSONDecodeError:
            pytest.fail(f"demo printed no JSON\n{self.tail()}")


def start_demo(home: Path, lineage: str, api_url: str, logs: Path, *, command: list[str] = DEMO) -> Run:
    logs.mkdir(parents=True, exist_ok=True)
    name = f"{lineage}-{uuid.uuid4().hex[:6]}"
    stdout, stderr = logs / f"{name}.out", logs / f"{name}.err"
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        process = subprocess.Popen(
            [*command, "demo", "--json", "--lineage", lineage, "--steps", str(STEPS), "--seed", str(SEED)],
            stdout=out,
            stderr=err,
            env=demo_env(home, api_url),
            cwd=REPO,
            start_new_session=True,
        )
    return Run(process, stdout, stderr)


def kill_when(
    run: Run, condition: Callable[[], bool], what: str, sig: int = signal.SIGKILL, interval: float = POLL
) -> None:
    """Send ``sig`` (to the whole process group for SIGKILL, to the process for others) once ``condition``."""
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while not condition():
            if run.process.poll() is not None:
                pytest.fail(f"demo exited ({run.process.returncode}) before {what}\n{run.tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}\n{run.tail()}")
            time.sleep(interval)
    except BaseException:
        if run.process.poll() is None:
            os.killpg(run.process.pid, signal.SIGKILL)
            run.process.wait()
        raise
    if sig == signal.SIGKILL:
        os.killpg(run.process.pid, signal.SIGKILL)
        run.process.wait()
    else:
        os.kill(run.process.pid, sig)


# -- looking at the store ----------------------------------------------------------------------------------------
def manifest_files(home: Path, lineage: str, region: str = "region-a") -> list[Path]:
    directory = home / "regions" / region / "lineages" / lineage / "manifests"
    try:
        return sorted(p for p in directory.iterdir() if p.name.endswith(".json") and not p.name.startswith("."))
    except FileNotFoundError:
        return []


def blob_files(home: Path, region: str) -> set[str]:
    found = set()
    for dirpath, _dirs, files in os.walk(home / "regions" / region / "blobs"):
        found.update(os.path.join(dirpath, f) for f in files)
    return found


@dataclass
class Reference:
    home: Path
    lineage: str
    result: dict[str, Any]
    state: Any


@pytest.fixture(scope="module")
def reference(api_url, tmp_path_factory) -> Reference:
    home = tmp_path_factory.mktemp("reference-home")
    run = start_demo(home, "reference", api_url, tmp_path_factory.mktemp("reference-logs"))
    result = run.result()
    assert result["status"] == "completed" and result["resumed_from"] is None, result
    state, _info = final_state(home, "reference", STEPS)
    # what the comparisons below cover: every component of the training state, plus the metrics
    assert {"model", "optimizer", "scheduler", "data", "rng", "determinism", "counters", "metrics"} <= set(state)
    assert state["counters"]["step"] == STEPS
    return Reference(home, "reference", result, state)


def resume_and_compare(reference: Reference, home: Path, lineage: str, api_url: str, logs: Path) -> dict[str, Any]:
    """Run demo again on the killed lineage; it must resume from the latest consistent checkpoint and
    end bit-identical to the reference."""
    latest = CheckpointStore.default(home).latest(lineage)
    expected_resume = None if latest is None else {"version": latest.version, "step": latest.step}
    before = set(checkpoints(home, lineage))  # what the killed run committed, uninterrupted

    result = start_demo(home, lineage, api_url, logs).result()

    assert result["status"] == "completed"
    assert result["lineage"] == lineage
    assert result["resumed_from"] == expected_resume
    state, info = final_state(home, lineage, STEPS)
    assert info.version == result["final_version"]
    differing = differing_leaves(reference.state, state)
    if differing:  # issue 18's divergence before the kill is reported with its figures, not as a resume failure
        fail_if_rounding(lineage, (reference.home, reference.lineage), (home, lineage), uninterrupted=before)
    assert differing == []
    assert result["final_digest"] == reference.result["final_digest"]
    return result


# -- SIGKILL at four points ------------------------------------------------------------------------------------------
def test_kill_before_the_first_checkpoint(reference, api_url, recovery_home, tmp_path):
    lineage = "killed-early"
    run = start_demo(recovery_home, lineage, api_url, tmp_path / "logs")

    # training has started (a light save exists) but no heavy checkpoint has been committed yet
    kill_when(
        run,
        lambda: (
            bool(manifest_files(recovery_home, lineage + LIGHT_SUFFIX)) and not manifest_files(recovery_home, lineage)
        ),
        "the first light save",
    )

    store = CheckpointStore.default(recovery_home)
    assert store.list(lineage) == [], "the kill came too late: a heavy checkpoint was already committed"
    assert store.list(lineage + LIGHT_SUFFIX), "light checkpoints exist, and resume must ignore them"
    result = resume_and_compare(reference, recovery_home, lineage, api_url, tmp_path / "logs")
    assert result["resumed_from"] is None


def test_kill_between_checkpoints(reference, api_url, recovery_home, tmp_path):
    lineage = "killed-between"
    store = CheckpointStore.default(recovery_home)
    run = start_demo(recovery_home, lineage, api_url, tmp_path / "logs")

    kill_when(run, lambda: len(store.list(lineage)) >= 2, "two committed checkpoints")

    infos = store.list(lineage)
    assert [i.metadata["trigger"] for i in infos] == ["every_n_steps"] * len(infos)
    assert infos[-1].step < STEPS
    # The journal, not Prefect, says where the killed run died (no failure event after SIGKILL).
    history = Journal(store.core, lineage).history()
    assert history.status == "running"
    assert history.interrupted_step == "train"
    assert set(history.completed_steps) == {"prepare-data"}
    result = resume_and_compare(reference, recovery_home, lineage, api_url, tmp_path / "logs")
    assert result["resumed_from"]["step"] == infos[-1].step >= 100
    history = Journal(store.core, lineage).history()
    assert history.status == "finished" and len(history.runs) == 2


def test_kill_during_an_async_save(reference, api_url, recovery_home, tmp_path):
    """Best effort: kill while a heavy save is half written (blobs in the second region, which only heavy
    saves use, newer than the latest manifest). The resume must not notice the torn save."""
    lineage = "killed-mid-save"
    run = start_demo(recovery_home, lineage, api_url, tmp_path / "logs")
    baseline: dict[str, Any] = {}

    def heavy_save_in_flight() -> bool:
        blobs = blob_files(recovery_home, "region-b")  # read blobs first: a manifest always comes after them
        count = len(manifest_files(recovery_home, lineage))
        if baseline.get("count") != count:
            baseline.update(count=count, blobs=blobs)
            return False
        return count >= 1 and bool(blobs - baseline["blobs"])

    kill_when(run, heavy_save_in_flight, "a heavy save in flight", interval=FAST_POLL)

    store = CheckpointStore.default(recovery_home)
    referenced = {
        str(recovery_home / "regions" / "region-b" / blob_key(chunk.digest))
        for info in store.list(lineage)
        for entry in store.core.resolve(lineage, info.version)[0].entries
        for chunk in entry.chunks
    }
    torn = blob_files(recovery_home, "region-b") - referenced
    if not torn:
        warnings.warn("the save finished before the kill landed; this run tested a kill between saves", stacklevel=1)
    resume_and_compare(reference, recovery_home, lineage, api_url, tmp_path / "logs")


def test_kill_during_evaluation(reference, api_url, recovery_home, tmp_path):
    lineage = "killed-in-eval"
    run = start_demo(recovery_home, lineage, api_url, tmp_path / "logs")

    triggers: dict[Path, str] = {}  # manifests are immutable: read each one once

    def train_end_committed() -> bool:
        for path in manifest_files(recovery_home, lineage):
            if path not in triggers:
                triggers[path] = json.loads(path.read_bytes())["metadata"].get("trigger")
        return "milestone:train_end" in triggers.values()

    kill_when(run, train_end_committed, "the train_end checkpoint", interval=FAST_POLL)

    infos = CheckpointStore.default(recovery_home).list(lineage)
    committed = [i.metadata["trigger"] for i in infos]
    assert "milestone:final" not in committed, "the run finished before the kill landed"
    assert committed[-1] == "milestone:train_end" and infos[-1].step == STEPS
    result = resume_and_compare(reference, recovery_home, lineage, api_url, tmp_path / "logs")
    assert result["resumed_from"] == {"version": infos[-1].version, "step": STEPS}
    # nothing was trained again: the resumed run went straight to evaluate and finalize
    assert [i.metadata["trigger"] for i in CheckpointStore.default(recovery_home).list(lineage)] == [
        *committed,
        "milestone:final",
    ]


# -- SIGTERM: emergency checkpoint ------------------------------------------------------------------------------------
def test_sigterm_writes_an_emergency_checkpoint_and_the_resume_is_identical(
    reference, api_url, recovery_home, tmp_path
):
    lineage = "preempted"
    store = CheckpointStore.default(recovery_home)
    run = start_demo(recovery_home, lineage, api_url, tmp_path / "logs")

    kill_when(run, lambda: len(store.list(lineage)) >= 2, "two committed checkpoints", sig=signal.SIGTERM)
    try:
        run.process.wait(120)  # the emergency save is one synchronous heavy save
    except subprocess.TimeoutExpired:
        os.killpg(run.process.pid, signal.SIGKILL)
        run.process.wait()
        pytest.fail(f"demo did not exit within 120 s of SIGTERM\n{run.tail()}")

    assert run.process.returncode == PREEMPTED_EXIT_CODE, run.tail()
    infos = store.list(lineage)
    emergency = infos[-1]
    assert emergency.metadata["trigger"] == "emergency", [i.metadata for i in infos]
    assert infos[-2].step < emergency.step < STEPS
    result = resume_and_compare(reference, recovery_home, lineage, api_url, tmp_path / "logs")
    assert result["resumed_from"] == {"version": emergency.version, "step": emergency.step}


# -- the Python RNG and Prefect's websocket keepalive ------------------------------------------------------------------
def test_python_rng_is_not_polluted_by_prefect_keepalive(reference, api_url, recovery_home, tmp_path):
    """The unpatched CLI, paused for 21 s after its first checkpoint (what a training step of 21 s, or any
    longer run, looks like to the websocket keepalive); no fault at all, so it must match the reference."""
    lineage = "paused"
    run = start_demo(recovery_home, lineage, api_url, tmp_path / "logs", command=CLI)
    try:
        kill_when(run, lambda: bool(manifest_files(recovery_home, lineage)), "the first checkpoint", sig=signal.SIGSTOP)
        time.sleep(21)
    finally:
        if run.process.poll() is None:
            os.killpg(run.process.pid, signal.SIGCONT)
    result = run.result()

    state, _info = final_state(recovery_home, lineage, STEPS)
    differing = differing_leaves(reference.state, state)
    if differing:  # no fault here: issue 18's divergence is reported with its figures
        fail_if_rounding(lineage, (reference.home, reference.lineage), (recovery_home, lineage))
    assert differing == []
    assert result["final_digest"] == reference.result["final_digest"]


def test_crash_test_command(api_url, recovery_home):
    """``prefect-recovery crash-test``: the product's own check, as a user runs it (unpatched CLI)."""
    done = subprocess.run(
        [*CLI, "crash-test", "--json", "--steps", str(STEPS), "--kill-after", "2", "--seed", str(SEED)],
        capture_output=True,
        text=True,
        timeout=3 * RUN_TIMEOUT,
        env=demo_env(recovery_home, api_url),
        cwd=REPO,
    )
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"crash-test printed no JSON (rc={done.returncode})\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")

    assert report["killed"] is True, "the run finished before crash-test could kill it"
    assert report["killed_after"]["version"] >= 2
    assert report["resumed"]["resumed_from"] == report["killed_after"]
    if not report["identical"]:
        differ = differing_leaves(
            final_state(recovery_home, report["reference"]["lineage"], STEPS)[0],
            final_state(recovery_home, report["resumed"]["lineage"], STEPS)[0],
        )
        assert differ, "crash-test says different, but every tensor and value is equal"
        pytest.fail(f"resumed run differs from the uninterrupted one at {differ[:20]}")
    assert done.returncode == 0
    assert report["resumed"]["final_digest"] == report["reference"]["final_digest"]


# -- a finished lineage ------------------------------------------------------------------------------------------------
def test_demo_on_a_finished_lineage_reports_finished_and_writes_nothing(reference, api_url, tmp_path):
    def snapshot() -> dict[str, tuple[int, int]]:
        found = {}
        for dirpath, _dirs, files in os.walk(reference.home):
            for name in files:
                stat = os.stat(os.path.join(dirpath, name))
                found[os.path.join(dirpath, name)] = (stat.st_size, stat.st_mtime_ns)
        return found

    before = snapshot()
    result = start_demo(reference.home, reference.lineage, api_url, tmp_path / "logs").result()

    assert result["status"] == "finished"
    assert result["resumed_from"] is None
    assert result["final_version"] == reference.result["final_version"]
    assert result["final_digest"] == reference.result["final_digest"]
    assert snapshot() == before
