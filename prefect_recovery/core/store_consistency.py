"""The consistency rule: which version of a lineage counts, and which manifest copy to load.

DESIGN.md invariant 3: a version is *consistent* when one identical, valid manifest is in at
least ``write_quorum`` regions (a copy damaged after its write still proves the write; a
region that cannot be asked lowers the requirement, to at least one) and every blob it names
exists in at least one region (for a paged manifest: every entry page it lists; the blobs the
pages name are checked as they are read, core/store_pages.py). "Latest" is the latest
consistent version, except that on a signing store a newest version no region holds a
trusted copy of stops the load instead of rolling the lineage back. The rule lives apart from
the reads it uses (core/store_reads.py) and the writer that must satisfy it
(core/store_writer.py) so that verify, GC, retention and the audit can apply the same rule
through ``ManifestCopies`` and ``Store.is_committed``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .errors import (
    CheckpointNotFoundError,
    ForeignObjectError,
    ManifestError,
    ManifestSignatureError,
    RegionError,
)
from .layout import check_lineage, manifest_key
from .manifest import MAX_MANIFEST_BYTES, Manifest, decode_manifest
from .models import CheckpointInfo
from .region_codecs import required_forms
from .region_object import RegionIO
from .signing import Keyring
from .store_listing import StoreListing


@dataclass
class ManifestCopies:
    """What each region holds for one version of a lineage."""

    version: int
    valid: dict[str, Manifest] = field(default_factory=dict)
    invalid: dict[str, str] = field(default_factory=dict)
    raw: dict[str, bytes] = field(default_factory=dict)
    # Copies that parse but whose signature fails (tampered, unsigned, unknown key).
    unsigned_or_forged: dict[str, ManifestSignatureError] = field(default_factory=dict)
    # Something the store did not write in the manifest's place (a link, a directory): not a
    # copy (it proves no write), but reported, and replaced by repair when it is a link.
    foreign: dict[str, str] = field(default_factory=dict)

    @property
    def damaged(self) -> list[str]:
        """Regions whose copy exists but fails its checks (corrupt, misplaced, forged)."""
        return [region for region in self.raw if region not in self.valid]

    def committed(self, manifest: Manifest | None, holders: list[str], quorum: int) -> bool:
        """Whether ``manifest`` was committed: its verified holders, plus the regions whose copy
        exists but was damaged after the write, reach ``quorum`` (a damaged copy still proves a
        write happened there; the verified copy is what is read)."""
        return manifest is not None and bool(holders) and len(holders) + len(self.damaged) >= quorum

    def groups(self, region_order: Sequence[str]) -> list[tuple[Manifest, list[str]]]:
        """Which regions hold the same manifest: each distinct valid manifest and its holders (in
        ``region_order``), most holders first (ties: the group of the earliest region first)."""
        groups: dict[str, list[str]] = {}
        for region in region_order:
            if region in self.valid:
                groups.setdefault(self.valid[region].manifest_digest, []).append(region)
        ordered = sorted(groups.values(), key=len, reverse=True)  # stable: equal lengths keep their order
        return [(self.valid[holders[0]], holders) for holders in ordered]

    def best(self, region_order: Sequence[str]) -> tuple[Manifest | None, list[str]]:
        """The manifest held by most regions (ties: earliest region) and who holds it."""
        groups = self.groups(region_order)
        return groups[0] if groups else (None, [])


logger = logging.getLogger("prefect_recovery.store")


def _causes(copies: ManifestCopies) -> str:
    return "; ".join(copies.invalid.get(region, "damaged") for region in copies.damaged)


def _untrusted(lineage: str, version: int, copies: ManifestCopies) -> ManifestError:
    """The error of a version whose manifest exists but no copy of it passes its checks."""
    error = ManifestSignatureError if copies.unsigned_or_forged else ManifestError
    return error(
        f"lineage {lineage!r} version {version} cannot be trusted in any region: {_causes(copies)}. "
        "Load an earlier version explicitly to go on without it"
    )


class StoreConsistency(StoreListing):
    """The committed/quorum rule over manifest copies, and the loads and listings built on it."""

    write_quorum: int
    keyring: Keyring | None

    def quorum_for(self, manifest: Manifest) -> int:
        """Copies a manifest needs to count as committed (1 for single-region placement)."""
        return self.write_quorum if manifest.placement == "all" else 1

    def is_committed(
        self, copies: ManifestCopies, manifest: Manifest | None, holders: list[str], missing: int = 0
    ) -> bool:
        """Whether ``manifest``, held by ``holders`` among ``copies``, is committed by the store's rule
        (``ManifestCopies.committed`` against its quorum, lowered by ``missing`` regions that could not
        be asked, to at least one)."""
        return manifest is not None and copies.committed(manifest, holders, max(1, self.quorum_for(manifest) - missing))

    def committed_groups(self, copies: ManifestCopies, missing: int = 0) -> list[tuple[Manifest, list[str]]]:
        """Which regions hold the same committed manifest: each group of ``copies.groups`` (most
        holders first) whose manifest is committed (``is_committed``)."""
        return [
            (manifest, holders)
            for manifest, holders in copies.groups(self.region_names)
            if self.is_committed(copies, manifest, holders, missing)
        ]

    def manifest_copies(self, lineage: str, version: int, regions: Iterable[str] | None = None) -> ManifestCopies:
        copies = ManifestCopies(version)
        key = manifest_key(lineage, version)
        targets = [self._region(n) for n in regions] if regions is not None else self.regions

        def fetch(region: RegionIO) -> None:
            try:
                data = self._bounded(region, region.get, key, MAX_MANIFEST_BYTES)
            except ForeignObjectError as exc:  # a link, directory or device in its place: no copy
                copies.invalid[region.name] = copies.foreign[region.name] = str(exc)
                return
            except RegionError as exc:
                copies.invalid[region.name] = str(exc)
                return
            copies.raw[region.name] = data
            try:
                copies.valid[region.name] = decode_manifest(
                    data,
                    expect_lineage=lineage,
                    expect_version=version,
                    region=region.name,
                    key=key,
                    keyring=self.keyring,
                )
            except ManifestSignatureError as exc:
                copies.invalid[region.name] = str(exc)
                copies.unsigned_or_forged[region.name] = exc
            except ManifestError as exc:
                copies.invalid[region.name] = str(exc)
            except Exception as exc:  # a record that cannot be checked is a damaged copy, never a lost thread
                copies.invalid[region.name] = (
                    f"manifest cannot be checked ({type(exc).__name__}: {exc}) [{region.name}:{key}]"
                )

        self._each_region(fetch, targets)
        return copies

    def consistent_manifest(
        self, lineage: str, version: int, listing: tuple[dict[int, list[str]], dict[str, str]] | None = None
    ) -> tuple[Manifest, list[str]] | None:
        """The committed manifest of ``version`` and its holders, or None if not consistent.

        A region that cannot be listed right now may hold the missing copies, so it lowers the
        copies required (to at least one), as for journal events: a region outage must not hide
        committed checkpoints from a restore.
        """
        return self._consistent(lineage, version, listing)[0]

    def _consistent(
        self, lineage: str, version: int, listing: tuple[dict[int, list[str]], dict[str, str]] | None = None
    ) -> tuple[tuple[Manifest, list[str]] | None, ManifestCopies | None]:
        listed, unreachable = listing if listing is not None else self.version_listing(lineage)
        holders_listed = listed.get(version)
        if not holders_listed:
            return None, None
        copies = self.manifest_copies(lineage, version, holders_listed)
        found = self._committed(copies, unreachable)
        return found, copies

    def _committed(self, copies: ManifestCopies, unreachable: dict[str, str]) -> tuple[Manifest, list[str]] | None:
        manifest, holders = copies.best(self.region_names)
        if manifest is None or not self.is_committed(copies, manifest, holders, len(unreachable)):
            return None
        if manifest.pages is not None:
            # Paged form: the pages are checked here, not the blobs they name (reading every page
            # on every resolve would make each rank read the whole checkpoint's entries, the cost
            # the pages exist to avoid). Blobs were written before their pages, their digests are
            # checked as they are read, and verify checks their presence (docs/SCALING.md).
            sizes = {page.digest: page.size for page in manifest.pages}
            several: list[list[list[tuple[str, int]]]] = []
        else:
            # Delta parents included; a chunk with several stored forms (regions with different
            # codecs) needs one form's blobs only (FORMAT.md, "Region codecs").
            sizes, several = required_forms(manifest.entries)
        if not all(self.blob_present(d, s) for d, s in sizes.items()):
            return None
        for forms in several:
            if not any(all(self.blob_present(d, s) for d, s in blobs) for blobs in forms):
                return None
        return manifest, holders

    def resolve(self, lineage: str, version: int | None = None) -> tuple[Manifest, list[str]]:
        """The manifest to load: ``version`` if given and consistent, else the latest consistent.

        A version whose manifest exists but no copy of it passes its checks (damaged, misplaced,
        forged, signed with an unknown key): on a signing store that may be tampering, and
        editing one byte must not roll a lineage back, so the load stops with a
        ``ManifestError`` (``ManifestSignatureError`` for signature failures). Without signing,
        "latest" is the latest consistent version (DESIGN.md invariant 3): the damaged version
        is skipped with a warning, and asked for by number it is ``CheckpointNotFoundError``
        naming the damage.
        """
        check_lineage(lineage)
        listing = self.version_listing(lineage)
        self.require_answer(listing[1], f"the checkpoints of lineage {lineage!r}")
        listed = listing[0]
        candidates = [version] if version is not None else sorted(listed, reverse=True)
        for candidate in candidates:
            if candidate not in listed:
                break
            found, copies = self._consistent(lineage, candidate, listing)
            if found is not None:
                return found
            if copies is not None and copies.damaged and not copies.valid:
                causes = _causes(copies)
                if self.keyring is None and version is None:
                    logger.warning(
                        "lineage %r: skipping version %s, damaged in every region: %s", lineage, candidate, causes
                    )
                    continue
                if self.keyring is None:
                    raise CheckpointNotFoundError(
                        f"lineage {lineage!r} has no consistent version {version}: its manifest is damaged in every "
                        f"region ({causes}); load an earlier version"
                    )
                raise _untrusted(lineage, candidate, copies)
        if version is not None:
            raise CheckpointNotFoundError(
                f"lineage {lineage!r} has no consistent version {version} "
                f"(consistent versions: {self.consistent_versions(lineage) or 'none'})"
            )
        raise CheckpointNotFoundError(f"lineage {lineage!r} has no consistent checkpoint in {self.region_names}")

    def consistent_versions(self, lineage: str) -> list[int]:
        listing = self.version_listing(lineage)
        return [v for v in listing[0] if self.consistent_manifest(lineage, v, listing)]

    def list(self, lineage: str | None = None) -> list[CheckpointInfo]:
        """Every consistent version, oldest first (of one lineage, or all).

        "Latest" means what ``resolve`` means: on a signing store, a version above the latest
        consistent one that no region holds a trusted copy of stops the listing of its lineage
        (``ManifestSignatureError`` / ``ManifestError``, as a load of "latest" would), so ``ls``,
        ``latest`` and ``recover`` never silently fall back past a forged newest version.
        """
        infos = []
        if lineage:
            names = [lineage]
        else:
            names, _strays, unreachable = self._lineage_listing()
            self.require_answer(unreachable, "the lineages")
        for name in names:
            listing = self.version_listing(name)
            self.require_answer(listing[1], f"the checkpoints of lineage {name!r}")
            untrusted: tuple[int, ManifestCopies] | None = None
            for version in listing[0]:
                found, copies = self._consistent(name, version, listing)
                if found is None:
                    if copies is not None and copies.damaged and not copies.valid:
                        untrusted = (version, copies)
                    continue
                untrusted = None
                manifest, holders = found
                infos.append(
                    CheckpointInfo(
                        lineage=name,
                        version=version,
                        step=manifest.step,
                        created_at=manifest.created_at,
                        manifest_digest=manifest.manifest_digest,
                        total_bytes=manifest.total_bytes,
                        regions=holders,
                        lagging={r: "manifest missing" for r in self.region_names if r not in holders},
                        metadata=manifest.metadata,
                    )
                )
            if untrusted is not None and self.keyring is not None:
                raise _untrusted(name, *untrusted)
        return infos

    def latest(self, lineage: str) -> CheckpointInfo | None:
        """The latest consistent version of ``lineage`` as ``resolve`` and ``list`` define it, or
        None when it has none; a forged newest version raises (see ``list``)."""
        found = self.list(lineage)
        return found[-1] if found else None
