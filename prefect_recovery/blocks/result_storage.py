"""The ``CheckpointStore`` as Prefect result storage: ``read_path`` / ``write_path``.

Prefect's ``ResultStore`` persists task and flow results, cache records and transaction
records through the two methods of ``prefect.filesystems.WritableFileSystem`` (and their
``aread_path`` / ``awrite_path`` forms in async code, found by name). ``S3Bucket`` and
``GcsBucket`` implement them over one bucket; here every path goes through the store, so a
result gets what a checkpoint gets (FORMAT.md, "Prefect results"):

* ``write_path(path, content)`` commits ``content`` as the next version of the lineage
  ``prefect-result.<sha256(path)>``: the bytes as a content-addressed blob in every region, the
  manifest (which records ``path``) published at the store's write quorum. A failed quorum
  raises, never a silent half-write.
* ``read_path(path)`` reads the latest consistent version and re-hashes every byte before
  returning it. A corrupt or missing copy in one region is skipped (and logged, naming the
  region) and another region's copy is served; no intact copy anywhere is
  ``ResultUnavailableError``, never a wrong value. A newer version whose manifest is damaged in
  every region is not skipped as a checkpoint load would skip it: the older version is a stale
  value, so the read fails the same way.

Prefect's own semantics are kept: a path is overwritten by writing it again (a new version;
the old one is left to retention), and reading a path never written raises
``ResultNotFoundError`` (a ``FileNotFoundError``), which Prefect's cache lookup reads as a
miss. Note that Prefect's cache lookup also treats a read *error* as a miss and recomputes the
task: the error is logged first (run logger), so the damage is visible in the run's logs.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from prefect.utilities.asyncutils import run_sync_in_worker_thread

from ..core import Store
from ..core.digest import algorithm_of, hash_bytes
from ..core.errors import BlobUnavailableError, CheckpointError, CheckpointNotFoundError, RegionError
from ..core.layout import blob_key, result_lineage
from ..core.store_reads import ReadReport

CONTENT_ENTRY = "content"
PATH_METADATA = "prefect_result_path"

logger = logging.getLogger(__name__)


class ResultNotFoundError(CheckpointNotFoundError, FileNotFoundError):
    """Nothing was ever stored under this result path (or every version of it is gone)."""

    def __init__(self, path: str, lineage: str, regions: list[str]):
        super().__init__(
            f"no Prefect result stored under {path!r} (lineage {lineage!r}) in regions {regions}; "
            "Prefect treats this as a cache miss. If you expected one, check that the flow's result_storage "
            "is this store and that retention has not removed it."
        )
        self.path = path
        self.lineage = lineage


class ResultUnavailableError(CheckpointError):
    """A result exists but no region holds an intact copy of it: the value is not returned."""

    def __init__(self, path: str, lineage: str, causes: dict[str, str]):
        detail = "; ".join(f"{region}: {cause}" for region, cause in causes.items())
        super().__init__(
            f"Prefect result {path!r} (lineage {lineage!r}) has no intact copy in any region ({detail}). "
            "No value is returned (a cached task is recomputed). See the damage with "
            f"`prefect-recovery verify --lineage {lineage}`."
        )
        self.path = path
        self.lineage = lineage
        self.causes = causes


def _logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The run's logger (shown in the UI) inside a flow or task, else the module's."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logger


def write_result(store: Store, path: str, content: bytes) -> None:
    """Commit ``content`` as the next version of ``path``'s result lineage (FORMAT.md, "Prefect results").

    Prefect rewrites a path with the same bytes when it recomputes a task whose cached record
    could not be read. A save keeps an existing blob of the right size (deduplication), so a
    rotten copy would be named again and the result stay unreadable: when the save reused
    stored blobs, each region's copy of them is re-hashed, a corrupt one deleted, and the result
    saved once more, which writes it again.
    """
    from ..training.state_io import save_state  # the state encoding, shared with checkpoints

    if not isinstance(content, (bytes, bytearray, memoryview)):
        raise TypeError(f"write_path({path!r}) takes bytes, not {type(content).__name__}")
    lineage = result_lineage(path)
    state, metadata = {CONTENT_ENTRY: bytes(content)}, {PATH_METADATA: path}
    info = save_state(store, state, lineage=lineage, metadata=metadata)
    if info.bytes_written is not None and info.bytes_written >= info.total_bytes * len(info.regions):
        return  # every byte was written now (raw, every region): nothing old was reused
    if _delete_corrupt_copies(store, lineage, info.version, fresh=(info.bytes_written, len(info.regions))):
        save_state(store, state, lineage=lineage, metadata=metadata)


def _delete_corrupt_copies(
    store: Store, lineage: str, version: int, fresh: tuple[int | None, int] = (None, 0)
) -> list[str]:
    """Delete every copy of a blob of ``version`` that does not hash to its name; the copies deleted.

    A blob is named by the digest of its bytes, so a copy that does not match is garbage in any
    manifest that names it: deleting it loses nothing, and the next save writes it again.
    ``fresh`` is (bytes the save wrote, regions that took it): when that covers every blob the
    version names (compressed, so fewer bytes than the content), nothing old was reused and
    nothing is read back.
    """
    manifest, holders = store.resolve(lineage, version)
    stored: dict[str, int] = {}
    for entry in store.manifest_entries(manifest, prefer=holders):
        for chunk in entry.chunks:
            # Every blob the chunk needs: a delta's parents, and each region codec's form (FORMAT.md).
            stored.update(chunk.blobs())
    written, regions = fresh
    if written is not None and written >= sum(stored.values()) * regions:
        return []
    deleted = []
    for region in store.regions:
        for digest, size in stored.items():
            key = blob_key(digest)
            try:
                if hash_bytes(region.get(key, max_bytes=size + 1), algorithm_of(digest)) != digest:
                    region.delete(key)
                    deleted.append(f"{region.name}/{key}")
            except RegionError:
                continue  # missing or unreachable: a later save or verify --repair writes it
    if deleted:
        _logger().warning(
            "Prefect result lineage %r: deleted %d corrupt blob copies (%s) so that this write stores them again",
            lineage,
            len(deleted),
            ", ".join(deleted),
        )
    return deleted


def _damaged_newer(store: Store, lineage: str, listed: dict[int, list[str]], newer_than: int) -> dict[str, str]:
    """Why each region's manifest of the newest version above ``newer_than`` is unreadable, when that
    version's manifest is damaged in every region that holds one; else {} (nothing newer, or a newer
    write that is still in flight or never reached its quorum: valid copies, not damage)."""
    for version in sorted((v for v in listed if v > newer_than), reverse=True):
        copies = store.manifest_copies(lineage, version, listed[version])
        if copies.damaged and not copies.valid:
            return {region: f"manifest of version {version}: {cause}" for region, cause in copies.invalid.items()}
    return {}


def _refuse_damaged_newer(store: Store, path: str, lineage: str, listed: dict[int, list[str]], newer_than: int) -> None:
    """A result path is a key, not a history: when the version written last is damaged everywhere, an older
    version is a stale value, so none is returned (``ResultUnavailableError``; Prefect recomputes, and the
    rewrite becomes the newest version). ``Store.resolve`` would skip to the older version, as checkpoints do."""
    if causes := _damaged_newer(store, lineage, listed, newer_than):
        error = ResultUnavailableError(path, lineage, causes)
        _logger().error("%s", error)
        raise error


def read_result(store: Store, path: str) -> bytes:
    """The bytes of ``path``'s latest version, every chunk verified (other regions on a bad copy)."""
    lineage = result_lineage(path)
    listed, _unreachable = store.version_listing(lineage)
    try:
        manifest, holders = store.resolve(lineage)
    except CheckpointNotFoundError:
        _refuse_damaged_newer(store, path, lineage, listed, 0)
        raise ResultNotFoundError(path, lineage, store.region_names) from None
    except CheckpointError as exc:  # a forged or untrusted manifest on a signing store, ...
        _logger().error("Prefect result %r (lineage %r) refused: %s", path, lineage, exc)  # Prefect swallows it: say it
        raise
    _refuse_damaged_newer(store, path, lineage, listed, manifest.version)
    entries = store.manifest_entries(manifest, prefer=holders)
    if [(entry.name, entry.kind) for entry in entries] != [(CONTENT_ENTRY, "bytes")]:
        raise ResultUnavailableError(
            path, lineage, {name: "the lineage holds a checkpoint, not a Prefect result" for name in holders}
        )
    [entry] = entries
    buffer = bytearray(entry.size)
    view = memoryview(buffer)
    report = ReadReport()  # where the verified bytes came from, and why a copy was passed over
    offset = 0
    for chunk in entry.chunks:
        try:
            # Whatever the chunk's stored form (raw, a codec, a delta: core/chunks.py), decoded and verified;
            # with region codecs, its cheapest form first (a raw local copy before a compressed cloud one).
            store.read_chunk_into(chunk, view[offset : offset + chunk.size], prefer=holders, report=report)
        except BlobUnavailableError as exc:
            error = ResultUnavailableError(path, lineage, exc.causes)
            _logger().error("%s", error)  # Prefect's cache lookup swallows read errors: say it here
            raise error from None
        offset += chunk.size
    if report.passed_over:
        _logger().warning(
            "Prefect result %r (lineage %r): a copy was passed over (%s); a verified copy was served from %s. "
            "Heal the store with `prefect-recovery verify --repair`.",
            path,
            lineage,
            "; ".join(f"{name}: {', '.join(causes)}" for name, causes in report.passed_over.items()),
            ", ".join(dict.fromkeys(report.served)),
        )
    return bytes(buffer)


