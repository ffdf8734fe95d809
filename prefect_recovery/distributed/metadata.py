"""DCP's global ``Metadata`` as JSON, so a distributed checkpoint loads without pickle.

torch's ``FileSystemWriter`` pickles ``Metadata`` into ``.metadata``; the store keeps it as a JSON
``bytes`` entry instead (FORMAT.md, "Distributed (DCP) checkpoints"): per state-dict item its tensor
properties and chunks (offsets, sizes) or that it is a bytes item, the planner's flattening map
(fqn -> path of string keys and integer indexes), which manifest entry holds each chunk, and the
storage meta. Anything JSON cannot carry is refused when saving, and anything that does not parse
back into exactly this schema is refused when loading (``DCPMetadataError``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from ..core.manifest import Entry
from ..core.records import parse_record
from ..training.encoding import DTYPES, _dtype_name
from .errors import DCPMetadataError

METADATA_FORMAT = "prefect-recovery/dcp-metadata"
METADATA_FORMAT_VERSION = 1
# DCP metadata of a 1,000-rank job with thousands of tensors stays far below this.
MAX_METADATA_BYTES = 256 * 2**20

_LAYOUTS = {"strided": torch.strided, "sparse_coo": torch.sparse_coo}
_MEMORY_FORMATS = {
    "contiguous_format": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "channels_last_3d": torch.channels_last_3d,
    "preserve_format": torch.preserve_format,
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ChunkJson(_Strict):
    offsets: list[int]
    sizes: list[int]


class TensorItemJson(_Strict):
    fqn: str
    kind: Literal["tensor"]
    dtype: str
    layout: str
    requires_grad: bool
    memory_format: str
    pin_memory: bool
    size: list[int]
    chunks: list[ChunkJson]


class BytesItemJson(_Strict):
    fqn: str
    kind: Literal["bytes"]


class StorageRef(_Strict):
    """Which manifest entry holds the item at ``fqn`` (and chunk ``offset`` for tensors)."""

    fqn: str
    offset: list[int] | None
    entry: str


class PlannerMapping(_Strict):
    """DefaultSavePlanner's flattening: the flat ``fqn`` and the path of keys/indexes it came from."""

    fqn: str
    path: list[str | int]


class StorageMetaJson(_Strict):
    checkpoint_id: str | None
    save_id: str | None
    modules: list[str]


class DCPMetadataJson(_Strict):
    format: Literal["prefect-recovery/dcp-metadata"]
    format_version: Literal[1]
    dcp_version: str | None
    items: list[Annotated[TensorItemJson | BytesItemJson, Field(discriminator="kind")]]
    planner_data: list[PlannerMapping] | None
    storage: list[StorageRef]
    storage_meta: StorageMetaJson | None


def check_planner_data(planner_data: Any) -> list[PlannerMapping] | None:
    """The planner's data as JSON, or ``DCPMetadataError`` when JSON cannot carry it.

    ``DefaultSavePlanner`` stores ``{fqn: (key, index, ...)}`` (flatten_state_dict) or nothing;
    another planner's objects would need pickle to come back, so they are refused at save time,
    before a single blob is written.
    """
    if planner_data is None:
        return None
    if isinstance(planner_data, Mapping):
        mappings = []
        for fqn, path in planner_data.items():
            if (
                isinstance(fqn, str)
                and isinstance(path, tuple | list)
                and all(isinstance(part, str | int) and not isinstance(part, bool) for part in path)
            ):
                mappings.append(PlannerMapping(fqn=fqn, path=list(path)))
                continue
            raise DCPMetadataError(
                f"the save planner's data for {fqn!r} is {path!r}, which cannot be stored without pickle "
                "(only paths of string keys and integer indexes can); use DefaultSavePlanner"
            )
        return mappings
    raise DCPMetadataError(
        f"the save planner's data is a {type(planner_data).__name__}, which cannot be stored without pickle; "
        "use DefaultSavePlanner (or a planner whose planner_data is a mapping of fqn to a path)"
    )


def _enum_name(value: Any, table: Mapping[str, Any], what: str, fqn: str) -> str:
    for name, member in table.items():
        if member == value:
            return name
    raise DCPMetadataError(f"item {fqn!r}: {what} {value} cannot be stored in a distributed checkpoint")


