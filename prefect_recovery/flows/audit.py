"""The ``audit`` flow: scrub, repair, retention and garbage collection, with a report.

Runs ``core.audit.audit_store`` (scrub every manifest and its signature in every region, check
every blob's presence, re-hash a ``read_data`` fraction, repair from verified copies, then apply
the store's ``RetentionPolicy`` and collect unreferenced blobs older than the grace period),
optionally replays one checkpoint segment to check determinism, and publishes:

* ``audit-checkpoints``: a table artifact, one row per checkpoint (lineage, version, step,
  trigger, size, signature, per-region status, retention decision);
* ``audit-summary``: a markdown artifact with the totals, the unrepaired problems and the
  timeline picture of the most recently written lineages;
* a ``prefect-recovery.audit.problem`` event per problem found, for automations.

The run fails when problems remain unrepaired (or a sampled replay is not deterministic), so
a scheduled audit that finds damage shows red in the UI and can drive an automation.
"""

from __future__ import annotations

import base64
import random
import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from ..blocks import CheckpointStore, open_store
from ..core.audit import AuditReport
from ..core.errors import CheckpointError
from ..core.layout import LIGHT_SUFFIX, STEPS_SUFFIX
from ..tasks.errors import RecoveryError, ReplayError
from ..telemetry.events import emit_audit_problem

PLOTTED_LINEAGES = 3


def timeline_images(store: CheckpointStore, report: AuditReport) -> tuple[dict[str, str], list[str]]:
    """Timeline pictures (as data URLs) of the most recently written lineages, and why any is missing."""
    try:
        from ..telemetry.plot import plot_timeline
    except ImportError as exc:  # pragma: no cover - the plot extra is installed by default
        return {}, [f"no timeline pictures: {exc}"]
    latest: dict[str, str] = {}
    for row in report.scrub.checkpoints:
        base = row.lineage.removesuffix(LIGHT_SUFFIX)
        if not base.endswith(STEPS_SUFFIX):
            latest[base] = max(latest.get(base, ""), row.created_at)
    images: dict[str, str] = {}
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as scratch:
        for lineage in sorted(latest, key=latest.__getitem__, reverse=True)[:PLOTTED_LINEAGES]:
            path = Path(scratch) / "timeline.png"
            try:
                plot_timeline(store, lineage, path)
            except (CheckpointError, RuntimeError, ImportError) as exc:
                notes.append(f"no timeline picture of {lineage}: {exc}")
                continue
            images[f"Timeline of {lineage}"] = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    return images, notes


def replay_sample(store: CheckpointStore, report: AuditReport, seed: int | None) -> dict[str, Any] | None:
    """Replay one randomly chosen checkpoint segment; None when no lineage has one to replay.

    Lineages that cannot be replayed here (their pipeline is not registered, or has no replay
    hook) are noted in the report and the next one is tried.
    """
    from .replay import replay_check, sample_segment

    rng = random.Random(seed)
    lineages = sorted({row.lineage for row in report.scrub.checkpoints if row.tier != "light"})
    rng.shuffle(lineages)
    for lineage in lineages:
        segment = sample_segment(store, lineage, rng)
        if segment is None:
            continue
        try:
            result = replay_check(store, lineage, *segment)
        except ReplayError as exc:
            report.notes.append(f"replay check of {lineage} not possible: {exc}")
            continue
        return {"lineage": lineage, **result.model_dump(mode="json")}
    return None


@flow(name="audit", log_prints=True)
def audit(
    store_block: CheckpointStore | str | None = None,
    read_data: float = 1.0,
    repair: bool = True,
    apply_retention: bool = True,
    lineage: str | None = None,
    dry_run: bool = False,
    replay: bool = False,
    seed: int | None = None,
) -> dict[str, Any]:
    """Scrub, repair and prune the checkpoint store, and publish the report.

    Args:
        store_block: A CheckpointStore block (the UI's Custom run form offers a picker) or a saved one's
            name (the CLI's form); default the embedded local store.
        read_data: Fraction (0-1) of the blobs read and re-hashed; every blob's presence is
            checked whatever the fraction.
        repair: Re-copy missing, corrupt or forged copies from a verified healthy copy.
        apply_retention: Apply the store's retention policy and collect garbage (only after a
            healthy scrub).
        lineage: Only this lineage (default: all; garbage collection needs all).
        dry_run: Report what retention and garbage collection would delete; delete nothing.
        replay: Also replay one randomly chosen checkpoint segment and check it is deterministic.
        seed: Seed of the random choices (read_data sample, replay segment).
    """
    logger = get_run_logger()
    store = open_store(store_block)
    report = store.audit(
        read_data=read_data,
        repair=repair,
        apply_retention=apply_retention,
        lineage=lineage,
        dry_run=dry_run,
        seed=seed,
    )
    if replay:
        try:
            report.replay = replay_sample(store, report, seed)
        except CheckpointError as exc:
            report.notes.append(f"replay check not run: {exc}")
        if report.replay is None:
            report.notes.append("replay check: no lineage has two heavy checkpoints to replay between")
    for problem in report.scrub.problems:
        emit_audit_problem(problem.lineage, problem.version, problem.region, problem.kind, problem.detail)

    images, image_notes = timeline_images(store, report)
    report.notes.extend(image_notes)
    create_table_artifact(
        table=report.rows() or [{"lineage": "-", "version": "-", "note": "the store holds no checkpoint"}],
        key="audit-checkpoints",
        description="One row per checkpoint: per-region status, signature and retention decision",
    )
    create_markdown_artifact(key="audit-summary", markdown=report.markdown(images))
    unrepaired = report.scrub.unrepaired
    logger.info(
        "audit: %s versions, %s blobs (%s re-hashed), %s problems (%s unrepaired)%s%s",
        report.scrub.versions,
        report.scrub.blobs,
        report.scrub.blobs_read,
        len(report.scrub.problems),
        len(unrepaired),
        f", retention deleted {sum(bool(d.deleted) for d in report.deletions)} versions" if report.deletions else "",
        f", GC freed {report.gc.total_bytes_freed} bytes" if report.gc and not dry_run else "",
    )
    if unrepaired:
        raise RecoveryError(
            f"audit found {len(unrepaired)} unrepaired problem(s): "
            + "; ".join(f"{p.region} {p.object}: {p.kind}" for p in unrepaired[:5])
            + ". Run the audit with repair=true, or `prefect-recovery audit`."
        )
    if not report.healthy:
        raise RecoveryError(f"audit replay check found a non-deterministic segment: {report.replay}")
    return report.model_dump(mode="json")


__all__ = ["audit", "replay_sample", "timeline_images"]
