"""Bytes-only core: format, regions, commit protocol, verify. Imports neither Prefect nor torch."""

from .errors import (
    BlobUnavailableError,
    CheckpointError,
    CheckpointNotFoundError,
    InvalidNameError,
    ManifestError,
    ObjectNotFoundError,
    QuorumNotMetError,
    RegionError,
    RegionUnavailableError,
    StorageFullError,
    VersionConflictError,
)
from .journal import Journal, JournalError, JournalEvent, LineageHistory, replay
from .manifest import Entry, Manifest, decode_manifest
from .models import CheckpointInfo, Problem, VerifyReport
from .region import LocalRegionIO, RegionIO, open_region
from .store import EntryPlan, Store
from .verify import verify_store

__all__ = [
    "BlobUnavailableError",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "Entry",
    "EntryPlan",
    "InvalidNameError",
    "Journal",
    "JournalError",
    "JournalEvent",
    "LineageHistory",
    "LocalRegionIO",
    "Manifest",
    "ManifestError",
    "ObjectNotFoundError",
    "Problem",
    "QuorumNotMetError",
    "RegionError",
    "RegionIO",
    "RegionUnavailableError",
    "StorageFullError",
    "Store",
    "VerifyReport",
    "VersionConflictError",
    "decode_manifest",
    "open_region",
    "replay",
    "verify_store",
]
