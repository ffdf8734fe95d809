"""Issue 12: the store against crafted records and stray files (classes 2-8, 10-12).

Each test plays an attacker who can write into one region, or a careless operator, against real
local regions, and asserts what a user would see: loads that return what was saved or stop with
the store's own error type, verify and the audit telling the truth, nothing touched outside
the layout, one meaning of "latest". docs/THREAT_MODEL.md points here.
"""

from __future__ import annotations

import json
import os
import random
import tracemalloc
from pathlib import Path

import pytest
from helpers.snapshot import snapshot
from helpers.tamper import manifest_path, raw_manifest, read_entry, reseal
from typer.testing import CliRunner

from prefect_recovery.core import (
    CheckpointError,
    CheckpointNotFoundError,
    EntryPlan,
    InvalidNameError,
    ManifestError,
    ManifestSignatureError,
    Store,
    collect_garbage,
    hmac_key,
    open_region,
    verify_store,
)
from prefect_recovery.core.audit import audit_store
from prefect_recovery.core.layout import blob_key
from prefect_recovery.core.manifest import Component, decode_manifest
from prefect_recovery.core.signing import Keyring

# Every case below fails on the main this issue was filed against; the fixes remove this mark.
pytestmark = []

CHUNK = 1024
SECRET = "s" * 40


def _regions(tmp_path: Path, count: int = 2) -> list[Path]:
    paths = []
    for index in range(count):
        path = tmp_path / f"region-{'abc'[index]}"
        path.mkdir()
        paths.append(path)
    return paths


def _store(paths: list[Path], quorum: int = 1, signed: bool = False) -> Store:
    keyring = Keyring(hmac_key("k1", SECRET)) if signed else None
    return Store(
        [open_region(str(p)) for p in paths], write_quorum=quorum, chunk_bytes=CHUNK, io_threads=2, keyring=keyring
    )


def _data(seed: str, size: int = 3000) -> bytes:
    return random.Random(seed).randbytes(size)


def _save(store: Store, lineage: str, seed: str, step: int | None = None):
    data = _data(seed)
    return store.commit(
        lineage, [EntryPlan(name="w", kind="bytes", data=memoryview(data))], step=step, components=[Component(name="w")]
    )


def _cli(*args: str):
    from prefect_recovery.cli import app

    return CliRunner().invoke(app, list(args))


def _region_args(paths: list[Path]) -> list[str]:
    return [arg for p in paths for arg in ("--region", str(p))]


# -- class 2: records that cannot be hashed or checked are damaged copies ----------------------
def _with_lone_surrogate(region: Path, lineage: str, version: int) -> None:
    """Put a lone-surrogate escape into a manifest's metadata: valid JSON, not encodable as UTF-8."""
    path = manifest_path(region, lineage, version)
    text = path.read_text()
    path.write_text(text.replace('"metadata":{}', '"metadata":{"note":"\\ud800"}', 1))
    assert "\\ud800" in path.read_text()


def test_lone_surrogate_manifest_is_a_damaged_copy_verify_reports_and_repairs(tmp_path: Path):
    a, b = _regions(tmp_path)
    store = _store([a, b], quorum=2)
    _save(store, "run", "v1")
    saved = _data("v2")
    _save(store, "run", "v2")
    _with_lone_surrogate(a, "run", 2)

    assert read_entry(store, "run") == (2, saved)  # region b's copy serves the read
    report = verify_store(store)
    assert not report.healthy
    assert [(p.region, p.kind, p.version) for p in report.problems] == [(str(a), "unreadable manifest", 2)]
    repaired = verify_store(store, repair=True)
    assert repaired.problems[0].repaired and repaired.healthy
    assert verify_store(store).healthy
    assert decode_manifest(manifest_path(a, "run", 2).read_bytes()).version == 2


