"""GC of blobs: mark every blob any manifest names, then sweep the old unreferenced ones.

*Mark*: every blob named by any manifest present in any region (for a paged manifest: its entry
pages and every blob they name), committed or not, signed or
not (a below-quorum manifest may be a publish in progress; a manifest whose signature does not
check still names blobs a repair may need). A manifest file that cannot be parsed makes the
whole run refuse to sweep: nobody knows what it references. So does an unreachable region: its
manifests may name blobs held elsewhere.

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

Apart from core/gc_manifests.py because the two answer different questions: this one "which
objects does no manifest need?" (any manifest counts, committed or not), that one "which
manifests are no checkpoint?" (the store's committed/quorum rule).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .digest import check_digest
from .errors import (
    InvalidNameError,
    ManifestError,
    ObjectNotFoundError,
    RegionError,
)
from .gc_report import GcReport
from .layout import blob_key, check_lineage, lineages_prefix, manifest_key, manifests_prefix, version_from_manifest_name
from .manifest import MAX_MANIFEST_BYTES, PageRef, decode_manifest, entry_blob_sizes
from .region_local import LocalRegionIO
from .region_object import RegionIO
from .store import Store

PREFLIGHT_PREFIX = "preflight"  # tasks/preflight.py writes preflight/<random>
TEMP_PREFIX = ".tmp-"
PROBE_KEY = re.compile(rf"{PREFLIGHT_PREFIX}/[0-9a-f]{{8,64}}")


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
        named = [page.digest for page in manifest.pages] if manifest.pages is not None else manifest.blob_digests()
        with lock:
            marks.manifests += 1
            marks.referenced.update(named)
            marks.names.setdefault((lineage, version), set()).update(named)
            marks.placements.setdefault((lineage, version), set()).add(manifest.placement)
            for page in manifest.pages or ():
                pages.setdefault(page.digest, page)
                paged.setdefault(page.digest, set()).add((lineage, version))

    # A paged manifest's entry pages, each read once (from any region: they are content
    # addressed), name the rest of its blobs. A page that cannot be read is a manifest that
    # cannot be read: what it references is unknown, and nothing is swept.
    pages: dict[str, PageRef] = {}
    paged: dict[str, set[Version]] = {}
    if jobs:
        workers = max(1, min(len(jobs), store.io_threads * len(store.regions)))
        with ThreadPoolExecutor(workers, thread_name_prefix="gc-mark") as pool:
            list(pool.map(read, jobs))

    def read_page(ref: PageRef) -> None:
        try:
            entries = store.read_pages([ref])[0]
        except (ManifestError, RegionError) as exc:
            with lock:
                marks.unreadable.append(f"entry page {ref.digest} of {sorted(paged[ref.digest])}: {exc}")
            return
        named = set(entry_blob_sizes(entries))  # a delta chunk's parents are live with it
        with lock:
            marks.referenced.update(named)
            for version in paged[ref.digest]:
                marks.names.setdefault(version, set()).update(named)

    if pages:
        with ThreadPoolExecutor(max(1, store.io_threads), thread_name_prefix="gc-page") as pool:
            list(pool.map(read_page, pages.values()))
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
