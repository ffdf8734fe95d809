"""Retention: which committed checkpoint versions to keep, and deleting the manifests of the rest.

A ``RetentionPolicy`` composes rules like orbax's preservation policies: a version is kept when
*any* rule keeps it (the newest N, every K-th step, milestones, anything younger than a
duration). On top of the policy, hard rules that no policy can switch off:

* the latest consistent version of a lineage is never deleted, nor anything newer (a newer
  committed version that is not consistent may be repaired; and the highest version number
  must stay listed so that numbers are never reused: the store takes ``max(listed) + 1``);
* derived ``<lineage>.steps`` lineages (``@step`` results that let a recovered run skip
  finished steps) are never touched;
* when the lineage's journal says a run or recovery is unfinished, every version at or after
  the one it would resume from is kept: the latest consistent one, a version pinned by the
  current run's ``resume_version`` or by a recovery in progress, whichever is oldest; for the
  light tier ``<lineage>.light`` (which has no journal of its own), every light version from
  the first one whose step reaches that resume point's step;
* uncommitted (below-quorum) manifests are never deleted: they may be a publish in progress;
* nothing is deleted while a region is unreachable (its copies would come back later), nor from
  a lineage whose journal cannot be read.

``decide_retention`` is the pure decision on a plain history; ``plan_retention`` gathers that
history from a store (no deletion) and ``apply_retention`` deletes the planned manifests in
every region. Blobs are never deleted here: ``core.gc.collect_garbage`` sweeps the blobs no
manifest names any more.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import CheckpointNotFoundError, JournalError, ManifestError, ObjectNotFoundError, RegionError
from .journal import Journal
from .layout import LIGHT_SUFFIX, STEPS_SUFFIX, manifest_key
from .manifest import MAX_MANIFEST_BYTES, Manifest, decode_manifest
from .store import Store

MILESTONE_PREFIX = "milestone"

# Reasons to keep a version (VersionDecision.reasons when action is "keep").
KEEP_LAST = "keep_last"
EVERY_STEPS = "every_steps"
MILESTONE = "milestone"
KEEP_WITHIN = "keep_within"
LATEST = "latest"
NEWER_THAN_LATEST = "newer_than_latest"
NO_CONSISTENT_VERSION = "no_consistent_version"
UNFINISHED_RUN = "unfinished_run"
UNKNOWN_AGE = "unknown_age"
UNCOMMITTED = "uncommitted"
REGION_UNREACHABLE = "region_unreachable"
JOURNAL_UNREADABLE = "journal_unreadable"


class RetentionPolicy(BaseModel):
    """Which committed versions of each lineage to keep; a version any rule keeps is kept."""

    model_config = ConfigDict(extra="forbid")

    keep_last: int | None = Field(
        default=5, ge=1, description="Keep the newest N committed versions of each lineage; None turns this rule off."
    )
    keep_every_steps: int | None = Field(
        default=None,
        ge=1,
        description="Keep the versions whose training step is a multiple of K; None turns this rule off.",
    )
    keep_milestones: bool = Field(
        default=True,
        description="Keep the versions a milestone saved (metadata trigger starting with 'milestone').",
    )
    keep_within: timedelta | None = Field(
        default=None,
        description="Keep every version younger than this, by the manifest's created_at; None turns this rule off.",
    )

    @field_validator("keep_within")
    @classmethod
    def _positive(cls, value: timedelta | None) -> timedelta | None:
        if value is not None and value <= timedelta(0):
            raise ValueError("keep_within must be a positive duration")
        return value


class VersionRecord(BaseModel):
    """What the decision needs to know about one committed version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(ge=1, description="Version number in its lineage.")
    step: int | None = Field(default=None, description="Training step the manifest records.")
    created_at: datetime | None = Field(default=None, description="When it was saved (manifest created_at).")
    trigger: str | None = Field(default=None, description="Manifest metadata 'trigger' (what asked for the save).")


HistoryItem = VersionRecord | tuple[int, int | None, datetime | str | None, str | None]


class VersionDecision(BaseModel):
    """Keep or delete one version, and why."""

    lineage: str = Field(description="The lineage the version belongs to.")
    version: int = Field(description="The version number.")
    step: int | None = Field(default=None, description="Training step of the version.")
    created_at: datetime | None = Field(default=None, description="When the version was saved.")
    trigger: str | None = Field(default=None, description="What asked for the save (manifest metadata).")
    action: Literal["keep", "delete"] = Field(description="What retention does with this version.")
    reasons: list[str] = Field(
        default_factory=list,
        description="Keep: the rules that keep it (e.g. keep_last, milestone). Delete: why no rule keeps it.",
    )
    manifest_digest: str | None = Field(default=None, description="Digest of the manifest the decision is about.")
    regions: list[str] = Field(default_factory=list, description="Regions holding that manifest when planned.")


