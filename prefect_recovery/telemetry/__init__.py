"""Telemetry: Prefect events (automations), Prometheus metrics, timeline plots.

Hooks into the core through ``Store(observers=...)`` (core/observe.py); the core never imports this
package. Nothing here imports torch.

    from prefect_recovery.telemetry import default_observers
    store = Store(regions, observers=default_observers())
"""

from __future__ import annotations

import os
import threading

from ..core.observe import StoreObserver
from .events import (
    emit_audit_problem,
    emit_recovery_finished,
    emit_recovery_started,
    prefect_event_observer,
)
from .metrics import FILE_ENV, PORT_ENV, MetricsObserver
from .plot import PlotUnavailableError, plot_timeline

_metrics: MetricsObserver | None = None
_metrics_lock = threading.Lock()


def process_metrics() -> MetricsObserver:
    """The process-wide ``MetricsObserver``, configured from the environment on first use."""
    global _metrics
    with _metrics_lock:
        if _metrics is None:
            _metrics = MetricsObserver.from_env()
        return _metrics


def default_observers() -> list[StoreObserver]:
    """Observers for a store: Prefect events always; metrics when ``PREFECT_RECOVERY_METRICS_FILE`` or
    ``PREFECT_RECOVERY_METRICS_PORT`` is set (one ``MetricsObserver`` for the whole process, so every
    store of the process adds to the same counters, file and endpoint)."""
    observers: list[StoreObserver] = [prefect_event_observer]
    if os.environ.get(FILE_ENV) or os.environ.get(PORT_ENV):
        observers.append(process_metrics())
    return observers


__all__ = [
    "MetricsObserver",
    "PlotUnavailableError",
    "default_observers",
    "emit_audit_problem",
    "emit_recovery_finished",
    "emit_recovery_started",
    "plot_timeline",
    "prefect_event_observer",
    "process_metrics",
]
