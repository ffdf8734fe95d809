"""Issue 15 tried from outside, the way a platform engineer would, on one Prefect server on PostgreSQL: the cases
the other production tests leave out.

* ``automations install`` as a user types it: two ``--deployment`` options and a ``--tag``, run twice (no
  duplicate automations), then a narrower scope (the last install wins); what Prefect then does with crashes of
  runs in and out of the scope; refusals (an unknown deployment, a zombie window shorter than two heartbeats, an
  empty tag, no server answering) each one line, exit 2, no traceback, nothing changed on the server.
* ``recover --crashed-run ID`` (the operator's form of what the automation does) for a run id nothing journaled,
  a run of a pipeline that is not registered, a run that finished, a run whose lineage a live run still holds,
  and, once that run is SIGKILLed, the recovery itself, bit-identical to the uninterrupted computation.
* The quiet CLI: every command a user runs against the server (demo, recover, verify, audit, history,
  replay-check, automations install) exits with thousands of events still queued and prints no queue-draining
  noise; the progress bars of ``replay-check`` and ``audit`` on a pseudo-terminal, none with ``--json`` (on a
  terminal too) or when piped.
* (slow) A user's pipeline that is not in this repository (WaveFit, written to a git repository in the test's
  directory) deployed with ``prefect deploy`` from its own prefect.yaml in the documented production form: a
  ``git_clone`` pull step (of a ``file://`` URL: no network) then ``prepare_run`` with ``{{ clone.directory }}``,
  run by a process worker whose host has no copy of the code; its flow-run process SIGKILLed mid-training, the
  automation's recovery (which clones the code again) finishes it bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import CLI, REPO
from helpers.derived_lineage_pipeline import lineage_of, prepare, train
from helpers.live_prefect import BIN, LiveServer, api, deployment_id, flow_runs, stop, wait_for
from helpers.postgres import postgres_database
from helpers.prefect_events import BACKLOG_CLI
from helpers.production_stack import _start_server, kill_tree
from helpers.terminal import run_on_a_terminal

from prefect_recovery import CheckpointStore
from prefect_recovery.core.journal import Journal
from prefect_recovery.deploy import RECOVER_AGAIN_AUTOMATION, RECOVER_AUTOMATION, ZOMBIE_AUTOMATION
from prefect_recovery.tasks.step import value_digest

TIMEOUT = 300
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
NAMES = (ZOMBIE_AUTOMATION, RECOVER_AUTOMATION, RECOVER_AGAIN_AUTOMATION)


# -- the server ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """``prefect server start`` on a fresh PostgreSQL database (dropped afterwards)."""
    tmp = tmp_path_factory.mktemp("outside-server")
    with postgres_database() as database_url:
        live = _start_server(tmp, database_url)
        try:
            yield live
        finally:
            stop(live.process)


def cli(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=cwd)


def cli_all(
    env: dict[str, str], commands: list[list[str]], cwd: Path | None = None, envs: list[dict[str, str]] | None = None
) -> list[subprocess.CompletedProcess]:
    """Several independent commands at once (each start costs seconds of imports): their results, in order.
    ``envs`` gives each command its own environment instead of ``env``."""
    pipe = subprocess.PIPE
    started = [
        (args, subprocess.Popen([*CLI, *args], stdout=pipe, stderr=pipe, text=True, env=own, cwd=cwd))
        for args, own in zip(commands, envs or [env] * len(commands), strict=True)
    ]
    results = []
    for args, process in started:
        out, err = process.communicate(timeout=TIMEOUT)
        results.append(subprocess.CompletedProcess(args, process.returncode, out, err))
    return results


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The single ``error: ...`` line a refused command prints: no traceback, nothing else on stderr."""
    assert "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    return lines[0]