class RetentionPlan(BaseModel):
    """What retention would keep and delete in a store; nothing is deleted by making a plan."""

    policy: RetentionPolicy = Field(description="The policy the plan applies.")
    now: datetime = Field(description="The time ages were measured against.")
    decisions: list[VersionDecision] = Field(
        default_factory=list, description="One per version found, by lineage and version."
    )
    skipped: dict[str, str] = Field(
        default_factory=dict, description="Lineages retention leaves alone entirely, with the reason."
    )
    unreachable: dict[str, str] = Field(
        default_factory=dict, description="Regions that could not be reached; nothing is deleted while any is."
    )
    notes: list[str] = Field(default_factory=list, description="Things a person should know about the plan.")

    @property
    def to_delete(self) -> list[VersionDecision]:
        return [d for d in self.decisions if d.action == "delete"]

    @property
    def to_keep(self) -> list[VersionDecision]:
        return [d for d in self.decisions if d.action == "keep"]


class VersionDeletion(BaseModel):
    """What ``apply_retention`` did to one planned version."""

    lineage: str = Field(description="The lineage of the version.")
    version: int = Field(description="The version number.")
    deleted: list[str] = Field(default_factory=list, description="Regions that no longer hold its manifest.")
    failed: dict[str, str] = Field(default_factory=dict, description="Regions where deleting failed, with the cause.")
    skipped: str | None = Field(
        default=None, description="Why the version was not deleted after all (re-checked at apply time)."
    )

    @property
    def complete(self) -> bool:
        return self.skipped is None and not self.failed


# -- the decision --------------------------------------------------------------------------------
def _record(item: HistoryItem) -> VersionRecord:
    if isinstance(item, VersionRecord):
        return item
    version, step, created_at, trigger = item
    return VersionRecord(version=version, step=step, created_at=_parse_time(created_at), trigger=trigger)


def _parse_time(value: datetime | str | None) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def is_milestone(trigger: object) -> bool:
    return isinstance(trigger, str) and trigger.startswith(MILESTONE_PREFIX)


def decide_retention(
    history: Iterable[HistoryItem],
    policy: RetentionPolicy,
    *,
    now: datetime | None = None,
    latest: int | Literal["highest"] | None = "highest",
    resume_from: int | None = None,
    lineage: str = "",
) -> list[VersionDecision]:
    """Keep or delete each committed version of one lineage (pure: no store, no clock unless ``now`` is None).

    Args:
        history: The committed versions: ``VersionRecord``s or ``(version, step, created_at,
            trigger)`` tuples (``created_at`` a datetime or an ISO 8601 string).
        policy: The rules; a version any rule keeps is kept.
        now: The time ages are measured against (default: the current UTC time).
        latest: The latest consistent version, always kept with everything newer. ``"highest"``
            (default): the highest version of ``history``. None: the lineage has no consistent
            version, and nothing is deleted.
        resume_from: An unfinished run may resume from this version: it and every newer
            version are kept.
        lineage: Recorded in the decisions.
    """
    now = now or datetime.now(UTC)
    records = sorted((_record(item) for item in history), key=lambda r: r.version)
    if latest == "highest":
        latest = records[-1].version if records else None
    newest = {r.version for r in records[-policy.keep_last :]} if policy.keep_last else set()
    decisions = []
    for record in records:
        keep: list[str] = []
        why_not: list[str] = []
        if latest is None:
            keep.append(NO_CONSISTENT_VERSION)
        elif record.version == latest:
            keep.append(LATEST)
        elif record.version > latest:
            keep.append(NEWER_THAN_LATEST)
        if resume_from is not None and record.version >= resume_from:
            keep.append(UNFINISHED_RUN)
        if policy.keep_last:
            if record.version in newest:
                keep.append(KEEP_LAST)
            else:
                why_not.append(f"not among the newest {policy.keep_last}")
        if policy.keep_every_steps:
            if record.step is not None and record.step % policy.keep_every_steps == 0:
                keep.append(EVERY_STEPS)
            else:
                why_not.append(f"step {record.step} is not a multiple of {policy.keep_every_steps}")
        if policy.keep_milestones:
            if is_milestone(record.trigger):
                keep.append(MILESTONE)
            else:
                why_not.append(f"not a milestone (trigger {record.trigger!r})")
        if policy.keep_within is not None:
            if record.created_at is None:
                keep.append(UNKNOWN_AGE)
            elif now - record.created_at < policy.keep_within:
                keep.append(KEEP_WITHIN)
            else:
                why_not.append(f"older than {policy.keep_within}")
        decisions.append(
            VersionDecision(
                lineage=lineage,
                version=record.version,
                step=record.step,
                created_at=record.created_at,
                trigger=record.trigger,
                action="keep" if keep else "delete",
                reasons=keep or why_not or ["no rule keeps it"],
            )
        )
    return decisions


