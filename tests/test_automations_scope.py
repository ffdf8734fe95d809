"""``prefect-recovery automations install --deployment NAME --tag TAG`` on a real Prefect server: the automations
match only the flow runs of those deployments or with that tag, and a crash of anything else starts no recovery.

The deployments are plain records made through the REST API (no worker runs them): the automation's action,
creating a ``recover/recover`` flow run, is what is checked, not its execution (test_automations_e2e.py runs a
recovery end to end). Runs are crashed by setting their state through the API, which emits the same
``prefect.flow-run.Crashed`` event, with the run's deployment and tags as related resources, as a crash does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import CLI, REPO
from helpers.live_prefect import BIN, LiveServer, api, deployment_id, flow_runs, live_server, wait_for

from prefect_recovery.deploy import (
    RECOVER_AGAIN_AUTOMATION,
    RECOVER_AUTOMATION,
    WORKDIR_ENV,
    ZOMBIE_AUTOMATION,
    AutomationScopeError,
    install_automations,
    prepare_run,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with live_server(tmp_path_factory.mktemp("scope")) as live:
        for flow, name, tags in [
            ("recover", "recover", ["prefect-recovery"]),
            ("audit", "audit-daily", ["prefect-recovery"]),
            ("my-training", "nightly", []),  # --deployment my-training/nightly
            ("other-training", "tagged", ["recoverable"]),  # --tag recoverable
            ("unrelated", "etl", ["etl"]),  # neither
        ]:
            flow_id = api(live, "POST", "/flows/", {"name": flow})["id"]  # type: ignore[index]
            api(
                live,
                "POST",
                "/deployments/",
                {"name": name, "flow_id": flow_id, "tags": tags, "entrypoint": f"{flow}.py:{flow}"},
            )
        yield live


def install(server: LiveServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "automations", "install", "--json", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=server.env(),
    )


def install_here(server: LiveServer, *deployments: str, **kw: Any) -> list[dict[str, Any]]:
    """``install_automations`` in this process: a CLI start costs seconds; the CLI is tested once per case."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server.api_url}):
        return install_automations(list(deployments), **kw)


def by_name(server: LiveServer) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for automation in api(server, "POST", "/automations/filter", {}):  # type: ignore[union-attr]
        found.setdefault(automation["name"], []).append(automation)
    return found


def crash(server: LiveServer, deployment: str, lineage: str) -> str:
    path = f"/deployments/{deployment_id(server, deployment)}/create_flow_run"
    run_id = api(server, "POST", path, {"parameters": {"lineage": lineage}})["id"]  # type: ignore[index]
    api(
        server,
        "POST",
        f"/flow_runs/{run_id}/set_state",
        {"state": {"type": "CRASHED", "name": "Crashed", "message": "test crash"}, "force": True},
    )
    return run_id


def test_default_scope_is_the_shipped_tag(server: LiveServer) -> None:
    rows = install_here(server)
    assert [row["automation"] for row in rows] == [ZOMBIE_AUTOMATION, RECOVER_AUTOMATION, RECOVER_AGAIN_AUTOMATION]
    assert rows[0]["scope"] == {"deployments": [], "tags": ["prefect-recovery"]}
    found = by_name(server)
    recover_id = deployment_id(server, "recover/recover")
    zombie = found[ZOMBIE_AUTOMATION][0]["trigger"]
    assert zombie["match_related"] == {
        "prefect.resource.id": ["prefect.deployment." + recover_id, "prefect.tag.prefect-recovery"]
    }
    trigger = found[RECOVER_AUTOMATION][0]["trigger"]
    assert trigger["match_related"][0] == {"prefect.resource.id": ["prefect.tag.prefect-recovery"]}


def test_unknown_deployment_is_refused(server: LiveServer) -> None:
    done = install(server, "--deployment", "no-such/flow")
    assert done.returncode == 2
    assert "'no-such/flow' does not exist" in json.loads(done.stdout)["error"]
    with pytest.raises(AutomationScopeError, match="itself"):
        install_here(server, "recover/recover")
    with pytest.raises(AutomationScopeError, match="FLOW"):
        install_here(server, "nightly")


