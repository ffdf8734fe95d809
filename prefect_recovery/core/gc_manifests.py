"""GC of stale uncommitted manifests: the versions of saves that crashed below their quorum.

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

Apart from the blob sweep (core/gc_blobs.py) because deleting a manifest decides that a version
is no checkpoint, by the store's own rule (core/store_consistency.py) and the lineage's journal;
deleting a blob only needs that no manifest names it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import (
    JournalError,
    RegionError,
    RegionUnavailableError,
)
from .gc_blobs import Version, _Marks
from .gc_report import GcReport
from .journal import Journal
from .layout import manifest_key
from .store import Store


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
