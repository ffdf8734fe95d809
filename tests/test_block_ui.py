"""The ``CheckpointStore`` block in the Prefect UI, end to end: a user creates a store with two regions (one
with an ``AwsCredentials`` block picked from the UI's block picker, one with secret storage options), saves it,
opens it again, edits one region and saves again; the saved document loads with the edit and every secret intact.

Everything is real: ``prefect server start`` (SQLite) with its bundled UI, Debian's Chromium driven by Playwright.
The form is the UI's block form (Prefect 3.9's ``/v2`` UI: the default one renders every list field, even a list
of strings, as one JSON text box). Secrets never travel inside the region list (Prefect's server masks by dotted
path and never inside a list): storage options live in ``region_storage_options``, masked value by value, and a
credentials block is a reference to its own document.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.live_prefect import LiveServer, api, live_server
from helpers.ui import ui_page

pytestmark = pytest.mark.slow

SECRET = "aws-secret-never-shown"
OPTION_SECRET = "storage-option-secret-never-shown"
STORE = "ui-store"
CREDENTIALS = "prod-s3"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with live_server(tmp_path_factory.mktemp("block-ui")) as running:
        yield running


def against(server: LiveServer):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings({PREFECT_API_URL: server.api_url})


def fill_region(page: Any, index: int, url: str, name: str) -> None:
    """The index-th region item of the form (items carry no stable hook, so by order): its Url text box, then
    its Name's 'str' choice, which shows the Name text box right after the Url one."""
    page.locator("textarea").nth(2 * index).fill(url)
    page.get_by_role("tab", name="str", exact=True).nth(2 * index).click()  # per item: Name's, then Credentials'
    page.locator("textarea").nth(2 * index + 1).fill(name)


def test_create_then_edit_a_store_in_the_ui_keeps_the_edit_and_the_secrets(server: LiveServer, tmp_path: Path) -> None:
    from playwright.sync_api import expect
    from prefect_aws import AwsCredentials

    from prefect_recovery import CheckpointStore

    regions = {name: tmp_path / name for name in ("eu", "us", "us-moved")}
    for path in regions.values():
        path.mkdir()
    with against(server):
        CheckpointStore.register_type_and_schema()
        AwsCredentials(aws_access_key_id="AKIA-UI", aws_secret_access_key=SECRET).save(CREDENTIALS)

    with ui_page() as page:
        page.goto(f"{server.url}/v2/blocks/catalog/checkpoint-store/create")
        page.locator("input[name='blockName']").fill(STORE)
        add_region = page.get_by_role("button", name="Add item").first
        add_region.click()
        add_region.click()
        fill_region(page, 0, str(regions["eu"]), "eu")
        fill_region(page, 1, str(regions["us"]), "us")
        # the first region's credentials: the AwsCredentials picker, the block saved through the API
        page.get_by_role("tab", name="AwsCredentials", exact=True).first.click()
        page.get_by_role("button", name="Select a block").first.click()
        page.get_by_role("option", name=CREDENTIALS).click()
        # the second region's secret storage option, in the store's masked options (a JSON editor)
        options_editor = page.locator(".cm-content").first
        options_editor.click()
        page.keyboard.insert_text(json.dumps({"us": {"key": OPTION_SECRET, "anon": False}}))
        page.get_by_role("button", name="Save", exact=True).click()
        expect(page).to_have_url(re.compile(r"/v2/blocks/block/[0-9a-f-]+$"))
        document_id = page.url.rsplit("/", 1)[-1]

        shown = api(server, "GET", f"/block_documents/{document_id}")
        assert SECRET not in json.dumps(shown) and OPTION_SECRET not in json.dumps(shown)
        assert [region["url"] for region in shown["data"]["regions"]] == [str(regions["eu"]), str(regions["us"])]

        # edit one region: the other one, its credentials and every secret are left as they are
        page.goto(f"{server.url}/v2/blocks/block/{document_id}/edit")
        expect(page.locator("textarea").nth(2)).to_have_value(str(regions["us"]))
        page.locator("textarea").nth(2).fill(str(regions["us-moved"]))
        page.get_by_role("button", name="Save", exact=True).click()
        expect(page).to_have_url(re.compile(rf"/v2/blocks/block/{document_id}$"))

    with against(server):
        from prefect.events.worker import EventsWorker

        store = CheckpointStore.load(STORE)
        EventsWorker.drain_all()  # the block events go out while the server is still up
    assert [(region.name, region.url) for region in store.regions] == [
        ("eu", str(regions["eu"])),
        ("us", str(regions["us-moved"])),
    ]
    credentials = store.regions[0].credentials
    assert isinstance(credentials, AwsCredentials)
    assert credentials.aws_secret_access_key.get_secret_value() == SECRET
    assert store.regions[1].storage_options.get_secret_value() == {"key": OPTION_SECRET, "anon": False}
    assert store.regions[1].credentials is None
