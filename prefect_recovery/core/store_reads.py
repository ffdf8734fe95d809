"""Reads with deadlines: which region to ask first, and how long to wait for it (FORMAT.md, reads).

Every read the store makes (a listing, a size, a manifest, a blob) goes through here, so one
rule decides what a stalled region costs: an object-store call with no answer after
``read_deadline`` counts as failed and its region is tried last (and not listed) for
``SLOW_PENALTY`` seconds, while the other regions serve the read. Blobs are re-hashed on every
read, with fallback to the next region. The seam is there because the deadline and the read
order are one policy shared by listing, the consistency rule and loads; the writer only marks
a region slow when it leaves it lagging.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .chunks import resolve_into
from .codecs import CodecName
from .digest import PARALLEL_HASH_BYTES, HashAlgorithm, hash_bytes, hasher_digest, new_hasher
from .errors import BlobUnavailableError, RegionError, RegionUnavailableError
from .layout import blob_key
from .manifest import ChunkRef, Entry
from .progress import advance
from .region_codecs import select_form
from .region_local import LocalRegionIO
from .region_object import RegionIO

# How long a region whose read stalled past read_deadline is tried last and not listed.
SLOW_PENALTY = 300.0
_T = TypeVar("_T")


@dataclass
class ReadReport:
    """What reads went through, for a caller that tells the user (Prefect result reads): the region each
    verified blob came from, and every cause for which a region's copy was passed over."""

    served: list[str] = field(default_factory=list)
    passed_over: dict[str, list[str]] = field(default_factory=dict)

    def note_passed_over(self, causes: dict[str, str]) -> None:
        for region, cause in causes.items():
            if cause not in self.passed_over.setdefault(region, []):
                self.passed_over[region].append(cause)


