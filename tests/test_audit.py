"""The audit (scrub, repair, retention, garbage collection) as a user meets it: ``audit_store`` and its
report rows, the ``audit`` Prefect flow with its artifacts and events, and ``prefect-recovery audit``.

Regions are real local directories under ``tmp_path``; checkpoints are real torch states saved through
``training.state_io.save_state``; damage is done to the files the way bit rot, a lagging region or an
attacker would (``helpers.tamper``). Flows, artifacts, events and Secret blocks go through the real
Prefect test server (``prefect_server``). Nothing is mocked.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import secrets
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from helpers.tamper import flip_byte, reseal
from pydantic import ValidationError
from typer.testing import CliRunner

from prefect_recovery import CheckpointStore
from prefect_recovery.blocks.checkpoint_store import Region
from prefect_recovery.cli import app
from prefect_recovery.core import Store, open_region
from prefect_recovery.core.audit import audit_store
from prefect_recovery.core.errors import CheckpointNotFoundError
from prefect_recovery.core.layout import blob_key, manifest_key
from prefect_recovery.core.retention import RetentionPolicy
from prefect_recovery.core.signing import Keyring, hmac_key
from prefect_recovery.training.state_io import load_state, save_state

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- helpers -------------------------------------------------------------------------------------------------
def region_dirs(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "region-a", tmp_path / "region-b"
    a.mkdir(exist_ok=True)
    b.mkdir(exist_ok=True)
    return a, b


def local_store(tmp_path: Path, keyring: Keyring | None = None) -> Store:
    a, b = region_dirs(tmp_path)
    return Store([open_region(str(a), name="a"), open_region(str(b), name="b")], keyring=keyring, straggler_grace=5)


def single_region(path: Path, name: str, keyring: Keyring | None = None) -> Store:
    """A store reading only ``path``: proves that region's copy is complete on its own."""
    return Store([open_region(str(path), name=name)], keyring=keyring)


def tensors(seed: int, count: int = 3) -> dict[str, torch.Tensor]:
    """``count`` tensors of different sizes (so each is its own blob, and sizes tell them apart)."""
    generator = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(16 + 8 * i, generator=generator) for i in range(count)}


def blob_path(region: Path, digest: str) -> Path:
    return region / blob_key(digest)


def manifest_path(region: Path, lineage: str, version: int) -> Path:
    return region / manifest_key(lineage, version)


def digest_of(store: Store, lineage: str, version: int, entry: str) -> str:
    manifest, _holders = store.resolve(lineage, version)
    (found,) = [e for e in manifest.entries if e.name == entry]
    (chunk,) = found.chunks
    return chunk.digest


def entry_digests(store: Store, lineage: str, version: int) -> dict[str, str]:
    manifest, _holders = store.resolve(lineage, version)
    return {e.name: e.chunks[0].digest for e in manifest.entries}


def assert_bit_identical(loaded: dict, expected: dict) -> None:
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
        assert loaded[name].numpy().tobytes() == tensor.numpy().tobytes(), name


def row_of(report, lineage: str, version: int) -> dict:
    (row,) = [r for r in report.rows() if r["lineage"] == lineage and r["version"] == version]
    return row


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- 1. each finding, through audit_store and the report rows ------------------------------------------------
def test_a_blob_deleted_in_one_region_is_missing_then_repaired(tmp_path):
    a, b = region_dirs(tmp_path)
    store = local_store(tmp_path)
    state = tensors(0)
    save_state(store, state, lineage="run", step=10, metadata={"trigger": "every_n_steps"})
    digest = digest_of(store, "run", 1, "t1")
    blob_path(b, digest).unlink()

    report = audit_store(store)

    (problem,) = report.scrub.problems
    assert (problem.region, problem.kind, problem.repaired) == ("b", "missing", True)
    assert (problem.lineage, problem.version, problem.object) == ("run", 1, blob_key(digest))
    row = row_of(report, "run", 1)
    assert row["region a"] == "ok" and row["region b"] == "repaired"
    assert row["copies"] == 2 and row["under-replicated"] == "no"
    assert (row["step"], row["trigger"]) == (10, "every_n_steps")
    assert report.healthy and report.scrub.unrepaired == []
    assert "problems: 1 found, 0 unrepaired" in report.markdown()
    assert blob_path(b, digest).read_bytes() == blob_path(a, digest).read_bytes()
    loaded, _manifest = load_state(single_region(b, "b"), lineage="run")
    assert_bit_identical(loaded, state)