def test_lone_surrogate_in_every_copy_is_refused_with_the_stores_error(tmp_path: Path):
    (a,) = _regions(tmp_path, 1)
    store = _store([a])
    _save(store, "run", "v1")
    _save(store, "run", "v2")
    _with_lone_surrogate(a, "run", 2)

    with pytest.raises(ManifestError):
        decode_manifest(manifest_path(a, "run", 2).read_bytes())
    # unsigned store: "latest" is the latest consistent version, the damaged one is skipped...
    assert read_entry(store, "run") == (1, _data("v1"))
    # ...and asked for by number, it is the store's own error naming the damage
    with pytest.raises(CheckpointNotFoundError, match="damaged"):
        read_entry(store, "run", 2)
    assert not verify_store(store).healthy
    assert audit_store(store, apply_retention_policy=False).scrub.healthy is False


def test_non_ascii_signature_value_is_a_bad_signature_not_a_crash(tmp_path: Path):
    a, b = _regions(tmp_path)
    store = _store([a, b], signed=True)
    _save(store, "run", "v1")
    _save(store, "run", "v2")
    for region in (a, b):
        raw = raw_manifest(region, "run", 2)
        raw["signature"]["value"] = "é" * 44  # outside the signed body: the digest still matches
        manifest_path(region, "run", 2).write_text(json.dumps(raw, ensure_ascii=False))

    with pytest.raises(ManifestSignatureError):
        read_entry(store, "run")
    assert read_entry(store, "run", 1) == (1, _data("v1"))
    report = verify_store(store)
    assert not report.healthy
    assert sorted((p.region, p.kind) for p in report.problems) == [(str(a), "bad signature"), (str(b), "bad signature")]


# -- class 3: one blob, two declared sizes ------------------------------------------------------
def test_blob_named_twice_with_two_sizes_is_damage_not_a_consistent_version(tmp_path: Path):
    (a,) = _regions(tmp_path, 1)
    store = _store([a])
    _save(store, "run", "v1")
    _save(store, "run", "v2")
    raw = raw_manifest(a, "run", 2)
    real = raw["entries"][0]["chunks"][0]
    huge = {"digest": real["digest"], "size": 2**40}
    # the huge claim first, the true size last: a "last size wins" check sees only the true one
    raw["entries"].insert(0, {**raw["entries"][0], "name": "a-huge", "size": 2**40, "chunks": [huge]})
    manifest_path(a, "run", 2).write_bytes(reseal(raw))

    assert [info.version for info in store.list("run")] == [1]
    assert read_entry(store, "run") == (1, _data("v1"))  # never allocates the claimed TiB
    with pytest.raises(CheckpointError):
        read_entry(store, "run", 2)
    assert not verify_store(store).healthy


# -- class 4: every record read is bounded before it is read -------------------------------------
def test_a_huge_sparse_manifest_is_not_read_whole(tmp_path: Path):
    (a,) = _regions(tmp_path, 1)
    store = _store([a])
    _save(store, "run", "v1")
    _save(store, "run", "v2")
    path = manifest_path(a, "run", 2)
    path.unlink()
    with open(path, "wb") as handle:  # 384 MiB, sparse: costs no disk
        handle.truncate(384 * 2**20)

    tracemalloc.start()
    try:
        assert read_entry(store, "run") == (1, _data("v1"))
        report = verify_store(store)
        _peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not report.healthy
    assert _peak < 192 * 2**20, f"reading a 384 MiB manifest took {_peak / 2**20:.0f} MiB"


def test_a_manifest_symlinked_to_dev_zero_is_refused(tmp_path: Path):
    (a,) = _regions(tmp_path, 1)
    store = _store([a])
    _save(store, "run", "v1")
    _save(store, "run", "v2")
    path = manifest_path(a, "run", 2)
    path.unlink()
    path.symlink_to("/dev/zero")

    assert read_entry(store, "run") == (1, _data("v1"))
    report = verify_store(store)
    assert not report.healthy
    assert [p.version for p in report.problems] == [2]


# -- class 5: stray files ------------------------------------------------------------------------
def test_an_empty_highest_version_file_does_not_block_later_saves(tmp_path: Path):
    a, b = _regions(tmp_path)
    store = _store([a, b])
    _save(store, "run", "v1")
    manifest_path(b, "run", 999999999999).write_bytes(b"")

    info = _save(store, "run", "v2")
    assert info.version == 2
    assert read_entry(store, "run") == (2, _data("v2"))
    assert [i.version for i in store.list("run")] == [1, 2]


