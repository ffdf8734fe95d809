"""``prefect-recovery automations install --deployment NAME --tag TAG`` on a real Prefect server: the automations
match only the flow runs of those deployments or with that tag, and a crash of anything else starts no recovery.

The deployments are plain records made through the REST API (no worker runs them): the automation's action,
creating a ``recover/recover`` flow run, is what is checked, not its execution (test_automations_e2e.py runs a
recovery end to end). Runs are crashed by setting their state through the API, which emits the same
``prefect.flow-run.Crashed`` event, with the run's deployment and tags as related resources, as a crash does.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import CLI
from helpers.live_prefect import LiveServer, api, deployment_id, flow_runs, live_server, wait_for

from prefect_recovery.deploy import (
    RECOVER_AUTOMATION,
    ZOMBIE_AUTOMATION,
    AutomationScopeError,
    install_automations,
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


def recover_lineages(server: LiveServer) -> list[str]:
    return [r["parameters"].get("lineage") for r in flow_runs(server, deployment="recover/recover")]


def test_default_scope_is_the_shipped_tag(server: LiveServer) -> None:
    done = install(server)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {row["automation"] for row in json.loads(done.stdout)} == {ZOMBIE_AUTOMATION, RECOVER_AUTOMATION}
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
    # in this process (a CLI start costs seconds): the recover deployment cannot recover itself
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server.api_url}), pytest.raises(AutomationScopeError, match="itself"):
        install_automations(["recover/recover"])
    with temporary_settings({PREFECT_API_URL: server.api_url}), pytest.raises(AutomationScopeError, match="FLOW"):
        install_automations(["nightly"])


def test_scoped_install_updates_and_recovers_only_its_runs(server: LiveServer) -> None:
    args = ("--deployment", "my-training/nightly", "--tag", "recoverable", "--zombie-after", "90")
    first, second = install(server, *args), install(server, *args)
    assert first.returncode == 0 and second.returncode == 0, (first.stderr[-3000:], second.stderr[-3000:])
    assert [row["action"] for row in json.loads(second.stdout)] == ["updated", "updated"]
    found = by_name(server)
    assert len(found[ZOMBIE_AUTOMATION]) == 1 and len(found[RECOVER_AUTOMATION]) == 1, "install duplicated"

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

    # crashes outside the scope first (an unrelated deployment, a recovery itself), then the two in scope
    crash(server, "unrelated/etl", "etl-lineage")
    crash(server, "recover/recover", "recovering-lineage")
    crash(server, "my-training/nightly", "mine")
    crash(server, "other-training/tagged", "tagged")
    wait_for(lambda: {"mine", "tagged"} <= set(recover_lineages(server)), 60, "the two scoped recoveries")
    lineages = recover_lineages(server)
    # the two runs set above, plus exactly one recovery for each scoped crash
    assert sorted(lineages) == ["mine", "recovering-lineage", "tagged"], lineages