def test_a_flipped_byte_is_found_only_when_read_and_a_truncated_blob_always(tmp_path):
    """read_data is the fraction of blobs re-hashed: the rest are checked for presence and size only."""
    a, b = region_dirs(tmp_path)
    store = local_store(tmp_path)
    state = tensors(1)
    save_state(store, state, lineage="run", step=5)
    flipped = digest_of(store, "run", 1, "t0")
    truncated = digest_of(store, "run", 1, "t2")
    flip_byte(blob_path(b, flipped), offset=3, mask=0x01)  # same size, different bytes

    presence_only = audit_store(store, read_data=0.0, repair=False)
    assert presence_only.scrub.blobs_read == 0 and presence_only.scrub.bytes_checked == 0
    assert presence_only.scrub.problems == [], "a same-size corruption is invisible without reading the blob"
    assert row_of(presence_only, "run", 1)["region b"] == "ok"

    read_all = audit_store(store, read_data=1.0, repair=False)
    (problem,) = read_all.scrub.problems
    assert (problem.region, problem.kind, problem.object) == ("b", "corrupt", blob_key(flipped))
    assert "do not hash" in problem.detail and not problem.repaired
    row = row_of(read_all, "run", 1)
    assert row["region b"] == "corrupt" and row["copies"] == 1 and row["under-replicated"] == "YES"
    assert not read_all.healthy and "PROBLEMS REMAIN" in read_all.markdown()

    path = blob_path(b, truncated)
    path.write_bytes(path.read_bytes()[:-4])
    sized = audit_store(store, read_data=0.0, repair=True)
    (problem,) = sized.scrub.problems
    assert (problem.region, problem.kind, problem.object) == ("b", "corrupt", blob_key(truncated))
    assert "its manifest says" in problem.detail and problem.repaired
    assert path.read_bytes() == blob_path(a, truncated).read_bytes()
    assert blob_path(b, flipped).read_bytes() != blob_path(a, flipped).read_bytes()  # still not seen

    healed = audit_store(store, read_data=1.0, repair=True)
    assert [(p.kind, p.object, p.repaired) for p in healed.scrub.problems] == [("corrupt", blob_key(flipped), True)]
    assert row_of(healed, "run", 1)["region b"] == "repaired"
    loaded, _manifest = load_state(single_region(b, "b"), lineage="run")
    assert_bit_identical(loaded, state)


def test_a_manifest_missing_in_one_region_is_under_replicated_without_repair(tmp_path):
    _a, b = region_dirs(tmp_path)
    store = local_store(tmp_path)
    save_state(store, tensors(2), lineage="run", step=1)
    save_state(store, tensors(3), lineage="run", step=2)
    manifest_path(b, "run", 2).unlink()

    report = audit_store(store, repair=False)

    row = row_of(report, "run", 2)
    assert row["under-replicated"] == "YES" and row["copies"] == 1
    assert row["region a"] == "ok" and row["region b"] == "missing"
    assert row_of(report, "run", 1)["under-replicated"] == "no"
    (problem,) = report.scrub.problems
    assert (problem.region, problem.kind, problem.version, problem.repaired) == ("b", "missing", 2, False)
    summary = report.markdown()
    assert "under-replicated checkpoints: 1" in summary and "## Unrepaired problems" in summary
    assert not manifest_path(b, "run", 2).exists(), "repair=False must not write anything"
    assert report.retention is None and report.gc is None
    assert any("skipped" in note for note in report.notes)


