"""Prometheus metrics of a store's saves and restores (a store observer with its own registry).

Metrics (every name starts with ``prefect_recovery_``):

================================================ ========= ===========================================
name                                             type      labels
================================================ ========= ===========================================
``checkpoint_bytes_total``                       counter   lineage, tier, operation (save / restore)
``save_duration_seconds``                        histogram lineage, tier
``restore_duration_seconds``                     histogram lineage, tier
``throughput_bytes_per_second``                  gauge     lineage, tier, operation (the last one)
``operations_total``                             counter   lineage, tier, operation, outcome
``region_operations_total``                      counter   region, operation, outcome
``last_success_timestamp_seconds``               gauge     lineage, tier, operation
``last_checkpoint_step``                         gauge     lineage, tier
================================================ ========= ===========================================

``outcome`` is ``success`` or ``failure``. Per region, a committed save counts ``success`` for each
region that holds it and ``failure`` for each one left lagging; a failed save counts ``failure`` for
each region that gave a cause; a restore counts ``success`` for the regions holding its manifest.

Cardinality: ``lineage`` is the lineage's *base* name (``run`` for ``run``, ``run.light`` and
``run.steps``; the sibling goes into ``tier``: heavy, light, steps), and at most ``max_lineages`` (50)
distinct base names get their own series; later ones are counted under ``lineage="_other"``. A process
that trains one model sees one or two lineages; a long-lived worker that runs many experiments stays
bounded. ``lineage_label="none"`` drops the lineage altogether (``_all``).

Export: ``write_textfile(path)`` (node_exporter's textfile collector; atomic rename), ``serve(port)``
(``prometheus_client.start_http_server``). ``from_env()`` reads ``PREFECT_RECOVERY_METRICS_FILE``
(rewritten after every event) and ``PREFECT_RECOVERY_METRICS_PORT`` (plus ``PREFECT_RECOVERY_METRICS_ADDR``,
default ``0.0.0.0``).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server, write_to_textfile

from ..core.observe import StoreEvent
from .events import base_lineage

logger = logging.getLogger("prefect_recovery.telemetry")

FILE_ENV = "PREFECT_RECOVERY_METRICS_FILE"
PORT_ENV = "PREFECT_RECOVERY_METRICS_PORT"
ADDR_ENV = "PREFECT_RECOVERY_METRICS_ADDR"
OTHER_LINEAGES = "_other"
ALL_LINEAGES = "_all"
# From a small JSON save (milliseconds) to a multi-GB one over a slow link (tens of minutes).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, float("inf"))
_OPERATION = {"checkpoint_committed": "save", "save_failed": "save", "checkpoint_restored": "restore"}


class MetricsObserver:
    """A store observer that keeps Prometheus metrics in its own ``CollectorRegistry``.

    ``Store(regions, observers=[MetricsObserver(textfile="/var/lib/node_exporter/ckpt.prom")])``.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        textfile: str | os.PathLike[str] | None = None,
        lineage_label: Literal["base", "none"] = "base",
        max_lineages: int = 50,
    ):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.textfile = Path(textfile) if textfile else None
        self.lineage_label = lineage_label
        self.max_lineages = max_lineages
        self.server = None
        self._lineages: set[str] = set()
        self._lock = threading.Lock()
        ns, reg = "prefect_recovery", self.registry
        self.bytes = Counter(
            "checkpoint_bytes", "Bytes of checkpoint state saved or restored.",
            ["lineage", "tier", "operation"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.save_seconds = Histogram(
            "save_duration_seconds", "Wall time of a save (commit), failed ones included.",
            ["lineage", "tier"], namespace=ns, registry=reg, buckets=DURATION_BUCKETS,
        )  # fmt: skip
        self.restore_seconds = Histogram(
            "restore_duration_seconds", "Wall time of a restore (resolve, read and verify).",
            ["lineage", "tier"], namespace=ns, registry=reg, buckets=DURATION_BUCKETS,
        )  # fmt: skip
        self.throughput = Gauge(
            "throughput_bytes_per_second", "Bytes per second of the last successful save or restore.",
            ["lineage", "tier", "operation"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.operations = Counter(
            "operations", "Saves and restores by outcome (success, failure).",
            ["lineage", "tier", "operation", "outcome"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.region_operations = Counter(
            "region_operations", "Per region: saves it holds or missed, restores it served (success, failure).",
            ["region", "operation", "outcome"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.last_success = Gauge(
            "last_success_timestamp_seconds", "Unix time of the last successful save or restore.",
            ["lineage", "tier", "operation"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.last_step = Gauge(
            "last_checkpoint_step", "Training step of the last committed checkpoint.",
            ["lineage", "tier"], namespace=ns, registry=reg,
        )  # fmt: skip

    @classmethod
    def from_env(cls) -> MetricsObserver:
        """An observer configured by ``PREFECT_RECOVERY_METRICS_FILE`` / ``_PORT`` (HTTP server started)."""
        observer = cls(textfile=os.environ.get(FILE_ENV) or None)
        port = os.environ.get(PORT_ENV, "").strip()
        if port:
            try:
                observer.serve(int(port), os.environ.get(ADDR_ENV) or "0.0.0.0")
            except (ValueError, OSError) as exc:  # a second process on the same port: metrics stay in the file
                logger.warning("cannot serve metrics on %s=%s: %s", PORT_ENV, port, exc)
        return observer

    def _lineage(self, lineage: str) -> str:
        if self.lineage_label == "none":
            return ALL_LINEAGES
        base = base_lineage(lineage)[0]
        if base in self._lineages:
            return base
        if len(self._lineages) >= self.max_lineages:
            return OTHER_LINEAGES
        self._lineages.add(base)
        return base

    def __call__(self, event: StoreEvent) -> None:
        operation = _OPERATION.get(event.kind)
        if operation is None:
            return
        with self._lock:
            lineage = self._lineage(event.lineage)
        tier = base_lineage(event.lineage)[1]
        ok = event.kind != "save_failed"
        (self.save_seconds if operation == "save" else self.restore_seconds).labels(lineage, tier).observe(
            event.seconds
        )
        self.operations.labels(lineage, tier, operation, "success" if ok else "failure").inc()
        for region, status in event.regions.items():
            outcome = "success" if ok and status == "ok" else "failure"
            self.region_operations.labels(region, operation, outcome).inc()
        if ok:
            self.bytes.labels(lineage, tier, operation).inc(event.bytes)
            if event.seconds > 0:
                self.throughput.labels(lineage, tier, operation).set(event.bytes / event.seconds)
            self.last_success.labels(lineage, tier, operation).set_to_current_time()
            if operation == "save" and event.step is not None:
                self.last_step.labels(lineage, tier).set(event.step)
        if self.textfile is not None:
            self.write_textfile(self.textfile)

    def write_textfile(self, path: str | os.PathLike[str]) -> Path:
        """Write every metric to ``path`` (Prometheus text format; temp file + rename, so readers never see
        half a file). node_exporter's textfile collector reads ``*.prom`` files of its directory."""
        path = Path(path)
        with self._lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_to_textfile(str(path), self.registry)
        return path

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` over HTTP from a daemon thread; returns the port (``port=0``: a free one)."""
        if self.server is None:
            self.server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return self.server.server_port

    def close(self) -> None:
        """Stop the HTTP server, if one runs."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


__all__ = ["ADDR_ENV", "FILE_ENV", "PORT_ENV", "MetricsObserver"]
