"""Prefect tasks over a CheckpointStore, for flows that do not use the ``@step`` framework.

The building blocks PrefectHQ's integrations ship (``s3_upload``, ``s3_download``...), here for
checkpoints: save, load, verify and audit, each a Prefect task run with its own state and logs.
Each takes the block itself (the UI's run form offers a block picker) or a saved block's name
(the CLI form); without one, the embedded default store.

Prefect's own result persistence and caching are off for these tasks: the checkpoint *is* the
persisted result (multi-region, verified), and a second copy in Prefect's result storage would
double the bytes and bypass the verification. Transient region errors are retried inside the
store (tenacity); ``task.with_options(retries=...)`` adds task-level retries where wanted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from pydantic import JsonValue

from ..blocks import CheckpointStore, open_store
from ..core.audit import AuditReport
from ..core.errors import CheckpointError
from ..core.models import CheckpointInfo, VerifyReport

_OPTIONS: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}


class StoreUnhealthyError(CheckpointError):
    """A verify or audit task found problems it did not repair (the report lists them)."""

    def __init__(self, message: str, report: VerifyReport | AuditReport):
        super().__init__(message)
        self.report = report


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The task run's logger (shown in the UI); the module's when called as ``task.fn(...)``."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def _store(store: CheckpointStore | str | None) -> CheckpointStore:
    if isinstance(store, CheckpointStore):
        return store
    return open_store(store or None)


def _problem_lines(report: VerifyReport) -> str:
    lines = [f"{p.kind} in region {p.region}: {p.object} ({p.detail})" for p in report.unrepaired[:5]]
    more = len(report.unrepaired) - len(lines)
    return "; ".join(lines) + (f"; and {more} more" if more > 0 else "")


@task(name="save-checkpoint", **_OPTIONS)
def save_checkpoint(
    state: Any,
    lineage: str,
    store: CheckpointStore | str | None = None,
    step: int | None = None,
    metadata: dict[str, JsonValue] | None = None,
) -> CheckpointInfo:
    """Save ``state`` as the next version of ``lineage`` (every region, write quorum, signed when
    the store signs); returns what was committed."""
    info = _store(store).save_checkpoint(state, lineage=lineage, step=step, metadata=metadata)
    _logger().info(
        "committed %s v%s (step %s, %s bytes) in %s", lineage, info.version, step, info.total_bytes, info.regions
    )
    return info


@task(name="load-checkpoint", **_OPTIONS)
def load_checkpoint(
    lineage: str,
    store: CheckpointStore | str | None = None,
    version: int | None = None,
    keys: Iterable[Any] | None = None,
) -> Any:
    """Load ``version`` of ``lineage`` (default: the latest consistent one), every blob
    digest-checked before it is handed out; ``keys`` loads only those subtrees."""
    opened = _store(store)
    state = opened.load_checkpoint(lineage=lineage, version=version, keys=keys)
    _logger().info("loaded %s %s", lineage, f"v{version}" if version is not None else "(latest)")
    return state


@task(name="verify-store", **_OPTIONS)
def verify_store(
    store: CheckpointStore | str | None = None,
    lineage: str | None = None,
    repair: bool = False,
    fail_on_problems: bool = True,
) -> VerifyReport:
    """Re-hash every manifest and blob in every region (of one lineage, or all); ``repair`` heals
    from verified copies. Problems left unrepaired fail the task run (``StoreUnhealthyError``,
    carrying the report) unless ``fail_on_problems=False``."""
    report = _store(store).verify(repair=repair, lineage=lineage)
    logger = _logger()
    logger.info(
        "verified %s versions, %s blobs in %s regions: %s problems, %s repaired",
        report.versions,
        report.blobs,
        len(report.regions),
        len(report.problems),
        len(report.problems) - len(report.unrepaired),
    )
    if report.unrepaired and fail_on_problems:
        raise StoreUnhealthyError(
            f"{len(report.unrepaired)} problem(s) left unrepaired: {_problem_lines(report)}; "
            "run verify_store(repair=True) or `prefect-recovery verify --repair`",
            report,
        )
    return report


@task(name="audit-store", **_OPTIONS)
def audit_store(
    store: CheckpointStore | str | None = None,
    lineage: str | None = None,
    read_data: float = 0.1,
    repair: bool = True,
    apply_retention: bool = True,
    dry_run: bool = False,
    seed: int | None = None,
    fail_on_problems: bool = True,
) -> AuditReport:
    """Scrub (a ``read_data`` fraction re-hashed), repair, then apply the store's retention and
    collect garbage (``CheckpointStore.audit``). The ``audit`` flow adds the report artifacts and
    events; this task is the same work as one step of a user's own flow."""
    report = _store(store).audit(
        read_data=read_data,
        repair=repair,
        apply_retention=apply_retention,
        lineage=lineage,
        dry_run=dry_run,
        seed=seed,
    )
    _logger().info(
        "audit: %s versions scrubbed, %s problems (%s unrepaired), %s versions deleted by retention",
        report.scrub.versions,
        len(report.scrub.problems),
        len(report.scrub.unrepaired),
        len(report.deletions),
    )
    if report.scrub.unrepaired and fail_on_problems:
        raise StoreUnhealthyError(
            f"audit left {len(report.scrub.unrepaired)} problem(s) unrepaired: {_problem_lines(report.scrub)}",
            report,
        )
    return report
