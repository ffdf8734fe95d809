"""Chromium driven by Playwright, for the end-to-end tests of the Prefect UI (``test_recover_ui``,
``test_audit_ui``): one place for which browser binary is used, how it is launched and how large and
patient its page is, so the UI tests cannot drift apart on these.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from playwright.sync_api import Page

# Debian's Chromium (`make install-dev` installs it); Playwright's own browser download does not work offline.
CHROMIUM = os.environ.get("PREFECT_RECOVERY_CHROMIUM", "/usr/bin/chromium")
# headless in a container: no sandbox (no user namespaces), no GPU, and nothing that phones home or updates itself
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@contextmanager
def ui_page() -> Iterator[Page]:
    """A fresh headless Chromium with one 1280x900 page (the size the README screenshots are taken at); the
    browser is closed on the way out, whether the test passed or not."""
    # imported here: collecting the tests must not need Playwright
    from playwright.sync_api import expect, sync_playwright

    # Playwright's assertions (expect) have their own 5 s default, which page.set_default_timeout does not change:
    # under the load of a full test run the server took longer than that to create a flow run (test_recover_ui
    # failed at "to_have_url" after Submit with the load average at 19).
    expect.set_options(timeout=60_000)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(60_000)  # two slow cores: the first render of the UI takes seconds
            yield page
        finally:
            browser.close()


def open_custom_run(page: Page, server_url: str, deployment_name: str, deployment_id: str) -> None:
    """Deployments -> the deployment's page -> Run -> Custom run, as a user does it (the form is then open)."""
    from playwright.sync_api import expect

    page.goto(f"{server_url}/deployments")
    # the deployment's name links to its page (the flow's name, which may be the same, links to the flow)
    page.get_by_role("link", name=deployment_name, exact=True).and_(
        page.locator(f"[href='/deployments/deployment/{deployment_id}']")
    ).click()
    expect(page).to_have_url(f"{server_url}/deployments/deployment/{deployment_id}")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run", exact=True).click()


def submit_custom_run(page: Page, server_url: str, deployment_id: str) -> None:
    """Submit the open Custom run form; the UI goes back to the deployment's runs once the flow run exists."""
    from playwright.sync_api import expect

    page.get_by_role("button", name="Submit", exact=True).click()
    expect(page).to_have_url(f"{server_url}/deployments/deployment/{deployment_id}?tab=Runs")