def encode_metadata(metadata: Metadata, storage: Mapping[MetadataIndex, str]) -> bytes:
    """``metadata`` (with ``storage``: item index -> entry name) as canonical JSON bytes."""
    items: list[TensorItemJson | BytesItemJson] = []
    for fqn, item in metadata.state_dict_metadata.items():
        if isinstance(item, BytesStorageMetadata):
            items.append(BytesItemJson(fqn=fqn, kind="bytes"))
            continue
        if not isinstance(item, TensorStorageMetadata):
            raise DCPMetadataError(f"item {fqn!r} is a {type(item).__name__}, not tensor or bytes metadata")
        props = item.properties
        items.append(
            TensorItemJson(
                fqn=fqn,
                kind="tensor",
                dtype=_dtype_name(props.dtype),
                layout=_enum_name(props.layout, _LAYOUTS, "layout", fqn),
                requires_grad=bool(props.requires_grad),
                memory_format=_enum_name(props.memory_format, _MEMORY_FORMATS, "memory format", fqn),
                pin_memory=bool(props.pin_memory),
                size=list(item.size),
                chunks=[ChunkJson(offsets=list(c.offsets), sizes=list(c.sizes)) for c in item.chunks],
            )
        )
    meta = metadata.storage_meta
    body = DCPMetadataJson(
        format=METADATA_FORMAT,
        format_version=METADATA_FORMAT_VERSION,
        dcp_version=metadata.version,
        items=items,
        planner_data=check_planner_data(metadata.planner_data),
        storage=[
            StorageRef(fqn=index.fqn, offset=None if index.offset is None else list(index.offset), entry=name)
            for index, name in storage.items()
        ],
        storage_meta=None
        if meta is None
        else StorageMetaJson(
            checkpoint_id=None if meta.checkpoint_id is None else str(meta.checkpoint_id),
            # The save's id is a fresh uuid per save: stored, it would make two checkpoints of one
            # state differ in state digest (a recovered lineage's final digest could never match an
            # uninterrupted run's). It identifies the save in flight only, so it is not persisted.
            save_id=None,
            modules=list(meta.modules),
        ),
    )
    return json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()


def _lookup(table: Mapping[str, Any], name: str, what: str, fqn: str) -> Any:
    if name not in table:
        raise DCPMetadataError(f"item {fqn!r}: unknown {what} {name!r} in the checkpoint's DCP metadata")
    return table[name]


def decode_metadata(data: bytes, entries: Mapping[str, Entry], where: str) -> Metadata:
    """Parse stored DCP metadata and check it against the manifest's ``entries``.

    Every chunk and bytes item must be stored in an entry of the manifest whose kind, dtype and
    shape agree, so a load never asks for something the manifest does not name and checks.
    """
    parsed = parse_record(
        data,
        what=f"DCP metadata of {where}",
        format_name=METADATA_FORMAT,
        format_version=METADATA_FORMAT_VERSION,
        model=DCPMetadataJson,
        max_bytes=MAX_METADATA_BYTES,
        fail=DCPMetadataError,
    )
    storage: dict[MetadataIndex, str] = {}
    for ref in parsed.storage:
        index = MetadataIndex(ref.fqn, ref.offset)
        if index in storage:
            raise DCPMetadataError(f"{where}: item {ref.fqn!r} at {ref.offset} is stored twice")
        if ref.entry not in entries:
            raise DCPMetadataError(f"{where}: item {ref.fqn!r} names entry {ref.entry!r}, which the manifest lacks")
        storage[index] = ref.entry
    state_dict_metadata: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    for item in parsed.items:
        if item.fqn in state_dict_metadata:
            raise DCPMetadataError(f"{where}: item {item.fqn!r} is described twice")
        if isinstance(item, BytesItemJson):
            entry = entries.get(storage.get(MetadataIndex(item.fqn), ""))
            if entry is None or entry.kind != "bytes":
                raise DCPMetadataError(f"{where}: bytes item {item.fqn!r} has no bytes entry in the manifest")
            state_dict_metadata[item.fqn] = BytesStorageMetadata()
            continue
        dtype = _lookup(DTYPES, item.dtype, "dtype", item.fqn)
        chunks = []
        for chunk in item.chunks:
            if len(chunk.offsets) != len(item.size) or len(chunk.sizes) != len(item.size):
                raise DCPMetadataError(f"{where}: item {item.fqn!r} has a chunk of the wrong rank")
            entry = entries.get(storage.get(MetadataIndex(item.fqn, chunk.offsets), ""))
            if entry is None or entry.kind != "tensor" or entry.dtype != item.dtype or entry.shape != chunk.sizes:
                raise DCPMetadataError(
                    f"{where}: chunk {chunk.offsets} of {item.fqn!r} ({item.dtype}, {chunk.sizes}) has no matching "
                    "tensor entry in the manifest"
                )
            chunks.append(ChunkStorageMetadata(offsets=torch.Size(chunk.offsets), sizes=torch.Size(chunk.sizes)))
        state_dict_metadata[item.fqn] = TensorStorageMetadata(
            properties=TensorProperties(
                dtype=dtype,
                layout=_lookup(_LAYOUTS, item.layout, "layout", item.fqn),
                requires_grad=item.requires_grad,
                memory_format=_lookup(_MEMORY_FORMATS, item.memory_format, "memory format", item.fqn),
                pin_memory=item.pin_memory,
            ),
            size=torch.Size(item.size),
            chunks=chunks,
        )
    meta = parsed.storage_meta
    return Metadata(
        state_dict_metadata=state_dict_metadata,
        planner_data=None
        if parsed.planner_data is None
        else {mapping.fqn: tuple(mapping.path) for mapping in parsed.planner_data},
        storage_data=storage,
        storage_meta=None
        if meta is None
        else StorageMeta(checkpoint_id=meta.checkpoint_id, save_id=meta.save_id, modules=list(meta.modules)),
        version=parsed.dcp_version,
    )