# -- what the store and the journal say ------------------------------------------------------------
class _Guard(BaseModel):
    """The hard rules of one lineage, from the store and the journal."""

    latest: int | None = None
    resume_from: int | None = None
    refusal: str | None = None  # a reason to delete nothing in the lineage
    note: str | None = None


def _latest_consistent(store: Store, lineage: str) -> int | None:
    try:
        manifest, _holders = store.resolve(lineage)
    except CheckpointNotFoundError:
        return None
    return manifest.version


def _guard(store: Store, lineage: str, light_of: str | None) -> _Guard:
    """Latest consistent version and the resume point of an unfinished run, for one lineage.

    ``light_of``: for ``<parent>.light``, the parent; its journal decides, and the resume point
    becomes the first light version whose step reaches the parent's resume step.
    """
    latest = _latest_consistent(store, lineage)
    owner = light_of or lineage
    try:
        history = Journal(store, owner).history()
    except (JournalError, RegionError) as exc:
        return _Guard(latest=latest, refusal=f"the journal of {owner!r} cannot be read ({exc}); deleting nothing")
    if light_of is None:
        unfinished, resume_from = history.unfinished, history.resume_floor(latest)
        if unfinished and resume_from is None:
            return _Guard(latest=latest)  # nothing committed to resume from yet
        note = f"{lineage}: an unfinished run may resume from v{resume_from}; keeping it and every newer version"
        return _Guard(latest=latest, resume_from=resume_from, note=note if unfinished else None)
    parent_latest = _latest_consistent(store, light_of)
    parent_resume = history.resume_floor(parent_latest)
    if not history.unfinished:
        return _Guard(latest=latest)
    resume_step: int | None = None
    if parent_resume is not None:
        try:
            resume_step = store.resolve(light_of, parent_resume)[0].step
        except CheckpointNotFoundError:
            resume_step = None
    first: int | None = None
    for version in store.versions(lineage):
        manifest = _first_valid(store, lineage, version)
        step = manifest.step if manifest is not None else None
        if resume_step is None or step is None or step >= resume_step:
            first = version
            break
    where = f"step {resume_step}" if resume_step is not None else "the start"
    note = (
        f"{lineage}: the run of {light_of!r} is unfinished (resumes from {where}); keeping light versions "
        f"from v{first} on"
        if first is not None
        else None
    )
    return _Guard(latest=latest, resume_from=first, note=note)


def _first_valid(store: Store, lineage: str, version: int) -> Manifest | None:
    copies = store.manifest_copies(lineage, version)
    manifest, _holders = copies.best(store.region_names)
    return manifest


def _unreachable(store: Store) -> dict[str, str]:
    _reachable, causes = store.reachable_regions()
    return causes


def plan_retention(
    store: Store, policy: RetentionPolicy, *, lineage: str | None = None, now: datetime | None = None
) -> RetentionPlan:
    """Decide, for every version of every lineage (or of ``lineage``), keep or delete. Deletes nothing."""
    now = now or datetime.now(UTC)
    plan = RetentionPlan(policy=policy, now=now, unreachable=_unreachable(store))
    if plan.unreachable:
        plan.notes.append(
            "nothing will be deleted while a region is unreachable ("
            + "; ".join(f"{name}: {cause}" for name, cause in plan.unreachable.items())
            + "): its copies of deleted manifests would come back with it"
        )
    names = [lineage] if lineage else store.lineages()
    for name in names:
        if name.endswith(STEPS_SUFFIX):
            plan.skipped[name] = "step results (@step) of a pipeline: never deleted by retention"
            continue
        light_of = name[: -len(LIGHT_SUFFIX)] if name.endswith(LIGHT_SUFFIX) else None
        plan.decisions.extend(_plan_lineage(store, policy, name, light_of, now, plan))
    return plan