def error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The ``error: ...`` line of a command refused inside a flow run (Prefect logs the run's own lines above
    it): one such line, at the end, and no traceback."""
    assert "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], done.stderr[-3000:]
    return errors[0]


# -- automations install ------------------------------------------------------------------------------------------
def make_deployment(server: LiveServer, flow: str, name: str, tags: list[str]) -> str:
    flow_id = api(server, "POST", "/flows/", {"name": flow})["id"]  # type: ignore[index]
    body = {"name": name, "flow_id": flow_id, "tags": tags, "entrypoint": f"{flow}.py:{flow}"}
    return api(server, "POST", "/deployments/", body)["id"]  # type: ignore[index]


def automations(server: LiveServer) -> list[dict[str, Any]]:
    return api(server, "POST", "/automations/filter", {})  # type: ignore[return-value]


def crash(server: LiveServer, deployment: str) -> str:
    """A run of ``deployment`` set Crashed through the API (the same event, with the same related resources, as
    a run whose process died). Scheduled a day ahead: no worker may pick it up first."""
    later = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 86400))
    scheduled = {"type": "SCHEDULED", "name": "Scheduled", "state_details": {"scheduled_time": later}}
    path = f"/deployments/{deployment_id(server, deployment)}/create_flow_run"
    run_id = api(server, "POST", path, {"parameters": {}, "state": scheduled})["id"]  # type: ignore[index]
    state = {"type": "CRASHED", "name": "Crashed", "message": "test crash"}
    api(server, "POST", f"/flow_runs/{run_id}/set_state", {"state": state, "force": True})
    return run_id


def recoveries(server: LiveServer) -> dict[str, dict[str, Any]]:
    """The recover runs on the server, by the ``crashed_run`` they were given."""
    return {str(r["parameters"].get("crashed_run")): r for r in flow_runs(server, deployment="recover/recover")}


@pytest.fixture(scope="module")
def deployments(server: LiveServer) -> dict[str, str]:
    """Deployment records (no worker runs them): the automations' actions are checked, not their execution."""
    made = {}
    for flow, name, tags in [
        ("recover", "recover", ["prefect-recovery"]),
        ("alpha-train", "nightly", []),
        ("beta-train", "weekly", []),
        ("gamma-train", "adhoc", ["gpu"]),  # --tag gpu
        ("unrelated", "etl", ["etl"]),
    ]:
        made[f"{flow}/{name}"] = make_deployment(server, flow, name, tags)
    return made


