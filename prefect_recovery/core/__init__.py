"""Bytes-only core: format, regions, commit protocol, verify. Imports neither Prefect nor torch."""

from .audit import AuditReport, audit_store
from .errors import (
    BlobUnavailableError,
    CheckpointError,
    CheckpointNotFoundError,
    InvalidArgumentError,
    InvalidNameError,
    JournalSignatureError,
    ManifestError,
    ManifestSignatureError,
    ObjectNotFoundError,
    QuorumNotMetError,
    RegionError,
    RegionUnavailableError,
    StorageFullError,
    VersionConflictError,
)
from .gc import collect_garbage
from .gc_report import GcReport
from .journal import Journal, JournalError
from .journal_format import JournalEvent
from .lineage_history import LineageHistory, fold_journal
from .manifest import Entry, Manifest, decode_manifest
from .models import CheckpointInfo, Problem, VerifyReport
from .region import open_region
from .region_local import LocalRegionIO
from .region_object import RegionIO
from .retention import RetentionPlan, RetentionPolicy, apply_retention, plan_retention
from .signing import Keyring, ed25519_key, hmac_key
from .store import Store
from .store_writer import EntryPlan
from .verify import verify_store

__all__ = [
    "AuditReport",
    "BlobUnavailableError",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "Entry",
    "EntryPlan",
    "GcReport",
    "InvalidArgumentError",
    "InvalidNameError",
    "Journal",
    "JournalError",
    "JournalEvent",
    "JournalSignatureError",
    "Keyring",
    "LineageHistory",
    "LocalRegionIO",
    "Manifest",
    "ManifestError",
    "ManifestSignatureError",
    "ObjectNotFoundError",
    "Problem",
    "QuorumNotMetError",
    "RegionError",
    "RegionIO",
    "RegionUnavailableError",
    "RetentionPlan",
    "RetentionPolicy",
    "StorageFullError",
    "Store",
    "VerifyReport",
    "VersionConflictError",
    "apply_retention",
    "audit_store",
    "collect_garbage",
    "decode_manifest",
    "ed25519_key",
    "fold_journal",
    "hmac_key",
    "open_region",
    "plan_retention",
    "verify_store",
]