def test_an_unsigned_store_says_signing_is_off(tmp_path):
    store = local_store(tmp_path)
    save_state(store, tensors(4), lineage="run", step=1)

    report = audit_store(store)

    assert row_of(report, "run", 1)["signature"] == "unsigned"
    assert report.scrub.signing.startswith("off")
    assert "* signing: off: manifests are not signed" in report.markdown()


def test_a_tampered_manifest_in_a_signed_store_is_restored_from_the_verified_region(tmp_path):
    a, b = region_dirs(tmp_path)
    keyring = Keyring(hmac_key("audit-key-1", secrets.token_hex(32)))
    store = local_store(tmp_path, keyring)
    state = tensors(5)
    save_state(store, state, lineage="run", step=7)
    good = manifest_path(a, "run", 1).read_bytes()
    raw = json.loads(manifest_path(b, "run", 1).read_bytes())
    assert raw["signature"]["key_id"] == "audit-key-1"
    raw["step"] = 700  # a forger rewrites the step and recomputes the digest, but cannot sign
    manifest_path(b, "run", 1).write_bytes(reseal(raw))

    report = audit_store(store)

    (problem,) = report.scrub.problems
    assert (problem.region, problem.kind, problem.repaired) == ("b", "bad signature", True)
    assert (problem.lineage, problem.version) == ("run", 1)
    row = row_of(report, "run", 1)
    assert row["signature"] == "verified (key audit-key-1)"
    assert row["region a"] == "ok" and row["region b"] == "repaired" and row["step"] == 7
    assert report.healthy
    assert "signing: on: signs with 'audit-key-1'" in report.markdown()
    assert manifest_path(b, "run", 1).read_bytes() == good
    loaded, manifest = load_state(single_region(b, "b", keyring), lineage="run")
    assert manifest.step == 7
    assert_bit_identical(loaded, state)


# -- 2. read_data sampling -----------------------------------------------------------------------------------
def test_read_data_samples_ceil_of_the_fraction_and_the_seed_picks_which(tmp_path):
    a, b = region_dirs(tmp_path)
    store = local_store(tmp_path)
    save_state(store, tensors(6, count=7), lineage="run", step=1)
    digests = entry_digests(store, "run", 1)
    sizes = {blob_key(d): blob_path(a, d).stat().st_size for d in digests.values()}
    assert len(set(sizes.values())) == 7
    for digest in digests.values():
        flip_byte(blob_path(b, digest))  # every copy in b is rotten; only the re-hashed ones show it

    def found(seed: int) -> tuple[frozenset[str], int]:
        report = audit_store(store, read_data=0.5, repair=False, seed=seed)
        assert report.scrub.blobs == 7 and report.scrub.blobs_read == math.ceil(7 * 0.5) == 4
        objects = frozenset(p.object for p in report.scrub.problems)
        assert {p.kind for p in report.scrub.problems} == {"corrupt"} and len(objects) == 4
        # both regions' copies of each sampled blob were read, and nothing else
        assert report.scrub.bytes_checked == 2 * sum(sizes[key] for key in objects)
        return objects, report.scrub.bytes_checked

    samples = {seed: found(seed) for seed in range(8)}
    assert found(3) == samples[3], "the same seed reads the same blobs"
    assert len({objects for objects, _bytes in samples.values()}) > 1, "different seeds read different blobs"
    assert len({checked for _objects, checked in samples.values()}) > 1

    everything = audit_store(store, read_data=1.0, repair=False)
    assert everything.scrub.blobs_read == 7 and len(everything.scrub.problems) == 7
    assert everything.scrub.bytes_checked == 2 * sum(sizes.values())


