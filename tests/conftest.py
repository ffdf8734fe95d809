"""Shared fixtures. Every test runs with its own PREFECT_RECOVERY_HOME; tests that need a
Prefect API ask for the one session-wide ``prefect_test_harness`` server (``prefect_server``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import prefect_recovery  # noqa: F401  (first, as the README asks: MKL's reproducible mode is fixed at its first use)

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "prefect_recovery.cli"]


@pytest.fixture(autouse=True)
def recovery_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty ``$PREFECT_RECOVERY_HOME`` per test (the embedded default store lives there)."""
    home = tmp_path / "recovery-home"
    monkeypatch.setenv("PREFECT_RECOVERY_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):
    """Prefect's temporary local server (SQLite) with a throwaway PREFECT_HOME."""
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
