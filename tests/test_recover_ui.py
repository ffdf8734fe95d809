"""Recovery from the Prefect UI, end to end: a pipeline run killed with SIGKILL is recovered by a user who opens
the ``recover`` deployment in the UI, starts a Custom run with ``lineage`` filled in and submits it.

Everything is real: ``prefect server start`` (SQLite), ``prefect-recovery serve`` running the flow run it is
handed, ``prefect-recovery demo`` subprocesses, and Debian's Chromium driven by Playwright. The recovered lineage
must end with exactly the tensors of an uninterrupted run of the same steps and seed. The Custom run form, filled
in, is saved to ``docs/img/recover-custom-run.png`` for the README.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import CLI, REPO
from helpers.live_prefect import Stack, deployment_id, flow_runs, live_stack, wait_completed, wait_for
from helpers.rounding import checkpoints, fail_if_rounding
from helpers.step_values import differing_leaves
from helpers.ui import open_custom_run, submit_custom_run, ui_page

from prefect_recovery import CheckpointStore

pytestmark = pytest.mark.slow

STEPS, SEED = 150, 7  # heavy checkpoints at steps 50, 100, 150, then milestone:train_end and milestone:final
RUN_TIMEOUT = 300
SCREENSHOT = REPO / "docs" / "img" / "recover-custom-run.png"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One server and ``serve`` for the module: starting them takes tens of seconds."""
    with live_stack(tmp_path_factory.mktemp("recover-ui")) as stack:
        yield stack


@pytest.fixture
def start_demo(stack: Stack) -> Iterator[Callable[[str], subprocess.Popen[bytes]]]:
    """``prefect-recovery demo --json`` for a lineage, as a subprocess (a process group, killed at teardown)."""
    started: list[subprocess.Popen[bytes]] = []

    def start(lineage: str) -> subprocess.Popen[bytes]:
        with open(stack.tmp / f"demo-{lineage}.log", "wb") as err:
            process = subprocess.Popen(
                [*CLI, "demo", "--json", "--lineage", lineage, "--steps", str(STEPS), "--seed", str(SEED)],
                stdout=subprocess.PIPE,
                stderr=err,
                env=stack.env,
                cwd=REPO,
                start_new_session=True,
            )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        process.stdout.close()  # type: ignore[union-attr]


def final_state(store: CheckpointStore, lineage: str) -> dict[str, Any]:
    final = store.latest(lineage)
    assert final is not None and final.metadata["trigger"] == "milestone:final", final
    assert final.step == STEPS
    return store.load(lineage=lineage, version=final.version)


def submit_recover_from_ui(stack: Stack, lineage: str) -> None:
    """Deployments -> recover -> Run -> Custom run -> lineage -> Submit, as a user does it."""
    from playwright.sync_api import expect

    recover_id = deployment_id(stack.server, "recover/recover")
    with ui_page() as page:
        open_custom_run(page, stack.server.url, "recover", recover_id)
        # each parameter is a labelled form property; its label is not tied to the input (no for/id pair). The
        # label reads "lineage (Optional)": a recovery can be given the crashed run's id instead (auto-recovery)
        field = (
            page.locator(".schema-form-property")
            .filter(has=page.get_by_text(re.compile(r"^lineage( \(Optional\))?$")))
            .get_by_role("textbox")
        )
        field.fill(lineage)
        expect(field).to_have_value(lineage)
        expect(field).to_have_count(1)

        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT))
        submit_custom_run(page, stack.server.url, recover_id)


def test_recover_a_killed_run_from_the_ui(stack: Stack, start_demo: Callable[[str], subprocess.Popen[bytes]]) -> None:
    lineage = "ui-crash"
    store = CheckpointStore.default(stack.home)

    # the uninterrupted reference runs meanwhile (it shares nothing with the killed lineage but the store)
    reference = start_demo("ref")
    crashing = start_demo(lineage)

    def two_checkpoints_or_exit() -> bool:
        return crashing.poll() is not None or len(store.list(lineage)) >= 2

    try:
        wait_for(two_checkpoints_or_exit, RUN_TIMEOUT, "two committed checkpoints", interval=0.05)
        assert crashing.poll() is None, f"demo exited ({crashing.returncode}) before its second checkpoint"
    finally:
        if crashing.poll() is None:
            os.killpg(crashing.pid, signal.SIGKILL)
        crashing.wait()
    killed_at = store.list(lineage)
    before = set(checkpoints(store, lineage))  # written by the uninterrupted process
    assert [i.metadata["trigger"] for i in killed_at] == ["every_n_steps"] * len(killed_at)
    assert killed_at[-1].step < STEPS, "the kill came too late: training had finished"

    submit_recover_from_ui(stack, lineage)

    runs = wait_for(lambda: flow_runs(stack.server, "recover/recover"), 30, "the flow run the UI created")
    assert len(runs) == 1, runs
    run_id = runs[0]["id"]
    assert runs[0]["parameters"]["lineage"] == lineage

    run = wait_completed(stack, run_id, "recover run", RUN_TIMEOUT)
    assert run["parameters"]["lineage"] == lineage

    out, _ = reference.communicate(timeout=RUN_TIMEOUT)
    assert reference.returncode == 0, (stack.tmp / "demo-ref.log").read_text()[-4000:]
    assert json.loads(out)["status"] == "completed"

    recovered = store.list(lineage)
    # the recovery resumed after the last committed checkpoint: the killed run's checkpoints are still the first ones
    assert [(i.version, i.manifest_digest) for i in recovered[: len(killed_at)]] == [
        (i.version, i.manifest_digest) for i in killed_at
    ]
    differing = differing_leaves(final_state(store, "ref"), final_state(store, lineage))
    if differing:  # issue 18's divergence, before the kill or in the reference, is reported with its figures
        fail_if_rounding(lineage, (store, "ref"), (store, lineage), uninterrupted=before)
    assert differing == []
