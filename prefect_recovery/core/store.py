"""The multi-region checkpoint store: the commit protocol and consistent reads (FORMAT.md).

Write order (DESIGN.md invariant 2): every blob to every region in parallel, then, only in
regions that took all blobs, the manifest, create-only. The manifest goes first to one region
(the *arbiter*: the first healthy region in configured order), which decides who owns a
version number when two writers race; then to the others in parallel. A save counts when
``write_quorum`` regions hold its manifest; below that, the manifests it did create are
removed again and the save fails, so no manifest claims a commit that did not happen.

Read rule (invariant 3): a version is *consistent* when one identical, valid manifest is in at
least ``write_quorum`` regions and every blob it names exists in at least one region; every
blob is re-hashed on read, with fallback to the next region.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from typing import Any, Literal, TypeVar

from pydantic import JsonValue

from .digest import HashAlgorithm, hash_bytes
from .errors import (
    BlobUnavailableError,
    CheckpointNotFoundError,
    ForeignObjectError,
    InvalidArgumentError,
    InvalidNameError,
    ManifestError,
    ManifestSignatureError,
    ObjectNotFoundError,
    QuorumNotMetError,
    RegionError,
    RegionUnavailableError,
    SigningKeyError,
)
from .layout import (
    blob_key,
    check_entry_name,
    check_lineage,
    lineages_prefix,
    manifest_key,
    manifests_prefix,
    version_from_manifest_name,
)
from .liveness import host_and_pid
from .manifest import MAX_MANIFEST_BYTES, Component, Entry, Manifest, ManifestBody, ShardInfo, decode_manifest
from .models import CheckpointInfo
from .observe import StoreEvent, StoreObserver, notify
from .publish import publish
from .region import LocalRegionIO, PutOutcome, RegionIO
from .signing import Keyring

DEFAULT_CHUNK_BYTES = 32 * 2**20
# How long a region whose read stalled past read_deadline is tried last and not listed.
SLOW_PENALTY = 300.0
# Listed version numbers above the highest real manifest that a save skips over (stray files
# such as an empty 999999999999.json); past that many, the next number is above them all.
MAX_STRAY_VERSIONS = 32
_T = TypeVar("_T")


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


def _writer_info() -> dict[str, JsonValue]:
    try:
        version = importlib_metadata.version("prefect-recovery")
    except importlib_metadata.PackageNotFoundError:
        version = "unknown"
    host, pid = host_and_pid()
    return {"host": host, "pid": pid, "prefect_recovery": version}


def core_store(store: Any) -> Store:
    """The core ``Store`` of ``store``: a core ``Store`` itself, or anything that holds one as
    ``.core`` (the ``CheckpointStore`` block); every layer that accepts either asks this."""
    if isinstance(store, Store):
        return store
    core = getattr(store, "core", None)
    return store if core is None else core


class Store:
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
            observers: Called with a ``StoreEvent`` after each commit, failed save and
                restore (core/observe.py); telemetry hooks in here.
        """
        if not regions:
            raise InvalidArgumentError("a store needs at least one region")
        names = [region.name for region in regions]
        if len(set(names)) != len(names):
            raise InvalidArgumentError(f"regions must be distinct, got {names}")
        if not 1 <= write_quorum <= len(regions):
            raise InvalidArgumentError(
                f"write_quorum must be between 1 and the number of regions ({len(regions)}), got {write_quorum}"
            )
        if chunk_bytes < 1:
            raise InvalidArgumentError("chunk_bytes must be positive")
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
        )

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

    @property
    def region_names(self) -> list[str]:
        return [region.name for region in self.regions]

    def _region(self, name: str) -> RegionIO:
        return next(region for region in self.regions if region.name == name)

    # -- writing ------------------------------------------------------------------------
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
        written = self.write_entries(entries)
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

    def write_entries(self, entries: Sequence[EntryPlan]) -> WrittenEntries:
        """Phase one of a save: hash every chunk once and write it to every region.

        Nothing is published: the blobs are content-addressed and create-only, so until a
        manifest names them (``commit_entries``) they are invisible and GC may sweep them once
        past its grace period. Several writers (torch.distributed ranks) may each run this
        phase for their own entries and hand the results to one committer.
        """
        names = [check_entry_name(plan.name) for plan in entries]  # before a single byte is written
        if len(set(names)) != len(names):
            duplicates = sorted({name for name in names if names.count(name) > 1})
            raise InvalidNameError(f"duplicate entry names {duplicates}")
        region_causes, bytes_written, chunk_refs = self._write_blobs(entries)
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
        healthy = [r for r in self.regions if r.name not in region_causes]
        if len(healthy) < self.write_quorum:
            raise QuorumNotMetError(
                f"save of lineage {lineage!r} not committed: only {len(healthy)} of "
                f"{len(self.regions)} regions took the data, write_quorum is {self.write_quorum}",
                region_causes,
            )
        body_fields: dict[str, Any] = dict(
            lineage=lineage,
            step=step,
            hash_algorithm=self.hash_algorithm,
            placement=self.placement,
            entries=manifest_entries,
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

    def _write_blobs(self, entries: Sequence[EntryPlan]) -> tuple[dict[str, str], int, list[list[Any]]]:
        """Hash every chunk once and write it to every region; returns per-region failures."""
        from .manifest import ChunkRef

        slices: list[tuple[int, memoryview]] = []
        for index, plan in enumerate(entries):
            data = plan.data.cast("B") if plan.data.format != "B" or plan.data.ndim != 1 else plan.data
            if len(data) == 0:
                continue
            for start in range(0, len(data), self.chunk_bytes):
                slices.append((index, data[start : start + self.chunk_bytes]))

        causes: dict[str, str] = {}
        written = [0]
        lock = threading.Lock()
        claimed: dict[str, set[str]] = {region.name: set() for region in self.regions}

        def put(region: RegionIO, digest_future: Future[str], data: memoryview) -> None:
            if region.name in causes:
                return
            digest = digest_future.result()
            with lock:
                if digest in claimed[region.name]:
                    return
                claimed[region.name].add(digest)
            try:
                if self._ensure_blob(region, digest, data):
                    with lock:
                        written[0] += len(data)
            except RegionError as exc:
                with lock:
                    causes.setdefault(region.name, str(exc))

        hash_threads = min(2, os.cpu_count() or 1)
        with ThreadPoolExecutor(hash_threads, thread_name_prefix="ckpt-hash") as hasher:
            digests = [hasher.submit(hash_bytes, data, self.hash_algorithm) for _, data in slices]
            pools = [
                ThreadPoolExecutor(self.io_threads, thread_name_prefix=f"ckpt-put-{i}")
                for i in range(len(self.regions))
            ]
            stragglers: set[str] = set()
            try:
                by_region: dict[str, list[Future[None]]] = {region.name: [] for region in self.regions}
                for (_, data), digest in zip(slices, digests, strict=True):
                    for region, pool in zip(self.regions, pools, strict=True):
                        by_region[region.name].append(pool.submit(put, region, digest, data))
                stragglers = self._await_puts(by_region, causes, lock)
            finally:
                for region, pool in zip(self.regions, pools, strict=True):
                    # A straggler's in-flight puts finish in the background (blobs are
                    # content-addressed, so a late copy is still a right copy).
                    pool.shutdown(wait=region.name not in stragglers, cancel_futures=region.name in stragglers)
            refs: list[list[ChunkRef]] = [[] for _ in entries]
            for (index, data), digest in zip(slices, digests, strict=True):
                refs[index].append(ChunkRef(digest=digest.result(), size=len(data)))
        return causes, written[0], refs

    def _await_puts(
        self, by_region: dict[str, list[Future[None]]], causes: dict[str, str], lock: threading.Lock
    ) -> set[str]:
        """Wait for every region's puts, or, once the quorum is done, for ``straggler_grace`` more.

        Returns the regions given up on (recorded in ``causes`` as lagging).
        """
        pending = {future for futures in by_region.values() for future in futures}
        started = time.monotonic()
        deadline: float | None = None
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
            for future in done:
                future.result()  # put() records RegionErrors itself; anything else is a bug: raise
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

    # -- reading ------------------------------------------------------------------------
    def _is_slow(self, region: RegionIO) -> bool:
        return self._slow_until.get(region.name, 0.0) > time.monotonic()

    def _read_order(self, prefer: Sequence[str] = ()) -> list[RegionIO]:
        """``prefer`` first, then configuration order; regions that recently stalled last."""
        order = [self._region(n) for n in prefer] + [r for r in self.regions if r.name not in prefer]
        return sorted(order, key=self._is_slow)  # stable: keeps the order within each group

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

    def _list_all(self, prefix: str) -> tuple[dict[str, list[str]], dict[str, str]]:
        """List ``prefix`` in every region in parallel: names by region, and the regions that failed."""
        names: dict[str, list[str]] = {}
        causes: dict[str, str] = {}

        def one(region: RegionIO) -> None:
            if self._is_slow(region):
                causes[region.name] = "stalled recently; skipped"
                return
            try:
                names[region.name] = self._bounded(region, region.list, prefix)
            except RegionError as exc:
                causes[region.name] = str(exc)

        threads = [threading.Thread(target=one, args=(region,), daemon=True) for region in self.regions]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return names, causes

    def lineages(self) -> list[str]:
        """Every lineage any region lists; entries under ``lineages/`` that are not lineage names
        (``.DS_Store``, ``lost+found``, ``old run``) are skipped (see ``stray_entries``)."""
        return self._lineage_listing()[0]

    def stray_entries(self) -> list[str]:
        """``<region>: lineages/<name>`` of each entry under ``lineages/`` that is no lineage name:
        not the store's, never read, written or deleted; verify and the audit report them."""
        return self._lineage_listing()[1]

    def _lineage_listing(self) -> tuple[list[str], list[str]]:
        listed, _causes = self._list_all(lineages_prefix())
        names: set[str] = set()
        strays: list[str] = []
        for region in self.region_names:
            for name in listed.get(region, []):
                try:
                    names.add(check_lineage(name))
                except InvalidNameError:
                    strays.append(f"{region}: lineages/{name}")
        return sorted(names), strays

    def reachable_regions(self) -> tuple[list[RegionIO], dict[str, str]]:
        reachable, causes = [], {}
        for region in self.regions:
            try:
                region.probe()
                reachable.append(region)
            except RegionError as exc:
                causes[region.name] = str(exc)
        return reachable, causes

    def versions(self, lineage: str) -> dict[int, list[str]]:
        """Every version number any region lists for ``lineage``, with the regions listing it."""
        return self.version_listing(lineage)[0]

    def version_listing(self, lineage: str) -> tuple[dict[int, list[str]], dict[str, str]]:
        """Versions listed per region: every version number any region lists for ``lineage``, with
        the regions listing it (in region order), and the regions that could not be listed (with
        why). Regions are listed in parallel, each bounded by ``read_deadline``."""
        check_lineage(lineage)
        listed, unreachable = self._list_all(manifests_prefix(lineage))
        found: dict[int, list[str]] = {}
        for region in self.regions:
            for name in listed.get(region.name, []):
                version = version_from_manifest_name(name)
                if version is not None:
                    found.setdefault(version, []).append(region.name)
        return dict(sorted(found.items())), unreachable

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

        threads = [threading.Thread(target=fetch, args=(region,), daemon=True) for region in targets]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return copies

    def blob_present(self, digest: str, size: int) -> bool:
        key = blob_key(digest)
        for region in self._read_order():
            try:
                if self._bounded(region, region.size, key) == size:
                    return True
            except RegionError:
                continue
        return False

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
        sizes = {c.digest: c.size for e in manifest.entries for c in e.chunks}
        if not all(self.blob_present(d, s) for d, s in sizes.items()):
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
        for name in [lineage] if lineage else self.lineages():
            listing = self.version_listing(name)
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

    def read_blob_into(self, digest: str, buffer: memoryview, prefer: Sequence[str] = ()) -> str:
        """Fill ``buffer`` with an intact copy of blob ``digest``; return the region it came from."""
        key = blob_key(digest)
        causes: dict[str, str] = {}
        for region in self._read_order(prefer):
            try:
                if isinstance(region, LocalRegionIO):  # straight into the buffer
                    size = region.read_into(key, buffer)
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
            if hash_bytes(buffer, digest.split(":", 1)[0]) != digest:  # type: ignore[arg-type]
                causes[region.name] = "content does not match its digest (corrupt)"
                continue
            return region.name
        raise BlobUnavailableError(digest, causes)

    def read_entries_into(self, targets: Sequence[tuple[Entry, memoryview]], prefer: Sequence[str] = ()) -> None:
        """Fill each buffer with its entry's bytes, chunks read in parallel and verified."""
        jobs = []
        for entry, buffer in targets:
            flat = buffer.cast("B") if buffer.format != "B" or buffer.ndim != 1 else buffer
            if len(flat) != entry.size:
                raise ValueError(f"buffer of {len(flat)} bytes for entry {entry.name!r} of {entry.size}")
            offset = 0
            for chunk in entry.chunks:
                jobs.append((chunk.digest, flat[offset : offset + chunk.size]))
                offset += chunk.size
        if len(jobs) <= 1:
            for digest, view in jobs:
                self.read_blob_into(digest, view, prefer)
            return
        with ThreadPoolExecutor(self.io_threads, thread_name_prefix="ckpt-get") as pool:
            for future in [pool.submit(self.read_blob_into, d, v, prefer) for d, v in jobs]:
                future.result()
