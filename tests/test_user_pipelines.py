"""Two pipelines a user wrote from the README (not the example), killed with SIGKILL at every step boundary,
inside a save, inside evaluation and inside their recovery, then recovered from the CLI and from the Python
API: the final state (and the exported result) must be bit-identical to an uninterrupted run every time.

* ``helpers/user_pipeline_steps.py``: make-data -> normalize -> train -> evaluate -> export ``@step``s; a GRU
  with dropout, AdamW, OneCycleLR, gradient clipping, accumulation every 2 batches, heavy / light / timebox /
  milestone triggers; the flow returns None.
* ``helpers/user_pipeline_loop.py``: a plain loop in the flow over a ``StatefulDataLoader`` with
  ``shuffle=True``, no generator and two workers drawing random augmentation; returns None.

Kill points (``helpers/kill_points.py``): ``stored:<step>`` (the step's result is committed, the journal does
not know yet), ``after:<step>`` (the journal recorded the step, the next has not started), ``committed:<n>``
(the n-th heavy checkpoint is committed, its journal record not yet written) and ``evaluate``. Every run and
every CLI recovery is a real process on the session's Prefect server; the killed store is copied, one copy
recovered by ``prefect-recovery recover --json``, the other by calling the ``recover`` flow in this process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import CLI, REPO
from helpers import user_pipeline_loop, user_pipeline_steps  # noqa: F401  (registers both pipelines here)
from helpers.kill_points import KILL_ENV, MARKER_ENV

from prefect_recovery.core.journal import Journal

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
TIMEOUT = 300
STEPS_MODULE, LOOP_MODULE = "helpers.user_pipeline_steps", "helpers.user_pipeline_loop"
STEPS_POINTS = [
    "stored:make-data",
    "after:make-data",
    "stored:normalize",
    "after:normalize",
    "committed:2",
    "stored:train",
    "after:train",
    "evaluate",
    "stored:evaluate",
    "stored:export",
]
LOOP_POINTS = ["stored:prepare", "after:prepare", "committed:2", "evaluate"]


@pytest.fixture(scope="module")
def api_url(prefect_server) -> str:
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


def environ(home: Path, api_url: str, module: str, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in (KILL_ENV, MARKER_ENV)}
    env.update(
        PREFECT_RECOVERY_HOME=str(home),
        PREFECT_API_URL=api_url,
        PREFECT_RECOVERY_PIPELINES=module,
        PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")])),
        **extra,
    )
    return env


def start(args: list[str], env: dict[str, str], logs: Path, name: str) -> subprocess.Popen[bytes]:
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{name}.out", "wb") as out, open(logs / f"{name}.err", "wb") as err:
        return subprocess.Popen(args, stdout=out, stderr=err, env=env, cwd=REPO, start_new_session=True)


def tail(logs: Path, name: str) -> str:
    return "".join(f"\n{p.name}:\n{p.read_text()[-3000:]}" for p in (logs / f"{name}.out", logs / f"{name}.err"))


def run_killed_at(args: list[str], env: dict[str, str], point: str, logs: Path, name: str) -> None:
    """Start ``args`` holding at ``point``; SIGKILL its process group once it is there."""
    marker = logs / f"{name}.marker"
    process = start(args, {**env, KILL_ENV: point, MARKER_ENV: str(marker)}, logs, name)
    deadline = time.monotonic() + TIMEOUT
    try:
        while not marker.exists():
            if process.poll() is not None:
                pytest.fail(f"{name} exited ({process.returncode}) before reaching {point}{tail(logs, name)}")
            if time.monotonic() > deadline:
                pytest.fail(f"{name} never reached {point}{tail(logs, name)}")
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def run_to_end(args: list[str], env: dict[str, str], logs: Path, name: str) -> str:
    process = start(args, env, logs, name)
    try:
        code = process.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        pytest.fail(f"{name} did not finish{tail(logs, name)}")
    assert code == 0, f"{name} exited {code}{tail(logs, name)}"
    return (logs / f"{name}.out").read_text()


def outcome(home: Path, lineage: str) -> dict[str, Any]:
    """What a run ended with, from the store: the journal's final digest and each step's last result.

    A result is compared by its digest, except that a checkpoint version in it (train's ``{"version": ...}``)
    is replaced by the state digest of the checkpoint it names: a version number counts the checkpoints a run
    wrote, and the 0.5 s ``Timebox`` trigger writes one more whenever a stretch of steps takes longer, so two
    runs that trained bit-identically (equal states) on a loaded machine may number their last one v7 and v8.
    """
    from prefect_recovery import CheckpointStore, state_digest
    from prefect_recovery.tasks.step import value_digest
    from prefect_recovery.training.state_io import load_state

    store = CheckpointStore.default(home)
    events = Journal(store.core, lineage).events()
    finished = [e for e in events if e.kind == "run_finished"]
    assert finished, f"{lineage} has no run_finished"
    outputs = {}
    for event in (e for e in events if e.kind == "step_completed"):
        state, _ = load_state(store.core, lineage=f"{lineage}.steps", version=event.data["result_version"])
        result = state["result"]
        assert value_digest(result) == event.data["output_digest"], f"{event}: the journal names another result"
        if isinstance(result, dict) and "version" in result:
            result = {**result, "version": state_digest(store, lineage, result["version"])}
        outputs[event.data["step"]] = value_digest(result)
    return {"final_digest": finished[-1].data["final_digest"], "outputs": outputs}


REFERENCES: dict[str, dict[str, Any]] = {}


def reference(module: str, api_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if module not in REFERENCES:
        home = tmp_path_factory.mktemp("reference")
        run_to_end([*CLI[:1], "-m", module, "ref"], environ(home, api_url, module), home / "logs", "reference")
        REFERENCES[module] = outcome(home, "ref")
        assert REFERENCES[module]["final_digest"], REFERENCES[module]
    return REFERENCES[module]


def recover_both_ways(home: Path, module: str, lineage: str, api_url: str, expected: dict[str, Any], monkeypatch):
    """Recover a copy of ``home`` through the CLI and the original through the Python API; both must match."""
    copy = home.parent / f"{home.name}-cli"
    shutil.copytree(home / "regions", copy / "regions")
    out = run_to_end([*CLI, "recover", "--json", "--lineage", lineage], environ(copy, api_url, module),
                     home.parent / "logs", "recover-cli")  # fmt: skip
    payload = json.loads(out)
    assert payload["status"] == "recovered", payload
    assert payload["final_digest"] == expected["final_digest"]
    assert outcome(copy, lineage) == expected

    from prefect_recovery.flows.recover import recover

    monkeypatch.setenv("PREFECT_RECOVERY_HOME", str(home))
    result = recover(lineage=lineage)
    assert result["status"] == "recovered" and result["final_digest"] == expected["final_digest"], result
    assert outcome(home, lineage) == expected
    # a finished lineage is reported with its real final version and digest, nothing re-run
    again = recover(lineage=lineage)
    assert again["status"] == "finished" and again["final_digest"] == expected["final_digest"], again
    assert again["final_version"] == result["final_version"]


@pytest.mark.parametrize(
    ("module", "point"),
    [(STEPS_MODULE, point) for point in STEPS_POINTS] + [(LOOP_MODULE, point) for point in LOOP_POINTS],
)
def test_killed_and_recovered_bit_identically(module, point, api_url, tmp_path, tmp_path_factory, monkeypatch):
    expected = reference(module, api_url, tmp_path_factory)
    home = tmp_path / "home"
    run_killed_at([*CLI[:1], "-m", module, "run"], environ(home, api_url, module), point, tmp_path / "logs", "run")
    recover_both_ways(home, module, "run", api_url, expected, monkeypatch)


@pytest.mark.parametrize("module", [STEPS_MODULE, LOOP_MODULE])
def test_a_recovery_killed_inside_its_training_is_recovered_again(module, api_url, tmp_path, tmp_path_factory,
                                                                  monkeypatch):  # fmt: skip
    expected = reference(module, api_url, tmp_path_factory)
    home, logs = tmp_path / "home", tmp_path / "logs"
    env = environ(home, api_url, module)
    run_killed_at([*CLI[:1], "-m", module, "run"], env, "committed:1", logs, "run")
    # the recovery resumes from checkpoint 1 and is killed inside its own next save
    run_killed_at([*CLI, "recover", "--json", "--lineage", "run"], env, "committed:1", logs, "recovery")
    recover_both_ways(home, module, "run", api_url, expected, monkeypatch)
