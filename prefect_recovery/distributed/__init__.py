"""torch.distributed on top of the store: the store as a DCP storage backend (dcp.py).

Also the ``Checkpointer`` inside torchrun (checkpointer.py, returned by ``Checkpointer(...)``
itself when ``torch.distributed`` has more than one rank), the sampler whose position survives a
change of world size (sampler.py), and ``run_ranks``, which runs a torchrun job from a ``@step``
(launch.py; docs/DISTRIBUTED.md).

A layer beside ``training``: it imports torch and the core, never Prefect, so torchrun ranks
load it without Prefect's import cost.
"""

from __future__ import annotations

from .checkpointer import DistributedCheckpointer, RankStateWarning, WorldSizeChangeError
from .context import RankContext, rank_context
from .dcp import (
    DCP_FORMAT,
    METADATA_ENTRY,
    StoredItem,
    StoreReader,
    StoreWriter,
    committed_version,
    dcp_reader,
    dcp_writer,
    load_full_state,
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
from .launch import RanksFailedError, RanksResult, run_ranks
from .sampler import DistributedResumableSampler

__all__ = [
    "DCP_FORMAT",
    "METADATA_ENTRY",
    "DCPArgumentError",
    "DCPCheckpointError",
    "DCPMetadataError",
    "DCPVersionMismatchError",
    "DistributedCheckpointer",
    "DistributedResumableSampler",
    "NotADCPCheckpointError",
    "RankContext",
    "RankStateWarning",
    "RanksFailedError",
    "RanksResult",
    "StoreReader",
    "StoreWriter",
    "StoredItem",
    "UnsafeBytesItemError",
    "WorldSizeChangeError",
    "committed_version",
    "dcp_reader",
    "dcp_writer",
    "load_full_state",
    "rank_context",
    "rank_errors",
    "run_ranks",
]
