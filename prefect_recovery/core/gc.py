"""Garbage collection: mark-and-sweep of the blobs no manifest names, and of the manifests of
saves that never committed (FORMAT.md, "Retention and garbage collection").

``collect_garbage`` runs the two halves in order, each in its own module: first the stale
uncommitted manifests (core/gc_manifests.py: a version that never reached its quorum, from a
save that crashed), so that the blobs only they named become unreferenced; then the blob
mark-and-sweep (core/gc_blobs.py: blobs no manifest names, stale temp files and probes). It
refuses to sweep anything while a region is unreachable or a manifest cannot be parsed. What it
did is a ``GcReport`` (core/gc_report.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from .errors import (
    RegionError,
)
from .gc_blobs import _Candidate, _inventory, _mark, _Marks, _refusals
from .gc_manifests import _find_stale, _sweep_stale
from .gc_report import GcReport
from .store import Store

__all__ = ["MIN_GRACE", "GcReport", "collect_garbage"]

# Shorter than this, a save still uploading its blobs may lose them: refused.
MIN_GRACE = timedelta(minutes=1)


def collect_garbage(
    store: Store,
    *,
    grace: timedelta = timedelta(hours=1),
    now: datetime | None = None,
    dry_run: bool = False,
    assume_deleted: Iterable[tuple[str, int]] = (),
) -> GcReport:
    """Delete, in every region, the blobs no manifest names that are older than ``grace``, and
    the manifests of versions that never reached their quorum (stale uncommitted manifests: older
    than ``grace``, below a newer consistent version of their lineage, not the highest version).

    Args:
        store: The store to clean.
        grace: Unreferenced objects younger than this are kept: the blobs of a save still
            writing (its manifest comes last) must survive. Longer than the longest save;
            below ``MIN_GRACE`` is refused (ValueError).
        now: The time ages are measured against (default: now). Object times come from each
            backend's clock, so clock skew between this host and a region eats into ``grace``.
        dry_run: Report what would be deleted, delete nothing.
        assume_deleted: (lineage, version) pairs whose manifests count as gone (dry run only:
            what retention would delete), so the report says what GC would free after it.
    """
    if grace < MIN_GRACE:
        raise ValueError(
            f"grace {grace} is shorter than {MIN_GRACE}: the blobs of a save still uploading would be deleted. "
            "Use a grace longer than your longest save (default 1 hour)."
        )
    now = now or datetime.now(UTC)
    cutoff = (now - grace).timestamp()
    report = GcReport(
        swept=False, dry_run=dry_run, now=now, grace_seconds=grace.total_seconds(), regions=store.region_names
    )
    _reachable, down = store.reachable_regions()
    if down:
        report.refusals = _refusals(_Marks(unreachable=down), "before marking")
        return report

    if assume_deleted and not dry_run:
        raise ValueError("assume_deleted is for dry runs: delete the manifests (apply_retention) instead")
    ignore = frozenset(assume_deleted)
    marks = _mark(store, ignore)
    report.manifests_read = marks.manifests
    report.blobs_referenced = len(marks.referenced)
    report.notes.extend(marks.notes)
    report.refusals = _refusals(marks, "mark")
    if report.refusals:
        return report

    # Stale uncommitted manifests first; the blobs only they named are then unreferenced.
    gone = _sweep_stale(store, _find_stale(store, marks, cutoff, report), cutoff, dry_run, report)
    referenced = marks.referenced_without(gone)
    report.blobs_referenced = len(referenced)

    candidates: dict[str, list[_Candidate]] = {}
    for region in store.regions:
        try:
            candidates[region.name] = _inventory(region, cutoff, referenced, report)
        except RegionError as exc:
            report.refusals = _refusals(_Marks(unreachable={region.name: str(exc)}), "listing objects")
            return report

    # Re-list and re-mark right before deleting: spare what a save just wrote or committed.
    for region in store.regions:
        if not candidates[region.name]:
            continue
        try:
            current = region.list_info("blobs")
        except RegionError as exc:
            report.refusals = _refusals(_Marks(unreachable={region.name: str(exc)}), "re-listing objects")
            return report
        kept = []
        for candidate in candidates[region.name]:
            if candidate.kind == "blob" and current.get(candidate.key) != (candidate.size, candidate.mtime):
                report.rescued += 1  # rewritten or gone since the inventory
            else:
                kept.append(candidate)
        candidates[region.name] = kept
    if any(candidates.values()):
        # A dry run left the stale manifests in place: the re-mark must not count them either.
        again = _mark(store, ignore | gone if dry_run else ignore)
        report.refusals = _refusals(again, "re-mark")
        if report.refusals:
            return report
        report.blobs_referenced = len(again.referenced | referenced)
        for name, found in candidates.items():
            spared = [c for c in found if c.digest is not None and c.digest in again.referenced]
            report.rescued += len(spared)
            candidates[name] = [c for c in found if c not in spared]

    removed: set[str] = set()
    for region in store.regions:
        for candidate in candidates[region.name]:
            if not dry_run:
                try:
                    region.delete(candidate.key)
                except RegionError as exc:
                    report.notes.append(f"{region.name}: deleting {candidate.key} failed ({exc}); GC will retry it")
                    continue
            counter = {"blob": report.blobs_deleted, "temp": report.temp_files_deleted, "probe": report.probes_deleted}
            counter[candidate.kind][region.name] = counter[candidate.kind].get(region.name, 0) + 1
            report.bytes_freed[region.name] = report.bytes_freed.get(region.name, 0) + candidate.size
            report.deleted.setdefault(region.name, []).append(candidate.key)
            if candidate.digest is not None:
                removed.add(candidate.digest)
    report.swept = not dry_run

    if removed and not dry_run:
        after = _mark(store)
        report.lost_after_sweep = sorted(removed & after.referenced)
        if report.lost_after_sweep:
            report.notes.append(
                f"{len(report.lost_after_sweep)} deleted blob(s) are named by a manifest committed during the sweep "
                "(a save that reused an old unreferenced blob): that version is not consistent and reads fall back "
                "to an older one. Run `prefect-recovery verify` and save again."
            )
    if grace < timedelta(minutes=10):
        report.notes.append(f"grace {grace} is short: a save that takes longer than that may lose its blobs")
    return report
