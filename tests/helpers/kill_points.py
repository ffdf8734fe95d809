"""Test instrumentation for the user-style pipelines: hold a process at a named point until it is SIGKILLed.

``$USER_PIPELINE_KILL_AT`` names the point; when the process reaches it, it writes ``$USER_PIPELINE_MARKER``
and sleeps until killed. Points:

* ``stored:<step>``: the step's result is committed to ``<lineage>.steps``, its ``step_completed`` journal
  record not yet written (a store observer, called by the store right after the commit);
* ``committed:<n>``: the n-th heavy checkpoint of the training lineage is committed, its
  ``checkpoint_committed`` journal record not yet written (inside the save);
* any other name: the pipeline's own code calls ``pause(name)`` there (``after:<step>``, ``evaluate``...).

None of this is part of what a user writes: the pipelines call ``install(store)`` and ``pause(...)``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

KILL_ENV = "USER_PIPELINE_KILL_AT"
MARKER_ENV = "USER_PIPELINE_MARKER"
_heavy_commits: dict[str, int] = {}


def _hold(point: str) -> None:
    marker = os.environ.get(MARKER_ENV)
    if marker:
        Path(marker).write_text(point)
    while True:  # until SIGKILL
        time.sleep(0.05)


def pause(point: str) -> None:
    if os.environ.get(KILL_ENV) == point:
        _hold(point)


def _observer(event: Any) -> None:
    point = os.environ.get(KILL_ENV, "")
    if event.kind != "checkpoint_committed":
        return
    stored_step = point.split(":", 1)[1] if point.startswith("stored:") else None
    if stored_step is not None and event.lineage.endswith(".steps") and event.metadata.get("step") == stored_step:
        _hold(point)
    if point.startswith("committed:") and event.metadata.get("tier") == "heavy" and "." not in event.lineage:
        _heavy_commits[event.lineage] = _heavy_commits.get(event.lineage, 0) + 1
        if _heavy_commits[event.lineage] == int(point.split(":", 1)[1]):
            _hold(point)


def install(store: Any) -> None:
    """Let ``stored:``/``committed:`` points hold this process (only when a kill point is asked for)."""
    if os.environ.get(KILL_ENV) and _observer not in store.core.observers:
        store.core.observers.append(_observer)
