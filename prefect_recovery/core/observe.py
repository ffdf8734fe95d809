"""What a store tells its observers (telemetry hooks), without knowing who listens.

The core stays free of Prefect and Prometheus: a ``Store`` calls each function in its
``observers`` list with a ``StoreEvent`` after a commit or a restore. The telemetry layer
(``prefect_recovery.telemetry``) turns them into Prefect events and Prometheus metrics. An
observer that raises is logged and ignored: telemetry never fails a save or a restore.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import JsonValue

logger = logging.getLogger("prefect_recovery.observe")

StoreEventKind = Literal["checkpoint_committed", "checkpoint_restored", "save_failed"]


@dataclass(frozen=True)
class StoreEvent:
    """One finished store operation.

    Attributes:
        kind: What happened.
        lineage: The lineage (derived ones included, e.g. ``run.light``, ``run.steps``).
        version: The version committed or restored (None for a failed save).
        step: Training step recorded in the manifest.
        bytes: Bytes of state saved or restored (``total_bytes`` of the manifest).
        seconds: Wall time of the whole operation.
        regions: Region name -> ``"ok"`` or the reason it missed this operation.
        metadata: The manifest's metadata (``tier``, ``trigger``...) or, for a failure, ``{"error": ...}``.
    """

    kind: StoreEventKind
    lineage: str
    version: int | None
    step: int | None
    bytes: int
    seconds: float
    regions: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, JsonValue] = field(default_factory=dict)


StoreObserver = Callable[[StoreEvent], None]


def notify(observers: Sequence[StoreObserver], event: StoreEvent) -> None:
    for observer in observers:
        try:
            observer(event)
        except Exception:  # telemetry must never break a save or a restore
            logger.warning("store observer %r failed on %s", observer, event.kind, exc_info=True)


__all__ = ["StoreEvent", "StoreEventKind", "StoreObserver", "notify"]
