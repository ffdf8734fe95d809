"""The ``audit`` flow, verify-only for now: scrub every region and report.

Reads every manifest and every blob in every region and checks digests (``verify``); with
``repair`` it re-copies damaged or missing copies from a verified healthy one. Publishes a
table artifact (one row per problem) and fails the run when problems remain, so a scheduled
audit that finds damage shows red in the UI and can drive an automation.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from ..blocks import CheckpointStore
from ..core.errors import RecoveryError


@flow(name="audit", log_prints=True)
def audit(store_block: str | None = None, repair: bool = False, lineage: str | None = None) -> dict[str, Any]:
    """Verify every checkpoint in the store (and optionally repair); publish a report.

    Args:
        store_block: Name of a saved CheckpointStore block; default the embedded local store.
        repair: Re-copy damaged or missing copies from a verified healthy copy.
        lineage: Only this lineage (default: all).
    """
    store = CheckpointStore.load(store_block) if store_block else CheckpointStore.default()
    report = store.verify(repair=repair, lineage=lineage)
    rows = [problem.model_dump() for problem in report.problems]
    create_table_artifact(
        table=rows or [{"region": "-", "object": "-", "kind": "none", "detail": "no problems", "repaired": False}],
        key="audit-problems",
        description="Problems the audit found (repaired=true when repair fixed it)",
    )
    create_markdown_artifact(
        key="audit-summary",
        markdown=(
            f"# Checkpoint audit\n\n* regions: {', '.join(report.regions)}\n* lineages: {report.lineages}, "
            f"versions: {report.versions}, blobs: {report.blobs}, bytes checked: {report.bytes_checked:,}\n"
            f"* problems: {len(report.problems)} ({len(report.unrepaired)} unrepaired)\n"
            f"* healthy: {'yes' if report.healthy else 'NO'}\n"
        ),
    )
    summary = report.model_dump(mode="json")
    get_run_logger().info(
        "audit: %s versions, %s blobs, %s problems (%s unrepaired)",
        report.versions,
        report.blobs,
        len(report.problems),
        len(report.unrepaired),
    )
    if report.unrepaired:
        raise RecoveryError(
            f"audit found {len(report.unrepaired)} unrepaired problem(s): "
            + "; ".join(f"{p.region} {p.object}: {p.kind}" for p in report.unrepaired[:5])
            + ". Run the audit with repair=true, or `prefect-recovery verify --repair`."
        )
    return summary


__all__ = ["audit"]