# -- 3. repair idempotence -----------------------------------------------------------------------------------
def test_repair_is_idempotent_and_every_version_still_loads_bit_identically(tmp_path):
    a, b = region_dirs(tmp_path)
    store = local_store(tmp_path)
    states = {("run", 1): tensors(10), ("run", 2): tensors(11), ("other", 1): tensors(12)}
    for (lineage, version), state in states.items():
        assert save_state(store, state, lineage=lineage, step=version * 10).version == version
    blob_path(a, digest_of(store, "run", 1, "t0")).unlink()
    flip_byte(blob_path(b, digest_of(store, "run", 2, "t1")), offset=5)
    manifest_path(b, "other", 1).unlink()
    blob_path(b, digest_of(store, "other", 1, "t2")).unlink()

    first = audit_store(store)
    assert sorted((p.region, p.kind, p.lineage, p.version) for p in first.scrub.problems) == [
        ("a", "missing", "run", 1),
        ("b", "corrupt", "run", 2),
        ("b", "missing", "other", 1),
        ("b", "missing", "other", 1),
    ]
    assert all(p.repaired for p in first.scrub.problems) and first.healthy
    assert row_of(first, "run", 1)["region a"] == "repaired"
    assert row_of(first, "other", 1)["region b"] == "repaired"
    repaired_files = files_under(b)
    assert repaired_files == files_under(a), "both regions hold the same objects again"

    second = audit_store(store)
    assert second.scrub.problems == [] and second.healthy
    for row in second.rows():
        assert (row["region a"], row["region b"], row["copies"]) == ("ok", "ok", 2), row
    assert files_under(b) == repaired_files, "a second audit writes nothing"
    for region, name in ((a, "a"), (b, "b")):
        alone = single_region(region, name)
        for (lineage, version), state in states.items():
            loaded, _manifest = load_state(alone, lineage=lineage, version=version)
            assert_bit_identical(loaded, state)


# -- 4. retention through the audit --------------------------------------------------------------------------
SHARED = torch.arange(64, dtype=torch.float32)  # in every version: one blob, deduplicated


def six_versions(tmp_path: Path) -> tuple[CheckpointStore, dict[int, dict]]:
    """A store block keeping the newest 2 (and milestones), and 6 versions; v2 is a milestone."""
    a, b = region_dirs(tmp_path)
    block = CheckpointStore(
        regions=[Region(url=str(a), name="a"), Region(url=str(b), name="b")],
        retention=RetentionPolicy(keep_last=2),
        gc_grace_seconds=60,
    )
    states = {}
    for version in range(1, 7):
        state = {"shared": SHARED, **tensors(100 + version, count=1)}
        trigger = "milestone:epoch-1" if version == 2 else "every_n_steps"
        info = block.save_checkpoint(state, lineage="train", step=version * 100, metadata={"trigger": trigger})
        assert info.version == version
        states[version] = state
    return block, states


def age_blobs(*regions: Path, seconds_ago: float = 2 * 3600) -> None:
    old = time.time() - seconds_ago
    for region in regions:
        for path in (region / "blobs").rglob("*"):
            if path.is_file():
                os.utime(path, (old, old))


def test_retention_keeps_what_the_policy_says_and_gc_collects_blobs_older_than_grace(tmp_path):
    a, b = region_dirs(tmp_path)
    block, states = six_versions(tmp_path)
    with pytest.raises(ValidationError):
        CheckpointStore(regions=[str(a)], gc_grace_seconds=30)
    store = block.core
    unique = {v: digest_of(store, "train", v, "t0") for v in states}
    shared = digest_of(store, "train", 1, "shared")
    age_blobs(a, b)
    young = time.time()
    for region in (a, b):  # v4's blob was just written (as far as GC can tell): within grace
        os.utime(blob_path(region, unique[4]), (young, young))

    report = audit_store(
        store,
        policy=block.retention,
        gc_grace=timedelta(seconds=block.gc_grace_seconds),
    )

    assert report.healthy
    decided = {row["version"]: row["retention"] for row in report.rows()}
    assert decided[1] == decided[3] == decided[4] == "deleted"
    assert decided[2] == "keep: milestone"
    assert decided[5] == "keep: keep_last"
    assert decided[6].startswith("keep: latest") and "keep_last" in decided[6]
    for decision in report.retention.to_delete:
        assert any("not among the newest 2" in reason for reason in decision.reasons)
    assert "retention: 3 kept, 3 deleted" in report.markdown()

    assert [info.version for info in block.list("train")] == [2, 5, 6]
    for version in (2, 5, 6):
        assert_bit_identical(block.load(lineage="train", version=version), states[version])
    for version in (1, 3, 4):
        with pytest.raises(CheckpointNotFoundError):
            block.load(lineage="train", version=version)
        for region in (a, b):
            assert not manifest_path(region, "train", version).exists()

    gc = report.gc
    assert gc is not None and gc.swept and gc.grace_seconds == 60
    assert gc.blobs_deleted == {"a": 2, "b": 2} and gc.kept_young == 2
    for region in (a, b):
        assert not blob_path(region, unique[1]).exists() and not blob_path(region, unique[3]).exists()
        assert blob_path(region, unique[4]).exists(), "younger than the grace: kept"
        assert blob_path(region, shared).exists(), "still named by kept versions"
    assert "garbage collection: 4 unreferenced blobs, freed" in report.markdown()

    again = audit_store(store, policy=block.retention, gc_grace=timedelta(seconds=60))
    assert again.healthy and again.scrub.problems == [] and again.retention.to_delete == []
    assert again.gc.total_blobs_deleted == 0


