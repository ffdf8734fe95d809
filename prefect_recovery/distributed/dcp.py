"""The store as a ``torch.distributed.checkpoint`` (DCP) storage backend.

``dcp.save(state, storage_writer=dcp_writer(store, lineage))`` and
``dcp.load(state, storage_reader=dcp_reader(store, lineage))``: DCP's planners decide what each
rank writes and reads (DDP dedup of replicated tensors, FSDP2/DTensor shards, resharding at
load); the store decides how it is kept (FORMAT.md, "Distributed (DCP) checkpoints").

Commit protocol, in DCP's own call order (torch/distributed/checkpoint/storage.py):

1. every rank, ``write_data``: its items through ``Store.write_entries``: hashed, written
   create-only to every region, published nowhere; when the checkpoint will be committed in
   the paged form (FORMAT.md, "Entry pages"), the rank also writes its part's entry pages
   (``Store.write_entry_pages``), so pages are encoded by every rank in parallel; the
   ``WriteResult``s carry the manifest entries, the pages and the regions that failed back
   to the coordinator in DCP's own gather;
2. the coordinator, ``finish``: DCP's global ``Metadata`` as JSON (no pickle), then ONE
   manifest through ``Store.commit_entries`` naming every rank's entries, or listing the
   ranks' pages (arbiter first, quorum, signed).

DCP calls ``finish`` only after every rank's ``write_data`` returned, so a rank that dies or
hangs before that means no manifest: the previous version stays the latest, and the blobs the
other ranks wrote are unreferenced until GC's grace period removes them. The survivors block in
DCP's gather until the process group's collective fails (a dead gloo peer: at once, "Connection
closed by peer"; a hung one: after the process group's ``timeout``) and raise; under torchrun the
agent also stops the other ranks once one exits (docs/FORMAT.md).
"""

from __future__ import annotations

import dataclasses
import io
import os
import time
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import JsonValue
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from ..core.layout import check_lineage
from ..core.manifest import Component, Entry, Manifest, PageRef, ShardInfo
from ..core.models import CheckpointInfo
from ..core.observe import StoreEvent, notify
from ..core.region_local import LocalRegionIO
from ..core.state_tree import DTYPE_SIZES
from ..core.store import EntryPlan, Store, WrittenEntries, core_store
from ..training.encoding import _dtype_name, _path_part, allocate, contiguous_copy, reusable, tensor_bytes
from .errors import (
    DCPArgumentError,
    DCPMetadataError,
    DCPVersionMismatchError,
    NotADCPCheckpointError,
    UnsafeBytesItemError,
    picklable_across_ranks,
)
from .metadata import check_planner_data, decode_metadata, encode_metadata

DCP_FORMAT = "prefect-recovery/dcp"
DCP_FORMAT_VERSION = 1
# The DCP metadata's entry. Two path components, the second not starting with '@': no item's
# entry can take this name (bytes items have one component, tensor chunks end in '/@...').
METADATA_ENTRY = ".dcp/metadata.json"
# What torch's own FileSystemWriter records as the DCP format version it wrote.
DCP_VERSION = "1.0.0"


def tensor_entry_name(fqn: str, offsets: Sequence[int]) -> str:
    """The entry of one chunk of tensor ``fqn``: ``<fqn, percent-encoded>/@<offsets>``."""
    return f"{_path_part(fqn)}/@{','.join(str(int(o)) for o in offsets)}"


def bytes_entry_name(fqn: str) -> str:
    """The entry of a non-tensor item ``fqn`` (DCP's own torch.save bytes)."""
    return _path_part(fqn)


def dcp_tree() -> JsonValue:
    """The manifest's ``tree`` of a DCP checkpoint: what marks it as one, and where its metadata is."""
    return {
        "dict": [
            ["format", DCP_FORMAT],
            ["format_version", DCP_FORMAT_VERSION],
            ["metadata", {"bytes": METADATA_ENTRY}],
        ]
    }


def committed_version(metadata: Metadata) -> int | None:
    """The version a ``dcp.save`` through ``dcp_writer`` committed, from the ``Metadata`` it returned
    (on every rank: DCP broadcasts the coordinator's); None for another writer's metadata."""
    meta = metadata.storage_meta
    checkpoint_id = None if meta is None else str(meta.checkpoint_id or "")
    if not checkpoint_id or "@v" not in checkpoint_id:
        return None
    version = checkpoint_id.rpartition("@v")[2]
    return int(version) if version.isdigit() else None