class StoreReads:
    """The read half every other part of ``Store`` builds on (core/store.py sets the fields)."""

    regions: list[RegionIO]
    io_threads: int
    codec: CodecName
    region_codecs: dict[str, CodecName]  # the regions with a codec of their own
    read_deadline: float | None
    # Region name -> monotonic time until which it counts as slow (read last, not listed).
    _slow_until: dict[str, float]

    def codec_of(self, region: str) -> CodecName:
        """The codec ``region`` stores new chunks with."""
        return self.region_codecs.get(region, self.codec)

    @property
    def region_names(self) -> list[str]:
        return [region.name for region in self.regions]

    def _region(self, name: str) -> RegionIO:
        return next(region for region in self.regions if region.name == name)

    def _is_slow(self, region: RegionIO) -> bool:
        return self._slow_until.get(region.name, 0.0) > time.monotonic()

    def _read_order(self, prefer: Sequence[str] = ()) -> list[RegionIO]:
        """``prefer`` first, then configuration order; regions that recently stalled last."""
        order = [self._region(n) for n in prefer] + [r for r in self.regions if r.name not in prefer]
        return sorted(order, key=self._is_slow)  # stable: keeps the order within each group

    def _each_region(self, fn: Callable[[RegionIO], None], regions: Sequence[RegionIO]) -> None:
        """``fn(region)`` for every region, in parallel threads, or on this thread when there is
        only one: a thread's start and join cost more than a local listing, and every rank of a
        DCP load lists and fetches its manifest (on 2 cores with 4 ranks a new thread may wait a
        whole time slice to run). ``fn`` handles its own region's errors."""
        if len(regions) == 1:
            fn(regions[0])
            return
        threads = [threading.Thread(target=fn, args=(region,), daemon=True) for region in regions]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _bounded(self, region: RegionIO, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` on an object-store region, but give up after ``read_deadline`` (the
        region is then marked slow). Local regions are called directly, like their blob reads.

        The call runs in a daemon thread that is left behind if it hangs, so ``fn`` must not
        write into memory the caller keeps using (reads return new bytes; see read_blob_into).
        """
        if self.read_deadline is None or isinstance(region, LocalRegionIO):
            return fn(*args)  # local calls stay on this thread: no thread per call on the hot path
        box: dict[str, Any] = {}
        done = threading.Event()

        def run() -> None:
            try:
                box["value"] = fn(*args)
            except BaseException as exc:  # handed to the caller
                box["error"] = exc
            finally:
                done.set()

        threading.Thread(target=run, daemon=True, name=f"ckpt-read-{region.name}"[:60]).start()
        if not done.wait(self.read_deadline):
            self._slow_until[region.name] = time.monotonic() + SLOW_PENALTY
            raise RegionUnavailableError(
                region.name, f"no answer within {self.read_deadline:g} s (stalled); reading from the other regions"
            )
        if "error" in box:
            raise box["error"]
        return box["value"]

    def blob_present(self, digest: str, size: int) -> bool:
        key = blob_key(digest)
        for region in self._read_order():
            try:
                if self._bounded(region, region.size, key) == size:
                    return True
            except RegionError:
                continue
        return False

    def read_blob_into(
        self,
        digest: str,
        buffer: memoryview,
        prefer: Sequence[str] = (),
        skipped: dict[str, str] | None = None,
        only: Sequence[str] | None = None,
    ) -> str:
        """Fill ``buffer`` with an intact copy of blob ``digest``; return the region it came from.

        ``skipped``, when given, receives each region whose copy was passed over and why, so a
        caller that was served from another region can say which copy is damaged. ``only``: ask
        these regions alone, in this order (recently stalled ones last).
        """
        key = blob_key(digest)
        causes: dict[str, str] = {} if skipped is None else skipped
        algorithm: HashAlgorithm = digest.split(":", 1)[0]  # type: ignore[assignment]
        regions = self._read_order(prefer) if only is None else sorted(map(self._region, only), key=self._is_slow)
        for region in regions:
            got: str | None = None  # the digest computed while reading, if it was
            try:
                if isinstance(region, LocalRegionIO):  # straight into the buffer, hashed as it lands
                    hasher = new_hasher(algorithm) if len(buffer) < PARALLEL_HASH_BYTES else None
                    size = region.read_into(key, buffer, hasher)
                    if hasher is not None and size == len(buffer):
                        got = hasher_digest(hasher, algorithm)
                else:  # new bytes in a bounded call, copied here: a late answer never touches the buffer
                    data = self._bounded(region, region.get, key)
                    size = len(data)
                    if size == len(buffer):
                        buffer[:] = data
            except RegionError as exc:
                causes[region.name] = str(exc)
                continue
            if size != len(buffer):
                causes[region.name] = f"size {size}, expected {len(buffer)} (corrupt)"
                continue
            if (got or hash_bytes(buffer, algorithm)) != digest:
                causes[region.name] = "content does not match its digest (corrupt)"
                continue
            return region.name
        raise BlobUnavailableError(digest, causes)

    def read_chunk_into(
        self, chunk: ChunkRef, buffer: memoryview, prefer: Sequence[str] = (), report: ReadReport | None = None
    ) -> None:
        """Fill ``buffer`` with one chunk's verified bytes, whatever its stored form (raw, a
        codec, a delta chain: core/chunks.py); a chunk with a form per region codec is read in
        its cheapest form first (``_forms_by_cost``), the others on failure. ``report``, when given,
        receives where each blob came from and why a copy was passed over."""

        def read(digest: str, view: memoryview, only: Sequence[str] | None = None) -> None:
            passed_over: dict[str, str] = {}
            try:
                served = self.read_blob_into(digest, view, prefer, skipped=passed_over, only=only)
            finally:
                if report is not None:
                    report.note_passed_over(passed_over)
            if report is not None:
                report.served.append(served)

        if chunk.forms is None:
            resolve_into(read, chunk, buffer)
            return
        first: BlobUnavailableError | None = None
        causes: dict[str, str] = {}  # every region's first cause, whichever form it was asked for
        for form, holders in self._forms_by_cost(chunk, prefer):
            try:
                resolve_into(lambda digest, view, h=holders: read(digest, view, only=h), form, buffer)
                return
            except BlobUnavailableError as exc:
                first = first or exc
                for region, cause in exc.causes.items():  # named with its blob when it is another form's
                    causes.setdefault(region, cause if exc.digest == first.digest else f"{exc.digest}: {cause}")
        assert first is not None
        raise BlobUnavailableError(first.digest, causes)

    def _forms_by_cost(self, chunk: ChunkRef, prefer: Sequence[str]) -> list[tuple[ChunkRef, list[str]]]:
        """Each stored form of ``chunk`` with the regions to ask for it (those whose codec selects it first),
        cheapest first: a form a healthy local region holds raw (no network, no decoding), then one a local
        region holds coded, then the object stores' (raw before coded); ``prefer`` and the configuration
        order decide within each group. Reading the first region's form whatever it was made a store listing
        its compressed cloud region first decode every load from the cloud while a raw local copy sat idle."""
        order = self._read_order(prefer)
        cheapest = sorted(
            order,
            key=lambda r: (self._is_slow(r), not isinstance(r, LocalRegionIO), self.codec_of(r.name) != "none"),
        )
        ranked: list[tuple[ChunkRef, list[str]]] = []
        for region in cheapest:
            form = select_form(chunk, self.codec_of(region.name))
            for known, holders in ranked:
                if known.digest == form.digest:
                    holders.append(region.name)
                    break
            else:
                ranked.append((form, [region.name]))
        named = {form.digest for form, _ in ranked}
        ranked += [(form, []) for form in chunk.stored_forms() if form.digest not in named]  # no region selects it
        # Last, each form from the regions whose codec does not select it (one whose codec changed may still
        # hold it): asked only once every holder failed, so a lost region costs no request per chunk elsewhere.
        others = [(form, [r.name for r in order if r.name not in holders]) for form, holders in ranked]
        return [(form, holders) for form, holders in ranked if holders] + [pair for pair in others if pair[1]]

    def read_entries_into(
        self, targets: Sequence[tuple[Entry, memoryview]], prefer: Sequence[str] = (), threads: int | None = None
    ) -> None:
        """Fill each buffer with its entry's bytes, chunks read in parallel (``threads``, default
        the store's ``io_threads``) and verified."""
        jobs: list[tuple[ChunkRef, memoryview]] = []
        for entry, buffer in targets:
            flat = buffer.cast("B") if buffer.format != "B" or buffer.ndim != 1 else buffer
            if len(flat) != entry.size:
                raise ValueError(f"buffer of {len(flat)} bytes for entry {entry.name!r} of {entry.size}")
            offset = 0
            for chunk in entry.chunks:
                jobs.append((chunk, flat[offset : offset + chunk.size]))
                offset += chunk.size
        workers = threads or self.io_threads
        if len(jobs) <= 1 or workers <= 1:
            # One reader: on this thread. A pool of one only adds a thread and a wake-up per chunk
            # (a DCP rank on a machine with fewer cores than ranks reads with one: dcp.py).
            for done, (chunk, view) in enumerate(jobs, start=1):
                self.read_chunk_into(chunk, view, prefer)
                advance("read", done, len(jobs))
            if not jobs:
                advance("read", 0, 0)
            return
        with ThreadPoolExecutor(workers, thread_name_prefix="ckpt-get") as pool:
            futures = [pool.submit(self.read_chunk_into, c, v, prefer) for c, v in jobs]
            # Progress (chunks read and verified) is reported from this thread: the reporter is a
            # context variable the pool's threads do not see.
            for done, future in enumerate(as_completed(futures), start=1):
                future.result()
                advance("read", done, len(jobs))
