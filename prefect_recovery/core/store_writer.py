"""The writer: a save's blobs, its version number and the publication of its manifest.

Write order (DESIGN.md invariant 2): every blob to every region in parallel, then, only in
regions that took all blobs, the manifest, create-only. The manifest goes first to one region
(the *arbiter*: the first healthy region in configured order), which decides who owns a
version number when two writers race; then to the others in parallel (core/publish.py). A
save counts when ``write_quorum`` regions hold its manifest; below that, the manifests it did
create are removed again and the save fails, so no manifest claims a commit that did not
happen.

The save has two public phases, ``write_entries`` (blobs: invisible until named) and
``commit_entries`` (one manifest naming the entries of one or several writers, such as
torch.distributed ranks); ``commit`` is the two in a row. The writer is apart from the reads
because it only needs listing (to number versions) and the read deadline (to decide whether a
listed number holds a manifest), never the consistency rule.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from typing import Any, Literal

from pydantic import JsonValue

from .chunks import parents_of, prepare
from .codecs import CodecName
from .digest import HashAlgorithm, hash_bytes
from .errors import (
    BlobUnavailableError,
    CheckpointError,
    ForeignObjectError,
    InvalidNameError,
    ManifestError,
    ObjectNotFoundError,
    QuorumNotMetError,
    RegionError,
    SigningKeyError,
)
from .layout import blob_key, check_entry_name, check_lineage, manifest_key
from .liveness import host_and_pid
from .manifest import (
    MAX_MANIFEST_BYTES,
    MAX_PAGE_BYTES,
    PAGED_FORMAT_VERSION,
    ChunkRef,
    Component,
    Entry,
    Manifest,
    ManifestBody,
    PageRef,
    ShardInfo,
    canonical_json,
    check_entries,
    decode_manifest,
    encode_page,
)
from .models import CheckpointInfo
from .observe import StoreEvent, StoreObserver, notify
from .progress import advance
from .publish import publish
from .region_codecs import combine, select_form
from .region_common import PutOutcome
from .region_object import RegionIO
from .signing import Keyring
from .store_listing import StoreListing
from .store_pages import PAGE_BYTES, StorePages
from .store_reads import SLOW_PENALTY

DEFAULT_CHUNK_BYTES = 32 * 2**20
# Listed version numbers above the highest real manifest that a save skips over (stray files
# such as an empty 999999999999.json); past that many, the next number is above them all.
MAX_STRAY_VERSIONS = 32


@dataclass
class EntryPlan:
    """A leaf to store: its flat bytes and the metadata the manifest records for it."""

    name: str
    kind: str
    data: memoryview
    dtype: str | None = None
    shape: list[int] | None = None
    component: str | None = None
    shard: ShardInfo | None = None


@dataclass
class WrittenEntries:
    """What ``Store.write_entries`` wrote: the manifest entries (chunk digests and sizes), the
    regions that failed with why, and how many new bytes landed."""

    entries: list[Entry]
    region_causes: dict[str, str]
    bytes_written: int
    # The entry pages already written for these entries (``Store.write_entry_pages``, run by
    # each rank so that the committer only lists them); None: paged at commit if needed.
    pages: list[PageRef] | None = None


@dataclass(frozen=True)
class _Prepared:
    """One chunk ready to write: its manifest reference (every stored form) and the bytes of
    each blob it created, by digest (a blob not there already exists: an unchanged chunk's)."""

    ref: ChunkRef
    blobs: dict[str, bytes | memoryview]


def _writer_info() -> dict[str, JsonValue]:
    try:
        version = importlib_metadata.version("prefect-recovery")
    except importlib_metadata.PackageNotFoundError:
        version = "unknown"
    host, pid = host_and_pid()
    return {"host": host, "pid": pid, "prefect_recovery": version}


def _estimated_json_bytes(entry: Entry) -> int:
    """About the bytes of ``entry``'s canonical JSON, without encoding it (deciding to page)."""
    shape = len(entry.shape or ()) + (2 * len(entry.shard.global_shape) if entry.shard else 0)
    return 140 + len(entry.name) + 90 * len(entry.chunks) + 8 * shape


class StoreWrites(StoreListing, StorePages):
    """Saving: blobs to every region, then one manifest published to a quorum."""

    write_quorum: int
    hash_algorithm: HashAlgorithm
    chunk_bytes: int
    placement: Literal["all", "primary"]
    straggler_grace: float | None
    observers: list[StoreObserver]
    keyring: Keyring | None
    page_entries: int | None
    codec: CodecName
    codec_min_saving: float
    delta: bool
    # Content digest -> bytes of the chunks of the last delta save (Store.__init__ sets it).
    _delta_kept: dict[str, bytes]
    # (codec, content digest, size) -> stored form, of the encoded chunks of the last save: an unchanged
    # chunk saved again (another version, another lineage) is named, not encoded again (Store.__init__).
    _encoded_last: dict[tuple[str, str, int], ChunkRef]

    def commit(
        self,
        lineage: str,
        entries: Sequence[EntryPlan],
        *,
        step: int | None = None,
        tree: JsonValue = None,
        components: Iterable[Component] = (),
        metadata: dict[str, JsonValue] | None = None,
    ) -> CheckpointInfo:
        """Write ``entries`` as the next version of ``lineage`` and return what was committed."""
        started = time.monotonic()
        try:
            info = self._commit(lineage, entries, step=step, tree=tree, components=components, metadata=metadata)
        except Exception as exc:
            failed = getattr(exc, "causes", None) or {}
            notify(
                self.observers,
                StoreEvent(
                    "save_failed",
                    lineage,
                    None,
                    step,
                    sum(plan.data.nbytes for plan in entries),
                    time.monotonic() - started,
                    {str(k): str(v) for k, v in dict(failed).items()},
                    {"error": f"{type(exc).__name__}: {exc}"},
                ),
            )
            raise
        regions = {name: "ok" for name in info.regions} | info.lagging
        notify(
            self.observers,
            StoreEvent(
                "checkpoint_committed",
                lineage,
                info.version,
                step,
                info.total_bytes,
                time.monotonic() - started,
                regions,
                dict(info.metadata),
            ),
        )
        return info

    def _commit(
        self,
        lineage: str,
        entries: Sequence[EntryPlan],
        *,
        step: int | None,
        tree: JsonValue,
        components: Iterable[Component],
        metadata: dict[str, JsonValue] | None,
    ) -> CheckpointInfo:
        self._check_can_commit(lineage)  # before a single byte is written
        written = self.write_entries(entries, base=self.delta_base(lineage))
        return self.commit_entries(
            lineage,
            written,
            step=step,
            tree=tree,
            components=components,
            metadata=metadata,
        )

    def _check_can_commit(self, lineage: str) -> None:
        check_lineage(lineage)
        keyring = self.keyring
        if keyring is not None and keyring.signing_key is None and not keyring.accept_unsigned:
            raise SigningKeyError(
                f"save of lineage {lineage!r} refused: this store checks signatures but has no signing key, so "
                "every reader would reject what it writes; set the store's signing key (or accept_unsigned)"
            )

    def delta_base(self, lineage: str, *, ranks: Iterable[int] | None = None) -> list[Entry] | None:
        """What ``write_entries`` takes as ``base`` for the next version of ``lineage``: with ``delta`` on,
        the entries of its latest consistent version (the parents a delta chunk may name), empty when it has
        none that can be read; None with ``delta`` off.

        ``ranks``: a DCP save's rank asks for its own (``manifest_entries(ranks=...)``): of a paged version it
        reads only its own pages and those of no rank, not every rank's. A shard that another rank wrote last
        time (the sharding changed) is then written whole, as a renamed one is."""
        if not self.delta:
            return None
        try:
            manifest, holders = self.resolve(lineage)  # type: ignore[attr-defined]
            return self.manifest_entries(manifest, prefer=holders, ranks=ranks)
        except CheckpointError:  # no base (a first save, a damaged latest): the save is written whole
            return []

    def write_entries(self, entries: Sequence[EntryPlan], *, base: Sequence[Entry] | None = None) -> WrittenEntries:
        """Phase one of a save: hash every chunk once and write it to every region.

        With the store's ``codec`` each chunk is encoded first; with ``base`` (an earlier
        version's entries) a chunk of an entry of the same name, size and dtype may be stored
        as a delta against the base's chunk at its offset (core/chunks.py).

        Nothing is published: the blobs are content-addressed and create-only, so until a
        manifest names them (``commit_entries``) they are invisible and GC may sweep them once
        past its grace period. Several writers (torch.distributed ranks) may each run this
        phase for their own entries and hand the results to one committer.
        """
        names = [check_entry_name(plan.name) for plan in entries]  # before a single byte is written
        if len(set(names)) != len(names):
            duplicates = sorted({name for name in names if names.count(name) > 1})
            raise InvalidNameError(f"duplicate entry names {duplicates}")
        region_causes, bytes_written, chunk_refs = self._write_blobs(
            entries,
            region_codecs=[self.codec_of(region.name) for region in self.regions],  # type: ignore[attr-defined]
            base={entry.name: entry for entry in base} if base is not None else None,
        )
        manifest_entries = [
            Entry(
                name=plan.name,
                kind=plan.kind,  # type: ignore[arg-type]
                size=plan.data.nbytes,
                chunks=refs,
                dtype=plan.dtype,
                shape=plan.shape,
                component=plan.component,
                shard=plan.shard,
            )
            for plan, refs in zip(entries, chunk_refs, strict=True)
        ]
        return WrittenEntries(manifest_entries, region_causes, bytes_written)

    def commit_entries(
        self,
        lineage: str,
        written: WrittenEntries | Sequence[WrittenEntries],
        *,
        step: int | None = None,
        tree: JsonValue = None,
        components: Iterable[Component] = (),
        metadata: dict[str, JsonValue] | None = None,
    ) -> CheckpointInfo:
        """Phase two of a save: publish one manifest naming every written entry.

        ``written`` may come from several writers; a region that failed any of them holds an
        incomplete copy and does not count towards the write quorum.
        """
        self._check_can_commit(lineage)
        parts = [written] if isinstance(written, WrittenEntries) else list(written)
        region_causes: dict[str, str] = {}
        for part in parts:
            for region, cause in part.region_causes.items():
                region_causes.setdefault(region, cause)
        manifest_entries = [entry for part in parts for entry in part.entries]
        bytes_written = sum(part.bytes_written for part in parts)
        self._check_quorum(lineage, region_causes)
        paged: dict[str, Any] = {}
        if any(part.pages is not None for part in parts) or self._needs_pages(manifest_entries):
            # What the single-file form's schema checks: each part was checked when paged
            # (write_entry_pages); across parts, names must be unique (a blob digest names its
            # bytes, so one digest in two parts has one size; readers check that too, per read).
            if len({entry.name for entry in manifest_entries}) != len(manifest_entries):
                counts = Counter(entry.name for entry in manifest_entries)
                duplicates = sorted(name for name, count in counts.items() if count > 1)[:5]
                raise InvalidNameError(
                    f"save of lineage {lineage!r} refused: two writers wrote entries of one name {duplicates}"
                )
            # Entry pages, like blobs, are in every region before the manifest that lists them.
            pages: list[PageRef] = []
            for part in parts:
                if part.pages is None:
                    paged_part = self.write_entry_pages(part)
                    for region, cause in paged_part.region_causes.items():
                        region_causes.setdefault(region, cause)
                    bytes_written += paged_part.bytes_written - part.bytes_written
                    part = paged_part
                pages.extend(part.pages or ())
            self._check_quorum(lineage, region_causes)
            paged = dict(format_version=PAGED_FORMAT_VERSION, pages=pages)
            manifest_entries = []
        healthy = [r for r in self.regions if r.name not in region_causes]
        body_fields: dict[str, Any] = dict(
            lineage=lineage,
            step=step,
            hash_algorithm=self.hash_algorithm,
            placement=self.placement,
            entries=manifest_entries,
            **paged,
            tree=tree,
            components=list(components),
            metadata=metadata or {},
            writer=_writer_info(),
        )
        manifest, acked, lagging = self._commit_manifest(lineage, body_fields, healthy)
        lagging = {**region_causes, **lagging}
        return CheckpointInfo(
            lineage=lineage,
            version=manifest.version,
            step=step,
            created_at=manifest.created_at,
            manifest_digest=manifest.manifest_digest,
            total_bytes=manifest.total_bytes,
            regions=acked,
            lagging=lagging,
            bytes_written=bytes_written,
            metadata=manifest.metadata,
        )

    def _check_quorum(self, lineage: str, region_causes: dict[str, str]) -> None:
        healthy = [r for r in self.regions if r.name not in region_causes]
        if len(healthy) < self.write_quorum:
            raise QuorumNotMetError(
                f"save of lineage {lineage!r} not committed: only {len(healthy)} of "
                f"{len(self.regions)} regions took the data, write_quorum is {self.write_quorum}",
                region_causes,
            )

    def _needs_pages(self, entries: Sequence[Entry]) -> bool:
        """Whether a manifest naming ``entries`` is committed in the paged form: more than
        ``page_entries`` entries, or (about) more than ``PAGE_BYTES`` of JSON."""
        if self.page_entries is None:
            return False
        if len(entries) > self.page_entries:
            return True
        return sum(_estimated_json_bytes(entry) for entry in entries) > PAGE_BYTES

    def write_entry_pages(self, written: WrittenEntries) -> WrittenEntries:
        """Write ``written``'s entries as entry pages (to every region, like blobs) and return
        it with the pages listed, for ``commit_entries`` to list instead of encoding them.

        A torch.distributed rank may run this after ``write_entries`` so that the pages of a
        large checkpoint are encoded and written by every rank in parallel and the committer
        only gathers page references; ``commit_entries`` pages the parts that did not.
        """
        entries = written.entries
        if not entries:
            return WrittenEntries(entries, dict(written.region_causes), written.bytes_written, [])
        try:
            check_entries(entries)  # what the single-file form's schema checks
        except ValueError as exc:
            raise InvalidNameError(f"entries refused: {exc}") from None
        ranks = sorted({e.shard.rank for e in entries if e.shard is not None and e.shard.rank is not None})
        limit = self.page_entries or len(entries)
        groups: list[tuple[int, int, list[bytes]]] = []  # (start, end, encoded entries)
        current: list[bytes] = []
        size = start = 0
        for index, entry in enumerate(entries):
            encoded = canonical_json(entry.model_dump(mode="json"))
            if current and (len(current) >= limit or size + len(encoded) > PAGE_BYTES):
                groups.append((start, index, current))
                current, size, start = [], 0, index
            current.append(encoded)
            size += len(encoded) + 1
        groups.append((start, len(entries), current))
        datas = [encode_page(encoded) for _, _, encoded in groups]
        for data, (first, _, _) in zip(datas, groups, strict=True):
            if len(data) > MAX_PAGE_BYTES:
                raise InvalidNameError(
                    f"entry {entries[first].name!r} alone makes an entry page larger than {MAX_PAGE_BYTES} bytes; "
                    "store it with larger chunk_bytes"
                )
        plans = [EntryPlan(name=f"page-{i}", kind="bytes", data=memoryview(d)) for i, d in enumerate(datas)]
        causes, page_bytes, refs = self._write_blobs(plans, chunk_bytes=MAX_PAGE_BYTES)
        pages = [
            PageRef(
                digest=chunks[0].digest,
                size=len(data),
                entries=end - first,
                entry_bytes=sum(e.size for e in entries[first:end]),
                ranks=ranks,
                first=entries[first].name,
                last=entries[end - 1].name,
            )
            for data, chunks, (first, end, _) in zip(datas, refs, groups, strict=True)
        ]
        merged = dict(written.region_causes)
        for region, cause in causes.items():
            merged.setdefault(region, cause)
        return WrittenEntries(entries, merged, written.bytes_written + page_bytes, pages)

    def _write_blobs(
        self,
        entries: Sequence[EntryPlan],
        chunk_bytes: int | None = None,
        *,
        region_codecs: Sequence[CodecName] | None = None,
        base: dict[str, Entry] | None = None,
    ) -> tuple[dict[str, str], int, list[list[ChunkRef]]]:
        """Encode and hash every chunk once and write it to every region; returns per-region
        failures. ``region_codecs`` (each region's codec, in region order; None: all raw) and
        ``base`` (the entries a delta chunk may name as parents, by name) decide each chunk's
        stored form (core/chunks.py); the manifest's own entry pages are always raw. Regions
        with different codecs make one form per codec, each region getting its own
        (core/region_codecs.py; FORMAT.md, "Region codecs")."""
        step = chunk_bytes or self.chunk_bytes
        slices: list[tuple[int, memoryview, ChunkRef | None]] = []
        for index, plan in enumerate(entries):
            data = plan.data.cast("B") if plan.data.format != "B" or plan.data.ndim != 1 else plan.data
            if len(data) == 0:
                continue
            known = base.get(plan.name) if base else None
            parents = parents_of(len(data), plan.dtype, known, step)
            for number, start in enumerate(range(0, len(data), step)):
                slices.append((index, data[start : start + step], parents[number]))
        codec_of_region: list[CodecName] = list(region_codecs or ["none"] * len(self.regions))
        codec_by_name = {region.name: c for region, c in zip(self.regions, codec_of_region, strict=True)}
        distinct = list(dict.fromkeys(codec_of_region))
        raw = distinct == ["none"] and not base

        # What the last save's forms are remembered under: the codec, or every region's codec when they differ.
        remembered_as = distinct[0] if len(distinct) == 1 else "/".join(codec_of_region)
        # (region, blob) pairs ``_still_stored`` found held, so ``put`` does not ask that region again.
        held: set[tuple[str, str]] = set()

        def prepare_as(
            index: int, data: memoryview, codec: CodecName, parent: ChunkRef | None, content: str | None = None
        ) -> tuple[ChunkRef, Any]:
            stored = prepare(
                data,
                codec=codec,
                dtype=entries[index].dtype,
                algorithm=self.hash_algorithm,
                parent=parent,
                read_parent=self._read_parent,
                min_saving=self.codec_min_saving,
                known=(lambda content, size: self._still_stored(self._encoded_last.get((codec, content, size)), held))
                if len(distinct) == 1
                else None,
                content=content,
            )
            return stored.ref, stored.data

        def prepare_slice(index: int, data: memoryview, parent: ChunkRef | None) -> _Prepared:
            if raw:  # the path of every save before codecs: one hash, the blob is the chunk
                digest = hash_bytes(data, self.hash_algorithm)
                return _Prepared(ChunkRef(digest=digest, size=len(data)), {digest: data})
            if len(distinct) == 1:
                if parent is not None and parent.forms is not None:  # a base saved when codecs differed
                    parent = select_form(parent, distinct[0])  # a parent names one form
                ref, blob = prepare_as(index, data, distinct[0], parent)
                return _Prepared(ref, {} if blob is None else {ref.digest: blob})
            # Regions with different codecs: one form per codec, verified against one content digest,
            # hashed once for all of them.
            content = hash_bytes(data, self.hash_algorithm)
            if parent is not None and parent.size == len(data) and parent.content_digest == content:
                return _Prepared(parent, {})  # unchanged: the base's reference, forms and all
            earlier = self._still_stored(self._encoded_last.get((remembered_as, content, len(data))), held)
            if earlier is not None:
                return _Prepared(earlier, {})  # saved unchanged by the last save: named, not encoded again
            forms: list[ChunkRef] = []
            blobs: dict[str, bytes | memoryview] = {}
            for codec in distinct:
                # A raw region holds every chunk whole; the others may take a delta against the
                # base's form they hold (a parent names one form, so chains stay linear).
                own_parent = None if parent is None or codec == "none" else select_form(parent, codec)
                ref, blob = prepare_as(index, data, codec, own_parent, content)
                forms.append(ref)
                if blob is not None:
                    blobs[ref.digest] = blob
            return _Prepared(combine(forms, codec_of_region), blobs)

        causes: dict[str, str] = {}
        written = [0]
        lock = threading.Lock()
        claimed: dict[str, set[str]] = {region.name: set() for region in self.regions}

        def put(region: RegionIO, prepared_future: Future[_Prepared]) -> None:
            if region.name in causes:
                return
            prepared = prepared_future.result()
            # The form this region holds, and with it a delta's parents (or an unchanged chunk's
            # stored blobs): all in every region that counts this save (DESIGN.md invariant 3).
            form = select_form(prepared.ref, codec_by_name[region.name])
            try:
                for digest, size in form.form_blobs():
                    with lock:
                        if digest in claimed[region.name]:
                            continue
                        claimed[region.name].add(digest)
                    data = prepared.blobs.get(digest)
                    if data is None:
                        if (region.name, digest) not in held:
                            self._ensure_copied(region, digest, size)
                    elif self._ensure_blob(region, digest, memoryview(data)):
                        with lock:
                            written[0] += len(data)
            except (RegionError, BlobUnavailableError) as exc:
                with lock:
                    causes.setdefault(region.name, str(exc))

        # Hashing (and encoding: zstd and numpy release the GIL) on io_threads workers, at
        # most the cores there are; raw saves keep the two hashing threads they always had.
        cores = os.cpu_count() or 1
        hash_threads = min(2, cores) if raw else max(1, min(self.io_threads, cores))
        with ThreadPoolExecutor(hash_threads, thread_name_prefix="ckpt-hash") as hasher:
            digests = [hasher.submit(prepare_slice, index, data, parent) for index, data, parent in slices]
            pools = [
                ThreadPoolExecutor(self.io_threads, thread_name_prefix=f"ckpt-put-{i}")
                for i in range(len(self.regions))
            ]
            stragglers: set[str] = set()
            try:
                by_region: dict[str, list[Future[None]]] = {region.name: [] for region in self.regions}
                for digest in digests:
                    for region, pool in zip(self.regions, pools, strict=True):
                        by_region[region.name].append(pool.submit(put, region, digest))
                stragglers = self._await_puts(by_region, causes, lock)
            finally:
                for region, pool in zip(self.regions, pools, strict=True):
                    # A straggler's in-flight puts finish in the background (blobs are
                    # content-addressed, so a late copy is still a right copy).
                    pool.shutdown(wait=region.name not in stragglers, cancel_futures=region.name in stragglers)
            refs: list[list[ChunkRef]] = [[] for _ in entries]
            for (index, _, _), digest in zip(slices, digests, strict=True):
                refs[index].append(digest.result().ref)
            if not raw:
                self._encoded_last = {
                    (remembered_as, ref.content_digest, ref.size): ref for chunk in refs for ref in chunk
                }
            if base is not None:
                # The next delta save's parents are these chunks: keep their bytes (one copy of
                # the state in host memory) so it need not read and decode them back.
                self._delta_kept = {
                    ref.content_digest: bytes(data)
                    for (index, data, _), ref in zip(slices, (d.result().ref for d in digests), strict=True)
                }
        return causes, written[0], refs

    def _still_stored(self, ref: ChunkRef | None, held: set[tuple[str, str]]) -> ChunkRef | None:
        """``ref`` (a form the last save wrote) when some region still holds each of its blobs, so
        naming it again loses nothing (a region lacking one gets a verified copy, ``_ensure_copied``);
        else None, and the chunk is encoded anew. Each (region, blob) found is added to ``held``."""
        if ref is None:
            return None
        for digest, size in ref.blobs():  # every form's, when the regions' codecs differ
            found = False
            for region in self.regions:
                try:
                    found = region.size(blob_key(digest)) == size
                except RegionError:
                    continue
                if found:
                    held.add((region.name, digest))
                    break
            if not found:
                return None
        return ref

    def _read_parent(self, parent: ChunkRef, buffer: memoryview) -> None:
        """A delta parent's bytes: from the previous save's, kept in memory, or read back (a
        chain of k parents costs k blob reads)."""
        kept = self._delta_kept.get(parent.content_digest)
        if kept is not None and len(kept) == len(buffer):
            buffer[:] = kept
            return
        self.read_chunk_into(parent, buffer)  # type: ignore[attr-defined]

    def _ensure_copied(self, region: RegionIO, digest: str, size: int) -> None:
        """Make ``region`` hold blob ``digest`` (an existing blob a new chunk names), copying
        a verified copy from another region when it lacks one."""
        if region.size(blob_key(digest)) == size:
            return
        data = bytearray(size)
        self.read_blob_into(digest, memoryview(data))  # type: ignore[attr-defined]
        self._ensure_blob(region, digest, memoryview(data))

    def _await_puts(
        self, by_region: dict[str, list[Future[None]]], causes: dict[str, str], lock: threading.Lock
    ) -> set[str]:
        """Wait for every region's puts, or, once the quorum is done, for ``straggler_grace`` more.

        Returns the regions given up on (recorded in ``causes`` as lagging).
        """
        pending = {future for futures in by_region.values() for future in futures}
        total = len(pending)
        started = time.monotonic()
        deadline: float | None = None
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
            for future in done:
                future.result()  # put() records RegionErrors itself; anything else is a bug: raise
            advance("write", total - len(pending), total)  # chunk copies written (the CLI's bar, on a terminal)
            if not pending:
                break
            with lock:
                failed = set(causes)
            if len(failed) > len(by_region) - self.write_quorum:
                # The quorum can no longer be met: start no more puts, let the running ones end
                # (commit then raises QuorumNotMetError).
                for future in pending:
                    future.cancel()
                wait(pending)
                return set()
            if deadline is None and self.straggler_grace is not None:
                finished = [
                    name
                    for name, futures in by_region.items()
                    if name not in causes and all(future.done() for future in futures)
                ]
                if len(finished) >= self.write_quorum:
                    elapsed = time.monotonic() - started
                    deadline = time.monotonic() + max(self.straggler_grace, elapsed)
                continue
            if deadline is not None and time.monotonic() >= deadline:
                slow = {name for name, futures in by_region.items() if any(not f.done() for f in futures)}
                with lock:
                    for name in slow:
                        self._slow_until[name] = time.monotonic() + SLOW_PENALTY  # reads skip it too
                        causes.setdefault(
                            name,
                            f"still writing {time.monotonic() - started:.1f} s into the save, after the quorum "
                            "was done: left lagging (heal it with `prefect-recovery verify --repair`)",
                        )
                return slow
        return set()

    def _ensure_blob(self, region: RegionIO, digest: str, data: memoryview) -> bool:
        """Make ``region`` hold an intact copy of a blob; True when new bytes were written.

        An existing object of the right size is trusted here (content is checked on every read
        and by verify); a wrong-sized leftover, or one that lost a create race and does not
        hash right, is replaced.
        """
        key = blob_key(digest)
        try:
            existing = region.size(key)
        except ForeignObjectError:  # a link (or a directory: delete refuses) in the blob's place
            existing = -1
        if existing == len(data):
            return False
        if existing is not None:
            region.delete(key)
        if region.put_if_absent(key, data) is PutOutcome.CREATED:
            return True
        if hash_bytes(region.get(key, max_bytes=len(data)), self.hash_algorithm) != digest:
            region.delete(key)
            if (
                region.put_if_absent(key, data) is not PutOutcome.CREATED
                and hash_bytes(region.get(key, max_bytes=len(data)), self.hash_algorithm) != digest
            ):
                raise RegionError(
                    region.name, f"blob {digest} could not be stored intact: the object under its name does not match"
                )
            return True
        return False

    def _next_version(self, lineage: str) -> int:
        """One more than the highest version any region holds a manifest for.

        A listed name that is no manifest of its version (an empty or foreign file, a link, a
        directory: nothing a save could have published) does not take a number, so one stray
        ``999999999999.json`` cannot exhaust a lineage's versions. A copy that cannot be read
        right now counts (it may be a real manifest); a forged one counts too (it is one).
        """
        listed = self.versions(lineage)
        ordered = sorted(listed, reverse=True)
        for version in ordered[:MAX_STRAY_VERSIONS]:
            if self._holds_a_manifest(lineage, version, listed[version]):
                return version + 1
        if len(ordered) > MAX_STRAY_VERSIONS:
            return ordered[0] + 1
        return 1

    def _holds_a_manifest(self, lineage: str, version: int, regions: Sequence[str]) -> bool:
        key = manifest_key(lineage, version)
        for name in regions:
            region = self._region(name)
            try:
                data = self._bounded(region, region.get, key, MAX_MANIFEST_BYTES)
            except (ObjectNotFoundError, ForeignObjectError):
                continue
            except RegionError:
                return True
            try:
                decode_manifest(data, expect_lineage=lineage, expect_version=version)
            except ManifestError:
                continue
            return True
        return False

    def _commit_manifest(
        self, lineage: str, body_fields: dict[str, Any], healthy: list[RegionIO]
    ) -> tuple[Manifest, list[str], dict[str, str]]:
        built: dict[int, Manifest] = {}

        def encode(version: int) -> bytes:
            created_at = datetime.now(UTC).isoformat(timespec="microseconds")
            body = ManifestBody(version=version, created_at=created_at, **body_fields)
            built[version] = Manifest.build(body, self.keyring)
            return built[version].encode()

        published = publish(
            healthy,
            what=f"save of lineage {lineage!r}",
            first=self._next_version(lineage),
            key_of=lambda version: manifest_key(lineage, version),
            encode=encode,
            next_free=lambda: self._next_version(lineage),
            quorum=self.write_quorum,
        )
        return built[published.number], published.holders, published.lagging
