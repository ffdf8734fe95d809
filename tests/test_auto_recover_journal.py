"""Auto-recovery of any pipeline, on a real Prefect server with ``serve``: the lineage comes from the journal.

The pipeline (tests/helpers/derived_lineage_pipeline.py) has no ``lineage`` parameter: its lineage is derived
from two parameters. The auto-recover automation passes the crashed run's id; ``recover`` finds the lineage
whose journal holds that run's events (core/run_lookup.py). A run that journaled nothing is reported as such,
never guessed. A recovery whose process dies (Crashed) is started again with attempt + 1, at most
``--max-attempts`` times; the attempt past it is refused and changes nothing.

Processes are killed with SIGKILL (the pid the blocked step wrote); ``serve``'s runner sees its child die and
marks the run Crashed, which emits the event the automations match.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import CLI, REPO
from helpers.derived_lineage_pipeline import DEPLOYMENT, lineage_of, prepare, train
from helpers.live_prefect import LiveServer, api, deployment_id, flow_runs, live_server, stop, wait_for

from prefect_recovery import CheckpointStore
from prefect_recovery.core.journal import Journal
from prefect_recovery.core.run_lookup import lineages_of_run
from prefect_recovery.deploy import RECOVER_AGAIN_AUTOMATION, RECOVER_AUTOMATION
from prefect_recovery.tasks.step import value_digest

MAX_ATTEMPTS = 2
TIMEOUT = 300
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class Live:
    def __init__(self, tmp: Path, server: LiveServer, home: Path, serve: subprocess.Popen) -> None:
        self.tmp, self.server, self.home, self.serve = tmp, server, home, serve
        self.block, self.trace = tmp / "block", tmp / "trace"

    def store(self) -> CheckpointStore:
        return CheckpointStore.default(self.home)

    def logs(self) -> str:
        return "\n".join(
            f"----- {log.name} (tail) -----\n{log.read_text(errors='replace')[-6000:]}"
            for log in sorted(self.tmp.glob("*.log"))
        )

    def pids(self) -> list[int]:
        return [int(line) for line in self.trace.read_text().split()] if self.trace.exists() else []

    def run(self, run_id: str) -> dict[str, Any]:
        return api(self.server, "GET", f"/flow_runs/{run_id}")  # type: ignore[return-value]

    def final(self, run_id: str, what: str) -> dict[str, Any]:
        return wait_for(lambda: (r := self.run(run_id))["state_type"] in TERMINAL and r, TIMEOUT, what, interval=2)

    def recoveries(self, **parameters: Any) -> list[dict[str, Any]]:
        runs = flow_runs(self.server, deployment="recover/recover")
        return [r for r in runs if all(r["parameters"].get(k) == v for k, v in parameters.items())]

    def create(self, deployment: str, parameters: dict[str, Any], later: bool = False) -> str:
        body: dict[str, Any] = {"parameters": parameters}
        if later:  # a run no one picks up: crashed by the test through the API
            at = (datetime.now(UTC) + timedelta(days=1)).isoformat()
            body["state"] = {"type": "SCHEDULED", "name": "Scheduled", "state_details": {"scheduled_time": at}}
        path = f"/deployments/{deployment_id(self.server, deployment)}/create_flow_run"
        return api(self.server, "POST", path, body)["id"]  # type: ignore[index]

    def crash_via_api(self, run_id: str) -> None:
        state = {"type": "CRASHED", "name": "Crashed", "message": "test crash"}
        api(self.server, "POST", f"/flow_runs/{run_id}/set_state", {"state": state, "force": True})


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("auto-recover-journal")
    home = tmp / "recovery-home"
    with live_server(tmp) as server:
        env = server.env(
            PREFECT_RECOVERY_HOME=str(home),
            PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
            PREFECT_RECOVERY_PIPELINES="helpers.derived_lineage_pipeline",
            DERIVED_TEST_TRACE=str(tmp / "trace"),
            DERIVED_TEST_BLOCK=str(tmp / "block"),
            PREFECT_RUNNER_POLL_FREQUENCY="2",
        )
        with (tmp / "serve.log").open("wb") as out:
            serve = subprocess.Popen(
                [sys.executable, "-c", "from helpers.derived_lineage_pipeline import serve; serve()"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=tmp,
                start_new_session=True,
            )
        live = Live(tmp, server, home, serve)
        try:
            wait_for(
                lambda: deployment_id(server, DEPLOYMENT) and deployment_id(server, "recover/recover"),
                180,
                f"serve's deployments\n{live.logs()}",
            )
            yield live
        finally:
            stop(serve)


@pytest.fixture(scope="module")
def installed(live: Live) -> list[dict[str, Any]]:
    done = subprocess.run(
        [*CLI, "automations", "install", "--json", "--deployment", DEPLOYMENT, "--max-attempts", str(MAX_ATTEMPTS)],
        capture_output=True,
        text=True,
        timeout=180,
        env=live.server.env(),
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def wait_pids(live: Live, count: int) -> int:
    return wait_for(lambda: len(pids := live.pids()) >= count and pids[count - 1], TIMEOUT, f"blocked process {count}")


@pytest.mark.slow
def test_derived_lineage_is_recovered_and_so_is_a_crashed_recovery(live: Live, installed: list[dict]) -> None:
    assert [row["automation"] for row in installed][1:] == [RECOVER_AUTOMATION, RECOVER_AGAIN_AUTOMATION]
    lineage = lineage_of("exp", 3)
    live.block.touch()
    try:
        run_id = live.create(DEPLOYMENT, {"experiment": "exp", "seed": 3})
        os.kill(wait_pids(live, 1), signal.SIGKILL)  # the pipeline run, blocked in `train`
        assert live.final(run_id, "the killed run")["state_type"] == "CRASHED"

        # the automation passes the run's id, no lineage: recover reads it from the journal
        first = wait_for(lambda: live.recoveries(crashed_run=run_id), 120, "the automation's recovery")
        assert len(first) == 1 and first[0]["parameters"].get("lineage") is None, first
        assert first[0]["created_by"]["type"] == "AUTOMATION"

        pid = wait_pids(live, 2)  # the recovery re-runs `train`, and blocks too: kill it
        history = Journal(live.store().core, lineage).history()
        assert [r.run_id for r in history.recoveries] == [first[0]["id"]]
        os.kill(pid, signal.SIGKILL)
    finally:
        live.block.unlink()  # the next recovery goes through
    assert live.final(first[0]["id"], "the killed recovery")["state_type"] == "CRASHED"

    def second() -> list[dict]:
        return [r for r in live.recoveries(crashed_run=run_id) if r["id"] != first[0]["id"]]

    (again,) = wait_for(second, 120, "the recovery of the crashed recovery")
    assert again["parameters"]["attempt"] == 2 and again["parameters"]["max_attempts"] == MAX_ATTEMPTS, again
    done = live.final(again["id"], "the second recovery")
    assert done["state_type"] == "COMPLETED", f"{done['state']}\n{live.logs()}"

    history = Journal(live.store().core, lineage).history()
    assert history.status == "finished"
    assert [r.run_id for r in history.recoveries] == [first[0]["id"], again["id"]]
    assert history.recoveries[0].finished is None  # killed: it never journaled its end
    assert history.recoveries[1].finished["status"] == "completed"
    expected = value_digest(train.fn(prepare.fn(3), 3))  # the uninterrupted computation, in this process
    assert history.final["final_digest"] == expected


@pytest.mark.slow
def test_a_run_that_journaled_nothing_is_reported_not_guessed(live: Live, installed: list[dict]) -> None:
    store = live.store()
    before = {lineage: len(Journal(store.core, lineage).events()) for lineage in store.lineages()}
    run_id = live.create(DEPLOYMENT, {"experiment": "never", "seed": 1}, later=True)
    live.crash_via_api(run_id)
    (recovery,) = wait_for(lambda: live.recoveries(crashed_run=run_id), 120, "the automation's recovery")
    done = live.final(recovery["id"], "the recovery")
    assert done["state_type"] == "FAILED", done["state"]
    message = done["state"]["message"]
    assert f"flow run {run_id} journaled nothing" in message and "recover --lineage" in message, message
    after = {lineage: len(Journal(store.core, lineage).events()) for lineage in store.lineages()}
    assert after == before, "a recovery of an unknown lineage changed the store"


@pytest.mark.slow
def test_crashed_recoveries_stop_at_max_attempts(live: Live, installed: list[dict]) -> None:
    crashed = live.create(
        "recover/recover", {"crashed_run": "c0ffee", "attempt": MAX_ATTEMPTS, "max_attempts": MAX_ATTEMPTS}, later=True
    )
    live.crash_via_api(crashed)
    (last,) = wait_for(
        lambda: live.recoveries(crashed_run="c0ffee", attempt=MAX_ATTEMPTS + 1), 120, "the attempt past the limit"
    )
    done = live.final(last["id"], "the refused recovery")
    assert done["state_type"] == "FAILED", done["state"]
    assert f"recovery attempt {MAX_ATTEMPTS + 1}" in done["state"]["message"], done["state"]
    assert "refused" in done["state"]["message"]
    # a Failed recovery starts nothing: the automation that starts recoveries again matches Crashed only
    again = next(
        a for a in api(live.server, "POST", "/automations/filter", {}) if a["name"] == RECOVER_AGAIN_AUTOMATION
    )
    assert again["trigger"]["expect"] == ["prefect.flow-run.Crashed"]


def test_lineages_of_run_reads_candidates_first(tmp_path: Path) -> None:
    """The lookup on a real store: a candidate that holds the run costs one journal read; without one every
    base lineage is read; a run id no journal holds is found nowhere."""
    store = CheckpointStore.default(tmp_path).core
    for lineage, run in [("a", "run-a"), ("b", "run-b"), ("c", "run-c")]:
        Journal(store, lineage).append("run_started", run_id=run, data={"pipeline": "p", "parameters": {}})
    hit = lineages_of_run(store, "run-b", candidates=["b", 7, "no such/name"])
    assert hit.lineages == ["b"] and hit.searched == 1 and not hit.scanned_all
    scan = lineages_of_run(store, "run-c", candidates=["a"])
    assert scan.lineages == ["c"] and scan.searched == 3 and scan.scanned_all
    assert lineages_of_run(store, "run-z").lineages == []