class ResultStorage:
    """What makes a ``CheckpointStore`` a ``WritableFileSystem`` (Prefect result storage).

    Mixed into the block before ``WritableFileSystem``; the methods need only ``self.core``.
    """

    # No class annotation here: pydantic would take it for a block field.
    if TYPE_CHECKING:
        core: Store

    def _resolve_path(self, path: str) -> str:
        # Prefect asks an unsaved storage block for this to build its keys (results.py,
        # create_result_record): paths are names in the store, used as given, like S3Bucket's
        # keys without a bucket folder.
        return path

    async def aread_path(self, path: str) -> bytes:
        """Read the result stored under ``path``, verified, without blocking the event loop.

        Raises:
            ResultNotFoundError: nothing is stored under ``path``.
            ResultUnavailableError: no region holds an intact copy.
        """
        # self.core is built in the worker too: opening a store loads its signing keys from Secret
        # blocks, and Block.load on the event loop's thread returns a coroutine (async_dispatch)
        return await run_sync_in_worker_thread(lambda: read_result(self.core, path))

    @async_dispatch(aread_path)
    def read_path(self, path: str) -> bytes:
        """Read the result stored under ``path``: the latest version, every byte checked against its
        digest, another region's copy served when one is corrupt or missing.

        Example:
            ```python
            store = CheckpointStore.load("BLOCK_NAME")
            store.write_path("reports/latest.json", b"{}")
            assert store.read_path("reports/latest.json") == b"{}"
            ```

        Raises:
            ResultNotFoundError: nothing is stored under ``path``.
            ResultUnavailableError: no region holds an intact copy.
        """
        return read_result(self.core, path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        """Store ``content`` under ``path`` (a new version) without blocking the event loop."""
        await run_sync_in_worker_thread(lambda: write_result(self.core, path, content))  # core: see aread_path
        return path

    @async_dispatch(awrite_path)
    def write_path(self, path: str, content: bytes) -> str:
        """Store ``content`` under ``path``: a new version of its result lineage, in every region,
        committed at the write quorum (``QuorumNotMetError`` otherwise). Returns ``path``."""
        write_result(self.core, path, content)
        return path

    def result_lineage(self, path: str) -> str:
        """The lineage that holds the result stored under ``path`` (for ``list``, ``verify``, the CLI)."""
        return result_lineage(path)


def result_paths(store: Any) -> dict[str, str]:
    """Every result path stored in ``store`` (a core ``Store`` or the block), mapped to its lineage.

    Reads the latest manifest of every ``prefect-result.*`` lineage: for inspection, not a hot path.
    """
    from ..core.layout import RESULT_PREFIX
    from ..core.store import core_store

    core = core_store(store)
    found: dict[str, str] = {}
    for lineage in core.lineages():
        if lineage.startswith(RESULT_PREFIX):
            info = core.latest(lineage)
            if info is not None and isinstance(info.metadata.get(PATH_METADATA), str):
                found[str(info.metadata[PATH_METADATA])] = lineage
    return found
