"""The audit report in the Prefect UI, end to end: a user opens the ``audit-daily`` deployment, starts a Custom run
with ``store_block`` and ``read_data = 1`` filled in, and reads the report the run published.

Everything is real: ``prefect server start`` (SQLite), ``prefect-recovery serve`` running the flow run it is handed,
a saved ``CheckpointStore`` block with two local regions, and Debian's Chromium driven by Playwright. One blob copy
is damaged (same size, one flipped byte: only a re-hash finds it, so the default ``read_data`` of 0.1 would most
likely miss it); the run must repair it, the table artifact must show that copy as ``repaired``, and the markdown
summary must show the lineage's timeline as an image that the browser decoded. The rendered summary is saved to
``docs/img/audit-report.png`` for the README.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import REPO
from helpers.live_prefect import Stack, deployment_id, flow_runs, live_stack, wait_completed, wait_for
from helpers.tamper import flip_byte
from helpers.ui import open_custom_run, submit_custom_run, ui_page

from prefect_recovery import CheckpointStore
from prefect_recovery.blocks.checkpoint_store import Region
from prefect_recovery.core.journal import Journal
from prefect_recovery.core.layout import blob_key

pytestmark = pytest.mark.slow

LINEAGE = "ui-audit"
BLOCK = "audit-ui-store"
REGIONS = ("eu-west", "us-east")
DAMAGED = "us-east"
SCREENSHOT = REPO / "docs" / "img" / "audit-report.png"
RUN_TIMEOUT = 300


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One server and ``serve`` for the module: starting them takes tens of seconds."""
    with live_stack(tmp_path_factory.mktemp("audit-ui")) as stack:
        yield stack


