"""``GcReport``: what one garbage collection found and deleted, for the CLI, the flows and the audit.

Its own module because both halves of GC (core/gc_blobs.py, core/gc_manifests.py) fill it in,
and ``collect_garbage`` (core/gc.py) hands it back.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class GcReport(BaseModel):
    """What one garbage collection found and deleted (or, in a dry run, would delete)."""

    swept: bool = Field(description="Whether the sweep ran and deleted (False: refused, or a dry run).")
    dry_run: bool = Field(description="Nothing is deleted; the counts say what would be.")
    now: datetime = Field(description="The time ages were measured against.")
    grace_seconds: float = Field(description="Unreferenced objects younger than this were kept.")
    regions: list[str] = Field(description="Regions of the store, in order.")
    manifests_read: int = Field(default=0, description="Manifest copies parsed in the mark phase, all regions.")
    blobs_referenced: int = Field(default=0, description="Distinct blobs named by at least one manifest.")
    blobs_deleted: dict[str, int] = Field(default_factory=dict, description="Unreferenced blobs deleted, by region.")
    bytes_freed: dict[str, int] = Field(default_factory=dict, description="Bytes of the objects deleted, by region.")
    deleted: dict[str, list[str]] = Field(
        default_factory=dict, description="Keys deleted (blobs, stale manifests, temp files, probes), by region."
    )
    stale_manifests_deleted: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Manifest copies of versions that never reached their quorum (crashed saves, half-failed "
        "retention deletions), older than grace and below a newer consistent version, deleted, by region.",
    )
    uncommitted_kept: dict[str, str] = Field(
        default_factory=dict,
        description="Below-quorum versions ('<lineage> v<version>') left in place this run, with the reason.",
    )
    temp_files_deleted: dict[str, int] = Field(
        default_factory=dict, description="Stale .tmp-* files of interrupted local writes deleted, by region."
    )
    probes_deleted: dict[str, int] = Field(
        default_factory=dict, description="Stale preflight/ probe objects deleted, by region."
    )
    kept_young: int = Field(
        default=0, description="Unreferenced blobs, temp files and probes kept because they are younger than grace."
    )
    rescued: int = Field(
        default=0, description="Candidates spared because the re-mark before deleting found them referenced or new."
    )
    unknown_objects: int = Field(
        default=0, description="Objects under blobs/ whose name is not a digest; never deleted."
    )
    lost_after_sweep: list[str] = Field(
        default_factory=list,
        description="Deleted blobs that a manifest committed during the sweep names (see the notes).",
    )
    refusals: list[str] = Field(default_factory=list, description="Why nothing was swept, and what to do.")
    notes: list[str] = Field(default_factory=list, description="Other things a person should know.")

    @property
    def total_bytes_freed(self) -> int:
        return sum(self.bytes_freed.values())

    @property
    def total_blobs_deleted(self) -> int:
        return sum(self.blobs_deleted.values())
