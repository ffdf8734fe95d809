"""prefect-recovery: recoverable, bit-identical ML pipelines on Prefect.

Importing the package registers the ``CheckpointStore`` block with Prefect (entry point
``prefect.collections``), so ``prefect block register -m prefect_recovery`` finds it.
"""

from .blocks import CheckpointStore, Region
from .core import (
    BlobUnavailableError,
    CheckpointError,
    CheckpointInfo,
    CheckpointNotFoundError,
    ManifestError,
    QuorumNotMetError,
    RegionUnavailableError,
    VerifyReport,
)

__all__ = [
    "BlobUnavailableError",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "CheckpointStore",
    "ManifestError",
    "QuorumNotMetError",
    "Region",
    "RegionUnavailableError",
    "VerifyReport",
]