def test_scoped_install_updates_and_recovers_only_its_runs(server: LiveServer) -> None:
    args = ("--deployment", "my-training/nightly", "--tag", "recoverable", "--zombie-after", "90")
    first = install(server, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads(first.stdout)[0]["scope"] == {"deployments": ["my-training/nightly"], "tags": ["recoverable"]}
    second = install_here(server, "my-training/nightly", tags=["recoverable"], zombie_after=timedelta(seconds=90))
    assert [row["action"] for row in second] == ["updated", "updated", "updated"]
    found = by_name(server)
    names = (ZOMBIE_AUTOMATION, RECOVER_AUTOMATION, RECOVER_AGAIN_AUTOMATION)
    assert [len(found[name]) for name in names] == [1, 1, 1], "install duplicated"

    ids = {
        name: deployment_id(server, name) for name in ("my-training/nightly", "recover/recover", "audit/audit-daily")
    }
    zombie = found[ZOMBIE_AUTOMATION][0]["trigger"]
    assert zombie["within"] == 90
    assert sorted(zombie["match_related"]["prefect.resource.id"]) == sorted(
        [
            f"prefect.deployment.{ids['my-training/nightly']}",
            f"prefect.deployment.{ids['recover/recover']}",
            "prefect.tag.recoverable",
        ]
    )
    trigger = found[RECOVER_AUTOMATION][0]["trigger"]
    assert trigger["match_related"] == [
        {"prefect.resource.id": [f"prefect.deployment.{ids['my-training/nightly']}", "prefect.tag.recoverable"]},
        {"prefect.resource.role": "deployment", "prefect.resource.id": f"!prefect.deployment.{ids['recover/recover']}"},
        {
            "prefect.resource.role": "deployment",
            "prefect.resource.id": f"!prefect.deployment.{ids['audit/audit-daily']}",
        },
    ]

    again = found[RECOVER_AGAIN_AUTOMATION][0]["trigger"]
    assert again["expect"] == ["prefect.flow-run.Crashed"]  # a Failed recovery is not started again
    assert again["match_related"] == {
        "prefect.resource.role": "deployment",
        "prefect.resource.id": [f"prefect.deployment.{ids['recover/recover']}"],
    }

    # crashes outside the scope first (an unrelated deployment), a recovery itself, then the two in scope
    crash(server, "unrelated/etl", "etl-lineage")
    recovering = crash(server, "recover/recover", "recovering-lineage")
    mine = crash(server, "my-training/nightly", "mine")
    tagged = crash(server, "other-training/tagged", "tagged")

    def started() -> list[tuple[Any, ...]]:
        runs = [r for r in flow_runs(server, deployment="recover/recover") if r["id"] != recovering]
        return sorted(
            (str(p.get("crashed_run")), p.get("lineage"), p.get("attempt")) for p in (r["parameters"] for r in runs)
        )

    wait_for(lambda: len(started()) >= 3, 60, "the scoped recoveries and the recovery's second attempt")
    # exactly one recovery for each scoped crash, given the crashed run's id (recover reads its lineage from the
    # journal), and the crashed recovery started again with its own parameters and attempt 2; none for etl
    expected = [(mine, None, None), (tagged, None, None), ("None", "recovering-lineage", 2)]
    assert started() == sorted(expected), started()


def test_prepare_run_pull_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pull step of deployments/prefect.yaml, in this process: no PREFECT_RECOVERY_HOME means the user's home,
    never the working directory; the working directory comes from PREFECT_RECOVERY_WORKDIR and is importable."""
    import yaml

    shipped = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    assert shipped["pull"] == [{"prefect_recovery.deploy.prepare_run": {}}]
    assert all("pull" not in d for d in shipped["deployments"])  # every deployment takes the shared step

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PREFECT_RECOVERY_HOME")
    monkeypatch.delenv(WORKDIR_ENV, raising=False)
    assert prepare_run() == {"directory": str(tmp_path)}
    assert os.environ["PREFECT_RECOVERY_HOME"] == str(tmp_path / "home" / ".prefect-recovery")

    code = tmp_path / "checkout"
    (code / "mypipes").mkdir(parents=True)
    (code / "mypipes" / "__init__.py").write_text("NAME = 'mine'\n")
    monkeypatch.setenv(WORKDIR_ENV, str(code))
    monkeypatch.setenv("PREFECT_RECOVERY_HOME", str(tmp_path / "store"))  # an explicit home is kept
    assert prepare_run() == {"directory": str(code)}
    assert os.environ["PREFECT_RECOVERY_HOME"] == str(tmp_path / "store")
    assert __import__("mypipes").NAME == "mine"
    sys.modules.pop("mypipes")

    monkeypatch.setenv(WORKDIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="PREFECT_RECOVERY_WORKDIR"):
        prepare_run()


@pytest.mark.slow
def test_shipped_deployments_pull_portably_and_keep_checkpoints_out_of_the_checkout(
    server: LiveServer, tmp_path: Path
) -> None:
    """`prefect deploy` of deployments/prefect.yaml records no path of the deploying machine; a worker on
    another "host" (its own directory and HOME, no PREFECT_RECOVERY_HOME) runs the audit deployment through the
    pull step: the store lands under that HOME, not in the worker's working directory."""
    env = server.env()
    env.pop("PREFECT_RECOVERY_HOME", None)

    def prefect(*args: str, env: dict[str, str], cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(BIN / "prefect"), *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env
        )
        assert done.returncode == 0, f"prefect {' '.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done

    prefect("work-pool", "create", "recovery-pool", "--type", "process", env=env)
    prefect("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml", env=env)
    for name in ("example-pipeline/example-pipeline", "recover/recover", "audit/audit-daily"):
        deployment = api(server, "GET", f"/deployments/name/{name}")
        assert deployment["pull_steps"] == [{"prefect_recovery.deploy.prepare_run": {}}], deployment  # type: ignore[index]
        assert str(REPO) not in json.dumps(deployment), f"{name} records the deploying machine's checkout"

    host = tmp_path / "worker-host"
    workdir, home = host / "work", host / "home"
    workdir.mkdir(parents=True)
    home.mkdir()
    audit = api(server, "POST", f"/deployments/{deployment_id(server, 'audit/audit-daily')}/create_flow_run", {})
    worker_env = {**env, "HOME": str(home), "PREFECT_RECOVERY_WORKDIR": str(workdir), "PREFECT_HOME": str(host / "ph")}
    prefect("worker", "start", "--pool", "recovery-pool", "--run-once", env=worker_env, cwd=host)
    run = api(server, "GET", f"/flow_runs/{audit['id']}")  # type: ignore[index]
    assert run["state_type"] == "COMPLETED", run["state"]  # type: ignore[index]
    assert (home / ".prefect-recovery" / "regions").is_dir(), sorted(p.name for p in home.rglob("*"))[:20]
    assert not (workdir / ".prefect-recovery").exists() and not (host / ".prefect-recovery").exists()
