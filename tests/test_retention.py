"""Retention (core/retention.py): the pure decision on generated histories, then plans and
deletions on real local regions (no mocks), with the hard rules: latest kept, an unfinished
run's resume point kept (light tier included), ``.steps`` untouched, uncommitted manifests
left alone, nothing deleted while a region is down, half-failed deletions finished by a rerun."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from prefect_recovery.core import EntryPlan, Journal, LocalRegionIO, Store, open_region
from prefect_recovery.core.errors import RegionUnavailableError
from prefect_recovery.core.layout import manifest_key
from prefect_recovery.core.retention import (
    RetentionPolicy,
    VersionRecord,
    apply_retention,
    decide_retention,
    plan_retention,
)

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def history(n: int = 20) -> list[tuple[int, int, datetime, str]]:
    """Version v at step 10*v, saved v hours after a start; every 7th a milestone."""
    start = NOW - timedelta(hours=n)
    return [
        (v, 10 * v, start + timedelta(hours=v), "milestone:epoch_end" if v % 7 == 0 else "every_n_steps")
        for v in range(1, n + 1)
    ]


def kept(decisions) -> list[int]:
    return [d.version for d in decisions if d.action == "keep"]


def reasons(decisions) -> dict[int, list[str]]:
    return {d.version: d.reasons for d in decisions}


# -- the pure decision ------------------------------------------------------------------------------
def test_keep_last_alone():
    policy = RetentionPolicy(keep_last=3, keep_milestones=False)
    decisions = decide_retention(history(), policy, now=NOW)
    assert kept(decisions) == [18, 19, 20]
    assert reasons(decisions)[20] == ["latest", "keep_last"]
    assert reasons(decisions)[19] == ["keep_last"]
    assert reasons(decisions)[5] == ["not among the newest 3"]


def test_every_k_steps_milestones_and_age_compose():
    policy = RetentionPolicy(keep_last=2, keep_every_steps=50, keep_milestones=True, keep_within=timedelta(hours=3))
    decisions = decide_retention(history(), policy, now=NOW)
    # steps 50, 100, 150, 200 (v5, 10, 15, 20); milestones v7, 14; last 2: v19, 20; younger than 3 h: v18-20
    assert kept(decisions) == [5, 7, 10, 14, 15, 18, 19, 20]
    r = reasons(decisions)
    assert r[5] == ["every_steps"]
    assert r[14] == ["milestone"]
    assert r[18] == ["keep_within"]
    assert r[20] == ["latest", "keep_last", "every_steps", "keep_within"]
    assert r[3] == [
        "not among the newest 2",
        "step 30 is not a multiple of 50",
        "not a milestone (trigger 'every_n_steps')",
        "older than 3:00:00",
    ]


def test_plain_tuples_records_and_iso_strings_agree():
    items = history(6)
    as_strings = [(v, s, t.isoformat(), trig) for v, s, t, trig in items]
    records = [VersionRecord(version=v, step=s, created_at=t, trigger=trig) for v, s, t, trig in items]
    policy = RetentionPolicy(keep_last=1, keep_within=timedelta(hours=2))
    assert decide_retention(items, policy, now=NOW) == decide_retention(as_strings, policy, now=NOW)
    assert decide_retention(records[::-1], policy, now=NOW) == decide_retention(items, policy, now=NOW)


def test_latest_consistent_version_is_always_kept():
    nothing = RetentionPolicy(keep_last=None, keep_milestones=False)
    assert kept(decide_retention(history(), nothing, now=NOW)) == [20]
    # The latest *consistent* version is 15 (16-20 are committed but miss blobs): it and all newer are kept.
    decisions = decide_retention(history(), nothing, now=NOW, latest=15)
    assert kept(decisions) == [15, 16, 17, 18, 19, 20]
    assert reasons(decisions)[15] == ["latest"]
    assert reasons(decisions)[17] == ["newer_than_latest"]
    # No consistent version at all: nothing is deleted.
    none = decide_retention(history(), nothing, now=NOW, latest=None)
    assert kept(none) == list(range(1, 21))
    assert reasons(none)[1] == ["no_consistent_version"]


def test_unfinished_runs_resume_point_and_everything_after_are_kept():
    policy = RetentionPolicy(keep_last=2, keep_milestones=False)
    decisions = decide_retention(history(), policy, now=NOW, resume_from=12)
    assert kept(decisions) == list(range(12, 21))
    assert reasons(decisions)[12] == ["unfinished_run"]
    assert reasons(decisions)[20] == ["latest", "unfinished_run", "keep_last"]


def test_unknown_age_is_kept_by_an_age_rule():
    items = [(1, 1, None, None), (2, 2, "not a time", None), (3, 3, NOW, None)]
    decisions = decide_retention(items, RetentionPolicy(keep_last=1, keep_within=timedelta(days=1)), now=NOW)
    assert reasons(decisions) == {1: ["unknown_age"], 2: ["unknown_age"], 3: ["latest", "keep_last", "keep_within"]}


def test_policy_is_strict_and_documented():
    with pytest.raises(ValidationError):
        RetentionPolicy(keep_lsat=3)
    with pytest.raises(ValidationError):
        RetentionPolicy(keep_last=0)
    with pytest.raises(ValidationError):
        RetentionPolicy(keep_within=timedelta(0))
    assert RetentionPolicy().keep_last == 5
    assert RetentionPolicy.model_validate({"keep_within": "PT2H"}).keep_within == timedelta(hours=2)
    for name, info in RetentionPolicy.model_fields.items():
        assert info.description and info.description.endswith("."), name


# -- plans and deletions on a store ------------------------------------------------------------------
def payload(lineage: str, i: int) -> bytes:
    return random.Random(f"{lineage}-{i}").randbytes(3000)


def make_store(tmp_path: Path, quorum: int = 2, regions: list | None = None) -> Store:
    if regions is None:
        regions = []
        for name in ("a", "b"):
            (tmp_path / name).mkdir(exist_ok=True)
            regions.append(open_region(str(tmp_path / name)))
    return Store(regions, write_quorum=quorum, chunk_bytes=1024, straggler_grace=None)


def commit(store: Store, lineage: str, i: int, trigger: str = "every_n_steps", tier: str = "heavy") -> int:
    entries = [EntryPlan(name="w", kind="bytes", data=memoryview(payload(lineage, i)))]
    metadata = {"tier": tier, "trigger": trigger, "epoch": 0, "complete": tier == "heavy"}
    return store.commit(lineage, entries, step=10 * i, metadata=metadata).version


def load(store: Store, lineage: str, version: int | None = None) -> bytes:
    manifest, holders = store.resolve(lineage, version)
    (entry,) = manifest.entries
    buffer = bytearray(entry.size)
    store.read_entries_into([(entry, memoryview(buffer))], holders)
    return bytes(buffer)


def test_plan_on_a_store_keeps_by_policy_and_leaves_steps_alone(tmp_path):
    store = make_store(tmp_path)
    for i in range(1, 7):
        commit(store, "run", i, trigger="milestone:epoch_end" if i == 2 else "every_n_steps")
        commit(store, "run.steps", i)
    plan = plan_retention(store, RetentionPolicy(keep_last=2), now=datetime.now(UTC))
    assert plan.skipped == {"run.steps": "step results (@step) of a pipeline: never deleted by retention"}
    assert {d.lineage for d in plan.decisions} == {"run"}
    assert [d.version for d in plan.to_delete] == [1, 3, 4]
    assert reasons(plan.decisions)[2] == ["milestone"]
    assert all(d.regions == store.region_names and d.manifest_digest for d in plan.decisions)
    assert plan.unreachable == {} and plan.notes == []

    results = apply_retention(store, plan)
    assert [(r.lineage, r.version, r.deleted, r.complete) for r in results] == [
        ("run", v, store.region_names, True) for v in (1, 3, 4)
    ]
    assert list(store.versions("run")) == [2, 5, 6]
    assert list(store.versions("run.steps")) == [1, 2, 3, 4, 5, 6]
    for v in (2, 5, 6):
        assert load(store, "run", v) == payload("run", v)
    # A second application and a fresh plan change nothing more.
    assert all(r.complete for r in apply_retention(store, plan))
    assert plan_retention(store, RetentionPolicy(keep_last=2)).to_delete == []
    # The next save takes a new number: none is ever reused.
    assert commit(store, "run", 7) == 7


def test_unfinished_run_keeps_its_resume_point_and_the_light_tier_after_it(tmp_path):
    store = make_store(tmp_path)
    light = store.derive(store.regions[:1], write_quorum=1, placement="primary")
    for i in range(1, 7):
        commit(store, "run", i)
        commit(light, "run.light", i, tier="light")  # light v_i at step 10*i
    journal = Journal(store, "run")
    # A recovery pinned v3 (step 30) and the run it started is still going (no run_finished).
    journal.append("recovery_started", run_id="rec-1", data={"checkpoint": {"version": 3, "step": 30}})
    journal.append("run_started", run_id="run-2", data={"pipeline": "p", "recovery_run": "rec-1", "resume_version": 3})
    policy = RetentionPolicy(keep_last=1, keep_milestones=False)
    plan = plan_retention(store, policy)
    by = {(d.lineage, d.version): d for d in plan.decisions}
    assert [v for (lin, v), d in by.items() if lin == "run" and d.action == "delete"] == [1, 2]
    assert by[("run", 3)].reasons == ["unfinished_run"]
    assert by[("run", 6)].reasons == ["latest", "unfinished_run", "keep_last"]
    # Light versions from the first one at step >= 30 (v3) are kept.
    assert [v for (lin, v), d in by.items() if lin == "run.light" and d.action == "delete"] == [1, 2]
    assert by[("run.light", 4)].reasons == ["unfinished_run"]
    assert any("unfinished run may resume from v3" in note for note in plan.notes)

    # Once the run finished and the recovery ended, the policy alone decides.
    journal.append("run_finished", run_id="run-2", data={"final_version": 6})
    journal.append("recovery_finished", run_id="rec-1", data={"status": "completed"})
    plan = plan_retention(store, policy)
    assert kept(d for d in plan.decisions if d.lineage == "run") == [6]
    assert kept(d for d in plan.decisions if d.lineage == "run.light") == [6]


def test_crashed_run_keeps_the_latest_and_newer_even_when_the_policy_would_not(tmp_path):
    store = make_store(tmp_path)
    for i in range(1, 5):
        commit(store, "run", i)
    Journal(store, "run").append("run_started", run_id="r1", data={"pipeline": "p"})  # killed: never finished
    # v4's blob is lost everywhere: the latest consistent version is v3, which an unfinished run resumes from.
    manifest, _ = store.resolve("run", 4)
    for root in ("a", "b"):
        (tmp_path / root / manifest_blob_path(manifest)).unlink()
    plan = plan_retention(store, RetentionPolicy(keep_last=None, keep_milestones=False))
    assert reasons(plan.decisions) == {
        1: ["no rule keeps it"],
        2: ["no rule keeps it"],
        3: ["latest", "unfinished_run"],
        4: ["newer_than_latest", "unfinished_run"],
    }


def manifest_blob_path(manifest) -> str:
    from prefect_recovery.core.layout import blob_key

    (entry,) = manifest.entries
    return blob_key(entry.chunks[0].digest)


def test_uncommitted_manifests_are_never_deleted(tmp_path):
    store = make_store(tmp_path)
    for i in range(1, 4):
        commit(store, "run", i)
    # A save that reached only region a (write_quorum 2): a publish in progress, or a crashed one.
    alone = Store(store.regions[:1], write_quorum=1, chunk_bytes=1024)
    stray = commit(alone, "run", 9)
    assert stray == 4
    commit(store, "run", 5)  # v5, committed after it
    plan = plan_retention(store, RetentionPolicy(keep_last=1))
    assert reasons(plan.decisions)[4] == ["uncommitted"]
    assert [d.version for d in plan.to_delete] == [1, 2, 3]
    assert any("v4: uncommitted manifest" in note for note in plan.notes)
    apply_retention(store, plan)
    assert store.versions("run") == {4: [store.region_names[0]], 5: store.region_names}


class FlakyDeletes(LocalRegionIO):
    """A real local region whose manifest deletions fail while ``broken`` is set."""

    broken = True

    def delete(self, key: str) -> None:
        if self.broken and "/manifests/" in key:
            raise RegionUnavailableError(self.name, f"deleting {key} failed: connection reset")
        super().delete(key)


def test_half_failed_deletion_is_finished_by_a_rerun_and_reuses_no_number(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    flaky = FlakyDeletes(str(tmp_path / "b"))
    store = make_store(tmp_path, regions=[open_region(str(tmp_path / "a")), flaky])
    for i in range(1, 5):
        commit(store, "run", i)
    plan = plan_retention(store, RetentionPolicy(keep_last=2, keep_milestones=False))
    results = apply_retention(store, plan)
    assert [(r.version, r.deleted, list(r.failed), r.complete) for r in results] == [
        (1, [store.region_names[0]], [flaky.name], False),
        (2, [store.region_names[0]], [flaky.name], False),
    ]
    # Held by one region of a quorum of two: no longer a checkpoint, never the latest, never "newer".
    assert store.consistent_versions("run") == [3, 4]
    assert load(store, "run") == payload("run", 4)
    again = plan_retention(store, RetentionPolicy(keep_last=2, keep_milestones=False))
    assert reasons(again.decisions)[1] == ["uncommitted"] and again.to_delete == []
    # Rerunning the same plan finishes the job.
    flaky.broken = False
    assert all(r.complete for r in apply_retention(store, plan))
    assert list(store.versions("run")) == [3, 4]
    assert commit(store, "run", 5) == 5


def test_nothing_is_deleted_while_a_region_is_down(tmp_path):
    store = make_store(tmp_path, quorum=1)
    for i in range(1, 5):
        commit(store, "run", i)
    policy = RetentionPolicy(keep_last=1, keep_milestones=False)
    earlier = plan_retention(store, policy)
    assert [d.version for d in earlier.to_delete] == [1, 2, 3]
    (tmp_path / "b").rename(tmp_path / "b-away")
    plan = plan_retention(store, policy)
    assert plan.to_delete == [] and list(plan.unreachable) == [store.region_names[1]]
    assert reasons(plan.decisions)[1] == ["region_unreachable"]
    # An older plan applied during the outage deletes nothing either.
    results = apply_retention(store, earlier)
    assert all(r.skipped and "unreachable" in r.skipped and not r.deleted for r in results)
    (tmp_path / "b-away").rename(tmp_path / "b")
    assert list(store.versions("run")) == [1, 2, 3, 4]


def test_apply_rechecks_the_hard_rules(tmp_path):
    store = make_store(tmp_path)
    for i in range(1, 4):
        commit(store, "run", i)
    plan = plan_retention(store, RetentionPolicy(keep_last=1, keep_milestones=False))
    assert [d.version for d in plan.to_delete] == [1, 2]
    # Since the plan, a recovery pinned v1 and has not finished.
    Journal(store, "run").append("recovery_started", run_id="rec", data={"checkpoint": {"version": 1, "step": 10}})
    results = apply_retention(store, plan)
    assert [r.skipped for r in results] == ["an unfinished run may now resume from v1"] * 2
    assert list(store.versions("run")) == [1, 2, 3]
    assert (tmp_path / "a" / manifest_key("run", 1)).exists()