def store_with_a_damaged_copy(stack: Stack) -> tuple[CheckpointStore, dict[int, dict[str, torch.Tensor]], str]:
    """A saved block with two named regions and a lineage that failed once and was recovered (three heavy
    checkpoints and their journal); one blob of version 2 has a flipped byte in ``DAMAGED``. Returns the block,
    the saved states by version and the damaged blob's key."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    roots = {name: stack.tmp / "regions" / name for name in REGIONS}
    for root in roots.values():
        root.mkdir(parents=True)
    block = CheckpointStore(regions=[Region(url=str(root), name=name) for name, root in roots.items()], write_quorum=2)
    with temporary_settings({PREFECT_API_URL: stack.server.api_url}):
        block.save(BLOCK)

    journal = Journal(block.core, LINEAGE)
    generator = torch.Generator().manual_seed(11)
    states: dict[int, dict[str, torch.Tensor]] = {}

    def checkpoint(step: int, trigger: str, run_id: str) -> None:
        time.sleep(0.3)  # spread the points along the timeline's time axis
        state = {"weight": torch.randn(256, generator=generator), "bias": torch.randn(64, generator=generator)}
        info = block.save_checkpoint(state, lineage=LINEAGE, step=step, metadata={"trigger": trigger})
        journal.append("checkpoint_committed", run_id=run_id, data={"version": info.version, "step": step})
        states[info.version] = state

    journal.append("run_started", run_id="A", data={"pipeline": "example"})
    checkpoint(50, "every_n_steps", "A")
    checkpoint(100, "every_n_steps", "A")
    time.sleep(0.3)
    journal.append("failure", run_id="A", data={"step": "train", "final": True})
    journal.append("recovery_started", run_id="R1", data={"checkpoint": {"version": 2, "step": 100}})
    time.sleep(0.3)
    journal.append("run_started", run_id="B", data={"pipeline": "example", "recovery_run": "R1"})
    journal.append("recovery_finished", run_id="R1", data={"status": "completed"})
    checkpoint(150, "milestone:final", "B")
    journal.append("run_finished", run_id="B")

    manifest, _holders = block.core.resolve(LINEAGE, 2)
    (weight,) = [entry for entry in manifest.entries if entry.name == "weight"]
    damaged = blob_key(weight.chunks[0].digest)
    flip_byte(roots[DAMAGED] / damaged, offset=7, mask=0x01)
    assert (roots[DAMAGED] / damaged).read_bytes() != (roots[REGIONS[0]] / damaged).read_bytes()
    return block, states, damaged


def submit_audit_from_ui(stack: Stack, page: Any) -> None:
    """Deployments -> audit-daily -> Run -> Custom run -> store_block, read_data -> Submit, as a user does it."""
    from playwright.sync_api import expect

    audit_id = deployment_id(stack.server, "audit/audit-daily")
    open_custom_run(page, stack.server.url, "audit-daily", audit_id)

    def prop(name: str) -> Any:
        # each parameter is a labelled form property; its label is not tied to the input (no for/id pair)
        return page.locator(".schema-form-property").filter(has=page.get_by_text(f"{name} (Optional)", exact=True))

    store_block = prop("store_block")  # typed `str | None`: the user picks "str" before a textbox appears
    store_block.get_by_role("button", name="str", exact=True).click()
    store_block.get_by_role("textbox").fill(BLOCK)
    read_data = prop("read_data").get_by_role("spinbutton")
    expect(read_data).to_have_value("0.1")  # the deployment's daily sample
    read_data.fill("1")
    expect(read_data).to_have_value("1")
    submit_custom_run(page, stack.server.url, audit_id)


def open_artifact(page: Any, run_url: str, key: str) -> None:
    """The run's page -> Artifacts tab -> the card of ``key`` -> the artifact's page."""
    from playwright.sync_api import expect

    page.goto(run_url)
    expect(page.get_by_text("Completed", exact=True).first).to_be_visible()  # the run's state badge
    page.locator(".p-tab", has_text="Artifacts").click()  # the tabs are <li class="p-tab">, not role=tab
    card = page.locator("a[href^='/artifacts/artifact/']").filter(has=page.get_by_text(key, exact=True))
    card.click()
    expect(page).to_have_url(re.compile(r"/artifacts/artifact/[0-9a-f-]+$"))


def test_the_audit_report_of_a_custom_run_from_the_ui(stack: Stack) -> None:
    from playwright.sync_api import expect

    block, states, damaged = store_with_a_damaged_copy(stack)
    with ui_page() as page:
        submit_audit_from_ui(stack, page)

        def submitted() -> list[dict]:  # the scheduler adds the daily (03:00) runs meanwhile
            return [run for run in flow_runs(stack.server, "audit/audit-daily") if not run["auto_scheduled"]]

        runs = wait_for(submitted, 30, "the flow run the UI created")
        assert len(runs) == 1, runs
        run_id = runs[0]["id"]
        parameters = runs[0]["parameters"]
        assert (parameters["store_block"], parameters["read_data"], parameters["repair"]) == (BLOCK, 1, True)
        wait_completed(stack, run_id, "audit run", RUN_TIMEOUT)
        run_url = f"{stack.server.url}/runs/flow-run/{run_id}"

        # the table: one row per checkpoint, a column per named region, the flipped copy repaired
        open_artifact(page, run_url, "audit-checkpoints")
        table = page.locator("table")
        expect(table.locator("tbody tr")).to_have_count(len(states))
        headers = [text.strip() for text in table.locator("thead th").all_inner_texts()]
        assert {"lineage", "version", "step", "trigger", "copies", "region eu-west", "region us-east"} <= set(headers)
        rows = [
            dict(zip(headers, (text.strip() for text in row.locator("td").all_inner_texts()), strict=True))
            for row in table.locator("tbody tr").all()
        ]
        assert [
            (row["lineage"], row["version"], row["step"], row["region eu-west"], row["region us-east"]) for row in rows
        ] == [
            (LINEAGE, "1", "50", "ok", "ok"),
            (LINEAGE, "2", "100", "ok", "repaired"),
            (LINEAGE, "3", "150", "ok", "ok"),
        ]
        assert {row["copies"] for row in rows} == {"2"}

        # the summary: totals, and the timeline as a data-URL <img> that Chromium decoded at its full size
        open_artifact(page, run_url, "audit-summary")
        summary = page.locator("article.markdown-renderer").filter(
            has=page.get_by_role("heading", name="Checkpoint audit", exact=True)
        )
        expect(summary).to_have_count(1)
        expect(summary.get_by_text("problems: 1 found, 0 unrepaired")).to_be_visible()
        expect(summary.get_by_text("regions: eu-west, us-east")).to_be_visible()
        expect(summary.get_by_role("heading", name=f"Timeline of {LINEAGE}", exact=True)).to_be_visible()
        image = summary.get_by_role("img", name=f"Timeline of {LINEAGE}", exact=True)
        expect(image).to_be_visible()
        image.scroll_into_view_if_needed()
        page.wait_for_function("image => image.complete && image.naturalWidth > 0", arg=image.element_handle())
        loaded = image.evaluate(
            "image => ({src: image.src.slice(0, 22), width: image.naturalWidth, height: image.naturalHeight})"
        )
        assert loaded == {"src": "data:image/png;base64,", "width": 1000, "height": 500}

        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        summary.screenshot(path=str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size < 300_000

    # the repair the table reports happened on disk, and every version still loads bit-identically
    regions = stack.tmp / "regions"
    assert (regions / DAMAGED / damaged).read_bytes() == (regions / REGIONS[0] / damaged).read_bytes()
    for version, state in states.items():
        loaded_state = block.load(lineage=LINEAGE, version=version)
        assert all(torch.equal(loaded_state[name], tensor) for name, tensor in state.items()), version
