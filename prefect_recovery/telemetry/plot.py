"""A lineage's timeline as a PNG: training step against wall time, checkpoints, failures, recoveries.

Reads the store alone (DESIGN.md invariant 8): the heavy checkpoints of ``lineage`` and the light ones of
``lineage + ".light"`` (their manifests' ``step``, ``created_at`` and metadata ``tier`` / ``trigger``), and
the lineage's journal (run_started, failure, recovery_started, recovery_finished). A run that started,
never ended and was followed by another run or a recovery is drawn as a crash at its last journal event
(a process killed with SIGKILL writes no failure). Needs matplotlib: ``pip install 'prefect-recovery[plot]'``;
draws with the Agg canvas directly (no pyplot, no global backend, safe from any thread).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..core.errors import CheckpointError
from ..core.journal import Journal
from ..core.journal_format import JournalEvent
from ..core.layout import LIGHT_SUFFIX
from ..core.store import core_store

FIGSIZE = (10.0, 5.0)  # inches
DPI = 100  # FIGSIZE * DPI = 1000 x 500 pixels
TIER_COLORS = {"heavy": "tab:blue", "light": "tab:orange"}
TRIGGER_MARKERS = {"every_n_steps": "o", "timebox": "s", "milestone": "*", "manual": "D", "emergency": "X"}
OTHER_MARKER = "P"
INSTALL_HINT = "plotting needs matplotlib: pip install 'prefect-recovery[plot]'"


class PlotUnavailableError(ImportError):
    """matplotlib is not installed."""


@dataclass
class CheckpointPoint:
    time: datetime
    step: int | None
    version: int
    tier: str
    trigger: str


@dataclass
class Timeline:
    """What the plot shows, read from the store (``timeline(store, lineage)``)."""

    lineage: str
    checkpoints: list[CheckpointPoint] = field(default_factory=list)
    run_starts: list[tuple[datetime, str]] = field(default_factory=list)  # (time, run_id)
    failures: list[tuple[datetime, str, bool]] = field(default_factory=list)  # (time, label, final)
    crashes: list[tuple[datetime, str]] = field(default_factory=list)  # (time of last sign of life, run_id)
    recoveries: list[tuple[datetime, datetime | None, str]] = field(default_factory=list)  # (start, end, status)


def _time(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _trigger_kind(trigger: str) -> str:
    return trigger.split(":", 1)[0].removesuffix("s") if trigger.startswith("milestone") else trigger


def timeline(store: Any, lineage: str) -> Timeline:
    """Read the checkpoints and journal of ``lineage`` (a core ``Store`` or a ``CheckpointStore``)."""
    core = core_store(store)
    found = Timeline(lineage)
    for name, default_tier in ((lineage, "heavy"), (lineage + LIGHT_SUFFIX, "light")):
        for info in core.list(name):
            metadata = info.metadata or {}
            found.checkpoints.append(
                CheckpointPoint(
                    time=_time(info.created_at),
                    step=info.step,
                    version=info.version,
                    tier=str(metadata.get("tier") or default_tier),
                    trigger=str(metadata.get("trigger") or "manual"),
                )
            )
    found.checkpoints.sort(key=lambda point: point.time)  # _journal_marks reads them
    try:
        events = Journal(core, lineage).events()
    except CheckpointError:
        if not found.checkpoints:
            raise
        events = []  # checkpoints without a readable journal: draw what there is
    _journal_marks(found, events)
    return found


def _journal_marks(found: Timeline, events: list[JournalEvent]) -> None:
    last_seen: dict[str, datetime] = {}
    open_runs: dict[str, datetime] = {}  # run_id -> start, for runs with no end yet
    open_recoveries: dict[str, int] = {}  # run_id -> index in found.recoveries
    for event in sorted(events, key=lambda event: event.seq):
        at = _time(event.time)
        if event.kind in ("run_started", "recovery_started"):
            # another run or recovery starting means every run still open died without a word
            for run_id in [run_id for run_id in open_runs if run_id != event.run_id]:
                started = open_runs.pop(run_id)
                # its last sign of life: its last journal event, or a later checkpoint (light ones are not
                # journaled) written before this start
                signs = [last_seen.get(run_id, started)]
                signs += [p.time for p in found.checkpoints if started <= p.time <= at]
                found.crashes.append((max(signs), run_id))
        if event.kind == "run_started":
            found.run_starts.append((at, event.run_id))
            open_runs[event.run_id] = at
        elif event.kind == "failure":
            final = event.data.get("final", True) is not False
            step = event.data.get("step")
            found.failures.append((at, f"failure in {step}" if step else "failure", final))
            if final:
                open_runs.pop(event.run_id, None)
        elif event.kind == "run_finished":
            open_runs.pop(event.run_id, None)
        elif event.kind == "recovery_started":
            open_recoveries[event.run_id] = len(found.recoveries)
            found.recoveries.append((at, None, "in progress"))
        elif event.kind == "recovery_finished":
            status = str(event.data.get("status") or "finished")
            index = open_recoveries.pop(event.run_id, None)
            if index is None:
                found.recoveries.append((at, at, status))
            else:
                found.recoveries[index] = (found.recoveries[index][0], at, status)
        last_seen[event.run_id] = at


def _count(number: int, one: str, many: str | None = None) -> str:
    return f"{number} {one if number == 1 else many or one + 's'}"


def _matplotlib() -> tuple[Any, Any, Any]:
    try:
        import matplotlib.dates as mdates
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlotUnavailableError(f"{INSTALL_HINT} ({exc})") from None
    return Figure, FigureCanvasAgg, mdates


def plot_timeline(store: Any, lineage: str, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Draw the timeline of ``lineage`` into the PNG ``path`` (1000 x 500 pixels) and return its path.

    Training step (y) against wall time in UTC (x). Each checkpoint is a marker: colour by tier (heavy
    blue, light orange), shape by trigger (every_n_steps o, timebox s, milestone *, manual D, emergency X).
    A grey line joins them in time order, so a resume from an earlier step shows as a drop. Dotted grey
    lines: runs started; red dashed: final failures (orange: failed attempts that were retried); red
    dotted: crashes (a run with no end in the journal, at its last event); green bands: recoveries.
    Raises ``PlotUnavailableError`` (an ImportError) without matplotlib.
    """
    Figure, FigureCanvasAgg, mdates = _matplotlib()
    data = timeline(store, lineage)
    figure = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()

    points = [point for point in data.checkpoints if point.step is not None]
    if points:
        axes.plot([p.time for p in points], [p.step for p in points], color="0.6", linewidth=1, zorder=1,
                  label="training progress")  # fmt: skip
    series: dict[tuple[str, str], list[CheckpointPoint]] = {}
    for point in points:
        series.setdefault((point.tier, _trigger_kind(point.trigger)), []).append(point)
    for (tier, trigger), members in sorted(series.items()):
        marker = TRIGGER_MARKERS.get(trigger, OTHER_MARKER)
        color = TIER_COLORS.get(tier, "tab:purple")
        light = tier == "light"
        axes.scatter(
            [p.time for p in members],
            [p.step for p in members],
            marker=marker,
            s=30 if light else 70,
            facecolors="none" if light else color,
            edgecolors=color,
            linewidths=1.2,
            zorder=3,
            label=f"{tier} checkpoint ({trigger})",
        )

    seen: set[str] = set()

    def once(label: str) -> str:
        """One legend entry per kind of mark."""
        if label in seen:
            return "_nolegend_"
        seen.add(label)
        return label

    for at, _run_id in data.run_starts:
        axes.axvline(at, color="0.4", linestyle=":", linewidth=1, zorder=0, label=once("run started"))
    for at, _label, final in data.failures:
        label = "failure" if final else "failed attempt (retried)"
        axes.axvline(at, color="red" if final else "orange", linestyle="--", linewidth=1.5, zorder=2,
                     label=once(label))  # fmt: skip
    for at, _run_id in data.crashes:
        axes.axvline(at, color="red", linestyle=":", linewidth=2, zorder=2,
                     label=once("crash (run ended without a record)"))  # fmt: skip
    moments = [p.time for p in data.checkpoints] + [at for at, _ in data.run_starts]
    end_of_plot = max(moments + [r[1] or r[0] for r in data.recoveries], default=None)
    for start, end, status in data.recoveries:
        stop = end or end_of_plot or start
        if stop <= start:
            axes.axvline(start, color="green", linewidth=2, zorder=2, label=once(f"recovery ({status})"))
        else:
            axes.axvspan(start, stop, color="green", alpha=0.18, zorder=0, label=once(f"recovery ({status})"))

    if not points:
        axes.text(0.5, 0.5, "no checkpoints", transform=axes.transAxes, ha="center", va="center", color="0.5")
    locator = mdates.AutoDateLocator(tz=UTC)
    axes.xaxis.set_major_locator(locator)
    axes.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=UTC))
    axes.set_xlabel("wall time (UTC)")
    axes.set_ylabel("training step")
    heavy = sum(1 for p in data.checkpoints if p.tier == "heavy")
    failures = len(data.failures) + len(data.crashes)
    axes.set_title(
        title
        or f"lineage {lineage}: {heavy} heavy, {len(data.checkpoints) - heavy} light checkpoints, "
        f"{_count(failures, 'failure')}, {_count(len(data.recoveries), 'recovery', 'recoveries')}"
    )
    axes.grid(True, alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="upper left", fontsize="small", framealpha=0.85)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI)
    return path


__all__ = ["DPI", "FIGSIZE", "PlotUnavailableError", "Timeline", "plot_timeline", "timeline"]
