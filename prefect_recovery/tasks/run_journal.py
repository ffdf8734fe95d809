"""Record a pipeline run in the lineage's journal (DESIGN.md invariant 8).

``RunJournal`` appends run_started / step_started / step_completed / checkpoint_committed /
failure / run_finished events to the store. A run killed with SIGKILL writes no failure: its
last step_started without a step_completed tells ``replay()`` where it died.
"""

from __future__ import annotations

import contextlib
import platform
import uuid
from collections.abc import Iterator
from importlib import metadata
from typing import Any

from pydantic import JsonValue

from ..core.journal import Journal
from ..core.models import CheckpointInfo
from ..core.store import Store


def environment() -> dict[str, JsonValue]:
    """What a recovery must match: interpreter and library versions."""
    versions: dict[str, JsonValue] = {}
    for package in ("torch", "numpy", "prefect", "prefect-recovery"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"python": platform.python_version(), "platform": platform.platform(), "packages": versions}


def current_run_id() -> str:
    """The Prefect flow-run id when inside a flow run, else a fresh uuid."""
    try:
        from prefect.runtime import flow_run

        if flow_run.id:
            return str(flow_run.id)
    except Exception:  # outside Prefect, or no API: the journal does not need Prefect
        pass
    return uuid.uuid4().hex


class RunJournal:
    def __init__(self, store: Store, lineage: str, run_id: str | None = None):
        self.journal = Journal(store, lineage)
        self.run_id = run_id or current_run_id()

    def append(self, kind: Any, **data: JsonValue) -> None:
        self.journal.append(kind, run_id=self.run_id, data=data)

    def run_started(self, parameters: dict[str, JsonValue], resumed_from: JsonValue = None) -> None:
        self.append("run_started", parameters=parameters, environment=environment(), resumed_from=resumed_from)

    @contextlib.contextmanager
    def step(self, name: str, **inputs: JsonValue) -> Iterator[dict[str, JsonValue]]:
        """Journal a step; the caller may add output facts to the yielded dict."""
        self.append("step_started", step=name, inputs=inputs)
        outputs: dict[str, JsonValue] = {}
        try:
            yield outputs
        except BaseException as exc:
            self.append("failure", step=name, error=f"{type(exc).__name__}: {exc}"[:2000])
            raise
        self.append("step_completed", step=name, outputs=outputs)

    def checkpoint_committed(self, info: CheckpointInfo) -> None:
        self.append(
            "checkpoint_committed",
            version=info.version,
            step=info.step,
            trigger=info.metadata.get("trigger"),
            tier=info.metadata.get("tier"),
            regions=list(info.regions),
        )