def test_install_for_two_deployments_and_a_tag_twice_then_narrower(
    server: LiveServer, deployments: dict[str, str]
) -> None:
    env = server.env()
    args = ("automations", "install", "--json", "--deployment", "alpha-train/nightly",
            "--deployment", "beta-train/weekly", "--tag", "gpu", "--zombie-after", "90")  # fmt: skip
    first = cli(env, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert [row["action"] for row in json.loads(first.stdout)] == ["created"] * 3
    again = cli(env, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    rows = json.loads(again.stdout)
    assert [row["action"] for row in rows] == ["updated"] * 3, rows
    assert rows[0]["scope"] == {"deployments": ["alpha-train/nightly", "beta-train/weekly"], "tags": ["gpu"]}
    found = automations(server)
    assert sorted(a["name"] for a in found) == sorted(NAMES), "install duplicated or left others behind"

    by_name = {a["name"]: a for a in found}
    ids = {name: f"prefect.deployment.{i}" for name, i in deployments.items()}
    zombie = by_name[ZOMBIE_AUTOMATION]["trigger"]
    assert zombie["within"] == 90
    assert sorted(zombie["match_related"]["prefect.resource.id"]) == sorted(
        [ids["alpha-train/nightly"], ids["beta-train/weekly"], ids["recover/recover"], "prefect.tag.gpu"]
    )
    scope = by_name[RECOVER_AUTOMATION]["trigger"]["match_related"][0]["prefect.resource.id"]
    assert sorted(scope) == sorted([ids["alpha-train/nightly"], ids["beta-train/weekly"], "prefect.tag.gpu"])

    # what the server then does: one recovery per crash in the scope, none for the unrelated run
    outside = crash(server, "unrelated/etl")
    inside = [crash(server, name) for name in ("alpha-train/nightly", "beta-train/weekly", "gamma-train/adhoc")]
    wait_for(lambda: set(inside) <= set(recoveries(server)), 90, "a recovery of each crash in the scope")
    assert outside not in recoveries(server)

    # a narrower install replaces the scope: beta's crash (made first) starts nothing any more, alpha's does;
    # a duplicate left by two installs that raced (both found none, both created) is removed
    duplicate = {k: v for k, v in by_name[RECOVER_AUTOMATION].items() if k in ("name", "description", "enabled",
                                                                              "trigger", "actions")}  # fmt: skip
    api(server, "POST", "/automations/", duplicate)
    assert [a["name"] for a in automations(server)].count(RECOVER_AUTOMATION) == 2
    narrow = cli(env, "automations", "install", "--deployment", "alpha-train/nightly", "--zombie-after", "90")
    assert narrow.returncode == 0, narrow.stderr[-3000:]
    assert narrow.stdout.splitlines() == [  # one line each, never wrapped at 80 columns when piped
        f"updated: {ZOMBIE_AUTOMATION} (runs of alpha-train/nightly)",
        f"updated: {RECOVER_AUTOMATION} (runs of alpha-train/nightly)",
        f"updated: {RECOVER_AGAIN_AUTOMATION} (runs of recover runs, at most 3 attempts)",
    ], narrow.stdout
    assert sorted(a["name"] for a in automations(server)) == sorted(NAMES)
    zombie = next(a for a in automations(server) if a["name"] == ZOMBIE_AUTOMATION)["trigger"]
    assert sorted(zombie["match_related"]["prefect.resource.id"]) == sorted(
        [ids["alpha-train/nightly"], ids["recover/recover"]]
    )
    beta, alpha = crash(server, "beta-train/weekly"), crash(server, "alpha-train/nightly")
    wait_for(lambda: alpha in recoveries(server), 90, "the recovery of alpha's crash")
    assert beta not in recoveries(server)
    # the recover runs of these fake crashes must not reach a worker of a later test
    for run in flow_runs(server, deployment="recover/recover"):
        api(server, "DELETE", f"/flow_runs/{run['id']}")


def test_install_refusals_are_one_line_and_change_nothing(server: LiveServer, deployments: dict[str, str]) -> None:
    env = server.env()
    before = automations(server)
    unreachable = f"http://127.0.0.1:{free_port()}/api"
    cases = {
        "'no-such/flow' does not exist": ["--deployment", "alpha-train/nightly", "--deployment", "no-such/flow"],
        "at least 60 s": ["--zombie-after", "30"],
        "empty tag": ["--tag", " "],
        # no server answers: the message names the URL, not "deploy the deployments first"
        f"no Prefect server answers at {unreachable}": ["--deployment", "a/b"],
    }
    commands = [["automations", "install", *args] for args in cases.values()]
    commands.append(["automations", "install", "--json", *cases["at least 60 s"]])
    envs = [env, env, env, {**env, "PREFECT_API_URL": unreachable}, env]
    *plain, as_json = cli_all(env, commands, envs=envs)
    for (expected, args), done in zip(cases.items(), plain, strict=True):
        assert done.returncode == 2, (args, done.stdout, done.stderr[-2000:])
        assert expected in one_error_line(done), (args, done.stderr)
    assert as_json.returncode == 2 and "at least 60 s" in json.loads(as_json.stdout)["error"], as_json.stdout
    assert automations(server) == before  # nothing created, updated or deleted


def test_store_block_commands_when_no_server_answers(tmp_path: Path) -> None:
    """A laptop whose PREFECT_API_URL names a server that is down (VPN off): every command given ``--store BLOCK``
    says so in one line (JSON with --json), exit 2; none calls it an unexpected error or a failed pipeline."""
    unreachable = f"http://127.0.0.1:{free_port()}/api"
    env = {**os.environ, "PREFECT_API_URL": unreachable, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    commands = [
        ["recover", "--store", "prod", "--lineage", "x"],  # said "the pipeline failed", no pipeline having run
        ["ls", "--store", "prod", "--json"],
        ["demo", "--lineage", "down", "--steps", "10"],  # the default store: only the flow run needs the server
    ]
    *plain, as_json, demo = cli_all(env, commands, cwd=tmp_path)
    expected = f"cannot load the CheckpointStore block 'prod': no Prefect server answers at {unreachable}"
    for done in plain:
        assert done.returncode == 2, (done.args, done.stderr[-2000:])
        assert expected in one_error_line(done), done.stderr
    assert as_json.returncode == 2 and expected in json.loads(as_json.stdout)["error"], as_json.stdout
    assert demo.returncode == 2, demo.stderr[-2000:]
    line = error_line(demo)  # not "the pipeline failed": no pipeline ran
    assert f"cannot start the flow run: no Prefect server answers at {unreachable}" in line, line


def free_port() -> int:
    from helpers.live_prefect import free_port as port

    return port()


# -- recover --crashed-run ----------------------------------------------------------------------------------------
class Pipelines:
    """The user's pipeline of tests/helpers/derived_lineage_pipeline.py (its lineage is derived from two
    parameters) run as real processes against the server, and the CLI, all on one embedded store."""

    def __init__(self, server: LiveServer, tmp: Path) -> None:
        self.tmp, self.home = tmp, tmp / "recovery-home"
        self.block, self.trace = tmp / "block", tmp / "trace"
        self.env = server.env(
            PREFECT_RECOVERY_HOME=str(self.home),
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")])),
            PREFECT_RECOVERY_PIPELINES="helpers.derived_lineage_pipeline",
            DERIVED_TEST_TRACE=str(self.trace),
            DERIVED_TEST_BLOCK=str(self.block),
        )

    def store(self) -> CheckpointStore:
        return CheckpointStore.default(self.home)

    def start(self, experiment: str, seed: int, host: str | None = None) -> subprocess.Popen:
        """A run of the pipeline; with ``host``, in a UTS namespace of its own whose host name is ``host``: to the
        store it ran on another machine (a pid this one cannot check), though it is a process here."""
        code = "import sys; from helpers.derived_lineage_pipeline import derived_lineage_pipeline as p; " \
               "p(experiment=sys.argv[1], seed=int(sys.argv[2]))"  # fmt: skip
        command = [sys.executable, "-c", code, experiment, str(seed)]
        if host is not None:
            command = ["unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh", *command]
        return subprocess.Popen(command, env=self.env, cwd=self.tmp, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip

    def pids(self) -> list[str]:
        """The pids of the runs that blocked in their train step, oldest first."""
        return self.trace.read_text().split() if self.trace.exists() else []

    def blocked(self, seen: int) -> str:
        """The pid of the next run to block in its train step, once ``seen`` had blocked before it."""
        return wait_for(lambda: len(pids := self.pids()) > seen and pids[seen], TIMEOUT, "a run to block in train")

    def run_id(self, lineage: str) -> str:
        (started,) = [e for e in Journal(self.store().core, lineage).events() if e.kind == "run_started"]
        return str(started.run_id)

    def journals(self) -> dict[str, int]:
        store = self.store()
        return {lineage: len(Journal(store.core, lineage).events()) for lineage in store.lineages()}

    def recover(self, *args: str) -> subprocess.CompletedProcess[str]:
        return cli(self.env, "recover", *args, cwd=self.tmp)


@pytest.fixture(scope="module")
def pipelines(server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Pipelines:
    found = Pipelines(server, tmp_path_factory.mktemp("crashed-run"))
    finished = found.start("done", 1)  # one run that finished, for the cases below
    output = finished.communicate(timeout=TIMEOUT)[0]
    assert finished.returncode == 0, output[-3000:]
    return found


ADHOC = """
import sys
from prefect import flow
from prefect_recovery import CheckpointStore, PipelineRun

@flow(name="adhoc-analysis")  # journals a lineage, but is not registered with @register_pipeline
def adhoc():
    with PipelineRun(CheckpointStore.default(), "adhoc-lineage", pipeline="adhoc-analysis", parameters={}):
        raise RuntimeError("the analysis failed")

@flow(name="plain-flow")  # a flow that never touches the store
def plain():
    return 1

if __name__ == "__main__":
    print("PLAIN", plain(return_state=True).state_details.flow_run_id, flush=True)
    adhoc()
"""


def test_recover_crashed_run_that_cannot_be_recovered_says_why_and_changes_nothing(pipelines: Pipelines) -> None:
    (pipelines.tmp / "adhoc.py").write_text(ADHOC)
    failed = subprocess.run([sys.executable, "adhoc.py"], capture_output=True, text=True, timeout=TIMEOUT,
                            env=pipelines.env, cwd=pipelines.tmp)  # fmt: skip
    assert failed.returncode != 0 and "the analysis failed" in failed.stdout + failed.stderr, failed.stderr[-3000:]
    plain_run = failed.stdout.split("PLAIN ")[1].split()[0]
    before = pipelines.journals()

    # no such run anywhere, not even a flow-run id, a real flow run that never opened a PipelineRun: refused
    # before any flow run starts, in one line naming the run; a run of a pipeline this process cannot import:
    # the recover flow run fails, naming the pipeline and where pipelines are looked up
    unknown = [str(uuid.uuid4()), plain_run]
    adhoc = pipelines.run_id("adhoc-lineage")
    commands = [["recover", "--crashed-run", run_id] for run_id in unknown]
    commands += [["recover", "--crashed-run", adhoc], ["recover", "--crashed-run", plain_run, "--lineage", "x"]]
    *nothing, unregistered, both = cli_all(pipelines.env, commands, cwd=pipelines.tmp)
    for run_id, done in zip(unknown, nothing, strict=True):
        assert done.returncode == 2, (run_id, done.stdout, done.stderr[-3000:])
        line = one_error_line(done)
        assert f"flow run {run_id} journaled nothing" in line and "recover --lineage" in line, line
    assert unregistered.returncode == 2, (unregistered.stdout, unregistered.stderr[-3000:])
    line = error_line(unregistered)
    assert "adhoc-analysis" in line and "PREFECT_RECOVERY_PIPELINES" in line, line
    assert both.returncode == 2 and "not both" in one_error_line(both)
    assert pipelines.journals() == before, "a refused recovery changed a journal"


def test_recover_crashed_run_of_a_finished_lineage_changes_nothing(pipelines: Pipelines) -> None:
    lineage = lineage_of("done", 1)
    before = pipelines.journals()
    run_id = pipelines.run_id(lineage)
    commands = [["recover", "--crashed-run", run_id], ["recover", "--json", "--crashed-run", run_id]]
    done, as_json = cli_all(pipelines.env, commands, cwd=pipelines.tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"lineage {lineage} already finished" in done.stdout and "nothing changed" in done.stdout, done.stdout
    assert as_json.returncode == 0, as_json.stderr[-3000:]
    report = json.loads(as_json.stdout)
    history = Journal(pipelines.store().core, lineage).history()
    assert report["status"] == "finished" and report["lineage"] == lineage
    assert report["final_digest"] == history.final["final_digest"]
    assert pipelines.journals() == before


def test_recover_crashed_run_refused_while_held_then_recovered_after_sigkill(pipelines: Pipelines) -> None:
    lineage, seed = lineage_of("held", 5), 5
    pipelines.block.touch()
    seen = len(pipelines.pids())
    run = pipelines.start("held", seed)
    try:
        pid = pipelines.blocked(seen)
        run_id = pipelines.run_id(lineage)
        before = pipelines.journals()
        held = pipelines.recover("--crashed-run", run_id)
        assert held.returncode == 2, (held.stdout, held.stderr[-3000:])
        line = error_line(held)
        assert "lineage lock" in line and f"pid {pid}" in line, line
        assert pipelines.journals() == before, "a refused recovery journaled something"
        assert run.poll() is None, "the live run was disturbed"

        os.kill(int(pid), signal.SIGKILL)
        run.wait(60)
    finally:
        pipelines.block.unlink()
        if run.poll() is None:
            run.kill()
            run.wait()
    recovered = pipelines.recover("--json", "--crashed-run", run_id)
    assert recovered.returncode == 0, recovered.stderr[-3000:]
    report = json.loads(recovered.stdout)
    assert report["lineage"] == lineage and report["status"] == "recovered", report
    assert report["failed_step"] == "train" and report["reused_steps"] == ["prepare"], report
    # bit-identical to the uninterrupted computation of the same seed, done here
    assert report["final_digest"] == value_digest(train.fn(prepare.fn(seed), seed))
    assert Journal(pipelines.store().core, lineage).history().status == "finished"


def other_hosts() -> bool:
    """Whether a process can get a host name of its own here (``unshare --uts`` needs CAP_SYS_ADMIN)."""
    try:
        probe = subprocess.run(["unshare", "--uts", "sh", "-c", "hostname probe-host"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


@pytest.mark.skipif(not other_hosts(), reason="unshare --uts is not permitted here: no second host to run on")
def test_recover_crashed_run_from_another_host_waits_for_prefect_to_call_it_crashed(
    server: LiveServer, pipelines: Pipelines
) -> None:
    """A run whose process lived on another host: its pid cannot be checked from here, so its flow-run state in
    Prefect decides. Running (its host lost, the zombie detector not yet through): refused, even after the process
    is gone. Crashed (what the zombie detector sets): recovered, bit-identical."""
    lineage, seed = lineage_of("far", 6), 6
    pipelines.block.touch()
    seen = len(pipelines.pids())
    run = pipelines.start("far", seed, host="far-host")
    try:
        pid = pipelines.blocked(seen)
        run_id = pipelines.run_id(lineage)
        (started,) = [e for e in Journal(pipelines.store().core, lineage).events() if e.kind == "run_started"]
        assert started.data["process"]["host"] == "far-host"
        os.kill(int(pid), signal.SIGKILL)  # the host is lost: nothing tells Prefect
        run.wait(60)
    finally:
        pipelines.block.unlink()
        if run.poll() is None:
            run.kill()
            run.wait()
    assert api(server, "GET", f"/flow_runs/{run_id}")["state_type"] == "RUNNING"  # type: ignore[index]
    before = pipelines.journals()
    held = pipelines.recover("--crashed-run", run_id)
    assert held.returncode == 2, (held.stdout, held.stderr[-3000:])
    line = error_line(held)
    assert f"pid {pid} on far-host" in line and "is Running in Prefect" in line, line
    assert "zombie detector" in line and "Crashed" in line, line  # what ends the wait
    assert pipelines.journals() == before

    crashed = {"type": "CRASHED", "name": "Crashed", "message": "No heartbeat for 60 s: marked Crashed"}
    api(server, "POST", f"/flow_runs/{run_id}/set_state", {"state": crashed, "force": True})
    recovered = pipelines.recover("--json", "--crashed-run", run_id)
    assert recovered.returncode == 0, recovered.stderr[-3000:]
    report = json.loads(recovered.stdout)
    assert report["lineage"] == lineage and report["status"] == "recovered", report
    assert report["final_digest"] == value_digest(train.fn(prepare.fn(seed), seed))


# -- the quiet CLI ------------------------------------------------------------------------------------------------


def with_backlog(env: dict[str, str], cwd: Path, args: list[str], patch: str = "") -> subprocess.Popen:
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-c", BACKLOG_CLI.format(patch=patch), *args], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


@pytest.fixture(scope="module")
def demo_home(server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], Path]:
    """A store with a finished example-pipeline lineage ``q``: heavy checkpoints v1 (step 50), v2 (60)."""
    tmp = tmp_path_factory.mktemp("quiet")
    env = server.env(PREFECT_RECOVERY_HOME=str(tmp / "recovery-home"), COLUMNS="120", TERM="xterm")
    done = cli(env, "demo", "--json", "--lineage", "q", "--steps", "60", cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    return env, tmp


def test_no_command_prints_queue_draining_noise(
    server: LiveServer, demo_home: tuple[dict[str, str], Path], deployments: dict[str, str]
) -> None:
    env, tmp = demo_home
    commands = {
        "demo": ["demo", "--lineage", "quiet-demo", "--steps", "20"],
        "recover": ["recover", "--lineage", "q"],
        "verify": ["verify"],
        "audit": ["audit", "--dry-run"],
        "history": ["history", "--lineage", "q"],
        "replay-check": ["replay-check", "--lineage", "q", "--from", "1", "--to", "2"],
        "automations install": ["automations", "install", "--deployment", "alpha-train/nightly"],
    }
    # the control: the filter switched off, the same backlog shows the line (else this test proves nothing)
    # (a quick command, run alone: a slow one beside seven others, on a loaded machine, gave the events worker
    # time to send the whole backlog before the exit, and the control saw nothing to show)
    control = with_backlog(env, tmp, ["ls", "--json"], patch="cli._quiet_queue_services = lambda: None")
    out, err = control.communicate(timeout=TIMEOUT)
    running = {name: with_backlog(env, tmp, args) for name, args in commands.items()}
    assert control.returncode == 0, err[-3000:]
    assert "Still processing items" in err, "no backlog at exit: the check below would prove nothing"
    outputs = {}
    for name, process in running.items():
        out, err = process.communicate(timeout=TIMEOUT)
        outputs[name] = out
        assert process.returncode == 0, (name, out[-2000:], err[-3000:])
        for noise in ("Still processing items", "items remaining"):
            assert noise not in out + err, (name, err[-3000:])
        # piped output: no progress bar either (rich hides the cursor before drawing one)
        for bar in ("demo (", "recovering (", "verifying blobs", "auditing blobs", "replaying ("):
            assert bar not in out + err and "\x1b[?25l" not in out, (name, out[-2000:])
    assert "deterministic: q v1 (step 50) -> v2 (step 60)" in outputs["replay-check"], outputs["replay-check"]
    assert "healthy" in outputs["verify"] and "lineage quiet-demo completed" in outputs["demo"], outputs


def on_terminals(commands: dict[str, list[str]], env: dict[str, str], cwd: Path) -> dict[str, str]:
    """What each command writes to its stdout, a terminal of its own (pseudo-terminals, all at once), followed by
    ``[exit CODE]``. Its stderr goes to a file: on a terminal Prefect prints a first-run telemetry notice there
    (prefect/_internal/analytics/notice.py), which is not the command's output."""
    shown: dict[str, bytes] = {}

    def one(name: str, command: list[str]) -> None:
        with (cwd / f"{name.replace(' ', '-')}.stderr").open("wb") as errors:
            text, code = run_on_a_terminal(command, env, cwd, stderr=errors, timeout=TIMEOUT)
        shown[name] = text + f"\n[exit {code}]".encode()

    threads = [threading.Thread(target=one, args=item) for item in commands.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    return {name: text.decode(errors="replace") for name, text in shown.items()}


def test_replay_check_and_audit_bars_on_a_terminal_never_in_json_or_piped(
    demo_home: tuple[dict[str, str], Path],
) -> None:
    env, tmp = demo_home
    replay = [*CLI, "replay-check", "--lineage", "q", "--from", "1", "--to", "2"]
    audit = [*CLI, "audit", "--dry-run"]
    shown = on_terminals(
        {"replay": replay, "replay json": [*replay, "--json"], "audit": audit, "audit json": [*audit, "--json"]},
        env,
        tmp,
    )
    assert all(text.endswith("[exit 0]") for text in shown.values()), {k: v[-2000:] for k, v in shown.items()}
    assert "replaying (read)" in shown["replay"], shown["replay"][-3000:]
    # while the replay trains, its bar counts the segment's steps (v1 at step 50 -> v2 at step 60), not reads
    assert re.search(r"replaying \(train\).*?10/10", shown["replay"], re.S), shown["replay"][-3000:]
    assert "deterministic: q v1 (step 50)" in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown["replay"])
    assert "auditing blobs (verify)" in shown["audit"], shown["audit"][-3000:]
    for name in ("replay json", "audit json"):  # --json on a terminal: the JSON alone, no bar
        text = shown[name].rsplit("\n[exit", 1)[0].replace("\r\n", "\n")
        assert "\x1b" not in text, (name, text[:2000])
        try:
            assert isinstance(json.loads(text), dict), name
        except json.JSONDecodeError:
            pytest.fail(f"{name} on a terminal is not the JSON alone: {text[:3000]!r}")
    assert json.loads(shown["replay json"].rsplit("\n[exit", 1)[0])["deterministic"] is True
    # piped, the same commands draw no bar: test_no_command_prints_queue_draining_noise checks their output


# -- a user's pipeline from its own repository, deployed, killed, recovered --------------------------------------------
WAVEFIT = '''
"""WaveFit: fit a small MLP to a noisy sine; a crashed run is recovered by recover/recover."""

import time
from typing import Any

import torch
from prefect import flow
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from prefect_recovery import (Checkpointer, CheckpointSchedule, EveryNSteps, PipelineRun, register_pipeline,
                              seed_everything, step)
from prefect_recovery.blocks import open_store


@step(name="synthesize")
def synthesize(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(256, 1, generator=g) * 6.28
    return {"t": t, "y": torch.sin(3 * t) + 0.1 * torch.randn(256, 1, generator=g)}


@step(ignore=["store", "pace"])
def fit(store: Any, lineage: str, data: dict, seed: int, epochs: int, pace: float, resume: Any = None) -> int:
    seed_everything(seed)
    model = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = StatefulDataLoader(TensorDataset(data["t"], data["y"]), batch_size=32, shuffle=True)
    schedule = CheckpointSchedule(triggers=[EveryNSteps(every=4)])
    with Checkpointer(store, lineage, model=model, optimizer=optimizer, data=loader, schedule=schedule,
                      seed=seed, resume_from=resume) as ckpt:
        for _epoch in range(ckpt.epoch, epochs):
            for t, y in loader:
                optimizer.zero_grad(set_to_none=True)
                torch.nn.functional.mse_loss(model(t), y).backward()
                optimizer.step()
                ckpt.step()
                time.sleep(pace)
            ckpt.end_epoch()
        ckpt.flush()
        return ckpt.step_count


@register_pipeline
@flow(name="wavefit")
def wavefit(experiment: str, seed: int = 0, epochs: int = 3, pace: float = 0.0, store_block: str | None = None):
    lineage = f"{experiment}-s{seed}"  # derived: there is no lineage parameter
    store = open_store(store_block)
    parameters = {"experiment": experiment, "seed": seed, "epochs": epochs, "store_block": store_block}
    with PipelineRun(store, lineage, pipeline="wavefit", parameters=parameters) as run:
        fit(store, lineage, synthesize(seed), seed, epochs, pace, run.resume_point())
    return lineage
'''

PREFECT_YAML = """
name: wavefit
prefect-version: 3.9.1
build: null
push: null
pull:
  - prefect.deployments.steps.git_clone:
      id: clone
      repository: {repository}
      branch: main
  - prefect_recovery.deploy.prepare_run:
      directory: "{{{{ clone.directory }}}}"
deployments:
  - name: production
    entrypoint: wavefit.pipeline.wavefit
    tags: [recoverable]
    parameters: {{store_block: wave-store}}
    work_pool: {{name: wave-pool, work_queue_name: default}}
  - name: recover
    entrypoint: prefect_recovery.flows.recover.recover
    parameters: {{checkpoint: latest, preflight: strict}}
    work_pool: {{name: wave-pool, work_queue_name: default}}
"""


def user_repository(tmp: Path) -> tuple[Path, str]:
    """The user's checkout (wavefit/ and prefect.yaml, committed on main) and a file:// URL to clone it from."""
    checkout = tmp / "wavefit-repo"
    (checkout / "wavefit").mkdir(parents=True)
    (checkout / "wavefit" / "__init__.py").write_text("")
    (checkout / "wavefit" / "pipeline.py").write_text(textwrap.dedent(WAVEFIT))
    url = f"file://{checkout}"
    (checkout / "prefect.yaml").write_text(PREFECT_YAML.format(repository=url))
    git = {**os.environ, "GIT_AUTHOR_NAME": "u", "GIT_AUTHOR_EMAIL": "u@x", "GIT_COMMITTER_NAME": "u",
           "GIT_COMMITTER_EMAIL": "u@x"}  # fmt: skip
    for args in (["init", "-q", "-b", "main"], ["add", "."], ["commit", "-q", "-m", "wavefit"]):
        subprocess.run(["git", *args], cwd=checkout, env=git, check=True, capture_output=True)
    return checkout, url


def heavy_checkpoints(region: Path, lineage: str) -> int:
    try:
        return sum(1 for p in (region / "lineages" / lineage / "manifests").iterdir() if p.name.endswith(".json"))
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_user_pipeline_from_its_own_repository_is_killed_and_recovered_bit_identical(
    server: LiveServer, tmp_path: Path
) -> None:
    checkout, url = user_repository(tmp_path)
    regions = [tmp_path / "regions" / "a", tmp_path / "regions" / "b"]
    for region in regions:
        region.mkdir(parents=True)
    env = server.env(PYTHONPATH=str(checkout), PREFECT_RECOVERY_HOME=str(tmp_path / "client-home"))

    def prefect(*args: str, cwd: Path = checkout) -> None:
        done = subprocess.run([str(BIN / "prefect"), *args], capture_output=True, text=True, timeout=TIMEOUT,
                              env=env, cwd=cwd)  # fmt: skip
        assert done.returncode == 0, f"prefect {' '.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

    prefect("work-pool", "create", "wave-pool", "--type", "process")
    prefect("--no-prompt", "deploy", "--all", "--prefect-file", "prefect.yaml")
    save = "import sys; from prefect_recovery import CheckpointStore; " \
           "CheckpointStore(regions=sys.argv[1:], write_quorum=2).save('wave-store', overwrite=True)"  # fmt: skip
    subprocess.run([sys.executable, "-c", save, *map(str, regions)], env=env, check=True, timeout=TIMEOUT)
    installed = cli(env, "automations", "install", "--json", "--deployment", "wavefit/production")
    assert installed.returncode == 0, installed.stderr[-3000:]
    pull = [
        {"prefect.deployments.steps.git_clone": {"id": "clone", "repository": url, "branch": "main"}},
        {"prefect_recovery.deploy.prepare_run": {"directory": "{{ clone.directory }}"}},
    ]
    for name in ("wavefit/production", "recover/recover"):  # nothing of the deploying machine but the repository
        assert api(server, "GET", f"/deployments/name/{name}")["pull_steps"] == pull  # type: ignore[index]

    host = tmp_path / "worker-host"  # no copy of the code: the pull step clones it
    host.mkdir()
    worker_env = server.env(
        PREFECT_RECOVERY_PIPELINES="wavefit.pipeline",
        PREFECT_RECOVERY_HOME=str(host / "recovery-home"),
        PREFECT_HOME=str(host / "prefect-home"),
        PREFECT_WORKER_QUERY_SECONDS="2",
    )
    worker_env.pop("PYTHONPATH", None)
    log = host / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", "wave-pool", "--type", "process"],
            stdout=out, stderr=subprocess.STDOUT, env=worker_env, cwd=host, start_new_session=True,
        )  # fmt: skip
    store = CheckpointStore(regions=[str(r) for r in regions], write_quorum=2)
    try:
        path = f"/deployments/{deployment_id(server, 'wavefit/production')}/create_flow_run"
        crashing = api(server, "POST", path, {"parameters": {"experiment": "cut", "seed": 3, "pace": 1.0}})["id"]  # type: ignore[index]
        reference = api(server, "POST", path, {"parameters": {"experiment": "ref", "seed": 3}})["id"]  # type: ignore[index]

        def logs() -> str:
            return f"worker log:\n{log.read_text(errors='replace')[-6000:]}"

        wait_for(lambda: heavy_checkpoints(regions[0], "cut-s3") >= 2, TIMEOUT, f"two checkpoints\n{logs()}", 0.2)
        (started,) = [e for e in Journal(store.core, "cut-s3").events() if e.kind == "run_started"]
        assert str(started.run_id) == crashing
        os.kill(started.data["process"]["pid"], signal.SIGKILL)  # the flow-run process only: the worker reports it

        def final(run_id: str) -> dict[str, Any]:
            return wait_for(lambda: (r := api(server, "GET", f"/flow_runs/{run_id}"))["state_type"] in TERMINAL and r,
                            TIMEOUT, f"flow run {run_id} to end\n{logs()}", interval=2)  # fmt: skip

        assert final(reference)["state_type"] == "COMPLETED", logs()
        assert final(crashing)["state_type"] == "CRASHED", logs()
        recovery = wait_for(lambda: recoveries(server).get(crashing), 120, f"the automation's recovery\n{logs()}")
        done = final(recovery["id"])
        assert done["state_type"] == "COMPLETED", f"{done['state']}\n{logs()}"
    finally:
        kill_tree(worker)

    history = Journal(store.core, "cut-s3").history()
    assert history.status == "finished" and [r.run_id for r in history.recoveries] == [recovery["id"]]
    assert history.recoveries[0].started["checkpoint"]["version"] >= 2  # resumed, not restarted
    expected = Journal(store.core, "ref-s3").history().final["final_digest"]
    assert history.final["final_digest"] == expected  # bit-identical to the uninterrupted run
    assert not (host / "recovery-home").exists()  # every checkpoint went to the block's regions