@dataclass(frozen=True)
class StoredItem:
    """``WriteResult.storage_data`` of one item: its manifest entry, and how its rank's write went
    (the regions that failed it, and the new bytes it wrote, counted on the rank's first item)."""

    entry: Entry
    region_causes: dict[str, str]
    bytes_written: int
    # The entry pages the rank wrote for its whole part (on its first item; None on the others,
    # and when the rank did not page): the coordinator lists them instead of paging the part.
    pages: list[PageRef] | None = None


@dataclass(frozen=True)
class RankPlan:
    """``SavePlan.storage_data`` the coordinator hands each rank: its rank, and whether it pages
    its own part (the whole checkpoint names more than the store's ``page_entries`` entries, so
    ``commit_entries`` would page it anyway)."""

    rank: int
    page: bool = False


def _component(fqn: str) -> str:
    return fqn.split(".", 1)[0] or fqn


def _check_checkpoint_id(lineage: str, checkpoint_id: str | os.PathLike[str] | None) -> None:
    if checkpoint_id is not None and str(checkpoint_id) != lineage:
        raise DCPArgumentError(
            f"checkpoint_id {str(checkpoint_id)!r} given for the store's lineage {lineage!r}: the lineage is "
            "chosen with dcp_writer/dcp_reader; pass no checkpoint_id (or the same lineage)"
        )


