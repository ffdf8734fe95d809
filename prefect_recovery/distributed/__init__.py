"""torch.distributed on top of the store: the store as a DCP storage backend (dcp.py).

A layer beside ``training``: it imports torch and the core, never Prefect, so torchrun ranks
load it without Prefect's import cost.
"""

from __future__ import annotations

from .dcp import (
    DCP_FORMAT,
    METADATA_ENTRY,
    StoredItem,
    StoreReader,
    StoreWriter,
    committed_version,
    dcp_reader,
    dcp_writer,
    rank_errors,
)
from .errors import (
    DCPArgumentError,
    DCPCheckpointError,
    DCPMetadataError,
    DCPVersionMismatchError,
    NotADCPCheckpointError,
    UnsafeBytesItemError,
)

__all__ = [
    "DCP_FORMAT",
    "METADATA_ENTRY",
    "DCPArgumentError",
    "DCPCheckpointError",
    "DCPMetadataError",
    "DCPVersionMismatchError",
    "NotADCPCheckpointError",
    "StoreReader",
    "StoreWriter",
    "StoredItem",
    "UnsafeBytesItemError",
    "committed_version",
    "dcp_reader",
    "dcp_writer",
    "rank_errors",
]
