"""Garbage collection: mark-and-sweep of the blobs no manifest names, and of the manifests of
saves that never committed (FORMAT.md, "Retention and garbage collection").

*Mark*: every blob named by any manifest present in any region, committed or not, signed or
not (a below-quorum manifest may be a publish in progress; a manifest whose signature does not
check still names blobs a repair may need). A manifest file that cannot be parsed makes the
whole run refuse to sweep: nobody knows what it references. So does an unreachable region: its
manifests may name blobs held elsewhere.

*Stale uncommitted manifests*: a version held by fewer regions than its quorum (a save that
crashed after the arbiter took its manifest, or a retention deletion that failed half-way) is
never a checkpoint and nobody else removes it. It is collected when, with every region
reachable: every copy of it could be read; no manifest of it is committed by the store's own
rule (``Store.committed_groups``: placement ``primary`` needs one copy, and a copy that exists
but fails its checks still counts toward the quorum, since repairing it is the audit's job); it
is not the highest version number listed in its lineage (numbers are never reused); a higher
version of its lineage is consistent (publication numbers only go up, so its publication is
over); and every copy is older than ``grace``. Right before deleting, all of it is checked
again, and a copy that changed (bytes, size or time) or appeared spares the version.

The blobs only such manifests named are collected in the same run: the marks that choose blob
candidates leave out the versions whose every copy was deleted (in a dry run: would be), and the
re-mark before deleting blobs reads the manifests as they are then, so a stale manifest that was
spared, or whose deletion failed, keeps its blobs.

*Sweep*, per region: blobs (``blobs/...``) named by no manifest and last modified more than
``grace`` ago; leftover ``.tmp-*`` files of local regions and ``preflight/`` probe objects older
than ``grace``. The blobs of a save in progress (written, manifest not yet) are younger than
``grace`` and are never candidates. Right before deleting, the blobs are listed and the
manifests marked again, and whatever changed or became referenced is spared; after deleting,
the manifests are marked once more and any deleted blob that a manifest now names is reported.

Remaining race (documented in FORMAT.md): a save that finds an *old* unreferenced blob already
in place does not write it again (deduplication), so it does not refresh its age; if that save
commits its manifest between GC's last mark and its delete, the new version names a deleted
blob. It is not consistent then (reads never use it and fall back to an older version), the
post-sweep mark reports it, and ``verify`` finds it.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel, Field

from .digest import check_digest
from .errors import (
    InvalidNameError,
    JournalError,
    ManifestError,
    ObjectNotFoundError,
    RegionError,
    RegionUnavailableError,
)
from .journal import Journal
from .layout import blob_key, check_lineage, lineages_prefix, manifest_key, manifests_prefix, version_from_manifest_name
from .manifest import MAX_MANIFEST_BYTES, decode_manifest
from .region import LocalRegionIO, RegionIO
from .store import Store

# Shorter than this, a save still uploading its blobs may lose them: refused.
MIN_GRACE = timedelta(minutes=1)
PREFLIGHT_PREFIX = "preflight"  # tasks/preflight.py writes preflight/<random>
TEMP_PREFIX = ".tmp-"
PROBE_KEY = re.compile(rf"{PREFLIGHT_PREFIX}/[0-9a-f]{{8,64}}")


class GcReport(BaseModel):
    """What one garbage collection found and deleted (or, in a dry run, would delete)."""

    swept: bool = Field(description="Whether the sweep ran and deleted (False: refused, or a dry run).")
    dry_run: bool = Field(description="Nothing is deleted; the counts say what would be.")
    now: datetime = Field(description="The time ages were measured against.")
    grace_seconds: float = Field(description="Unreferenced objects younger than this were kept.")
    regions: list[str] = Field(description="Regions of the store, in order.")
    manifests_read: int = Field(default=0, description="Manifest copies parsed in the mark phase, all regions.")
    blobs_referenced: int = Field(default=0, description="Distinct blobs named by at least one manifest.")
    blobs_deleted: dict[str, int] = Field(default_factory=dict, description="Unreferenced blobs deleted, by region.")
    bytes_freed: dict[str, int] = Field(default_factory=dict, description="Bytes of the objects deleted, by region.")
    deleted: dict[str, list[str]] = Field(
        default_factory=dict, description="Keys deleted (blobs, stale manifests, temp files, probes), by region."
    )
    stale_manifests_deleted: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Manifest copies of versions that never reached their quorum (crashed saves, half-failed "
        "retention deletions), older than grace and below a newer consistent version, deleted, by region.",
    )
    uncommitted_kept: dict[str, str] = Field(
        default_factory=dict,
        description="Below-quorum versions ('<lineage> v<version>') left in place this run, with the reason.",
    )
    temp_files_deleted: dict[str, int] = Field(
        default_factory=dict, description="Stale .tmp-* files of interrupted local writes deleted, by region."
    )
    probes_deleted: dict[str, int] = Field(
        default_factory=dict, description="Stale preflight/ probe objects deleted, by region."
    )
    kept_young: int = Field(
        default=0, description="Unreferenced blobs, temp files and probes kept because they are younger than grace."
    )
    rescued: int = Field(
        default=0, description="Candidates spared because the re-mark before deleting found them referenced or new."
    )
    unknown_objects: int = Field(
        default=0, description="Objects under blobs/ whose name is not a digest; never deleted."
    )
    lost_after_sweep: list[str] = Field(
        default_factory=list,
        description="Deleted blobs that a manifest committed during the sweep names (see the notes).",
    )
    refusals: list[str] = Field(default_factory=list, description="Why nothing was swept, and what to do.")
    notes: list[str] = Field(default_factory=list, description="Other things a person should know.")

    @property
    def total_bytes_freed(self) -> int:
        return sum(self.bytes_freed.values())

    @property
    def total_blobs_deleted(self) -> int:
        return sum(self.blobs_deleted.values())


Version = tuple[str, int]  # (lineage, version)


@dataclass
class _Marks:
    referenced: set[str] = field(default_factory=set)
    manifests: int = 0
    unreadable: list[str] = field(default_factory=list)
    unreachable: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # Blobs named by each version (all its copies read), and the regions listing each version
    # (the ignored ones included).
    names: dict[Version, set[str]] = field(default_factory=dict)
    listed: dict[Version, set[str]] = field(default_factory=dict)
    placements: dict[Version, set[str]] = field(default_factory=dict)

    def referenced_without(self, gone: Iterable[Version]) -> set[str]:
        """The blobs named by the versions read, but ``gone``."""
        skip = set(gone)
        return set().union(*(names for version, names in self.names.items() if version not in skip))


@dataclass
class _StaleManifest:
    """A version below quorum that GC may delete, as it was found."""

    lineage: str
    version: int
    key: str
    copies: dict[str, tuple[bytes, int, float]]  # region -> (bytes, size, mtime)

    @property
    def label(self) -> str:
        return f"{self.lineage} v{self.version}"


@dataclass
class _Candidate:
    key: str
    size: int
    mtime: float
    digest: str | None  # None for temp files and probes
    kind: str  # "blob", "temp" or "probe"


def _mark(store: Store, ignore: frozenset[tuple[str, int]] = frozenset()) -> _Marks:
    """Every blob any manifest file in any region names (but the ``ignore``d (lineage, version)
    pairs: a dry run's retention deletions); what could not be read."""
    marks = _Marks()
    lock = threading.Lock()
    jobs: list[tuple[RegionIO, str, int, str]] = []
    for region in store.regions:
        try:
            for lineage in region.list(lineages_prefix()):
                try:
                    check_lineage(lineage)
                except InvalidNameError:
                    marks.notes.append(f"{region.name}: lineages/{lineage} is not a lineage name; ignored")
                    continue
                for name in region.list(manifests_prefix(lineage)):
                    version = version_from_manifest_name(name)
                    if version is None:
                        continue
                    marks.listed.setdefault((lineage, version), set()).add(region.name)
                    if (lineage, version) not in ignore:
                        jobs.append((region, lineage, version, manifest_key(lineage, version)))
        except RegionError as exc:
            marks.unreachable[region.name] = str(exc)

    def read(job: tuple[RegionIO, str, int, str]) -> None:
        region, lineage, version, key = job
        try:
            data = region.get(key, max_bytes=MAX_MANIFEST_BYTES)
        except ObjectNotFoundError:
            return  # deleted since it was listed (retention)
        except RegionError as exc:
            with lock:
                marks.unreachable.setdefault(region.name, str(exc))
            return
        try:
            # No keyring: a manifest's blobs count whatever its signature says.
            manifest = decode_manifest(
                data, expect_lineage=lineage, expect_version=version, region=region.name, key=key
            )
        except ManifestError as exc:
            with lock:
                marks.unreadable.append(str(exc))
            return
        with lock:
            marks.manifests += 1
            marks.referenced.update(manifest.blob_digests())
            marks.names.setdefault((lineage, version), set()).update(manifest.blob_digests())
            marks.placements.setdefault((lineage, version), set()).add(manifest.placement)

    if jobs:
        workers = max(1, min(len(jobs), store.io_threads * len(store.regions)))
        with ThreadPoolExecutor(workers, thread_name_prefix="gc-mark") as pool:
            list(pool.map(read, jobs))
    return marks


def _digest_of(key: str) -> str | None:
    """The digest a ``blobs/<algo>/<hh>/<hex>`` key names, or None for any other name."""
    parts = key.split("/")
    if len(parts) != 4 or parts[0] != "blobs":
        return None
    try:
        digest = check_digest(f"{parts[1]}:{parts[3]}")
    except (InvalidNameError, ValueError):
        return None
    return digest if blob_key(digest) == key else None


def _refusals(marks: _Marks, when: str) -> list[str]:
    refusals = []
    for name, cause in marks.unreachable.items():
        refusals.append(
            f"{when}: region {name} could not be read ({cause}); its manifests may name blobs kept in other "
            "regions, so nothing was swept. Bring the region back (or remove it from the store) and run GC again."
        )
    if marks.unreadable:
        shown = "; ".join(marks.unreadable[:5]) + (
            f" (+{len(marks.unreadable) - 5} more)" if len(marks.unreadable) > 5 else ""
        )
        refusals.append(
            f"{when}: {len(marks.unreadable)} manifest file(s) cannot be parsed, so what they reference is "
            f"unknown and nothing was swept ({shown}). Run `prefect-recovery verify --repair` to restore them "
            "from a healthy region, or delete a manifest that is beyond repair, then run GC again."
        )
    return refusals


def _inventory(region: RegionIO, cutoff: float, referenced: set[str], report: GcReport) -> list[_Candidate]:
    """Objects of ``region`` that may be deleted: unreferenced old blobs, stale temp files and probes."""
    candidates: list[_Candidate] = []
    for key, (size, mtime) in sorted(region.list_info("blobs").items()):
        digest = _digest_of(key)
        if digest is None:
            if not key.rsplit("/", 1)[-1].startswith(TEMP_PREFIX):
                report.unknown_objects += 1
            continue
        if digest in referenced:
            continue
        if mtime < cutoff:
            candidates.append(_Candidate(key, size, mtime, digest, "blob"))
        else:
            report.kept_young += 1
    # Only probes named as tasks/preflight.py names them (preflight/<hex>): anything else there is not ours.
    extras: list[tuple[str, str]] = [
        (key, "probe") for key in region.list_info(PREFLIGHT_PREFIX) if PROBE_KEY.fullmatch(key)
    ]
    if isinstance(region, LocalRegionIO):
        extras += [(key, "temp") for key in region.temp_files()]
    for key, kind in extras:
        info = region.list_info(key).get(key)
        if info is None:
            continue  # gone meanwhile
        if info[1] < cutoff:
            candidates.append(_Candidate(key, info[0], info[1], None, kind))
        else:
            report.kept_young += 1
    return candidates


# -- stale uncommitted manifests ------------------------------------------------------------------
def _listing(store: Store, lineage: str) -> dict[int, set[str]]:
    """``Store.version_listing`` as sets of regions, every region required (RegionError naming the
    first region that cannot be listed)."""
    listed, unreachable = store.version_listing(lineage)
    for name, cause in unreachable.items():
        raise RegionUnavailableError(name, cause.removeprefix(f"region {name}: "))
    return {version: set(names) for version, names in listed.items()}


def _consistent(store: Store, lineage: str, version: int, listing: dict[int, set[str]], seen: dict[int, bool]) -> bool:
    """Whether ``version`` is consistent, every region counted (no region may be missing)."""
    if version not in seen:
        order = store.region_names
        listed = {v: sorted(names, key=order.index) for v, names in listing.items()}
        seen[version] = store.consistent_manifest(lineage, version, (listed, {})) is not None
    return seen[version]


def _check_stale(
    store: Store,
    lineage: str,
    version: int,
    listing: dict[int, set[str]],
    cutoff: float,
    seen: dict[int, bool],
    journaled: set[int],
) -> tuple[_StaleManifest | None, str | None]:
    """``(stale, None)`` when every rule lets GC delete ``version``'s manifest copies; ``(None,
    why)`` when it is uncommitted but stays; ``(None, None)`` when it is committed (or gone):
    not GC's business. Raises RegionError when a region cannot answer."""
    key = manifest_key(lineage, version)
    copies = store.manifest_copies(lineage, version)
    if not copies.raw and not listing.get(version):
        return None, None
    unread = sorted(listing.get(version, set()) - set(copies.raw))
    if unread:
        causes = "; ".join(f"{name}: {copies.invalid.get(name, 'not found')}" for name in unread)
        return None, f"a listed copy could not be read ({causes})"
    if not copies.valid:
        return None, (
            "no copy passes its checks (damaged or forged wherever it is held): the audit reports it, GC never "
            "deletes it"
        )
    if store.committed_groups(copies):  # any manifest of it committed by the store's rule
        return None, None
    if version >= max(listing, default=version):
        return None, "the highest version of its lineage: its number stays listed, so it is never reused"
    regions = {region.name: region for region in store.regions}
    found: dict[str, tuple[bytes, int, float]] = {}
    for name, data in sorted(copies.raw.items()):
        info = regions[name].list_info(key).get(key)
        if info is None or info[0] != len(data):
            return None, f"its copy in {name} changed while it was checked"
        if info[1] >= cutoff:
            return None, f"its copy in {name} is younger than grace (a publication may still be under way)"
        found[name] = (data, info[0], info[1])
    newer = sorted((v for v in listing if v > version), reverse=True)
    if not any(_consistent(store, lineage, v, listing, seen) for v in newer):
        return None, "no higher version of its lineage is consistent, so its publication may not be over"
    if version in journaled:
        return None, (
            "the lineage's journal records it as committed: a checkpoint that lost manifest copies, not a crashed "
            "save; GC never deletes it (`prefect-recovery verify --repair` re-replicates it)"
        )
    return _StaleManifest(lineage, version, key, found), None


def _journaled_commits(store: Store, lineage: str) -> set[int] | None:
    """Versions the lineage's journal records as committed (``checkpoint_committed``); None when
    the journal cannot be read (then nothing of the lineage is collected)."""
    try:
        events = Journal(store, lineage).events()
    except (JournalError, RegionError):
        return None
    return {
        event.data["version"]
        for event in events
        if event.kind == "checkpoint_committed" and isinstance(event.data.get("version"), int)
    }


def _find_stale(store: Store, marks: _Marks, cutoff: float, report: GcReport) -> list[_StaleManifest]:
    """The below-quorum versions GC may delete; the others below quorum go to ``uncommitted_kept``.

    Only versions listed by fewer regions than ``write_quorum`` are read again (a version held in
    more regions by different manifests, possible only after a partition, is left alone), and not
    those whose every copy says placement ``primary`` (committed with one copy)."""
    by_lineage: dict[str, dict[int, set[str]]] = {}
    for (lineage, version), names in marks.listed.items():
        by_lineage.setdefault(lineage, {})[version] = names
    found: list[_StaleManifest] = []
    for lineage, listing in sorted(by_lineage.items()):
        seen: dict[int, bool] = {}
        journaled: set[int] | None = None  # read once per lineage, when a version needs it
        for version in sorted(listing):
            pair = (lineage, version)
            if (
                len(listing[version]) >= store.write_quorum
                or pair not in marks.names  # an assumed deletion, or gone since it was listed
                or marks.placements.get(pair) == {"primary"}
            ):
                continue
            if journaled is None:
                journaled = _journaled_commits(store, lineage)
            if journaled is None:
                report.uncommitted_kept[f"{lineage} v{version}"] = "its lineage's journal cannot be read"
                continue
            try:
                stale, why = _check_stale(store, lineage, version, listing, cutoff, seen, journaled)
            except RegionError as exc:
                stale, why = None, f"could not be checked ({exc})"
            if why is not None:
                report.uncommitted_kept[f"{lineage} v{version}"] = why
            if stale is not None:
                found.append(stale)
    return found


def _sweep_stale(
    store: Store, found: list[_StaleManifest], cutoff: float, dry_run: bool, report: GcReport
) -> set[Version]:
    """Check each stale manifest again, then delete its copies; the versions now gone everywhere
    (in a dry run: that would be)."""
    regions = {region.name: region for region in store.regions}
    gone: set[Version] = set()
    for stale in found:
        journaled = _journaled_commits(store, stale.lineage)
        try:
            if journaled is None:
                again, why = None, "its lineage's journal cannot be read"
            else:
                listing = _listing(store, stale.lineage)
                again, why = _check_stale(store, stale.lineage, stale.version, listing, cutoff, {}, journaled)
        except RegionError as exc:
            again, why = None, f"could not be checked again ({exc})"
        if again is None or again.copies != stale.copies:
            report.uncommitted_kept[stale.label] = "spared by the re-check before deleting: " + (
                why or "it changed since it was found"
            )
            continue
        complete = True
        for name, (_data, size, _mtime) in stale.copies.items():
            if not dry_run:
                try:
                    regions[name].delete(stale.key)
                except RegionError as exc:
                    report.notes.append(f"{name}: deleting stale manifest {stale.key} failed ({exc}); GC will retry it")
                    complete = False
                    continue
            report.stale_manifests_deleted.setdefault(name, []).append(stale.key)
            report.deleted.setdefault(name, []).append(stale.key)
            report.bytes_freed[name] = report.bytes_freed.get(name, 0) + size
        if complete:
            gone.add((stale.lineage, stale.version))
    return gone


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