class StoreWriter(StorageWriter):
    """A ``StorageWriter`` that commits each ``dcp.save`` as the next version of ``lineage``.

    After a save, ``info`` (on the coordinator) is the committed ``CheckpointInfo``; on every rank
    ``committed_version(dcp.save(...))`` is its version.
    """

    def __init__(
        self,
        store: Any,
        lineage: str,
        *,
        step: int | None = None,
        metadata: Mapping[str, JsonValue] | None = None,
    ):
        """
        Args:
            store: A core ``Store`` or anything holding one (the ``CheckpointStore`` block).
            lineage: The lineage the checkpoint becomes the next version of.
            step: Training step recorded in the manifest.
            metadata: User JSON recorded in the manifest.
        """
        picklable_across_ranks()  # a rank's typed error reaches every rank as itself (errors.py)
        self.store: Store = core_store(store)
        self.lineage = check_lineage(lineage)
        self.step = step
        self.metadata = dict(metadata or {})
        self.info: CheckpointInfo | None = None
        self.is_coordinator = False
        self.rank = 0
        self.save_id = uuid.uuid4().hex

    # -- DCP's protocol, in call order ---------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        _check_checkpoint_id(self.lineage, checkpoint_id)
        self.info = None
        self.save_id = uuid.uuid4().hex

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if not kwargs.get("use_collectives", True):
            raise DCPArgumentError(
                "use_collectives=False is not supported: the store commits one manifest naming every rank's "
                "entries, which needs the coordinator to gather the ranks' write results"
            )
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank") or 0)
        if is_coordinator:
            # Refuse before any rank writes a byte (e.g. a signing store without its key).
            check = getattr(self.store, "_check_can_commit", None)
            if check is not None:
                check(self.lineage)

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.lineage, save_id=self.save_id)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        # Which lineage this rank's writer names: the coordinator checks that every rank names the same one.
        return dataclasses.replace(plan, storage_data=self.lineage)

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        lineages = sorted({str(plan.storage_data) for plan in plans})
        if len(lineages) > 1:
            # One manifest names every rank's entries: it would land under the coordinator's lineage only.
            raise DCPArgumentError(
                f"the ranks of one dcp.save passed writers of {len(lineages)} lineages ({', '.join(lineages[:4])}); "
                "every rank must pass dcp_writer the same lineage (a per-rank lineage needs a process group per rank)"
            )
        for plan in plans:  # refuse planner data JSON cannot carry now, not after every rank wrote
            check_planner_data(plan.planner_data)
        # Ranks page their own parts only when the manifest will be paged whatever they do (its
        # entries, the metadata's included, exceed page_entries): a smaller checkpoint stays the
        # single-file manifest it was, byte for byte. (One paged only for its JSON size is still
        # paged, by the coordinator, at commit.)
        limit = self.store.page_entries
        page = limit is not None and sum(len(plan.items) for plan in plans) + 1 > limit
        # Each rank learns its rank from its plan: the shard metadata records it.
        return [dataclasses.replace(plan, storage_data=RankPlan(rank, page)) for rank, plan in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        data = plan.storage_data
        rank = data.rank if isinstance(data, RankPlan) else data if isinstance(data, int) else self.rank
        page = isinstance(data, RankPlan) and data.page
        plans: list[EntryPlan] = []
        keep_alive: list[Any] = []  # the bytes the entry plans view, until they are written
        for item in plan.items:
            data = planner.resolve_data(item)
            entry_plan = self._entry_plan(item, data, rank)
            keep_alive.append(data)
            plans.append(entry_plan)
        # With a delta store, each chunk that changed little since the lineage's latest version is stored as
        # an XOR against that version's chunk of the same entry (a shard keeps its name while the sharding
        # does); every rank reads its own part of the base (its pages, of a paged manifest), in parallel.
        written = self.store.write_entries(plans, base=self.store.delta_base(self.lineage, ranks=[rank]))
        if page and written.entries:
            # This rank's entry pages, written (to every region, like blobs) in parallel with the
            # other ranks': the coordinator only lists them (benchmarks/ranks.py, SCALING.md).
            written = self.store.write_entry_pages(written)
        results = [
            WriteResult(
                index=item.index,
                size_in_bytes=entry.size,
                storage_data=StoredItem(
                    entry,
                    dict(written.region_causes),
                    written.bytes_written if i == 0 else 0,
                    written.pages if i == 0 else None,
                ),
            )
            for i, (item, entry) in enumerate(zip(plan.items, written.entries, strict=True))
        ]
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def _entry_plan(self, item: WriteItem, data: Any, rank: int) -> EntryPlan:
        fqn = item.index.fqn
        if item.type == WriteItemType.BYTE_IO:
            buffer = data.getbuffer() if isinstance(data, io.BytesIO) else memoryview(bytes(data))
            return EntryPlan(name=bytes_entry_name(fqn), kind="bytes", data=buffer, component=_component(fqn))
        if not isinstance(data, torch.Tensor) or item.tensor_data is None:
            raise DCPArgumentError(f"item {fqn!r} resolved to a {type(data).__name__}, not a tensor")
        if _dtype_name(data.dtype) not in DTYPE_SIZES:  # quantized: scale/zero-point live outside the bytes
            raise DCPArgumentError(f"item {fqn!r}: tensors of dtype {data.dtype} cannot be stored; dequantize it")
        tensor = data.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.to("cpu")
        if not tensor.is_contiguous():  # DCP may hand a view: only its projection is stored
            tensor = contiguous_copy(tensor)
        chunk = item.tensor_data.chunk
        if list(tensor.shape) != list(chunk.sizes):
            raise DCPArgumentError(f"item {fqn!r}: resolved tensor {list(tensor.shape)} for chunk {list(chunk.sizes)}")
        return EntryPlan(
            name=tensor_entry_name(fqn, chunk.offsets),
            kind="tensor",
            data=tensor_bytes(tensor),
            dtype=_dtype_name(tensor.dtype),
            shape=list(tensor.shape),
            component=_component(fqn),
            shard=ShardInfo(global_shape=list(item.tensor_data.size), offsets=list(chunk.offsets), rank=rank),
        )

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        parts: list[WrittenEntries] = []
        storage: dict[MetadataIndex, str] = {}
        for rank_results in results:
            entries, causes, written, pages = [], {}, 0, None
            for result in rank_results:
                stored = result.storage_data
                if not isinstance(stored, StoredItem):
                    raise DCPArgumentError(
                        f"write result for {result.index.fqn!r} was not written by this store's writer "
                        f"({type(stored).__name__}); every rank must use dcp_writer"
                    )
                entries.append(stored.entry)
                causes.update(stored.region_causes)
                written += stored.bytes_written
                if stored.pages is not None:
                    pages = list(stored.pages)
                storage[result.index] = stored.entry.name
            parts.append(WrittenEntries(entries, causes, written, pages))
        metadata.version = DCP_VERSION
        metadata.storage_data = storage
        if metadata.storage_meta is None:
            metadata.storage_meta = self.storage_meta()
        started = time.monotonic()
        try:
            encoded = encode_metadata(metadata, storage)
            meta_plan = EntryPlan(name=METADATA_ENTRY, kind="bytes", data=memoryview(encoded))
            parts.append(self.store.write_entries([meta_plan]))
            components = sorted({entry.component for part in parts for entry in part.entries if entry.component})
            self.info = self.store.commit_entries(
                self.lineage,
                parts,
                step=self.step,
                tree=dcp_tree(),
                components=[Component(name=name) for name in components],
                metadata=self.metadata,
            )
        except Exception as exc:
            # The store's observers (telemetry) hear of it as of a Store.commit (commit_entries does not notify).
            failed = getattr(exc, "causes", None) or {}
            event = StoreEvent(
                "save_failed",
                self.lineage,
                None,
                self.step,
                sum(entry.size for part in parts for entry in part.entries),
                time.monotonic() - started,
                {str(k): str(v) for k, v in dict(failed).items()},
                {"error": f"{type(exc).__name__}: {exc}"},
            )
            notify(self.store.observers, event)
            raise
        info = self.info
        event = StoreEvent(
            "checkpoint_committed",
            self.lineage,
            info.version,
            self.step,
            info.total_bytes,
            time.monotonic() - started,
            {name: "ok" for name in info.regions} | info.lagging,
            dict(info.metadata),
        )
        notify(self.store.observers, event)
        # Handed back by dcp.save on every rank (DCP broadcasts the coordinator's metadata).
        metadata.storage_meta.checkpoint_id = f"{self.lineage}@v{self.info.version}"

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False  # never picked from a path: a store writer is always passed explicitly


def dcp_manifest_metadata_entry(manifest: Manifest, entries: Sequence[Entry] | None = None) -> Entry:
    """The metadata entry of a DCP checkpoint's manifest, or ``NotADCPCheckpointError``."""
    where = f"lineage {manifest.lineage!r} version {manifest.version}"
    if manifest.tree != dcp_tree():
        tree = manifest.tree
        marker = None
        if isinstance(tree, dict) and isinstance(tree.get("dict"), list):
            marker = next(
                (pair[1] for pair in tree["dict"] if isinstance(pair, list) and pair[:1] == ["format"]),
                None,
            )
        if marker == DCP_FORMAT:
            raise DCPMetadataError(
                f"{where} is a distributed checkpoint of another format version; upgrade prefect-recovery"
            )
        raise NotADCPCheckpointError(
            f"{where} was not written by dcp_writer (a Checkpointer or save_checkpoint state?); "
            "load it with store.load_checkpoint, or pick a version saved through dcp.save"
        )
    entry = next((e for e in (manifest.entries if entries is None else entries) if e.name == METADATA_ENTRY), None)
    if entry is None or entry.kind != "bytes":
        raise DCPMetadataError(f"{where} is marked as a distributed checkpoint but has no {METADATA_ENTRY} entry")
    return entry


def _check_bytes_item(fqn: str, data: bytes) -> None:
    """Refuse a bytes item that torch's restricted (weights_only) unpickler cannot load.

    DCP's planners serialize non-tensor items with ``torch.save`` and ``DefaultLoadPlanner``
    loads them with full pickle; an item that the restricted unpickler accepts names only
    allow-listed types (containers, numbers, strings, tensors), so full unpickling it runs no
    foreign code. The bytes were digest-checked (and the manifest signature-checked) already.
    """
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UnsafeBytesItemError(
            f"non-tensor item {fqn!r} cannot be loaded without full unpickling ({type(exc).__name__}: {exc}); "
            "refused: it could run arbitrary code. Store such values as tensors or plain Python containers"
        ) from None


def rank_read_threads(store: Store) -> int:
    """Reading threads of one rank: the store's ``io_threads``, but on local regions (where a
    read is a memory copy plus a hash, bound by the CPU) no more than this rank's share of the
    cores: torchrun starts ``LOCAL_WORLD_SIZE`` ranks per machine, each with its own pool, and
    4 ranks x 4 threads on 2 cores loaded up to 1.6x slower than one thread per rank
    (benchmarks/ranks.py --dcp). Object-store regions wait on the network: they keep them all."""
    if not all(isinstance(region, LocalRegionIO) for region in store.regions):
        return store.io_threads
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(store.io_threads, len(os.sched_getaffinity(0)) // local_ranks))


class StoreReader(StorageReader):
    """A ``StorageReader`` of one version of ``lineage`` (default: the latest consistent one).

    The manifest is resolved and verified (quorum, every blob present, signature on a signing
    store) before anything else; each rank then reads only the entries its load plan names, each
    re-hashed against its digest before a byte is used.
    """

    def __init__(self, store: Any, lineage: str, version: int | None = None):
        """
        Args:
            store: A core ``Store`` or anything holding one (the ``CheckpointStore`` block).
            lineage: The lineage to load from.
            version: The version; None means the latest consistent version.
        """
        picklable_across_ranks()  # a rank's typed error reaches every rank as itself (errors.py)
        self.store: Store = core_store(store)
        self.lineage = check_lineage(lineage)
        self.version = version
        self.manifest: Manifest | None = None
        self.holders: list[str] = []
        self.storage_data: dict[MetadataIndex, str] = {}
        self.load_id = uuid.uuid4().hex
        self._error: Exception | None = None
        self._entries: dict[str, Entry] = {}  # the manifest's entries, read once (paged or not)

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        _check_checkpoint_id(self.lineage, checkpoint_id)
        self.manifest, self.holders, self.storage_data, self._error = None, [], {}, None
        self.load_id = uuid.uuid4().hex

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The checkpoint's DCP metadata, after the manifest is resolved and verified.

        A failure here is raised by ``set_up_storage_reader``, DCP's next call, and this returns
        empty metadata meanwhile: ``dcp.load`` turns an exception of ``read_metadata`` into an
        ``AssertionError`` that keeps only its message, and the typed error (a forged manifest,
        not a DCP checkpoint, no such version) would be lost to the caller.
        """
        self._error = None
        try:
            return self._read_metadata()
        except Exception as exc:
            self._error = exc
            return Metadata(state_dict_metadata={}, storage_data={})

    def _read_metadata(self) -> Metadata:
        manifest, holders = self.store.resolve(self.lineage, self.version)
        listed = self.store.manifest_entries(manifest, prefer=holders)  # either form (FORMAT.md, "Entry pages")
        entry = dcp_manifest_metadata_entry(manifest, listed)
        buffer = bytearray(entry.size)
        self.store.read_entries_into([(entry, memoryview(buffer))], prefer=holders)
        where = f"lineage {self.lineage!r} version {manifest.version}"
        metadata = decode_metadata(bytes(buffer), {e.name: e for e in listed}, where)
        self._entries = {e.name: e for e in listed}
        self.manifest, self.holders = manifest, holders
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.checkpoint_id = f"{self.lineage}@v{manifest.version}"
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if self._error is not None:
            raise self._error
        if metadata.storage_data is None:
            raise DCPMetadataError("the checkpoint's DCP metadata names no storage for its items")
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        if self._error is not None:
            raise self._error
        # Which manifest this rank resolved: the coordinator checks that every rank loads the same one.
        digest = self.manifest.manifest_digest if self.manifest is not None else None
        return dataclasses.replace(plan, storage_data=digest)

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        digests = {plan.storage_data for plan in plans}
        if len(digests) > 1:
            raise DCPVersionMismatchError(
                f"the ranks resolved {len(digests)} different versions of lineage {self.lineage!r} (a save "
                "committed while they were loading); pass version= to dcp_reader so every rank loads the same one"
            )
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        if self.manifest is None:
            raise DCPArgumentError("read_data before read_metadata: the reader is used outside dcp.load's order")
        entries = self._entries
        wanted: dict[str, list[ReadItem]] = defaultdict(list)
        for item in plan.items:
            name = self.storage_data.get(item.storage_index)
            if name is None or name not in entries:
                raise DCPMetadataError(f"item {item.storage_index.fqn!r} is not stored in this checkpoint")
            wanted[name].append(item)
        values: dict[str, Any] = {}
        direct: set[str] = set()  # entries read straight into the planner's tensor
        targets = []
        for name, items in wanted.items():
            entry = entries[name]
            target = self._whole_entry_target(entry, items, planner)
            if target is not None:
                values[name], view = target, tensor_bytes(target) if entry.size else memoryview(bytearray())
                direct.add(name)
            else:
                values[name], view = allocate(entry)
            targets.append((entry, view))
        # Only the entries this rank's plan names are read (partial restore), each one verified.
        self.store.read_entries_into(targets, prefer=self.holders, threads=rank_read_threads(self.store))
        for name, items in wanted.items():
            for item in items:
                self._deliver(item, values[name], planner, name in direct)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    @staticmethod
    def _whole_entry_target(entry: Entry, items: list[ReadItem], planner: LoadPlanner) -> torch.Tensor | None:
        """The planner's tensor when one read item wants the whole entry and it can take the bytes as they are."""
        if len(items) != 1 or items[0].type != LoadItemType.TENSOR:
            return None
        item = items[0]
        if any(item.storage_offsets) or list(item.lengths) != list(entry.shape or []):
            return None
        target = planner.resolve_tensor(item).detach()
        return target if reusable(target, entry) else None

    @staticmethod
    def _deliver(item: ReadItem, value: Any, planner: LoadPlanner, direct: bool) -> None:
        if item.type == LoadItemType.BYTE_IO:
            data = bytes(value)
            _check_bytes_item(item.storage_index.fqn, data)
            planner.load_bytes(item, io.BytesIO(data))
            return
        if direct:
            planner.commit_tensor(item, value)
            return
        source = narrow_tensor_by_index(value, item.storage_offsets, item.lengths)
        target = planner.resolve_tensor(item).detach()
        if target.size() != source.size():
            raise DCPMetadataError(
                f"item {item.storage_index.fqn!r}: stored chunk gives {list(source.size())}, "
                f"the load wants {list(target.size())}"
            )
        target.copy_(source)
        planner.commit_tensor(item, target)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False  # never picked from a path: a store reader is always passed explicitly


def dcp_writer(
    store: Any,
    lineage: str,
    *,
    step: int | None = None,
    metadata: Mapping[str, JsonValue] | None = None,
) -> StoreWriter:
    """A DCP ``StorageWriter`` committing each save as the next version of ``lineage`` in ``store``.

    Example:
        ``dcp.save(state_dict, storage_writer=dcp_writer(store, "run-1", step=100))``
    """
    return StoreWriter(store, lineage, step=step, metadata=metadata)


def dcp_reader(store: Any, lineage: str, version: int | None = None) -> StoreReader:
    """A DCP ``StorageReader`` of ``version`` of ``lineage`` (None: the latest consistent version).

    Example:
        ``dcp.load(state_dict, storage_reader=dcp_reader(store, "run-1"))``
    """
    return StoreReader(store, lineage, version)


def load_full_state(store: Any, lineage: str, version: int | None = None) -> dict[str, Any]:
    """Every item of a DCP checkpoint, whole, in this one process: sharded tensors joined into
    full ones, nested as the state dict given to ``dcp.save`` (DCP's flattening map), non-tensor
    items loaded as they were saved (through the same safety check as any DCP load).

    What DCP's own ``format_utils.dcp_to_torch_save`` does with a directory (an empty state dict,
    ``_EmptyStateDictLoadPlanner``, ``no_dist``), through the store's reader: for export and
    inspection, never for training (it needs the whole state in one host's memory).
    """
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    _load_state_dict(
        state, storage_reader=dcp_reader(store, lineage, version), planner=_EmptyStateDictLoadPlanner(), no_dist=True
    )
    return state


def rank_errors(exc: BaseException) -> dict[int, BaseException]:
    """The exception of each failed rank inside a ``CheckpointException`` (how ``dcp.save`` and
    ``dcp.load`` report failures: a ``BaseException`` that ``except Exception`` does not catch),
    or ``{-1: exc}`` for any other exception (e.g. a collective that timed out)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, Mapping):
        return {int(rank): pair[0] if isinstance(pair, tuple) else pair for rank, pair in failures.items()}
    return {-1: exc}