@pytest.mark.parametrize("stray", [".DS_Store", "lost+found", "old run"])
def test_stray_entries_under_lineages_are_reported_and_skipped(tmp_path: Path, stray: str):
    a, b = _regions(tmp_path)
    store = _store([a, b])
    _save(store, "run", "v1")
    if stray == "lost+found":
        (a / "lineages" / stray).mkdir()
    else:
        (a / "lineages" / stray).write_bytes(b"\x00\x01")

    assert [i.lineage for i in store.list()] == ["run"]
    assert store.lineages() == ["run"]
    report = verify_store(store)
    assert report.healthy
    assert any(stray in note for note in report.notes)
    assert audit_store(store, apply_retention_policy=False).scrub.healthy

    listed = _cli("ls", "--json", *_region_args([a, b]))
    assert listed.exit_code == 0, listed.output
    assert [row["lineage"] for row in json.loads(listed.stdout)] == ["run"]
    verified = _cli("verify", "--json", *_region_args([a, b]))
    assert verified.exit_code == 0, verified.output


# -- class 6: GC deletes only what the store wrote ---------------------------------------------
def test_gc_leaves_user_files_named_tmp_alone(tmp_path: Path):
    (a,) = _regions(tmp_path, 1)
    store = _store([a])
    _save(store, "run", "v1")
    user_files = [a / ".tmp-notes.txt", a / "lineages" / "run" / ".tmp-mine", a / "blobs" / ".tmp-x"]
    (a / "mine").mkdir()
    user_files.append(a / "mine" / ".tmp-results.csv")
    for path in user_files:
        path.write_text("user data")
        os.utime(path, (1, 1))  # very old
    ours = a / "blobs" / "blake3" / "ab" / f".tmp-{'ab' * 16}-{'0' * 32}"
    ours.parent.mkdir(parents=True, exist_ok=True)
    ours.write_bytes(b"half a blob")
    os.utime(ours, (1, 1))

    from datetime import timedelta

    report = collect_garbage(store, grace=timedelta(hours=1))
    assert all(path.exists() for path in user_files)
    assert not ours.exists()  # an interrupted write of the store's own is still cleaned up
    assert report.temp_files_deleted == {str(a): 1}


# -- class 7: repair counts only when the copy reads back intact --------------------------------
@pytest.mark.parametrize("occupant", ["directory", "dangling symlink"])
def test_repair_of_an_occupied_manifest_path_is_checked(tmp_path: Path, occupant: str):
    a, b = _regions(tmp_path)
    store = _store([a, b], quorum=1)
    _save(store, "run", "v1")
    path = manifest_path(b, "run", 1)
    path.unlink()
    if occupant == "directory":
        path.mkdir()
        (path / "user-file").write_text("keep me")
    else:
        path.symlink_to(tmp_path / "nowhere")

    report = verify_store(store, repair=True)
    again = verify_store(store, repair=True)
    if occupant == "directory":  # the store never deletes a directory it did not write
        assert not report.healthy and not again.healthy
        assert any("repair failed" in p.detail for p in report.problems)
        assert (path / "user-file").read_text() == "keep me"
    else:  # a link in the store's place is replaced by the real copy
        assert report.healthy and again.healthy and not again.problems
        assert not path.is_symlink()
        assert decode_manifest(path.read_bytes()).version == 1


# -- class 8: local regions never follow a symlink out of their root -----------------------------
def test_a_symlinked_lineage_directory_is_not_written_through(tmp_path: Path):
    (a,) = _regions(tmp_path, 1)
    outside = tmp_path / "outside"
    outside.mkdir()
    (a / "lineages").mkdir()
    (a / "lineages" / "run").symlink_to(outside, target_is_directory=True)
    store = _store([a])
    before = snapshot(outside)
    with pytest.raises(CheckpointError):
        _save(store, "run", "v1")
    assert snapshot(outside) == before