def test_a_dry_run_deletes_nothing_and_says_what_it_would_delete(tmp_path):
    a, b = region_dirs(tmp_path)
    block, _states = six_versions(tmp_path)
    age_blobs(a, b)
    before = (files_under(a), files_under(b))

    report = audit_store(block.core, policy=block.retention, gc_grace=timedelta(seconds=60), dry_run=True)

    assert (files_under(a), files_under(b)) == before
    decided = {row["version"]: row["retention"] for row in report.rows()}
    assert [decided[v] for v in (1, 3, 4)] == ["would delete"] * 3
    assert decided[2] == "keep: milestone"
    assert report.deletions == []
    assert report.gc is not None and report.gc.dry_run and not report.gc.swept
    summary = report.markdown()
    assert "(dry run)" in summary and "3 to delete" in summary and "would free" in summary
    assert [info.version for info in block.list("train")] == [1, 2, 3, 4, 5, 6]


def test_a_dry_run_counts_the_blobs_that_retention_would_orphan(tmp_path):
    a, b = region_dirs(tmp_path)
    block, _states = six_versions(tmp_path)
    age_blobs(a, b)
    dry = audit_store(block.core, policy=block.retention, gc_grace=timedelta(seconds=60), dry_run=True)
    real = audit_store(block.core, policy=block.retention, gc_grace=timedelta(seconds=60))
    assert real.gc.total_blobs_deleted == 6  # the unique blobs of v1, v3 and v4, in both regions
    assert dry.gc.total_blobs_deleted == real.gc.total_blobs_deleted
    assert dry.gc.total_bytes_freed == real.gc.total_bytes_freed


def test_retention_and_gc_are_skipped_while_a_problem_remains_unrepaired(tmp_path):
    a, b = region_dirs(tmp_path)
    block, _states = six_versions(tmp_path)
    store = block.core
    lost = digest_of(store, "train", 6, "t0")
    for region in (a, b):
        blob_path(region, lost).unlink()
    orphan = a / blob_key("blake3:" + "ab" * 32)  # an old unreferenced blob GC would otherwise take
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"orphan")
    age_blobs(a, b)
    before = (files_under(a), files_under(b))

    report = audit_store(store, policy=block.retention, gc_grace=timedelta(seconds=60))

    assert not report.healthy
    assert sorted((p.region, p.kind, p.object) for p in report.scrub.unrepaired) == [
        ("a", "missing", blob_key(lost)),
        ("b", "missing", blob_key(lost)),
    ]
    assert all("no intact copy in any region" in p.detail for p in report.scrub.unrepaired)
    assert report.retention is None and report.gc is None and report.deletions == []
    assert any("retention and garbage collection skipped" in note for note in report.notes)
    assert "retention and garbage collection skipped" in report.markdown()
    assert {row["retention"] for row in report.rows()} == {"not applied"}
    assert (files_under(a), files_under(b)) == before
    assert row_of(report, "train", 6)["region a"] == "missing"


