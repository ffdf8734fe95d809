"""The multi-region checkpoint store: the ``Store`` every upper layer holds (FORMAT.md).

``Store`` is a facade over four parts, each in its own module because each answers one
question and can be read (and changed) alone:

- core/store_writer.py: how a save is written (blobs, version numbering, manifest
  publication; the two-phase ``write_entries`` / ``commit_entries``), DESIGN.md invariant 2.
- core/store_reads.py: how a read is bounded (read deadline, read order, slow-region
  penalty, verified blob reads with fallback).
- core/store_listing.py: which lineages and version numbers the regions list.
- core/store_consistency.py: which version counts (``ManifestCopies``, the committed/quorum
  rule, ``resolve``, ``consistent_manifest``, ``list``), DESIGN.md invariant 3.

This module holds the settings shared by all four (``Store.__init__``) and re-exports the
public names, so ``from prefect_recovery.core.store import Store, EntryPlan, ...`` keeps working.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from .codecs import DEFAULT_MIN_SAVING, CodecName, check_codec
from .digest import HashAlgorithm
from .errors import InvalidArgumentError
from .manifest import ChunkRef
from .observe import StoreObserver
from .region_object import RegionIO
from .signing import Keyring
from .store_consistency import ManifestCopies, StoreConsistency
from .store_pages import DEFAULT_PAGE_ENTRIES, PAGE_BYTES, PageUnavailableError
from .store_reads import SLOW_PENALTY
from .store_writer import DEFAULT_CHUNK_BYTES, MAX_STRAY_VERSIONS, EntryPlan, StoreWrites, WrittenEntries

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_PAGE_ENTRIES",
    "MAX_STRAY_VERSIONS",
    "PAGE_BYTES",
    "SLOW_PENALTY",
    "EntryPlan",
    "ManifestCopies",
    "PageUnavailableError",
    "Store",
    "WrittenEntries",
    "core_store",
]


def core_store(store: Any) -> Store:
    """The core ``Store`` of ``store``: a core ``Store`` itself, or anything that holds one as
    ``.core`` (the ``CheckpointStore`` block); every layer that accepts either asks this."""
    if isinstance(store, Store):
        return store
    core = getattr(store, "core", None)
    return store if core is None else core


def check_regions(regions: Sequence[RegionIO], write_quorum: int) -> None:
    """A store's regions and write quorum are usable (InvalidArgumentError otherwise): checked before a store is
    built, and before anything is written to its regions (the first use of a new store marks them)."""
    if not regions:
        raise InvalidArgumentError("a store needs at least one region")
    names = [region.name for region in regions]
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"regions must be distinct, got {names}")
    if not 1 <= write_quorum <= len(regions):
        raise InvalidArgumentError(
            f"write_quorum must be between 1 and the number of regions ({len(regions)}), got {write_quorum}"
        )


class Store(StoreWrites, StoreConsistency):
    """Checkpoints of many lineages, replicated over several regions."""

    def __init__(
        self,
        regions: Sequence[RegionIO],
        *,
        write_quorum: int = 1,
        hash_algorithm: HashAlgorithm = "blake3",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        io_threads: int = 4,
        placement: Literal["all", "primary"] = "all",
        straggler_grace: float | None = 30.0,
        read_deadline: float | None = 30.0,
        observers: Sequence[StoreObserver] = (),
        keyring: Keyring | None = None,
        page_entries: int | None = DEFAULT_PAGE_ENTRIES,
        codec: CodecName = "none",
        codec_min_saving: float = DEFAULT_MIN_SAVING,
        delta: bool = False,
        region_codecs: Mapping[str, CodecName] | None = None,
    ):
        """
        Args:
            regions: Where copies go, in order; the first healthy one arbitrates versions.
            write_quorum: Regions that must hold a manifest for its save to count.
            hash_algorithm: Digest naming blobs and manifests.
            chunk_bytes: Largest blob; bigger entries are split.
            io_threads: Parallel transfers per region.
            placement: Recorded in each manifest. ``all``: every region should hold a copy
                (verify reports missing ones). ``primary``: one region by design (the
                Checkpointer's light tier), counted at quorum 1 and never reported missing.
            straggler_grace: Once ``write_quorum`` regions hold every blob of a save, the others
                get this many seconds more (at least as long again as the quorum took); a
                region still writing then is recorded as lagging, left out of the manifest's
                publication and healed later by ``verify --repair``. None: wait for every region.
            read_deadline: A read call (listing, size, manifest or object-store blob read) that
                has no answer after this many seconds counts as failed, and its region is
                tried last (and not listed) for ``SLOW_PENALTY`` seconds; other regions serve
                the read. None: wait as long as the region takes.
            keyring: Signs the manifests this store commits and checks every manifest's
                signature before any blob it names is read (core/signing.py). None: manifests
                are not signed, and signatures found are not checked.
            page_entries: A manifest naming more entries than this (or about ``PAGE_BYTES`` of
                them) is committed in the paged form (core/store_pages.py): its entries in entry
                pages of at most this many, the manifest listing the pages. None: never paged.
            observers: Called with a ``StoreEvent`` after each commit, failed save and
                restore (core/observe.py); telemetry hooks in here.
            codec: How chunks are stored (core/codecs.py): ``none`` (raw), ``zstd``,
                ``bytegroup-zstd`` (byte planes of floating-point tensors, then zstd) or
                ``auto`` (per chunk, the codec only where it saves ``codec_min_saving``).
                Loads decode whatever codec each chunk names, so it can change at any save.
            codec_min_saving: The fraction of a chunk ``auto`` (and a delta) must save.
            delta: Store a chunk that changed since the lineage's latest version as the XOR
                with that version's chunk, encoded, where that saves (core/chunks.py); a read
                resolves at most ``MAX_DELTA_CHAIN`` parents, GC keeps every parent.
            region_codecs: A codec of its own for some regions (region name -> codec), the
                others using ``codec``: e.g. a cloud region compressed, a local one raw. Each
                chunk then names one stored form per codec, each region holding its own
                (core/region_codecs.py; FORMAT.md, "Region codecs"); with ``delta``, a region
                whose codec is ``none`` holds every chunk whole.
        """
        check_regions(regions, write_quorum)
        if chunk_bytes < 1:
            raise InvalidArgumentError("chunk_bytes must be positive")
        check_codec(codec)
        names = [region.name for region in regions]
        for name, region_codec in (region_codecs or {}).items():
            if name not in names:
                raise InvalidArgumentError(
                    f"region_codecs names {name!r}, which is no region of this store (regions: {', '.join(names)})"
                )
            check_codec(region_codec)
        if not 0.0 <= codec_min_saving < 1.0:
            raise InvalidArgumentError(f"codec_min_saving must be in [0, 1), got {codec_min_saving}")
        if page_entries is not None and page_entries < 1:
            raise InvalidArgumentError(f"page_entries must be positive (or None: never page), got {page_entries}")
        self.regions = list(regions)
        self.write_quorum = write_quorum
        self.hash_algorithm = hash_algorithm
        self.chunk_bytes = chunk_bytes
        self.io_threads = io_threads
        self.placement = placement
        self.straggler_grace = straggler_grace
        self.read_deadline = read_deadline
        self.observers = list(observers)
        self.keyring = keyring
        self.page_entries = page_entries
        self.codec = codec
        # The regions with a codec of their own (``codec_of`` gives every region's).
        self.region_codecs: dict[str, CodecName] = dict(region_codecs or {})
        self.codec_min_saving = codec_min_saving
        self.delta = delta
        self._delta_kept: dict[str, bytes] = {}
        self._encoded_last: dict[tuple[str, str, int], ChunkRef] = {}
        self._slow_until: dict[str, float] = {}

    def derive(self, regions: Sequence[RegionIO], *, write_quorum: int, placement: Literal["all", "primary"]) -> Store:
        """A store over ``regions`` with this one's other settings (hashing, signing, observers)."""
        return Store(
            regions,
            write_quorum=write_quorum,
            hash_algorithm=self.hash_algorithm,
            chunk_bytes=self.chunk_bytes,
            io_threads=self.io_threads,
            placement=placement,
            straggler_grace=self.straggler_grace,
            read_deadline=self.read_deadline,
            observers=self.observers,
            keyring=self.keyring,
            page_entries=self.page_entries,
            codec=self.codec,
            codec_min_saving=self.codec_min_saving,
            delta=self.delta,
            region_codecs={r.name: self.region_codecs[r.name] for r in regions if r.name in self.region_codecs},
        )
