"""One audit of a store (DESIGN.md step 6): scrub and repair, then retention, then garbage
collection, summed up as rows and a markdown summary that the audit flow and the CLI share.

Order matters. Retention and GC only run on a store the scrub found healthy (after repair):
deleting versions while copies are damaged could remove the only intact one, and GC cannot
know what a manifest it cannot read references.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, Field, JsonValue

from .gc import collect_garbage
from .gc_report import GcReport
from .layout import LIGHT_SUFFIX
from .models import VerifyReport
from .retention import RetentionPlan, RetentionPolicy, VersionDeletion, apply_retention, plan_retention
from .store import Store
from .verify import verify_store


class AuditReport(BaseModel):
    """Everything one audit found and did."""

    started_at: datetime
    seconds: float
    dry_run: bool = Field(description="Retention and GC only said what they would delete.")
    scrub: VerifyReport
    retention: RetentionPlan | None = Field(default=None, description="The retention plan, when one was made.")
    deletions: list[VersionDeletion] = Field(default_factory=list, description="Versions retention deleted.")
    gc: GcReport | None = None
    replay: dict[str, JsonValue] | None = Field(default=None, description="The sampled replay check, if any.")
    notes: list[str] = Field(default_factory=list)

    @property
    def healthy(self) -> bool:
        replay_ok = self.replay is None or bool(self.replay.get("deterministic", True))
        return self.scrub.healthy and replay_ok

    def rows(self) -> list[dict[str, Any]]:
        """One row per checkpoint: lineage, version, step, trigger, size, signature, per-region
        status, and what retention decided."""
        decided: dict[tuple[str, int], str] = {}
        if self.retention is not None:
            deleted = {(d.lineage, d.version) for d in self.deletions if d.deleted}
            for decision in self.retention.decisions:
                key = (decision.lineage, decision.version)
                if decision.action == "keep":
                    decided[key] = "keep: " + ", ".join(decision.reasons)
                elif key in deleted:
                    decided[key] = "deleted"
                else:
                    decided[key] = "would delete" if self.dry_run else "delete failed or skipped"
        rows = []
        for row in self.scrub.checkpoints:
            rows.append(
                {
                    "lineage": row.lineage,
                    "version": row.version,
                    "step": row.step,
                    "trigger": row.trigger or "-",
                    "tier": row.tier or "-",
                    "size": human_bytes(row.bytes),
                    "signature": row.signature,
                    **{f"region {name}": status for name, status in row.regions.items()},
                    "copies": row.copies,
                    "under-replicated": "YES" if row.under_replicated else "no",
                    "retention": decided.get((row.lineage, row.version), "not applied"),
                }
            )
        return rows

    def markdown(self, images: dict[str, str] | None = None) -> str:
        """A summary for a Prefect markdown artifact; ``images`` maps captions to image URLs."""
        scrub = self.scrub
        lines = [
            "# Checkpoint audit",
            "",
            f"**{'Healthy' if self.healthy else 'PROBLEMS REMAIN'}** — {self.started_at:%Y-%m-%d %H:%M} UTC, "
            f"{self.seconds:.1f} s{' (dry run)' if self.dry_run else ''}",
            "",
            f"* regions: {text(', '.join(scrub.regions))}",
            f"* lineages: {scrub.lineages}, versions: {scrub.versions}, blobs: {scrub.blobs} "
            f"({scrub.blobs_read} read and re-hashed, {human_bytes(scrub.bytes_checked)})",
            f"* signing: {text(scrub.signing)}",
            f"* problems: {len(scrub.problems)} found, {len(scrub.unrepaired)} unrepaired",
            f"* under-replicated checkpoints: {sum(row.under_replicated for row in scrub.checkpoints)}",
        ]
        if self.retention is not None:
            lines.append(
                f"* retention: {len(self.retention.to_keep)} kept, {len(self.retention.to_delete)} "
                f"{'to delete' if self.dry_run else 'deleted'}"
            )
        if self.gc is not None:
            if self.gc.refusals:
                lines.append(f"* garbage collection refused: {text('; '.join(self.gc.refusals))}")
            else:
                verb = "would free" if self.dry_run else "freed"
                stale = sum(len(keys) for keys in self.gc.stale_manifests_deleted.values())
                crashed = f" and {stale} manifest copies of crashed saves" if stale else ""
                lines.append(
                    f"* garbage collection: {self.gc.total_blobs_deleted} unreferenced blobs{crashed}, "
                    f"{verb} {human_bytes(self.gc.total_bytes_freed)}, {self.gc.kept_young} kept (younger than grace)"
                )
        if self.replay is not None:
            replay = self.replay
            verdict = "deterministic" if replay.get("deterministic") else f"NOT deterministic: {text(str(replay))}"
            lines.append(
                f"* replay check {text(str(replay.get('lineage')))} v{text(str(replay.get('from_version')))}→"
                f"v{text(str(replay.get('to_version')))}: {verdict}"
            )
        repaired = [p for p in scrub.problems if p.repaired]
        if repaired:
            lines += ["", "## Repaired", "", "| checkpoint | region | was | object |", "|---|---|---|---|"]
            for p in repaired[:50]:
                shown = p.object if len(p.object) <= 40 else p.object[:40] + "…"  # blob keys are 80+ characters
                checkpoint = f"{text(p.lineage or '-')} v{p.version or '-'}"
                lines.append(f"| {checkpoint} | {text(p.region)} | {text(p.kind)} | {text(shown)} |")
        if scrub.unrepaired:
            lines += ["", "## Unrepaired problems", "", "| region | object | kind | detail |", "|---|---|---|---|"]
            lines += [
                f"| {text(p.region)} | {text(p.object)} | {text(p.kind)} | {text(p.detail)} |"
                for p in scrub.unrepaired[:50]
            ]
        notes = [*self.notes, *scrub.notes]
        if notes:
            lines += ["", "## Notes", "", *[f"* {text(note)}" for note in notes[:50]]]
        for caption, url in (images or {}).items():
            lines += ["", f"## {text(caption)}", "", f"![{text(caption)}]({url})"]
        return "\n".join(lines) + "\n"


# What the Prefect UI's markdown renderer would read as markup in store-controlled text (stray
# entry names, region names, problem details): escaped, so such text shows as itself and can
# plant no link, image, table cell or raw HTML in the audit artifact.
_MARKDOWN_SPECIAL = {c: "\\" + c for c in "\\`*_[](){}|~!#"} | {"<": "&lt;", ">": "&gt;", "&": "&amp;"}
_MARKDOWN_ESCAPES = str.maketrans(_MARKDOWN_SPECIAL | {"\n": " ", "\r": " "})


def text(value: str) -> str:
    """``value`` as literal text in markdown (a table cell or list item): markup escaped."""
    return str(value).translate(_MARKDOWN_ESCAPES)


def human_bytes(count: int) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def audit_store(
    store: Store,
    *,
    policy: RetentionPolicy | None = None,
    read_data: float = 1.0,
    repair: bool = True,
    apply_retention_policy: bool = True,
    gc_grace: timedelta = timedelta(hours=1),
    lineage: str | None = None,
    dry_run: bool = False,
    seed: int | None = None,
) -> AuditReport:
    """Scrub (and repair), then apply ``policy`` and collect garbage, in that order.

    Args:
        policy: What to keep; None keeps every version (GC still removes unreferenced blobs).
        read_data: Fraction of the blobs read and re-hashed (presence is always checked).
        repair: Re-copy damaged or missing copies from verified ones.
        apply_retention_policy: Apply ``policy`` and collect garbage after a healthy scrub.
        gc_grace: Unreferenced blobs younger than this survive (saves in progress).
        lineage: Only this lineage (GC, which is store-wide, is then skipped).
        dry_run: Retention and GC report what they would delete and delete nothing.
        seed: Seed of the read_data sample.
    """
    started_at = datetime.now(UTC)
    clock = time.monotonic()
    scrub = verify_store(store, repair=repair, lineage=lineage, read_data=read_data, seed=seed)
    report = AuditReport(started_at=started_at, seconds=0.0, dry_run=dry_run, scrub=scrub)
    if not apply_retention_policy:
        report.notes.append("retention and garbage collection not applied (apply_retention=false)")
    elif not scrub.healthy:
        report.notes.append(
            "retention and garbage collection skipped: the scrub left problems unrepaired; fix them first "
            "(a damaged store must not lose its other copies)"
        )
    else:
        if policy is None:
            report.notes.append("no retention policy configured on the store: every version is kept")
        else:
            report.retention = plan_retention(store, policy, lineage=lineage)
            light = f"{lineage}{LIGHT_SUFFIX}" if lineage is not None else None
            if light is not None and light in store.lineages():  # its light tier goes with it
                light_plan = plan_retention(store, policy, lineage=light, now=report.retention.now)
                report.retention.decisions += light_plan.decisions
                report.retention.notes += light_plan.notes
            if not dry_run:
                report.deletions = apply_retention(store, report.retention)
        if lineage is not None:
            report.notes.append("garbage collection is store-wide: skipped for a single-lineage audit")
        else:
            # A dry run deleted nothing: GC counts what retention would delete as gone already.
            plan = report.retention if dry_run else None
            doomed = [(d.lineage, d.version) for d in plan.to_delete] if plan is not None else []
            report.gc = collect_garbage(store, grace=gc_grace, dry_run=dry_run, assume_deleted=doomed)
    report.seconds = time.monotonic() - clock
    return report


__all__ = ["AuditReport", "audit_store", "human_bytes"]