# -- 5. the audit flow on the Prefect test server ------------------------------------------------------------
def saved_block(tmp_path: Path, **fields) -> tuple[str, CheckpointStore]:
    a, b = region_dirs(tmp_path)
    name = f"audit-{uuid.uuid4().hex[:10]}"
    block = CheckpointStore(regions=[Region(url=str(a), name="a"), Region(url=str(b), name="b")], **fields)
    block.save(name=name)
    return name, block


def flow_artifacts(flow_run_id) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {artifact.key: artifact for artifact in found}


def audit_problem_events(lineage: str, count: int, timeout: float = 60) -> list:
    """The server's ``prefect-recovery.audit.problem`` events about ``lineage``, once ``count`` have arrived."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=30)
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_events(
                filter=EventFilter(
                    event=EventNameFilter(name=["prefect-recovery.audit.problem"]),
                    resource=EventResourceFilter(id=[f"prefect-recovery.lineage.{lineage}"]),
                ),
                limit=50,
            )
            if len(page.events) >= count or time.monotonic() > deadline:
                return page.events
            time.sleep(0.5)


def test_the_audit_flow_publishes_a_table_a_summary_with_a_timeline_and_problem_events(prefect_server, tmp_path):
    from prefect_recovery.flows.audit import audit

    _a, b = region_dirs(tmp_path)
    name, block = saved_block(tmp_path)
    lineage = f"flow-{uuid.uuid4().hex[:8]}"
    states = {}
    for version in (1, 2, 3):
        states[version] = tensors(200 + version)
        block.save_checkpoint(
            states[version], lineage=lineage, step=version * 10, metadata={"trigger": "every_n_steps"}
        )
    damaged = digest_of(block.core, lineage, 2, "t1")
    blob_path(b, damaged).unlink()

    state = audit(store_block=name, seed=1, return_state=True)

    assert state.is_completed(), state.message
    result = state.result()
    assert result["scrub"]["problems"][0]["repaired"] is True
    assert blob_path(b, damaged).exists()
    artifacts = flow_artifacts(state.state_details.flow_run_id)
    assert {"audit-checkpoints", "audit-summary"} <= artifacts.keys()

    table = artifacts["audit-checkpoints"]
    assert table.type == "table"
    rows = json.loads(table.data)
    assert [(row["lineage"], row["version"], row["step"]) for row in rows] == [
        (lineage, 1, 10),
        (lineage, 2, 20),
        (lineage, 3, 30),
    ]
    assert [(row["region a"], row["region b"]) for row in rows] == [("ok", "ok"), ("ok", "repaired"), ("ok", "ok")]
    assert {row["signature"] for row in rows} == {"unsigned"}

    summary = artifacts["audit-summary"]
    assert summary.type == "markdown"
    markdown = summary.data
    assert "# Checkpoint audit" in markdown and "**Healthy**" in markdown
    assert "problems: 1 found, 0 unrepaired" in markdown and "versions: 3" in markdown
    assert f"## Timeline of {lineage}" in markdown
    (encoded,) = re.findall(r"!\[Timeline of [^\]]+\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)
    assert base64.b64decode(encoded)[:8] == PNG_MAGIC

    (event,) = audit_problem_events(lineage, 1)
    assert event.payload["lineage"] == lineage and event.payload["version"] == 2
    assert event.payload["region"] == "b" and event.payload["kind"] == "missing"
    assert event.resource["prefect-recovery.kind"] == "missing"
    assert event.resource["prefect-recovery.region"] == "b"
    for version, expected in states.items():
        assert_bit_identical(block.load(lineage=lineage, version=version), expected)


def test_the_audit_flow_fails_naming_an_unrepairable_problem(prefect_server, tmp_path):
    from prefect_recovery.flows.audit import audit

    a, b = region_dirs(tmp_path)
    name, block = saved_block(tmp_path)
    lineage = f"lost-{uuid.uuid4().hex[:8]}"
    block.save_checkpoint(tensors(300), lineage=lineage, step=1)
    lost = digest_of(block.core, lineage, 1, "t0")
    for region in (a, b):
        blob_path(region, lost).unlink()

    state = audit(store_block=name, return_state=True)

    assert state.is_failed()
    assert "unrepaired problem" in state.message and blob_key(lost) in state.message and "missing" in state.message
    artifacts = flow_artifacts(state.state_details.flow_run_id)
    markdown = artifacts["audit-summary"].data
    assert "PROBLEMS REMAIN" in markdown and "## Unrepaired problems" in markdown and blob_key(lost) in markdown
    (row,) = json.loads(artifacts["audit-checkpoints"].data)
    assert (row["region a"], row["region b"], row["copies"]) == ("missing", "missing", 0)
    events = audit_problem_events(lineage, 2)
    assert sorted(event.payload["region"] for event in events) == ["a", "b"]
    assert {event.payload["kind"] for event in events} == {"missing"}


# -- 6. the CLI ----------------------------------------------------------------------------------------------
def test_cli_audit_json_exit_codes(tmp_path):
    a, b = region_dirs(tmp_path)
    store = local_store(tmp_path)
    save_state(store, tensors(400), lineage="cli", step=1)
    save_state(store, tensors(401), lineage="cli", step=2)
    regions = ["--region", str(a), "--region", str(b)]

    healthy = CliRunner().invoke(app, ["audit", "--json", *regions])
    assert healthy.exit_code == 0, healthy.output
    payload = json.loads(healthy.stdout)
    assert payload["healthy"] is True and payload["scrub"]["problems"] == []
    assert [(row["lineage"], row["version"]) for row in payload["rows"]] == [("cli", 1), ("cli", 2)]
    for row in payload["rows"]:
        assert row[f"region {a}"] == row[f"region {b}"] == "ok" and row["copies"] == 2

    manifest_path(b, "cli", 2).unlink()
    unrepaired = CliRunner().invoke(app, ["audit", "--json", "--no-repair", "--read-data", "0", *regions])
    assert unrepaired.exit_code == 1, unrepaired.output
    payload = json.loads(unrepaired.stdout)
    assert payload["healthy"] is False
    assert payload["rows"][1]["under-replicated"] == "YES" and payload["rows"][1][f"region {b}"] == "missing"
    assert not manifest_path(b, "cli", 2).exists()

    repaired = CliRunner().invoke(app, ["audit", "--json", "--seed", "3", *regions])
    assert repaired.exit_code == 0, repaired.output
    assert json.loads(repaired.stdout)["rows"][1][f"region {b}"] == "repaired"
    assert manifest_path(b, "cli", 2).exists()


def test_cli_keygen_saves_a_secret_that_a_store_signs_with(prefect_server, tmp_path):
    from prefect.blocks.system import Secret

    a, _b = region_dirs(tmp_path)
    key_name = f"audit-key-{uuid.uuid4().hex[:8]}"
    made = CliRunner().invoke(app, ["keygen", key_name, "--algorithm", "hmac-sha256"])
    assert made.exit_code == 0, made.output
    assert re.fullmatch(r"[0-9a-f]{64}", str(Secret.load(key_name).get()))
    again = CliRunner().invoke(app, ["keygen", key_name, "--algorithm", "hmac-sha256"])
    assert again.exit_code != 0, "an existing key is not overwritten without --overwrite"

    name, block = saved_block(tmp_path, signing_key=key_name)
    state = tensors(500)
    block.save_checkpoint(state, lineage="signed", step=1)
    signature = json.loads(manifest_path(a, "signed", 1).read_bytes())["signature"]
    assert (signature["key_id"], signature["algorithm"]) == (key_name, "hmac-sha256")
    assert_bit_identical(CheckpointStore.load(name).load(lineage="signed"), state)

    audited = CliRunner().invoke(app, ["audit", "--json", "--store", name])
    assert audited.exit_code == 0, audited.output
    payload = json.loads(audited.stdout)
    (row,) = payload["rows"]
    assert row["signature"] == f"verified (key {key_name})"
    assert payload["scrub"]["signing"].startswith(f"on: signs with {key_name!r}")
