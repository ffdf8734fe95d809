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


ProblemKind = Literal["missing", "corrupt", "unreadable manifest", "unreachable region"]


class Problem(BaseModel):
    """One thing verify found wrong, and whether repair fixed it."""

    region: str
    object: str
    kind: ProblemKind
    detail: str
    repaired: bool = False


class VerifyReport(BaseModel):
    healthy: bool
    regions: list[str]
    lineages: int
    versions: int
    blobs: int
    bytes_checked: int
    problems: list[Problem]
    notes: list[str] = Field(default_factory=list)

    @property
    def unrepaired(self) -> list[Problem]:
        return [problem for problem in self.problems if not problem.repaired]