def test_a_symlinked_blob_directory_is_not_read_or_written_through(tmp_path: Path):
    a, b = _regions(tmp_path)
    store = _store([a, b], quorum=1)
    info = _save(store, "run", "v1")
    digest = store.resolve("run")[0].entries[0].chunks[0].digest
    # an attacker moves region a's blob tree outside and links it back
    outside = tmp_path / "outside"
    (a / "blobs").rename(outside)
    (a / "blobs").symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)

    assert read_entry(store, "run") == (info.version, _data("v1"))  # served by region b
    _save(store, "run", "v2")
    assert snapshot(outside) == before
    assert (outside / blob_key(digest).removeprefix("blobs/")).exists()
    assert not verify_store(store).healthy


# -- class 10: one meaning of "latest" ---------------------------------------------------------
def test_a_forged_newest_version_stops_list_latest_and_load_alike(tmp_path: Path):
    a, b = _regions(tmp_path)
    store = _store([a, b], signed=True)
    _save(store, "run", "v1")
    _save(store, "run", "v2")
    for region in (a, b):  # forged: an entry changed, digest recomputed, signature kept
        raw = raw_manifest(region, "run", 2)
        raw["metadata"] = {"evil": True}
        manifest_path(region, "run", 2).write_bytes(reseal(raw))

    with pytest.raises(ManifestSignatureError):
        store.resolve("run")
    with pytest.raises(ManifestSignatureError):
        store.list("run")
    from prefect_recovery.blocks import CheckpointStore

    block = CheckpointStore(regions=[str(a), str(b)])
    block._store = store
    with pytest.raises(ManifestSignatureError):
        block.latest("run")
    assert store.resolve("run", 1)[0].version == 1  # asked for by number, the older one loads


# -- class 11: strict parsing ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda raw: raw.__setitem__("version", str(raw["version"])), id="version-string"),
        pytest.param(lambda raw: raw.__setitem__("step", 7.0), id="step-float"),
        pytest.param(lambda raw: raw["components"][0].__setitem__("durable", "yes"), id="durable-yes"),
        pytest.param(
            lambda raw: raw["entries"][0].__setitem__("size", float(raw["entries"][0]["size"])), id="size-float"
        ),
    ],
)
def test_loose_types_are_damage_even_under_a_valid_signature(tmp_path: Path, edit):
    (a,) = _regions(tmp_path, 1)
    store = _store([a], signed=True)
    _save(store, "run", "v1", step=7)
    raw = raw_manifest(a, "run", 1)
    edit(raw)  # digest and signature kept: a lax parser coerces back to the signed body
    from prefect_recovery.core.manifest import canonical_json

    path = manifest_path(a, "run", 1)
    path.write_bytes(canonical_json(raw))
    with pytest.raises(ManifestError):
        decode_manifest(path.read_bytes(), keyring=store.keyring)
    with pytest.raises(ManifestError):
        store.resolve("run")


def test_duplicate_keys_are_damage_even_under_a_valid_signature(tmp_path: Path):
    (a,) = _regions(tmp_path, 1)
    store = _store([a], signed=True)
    _save(store, "run", "v1", step=3)
    path = manifest_path(a, "run", 1)
    text = path.read_text()
    assert text.startswith("{")
    path.write_text('{"step":999,' + text[1:])  # json.loads keeps the last "step": the signed one
    with pytest.raises(ManifestError, match="duplicate"):
        decode_manifest(path.read_bytes(), keyring=store.keyring)
    with pytest.raises(ManifestError):
        store.resolve("run")


# -- class 12: derived lineage names are reserved ---------------------------------------------------
@pytest.mark.parametrize("name", ["exp.steps", "exp.light", "exp.light.steps"])
def test_derived_suffixes_cannot_be_used_as_plain_lineages(tmp_path: Path, name: str):
    from prefect_recovery.blocks import CheckpointStore

    a, b = _regions(tmp_path)
    block = CheckpointStore(regions=[str(a), str(b)])
    with pytest.raises(InvalidNameError, match="reserved"):
        block.save({"x": b"1"}, lineage=name)
    assert not (a / "lineages").exists()
