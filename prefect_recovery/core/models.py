"""Public result models of the core store (persisted and printed as JSON by the CLI)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, JsonValue


class CheckpointInfo(BaseModel):
    """A committed checkpoint version, as returned by ``save`` and ``list``."""

    lineage: str
    version: int
    step: int | None
    created_at: str
    manifest_digest: str
    total_bytes: int = Field(description="Bytes of state the checkpoint holds.")
    regions: list[str] = Field(description="Regions that hold the manifest.")
    lagging: dict[str, str] = Field(
        default_factory=dict, description="Regions that missed this version, with the reason."
    )
    bytes_written: int | None = Field(default=None, description="New blob bytes this save wrote, summed over regions.")
    metadata: dict[str, JsonValue] = Field(default_factory=dict)


ProblemKind = Literal[
    "missing",
    "corrupt",
    "unreadable manifest",
    "bad signature",
    "unreachable region",
    # A layout directory that cannot be listed (a symbolic link in its place), and a committed
    # journal event with no intact copy anywhere: reported, never repaired (nothing to copy from).
    "unreadable listing",
    "journal hole",
]


class Problem(BaseModel):
    """One thing verify found wrong, and whether repair fixed it."""

    region: str
    object: str
    kind: ProblemKind
    detail: str
    repaired: bool = False
    lineage: str | None = Field(
        default=None, description="The checkpoint it affects (for a blob, the first one naming it)."
    )
    version: int | None = None


class CheckpointAudit(BaseModel):
    """One committed version as the scrub found it: a row of the audit report."""

    lineage: str
    version: int
    step: int | None
    created_at: str
    trigger: str | None = None
    tier: str | None = None
    bytes: int
    signature: str = Field(description="'verified (key K)', 'unsigned', 'signed, not checked' or 'bad signature'.")
    regions: dict[str, str] = Field(
        description="Region -> 'ok', 'repaired', 'missing', 'corrupt', 'bad signature' or 'unreachable'."
    )
    copies: int = Field(description="Regions holding an intact copy after the scrub (and repair).")
    under_replicated: bool = Field(description="Fewer intact copies than the regions it should be in.")


class VerifyReport(BaseModel):
    healthy: bool
    regions: list[str]
    lineages: int
    versions: int
    blobs: int
    blobs_read: int = Field(default=0, description="Blobs read and re-hashed (the read_data sample).")
    bytes_checked: int
    signing: str = Field(default="off", description="Whether manifests are signed and checked.")
    problems: list[Problem]
    checkpoints: list[CheckpointAudit] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)

    @property
    def unrepaired(self) -> list[Problem]:
        return [problem for problem in self.problems if not problem.repaired]