def _plan_lineage(
    store: Store, policy: RetentionPolicy, lineage: str, light_of: str | None, now: datetime, plan: RetentionPlan
) -> list[VersionDecision]:
    guard = _guard(store, lineage, light_of)
    if guard.note:
        plan.notes.append(guard.note)
    if guard.refusal:
        plan.notes.append(f"{lineage}: {guard.refusal}")
    committed: list[VersionRecord] = []
    found: dict[int, tuple[str, list[str]]] = {}
    uncommitted: list[VersionDecision] = []
    for version in store.versions(lineage):
        copies = store.manifest_copies(lineage, version)
        manifest, holders = copies.best(store.region_names)
        if manifest is None or not store.is_committed(copies, manifest, holders):
            held = ", ".join(holders) or "no region with a valid copy"
            note = (
                f"{lineage} v{version}: uncommitted manifest ({held}; below quorum): a publish in progress, a "
                "crashed save or an interrupted retention deletion; retention leaves it alone"
            )
            if guard.latest is not None and version < guard.latest:
                note += " (if the latter, rerun apply_retention with the plan that deleted it)"
            plan.notes.append(note)
            uncommitted.append(
                VersionDecision(
                    lineage=lineage,
                    version=version,
                    step=manifest.step if manifest else None,
                    action="keep",
                    reasons=[UNCOMMITTED],
                    manifest_digest=manifest.manifest_digest if manifest else None,
                    regions=holders,
                )
            )
            continue
        trigger = manifest.metadata.get("trigger")
        committed.append(
            VersionRecord(
                version=version,
                step=manifest.step,
                created_at=_parse_time(manifest.created_at),
                trigger=trigger if isinstance(trigger, str) else None,
            )
        )
        found[version] = (manifest.manifest_digest, holders)
    decisions = decide_retention(
        committed, policy, now=now, latest=guard.latest, resume_from=guard.resume_from, lineage=lineage
    )
    for decision in decisions:
        decision.manifest_digest, decision.regions = found[decision.version]
        if decision.action == "delete" and (plan.unreachable or guard.refusal):
            decision.action = "keep"
            decision.reasons = [REGION_UNREACHABLE if plan.unreachable else JOURNAL_UNREADABLE]
    return sorted(decisions + uncommitted, key=lambda d: d.version)


# -- deleting --------------------------------------------------------------------------------------
def apply_retention(store: Store, plan: RetentionPlan) -> list[VersionDeletion]:
    """Delete, in every region, the manifests of the versions ``plan`` deletes. Blobs stay (GC).

    The hard rules are checked again first, since the store may have moved on since the plan:
    nothing is deleted while a region is unreachable, a version is skipped unless it is still
    older than the latest consistent version of its lineage and older than where an unfinished
    run would resume, and only copies of the planned manifest (same ``manifest_digest``) or
    unreadable ones are deleted. Versions go oldest first, each from every region.

    A deletion that fails in some region leaves the version held by fewer regions: below quorum
    it no longer counts as a checkpoint (and, being older than the latest, never looks like a
    newer one nor frees its number); retention will not touch it again on its own, but running
    ``apply_retention`` with the same plan again finishes it (deleting is idempotent).
    """
    if not plan.to_delete:
        return []
    results: list[VersionDeletion] = []
    unreachable = _unreachable(store)
    guards: dict[str, _Guard] = {}
    for decision in sorted(plan.to_delete, key=lambda d: (d.lineage, d.version)):
        lineage, version = decision.lineage, decision.version
        result = VersionDeletion(lineage=lineage, version=version)
        results.append(result)
        if unreachable:
            result.skipped = "a region is unreachable: " + "; ".join(f"{n}: {c}" for n, c in unreachable.items())
            continue
        if lineage.endswith(STEPS_SUFFIX):
            result.skipped = "step results are never deleted by retention"
            continue
        if lineage not in guards:
            light_of = lineage[: -len(LIGHT_SUFFIX)] if lineage.endswith(LIGHT_SUFFIX) else None
            guards[lineage] = _guard(store, lineage, light_of)
        guard = guards[lineage]
        if guard.refusal:
            result.skipped = guard.refusal
            continue
        if guard.latest is None or version >= guard.latest:
            result.skipped = f"no longer older than the latest consistent version (now v{guard.latest})"
            continue
        if guard.resume_from is not None and version >= guard.resume_from:
            result.skipped = f"an unfinished run may now resume from v{guard.resume_from}"
            continue
        _delete_version(store, decision, result)
    return results


def _delete_version(store: Store, decision: VersionDecision, result: VersionDeletion) -> None:
    key = manifest_key(decision.lineage, decision.version)
    for region in store.regions:
        try:
            data = region.get(key, max_bytes=MAX_MANIFEST_BYTES)
        except ObjectNotFoundError:
            result.deleted.append(region.name)  # never held it, or deleted by an earlier attempt
            continue
        except RegionError as exc:
            result.failed[region.name] = str(exc)
            continue
        try:
            manifest = decode_manifest(data, expect_lineage=decision.lineage, expect_version=decision.version)
            planned = manifest.manifest_digest == decision.manifest_digest
        except ManifestError:
            planned = True  # a damaged copy of a version being deleted
        if not planned:
            result.failed[region.name] = (
                f"holds a different manifest ({manifest.manifest_digest}) than the one planned "
                f"({decision.manifest_digest}); left in place, plan again"
            )
            continue
        try:
            region.delete(key)
            result.deleted.append(region.name)
        except RegionError as exc:
            result.failed[region.name] = str(exc)
