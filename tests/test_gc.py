"""Garbage collection (core/gc.py) on real local regions, and ``RegionIO.list_info`` on local
regions and on the S3/GCS/Azure emulators. No mocks: slow saves and racing commits are real
saves through region subclasses that pause or act at a given call.

What is proven: retention + GC free exactly the blobs only deleted versions named, and every
kept version still loads bit-identically; a second GC deletes nothing; GC refuses (and deletes
nothing) with an unreadable manifest or a region down; the blobs of a save in progress survive
GC and the save then commits and loads; a grace shorter than a save makes the danger real (and
a grace under ``MIN_GRACE`` is refused); the re-mark before deleting spares a blob a save just
committed, and a deletion that still loses the race is reported.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers.emulators import Emulator, running_emulators, unique
from helpers.tamper import reseal

from prefect_recovery.core import EntryPlan, Journal, Keyring, LocalRegionIO, RegionIO, Store, hmac_key, open_region
from prefect_recovery.core.digest import hash_bytes
from prefect_recovery.core.errors import CheckpointNotFoundError, QuorumNotMetError, RegionUnavailableError
from prefect_recovery.core.gc import MIN_GRACE, collect_garbage
from prefect_recovery.core.gc_manifests import _check_stale
from prefect_recovery.core.layout import blob_key, manifest_key
from prefect_recovery.core.manifest import decode_manifest
from prefect_recovery.core.retention import RetentionPolicy, apply_retention, plan_retention
from prefect_recovery.core.verify import verify_store

CHUNK = 1024
HOUR = 3600.0


# -- helpers ------------------------------------------------------------------------------------------
def regions_at(tmp_path: Path, *names: str) -> list[LocalRegionIO]:
    out = []
    for name in names:
        (tmp_path / name).mkdir(exist_ok=True)
        out.append(LocalRegionIO(str(tmp_path / name)))
    return out


def make_store(regions, quorum: int = 2) -> Store:
    return Store(regions, write_quorum=quorum, chunk_bytes=CHUNK, straggler_grace=None)


SHARED = bytes(range(256)) * 10  # in every version: deduplicated, never garbage while one version lives


def entries_for(lineage: str, i: int) -> dict[str, bytes]:
    return {"w": random.Random(f"{lineage}-{i}").randbytes(2500), "shared": SHARED}


def commit(store: Store, lineage: str, i: int, trigger: str = "every_n_steps") -> int:
    plans = [EntryPlan(name=n, kind="bytes", data=memoryview(d)) for n, d in entries_for(lineage, i).items()]
    return store.commit(lineage, plans, step=i, metadata={"tier": "heavy", "trigger": trigger}).version


def load(store: Store, lineage: str, version: int | None = None) -> dict[str, bytes]:
    manifest, holders = store.resolve(lineage, version)
    buffers = {e.name: bytearray(e.size) for e in manifest.entries}
    store.read_entries_into([(e, memoryview(buffers[e.name])) for e in manifest.entries], holders)
    return {name: bytes(buf) for name, buf in buffers.items()}


def blob_keys_of(store: Store, lineage: str, version: int) -> set[str]:
    manifest, _ = store.resolve(lineage, version)
    return {blob_key(d) for d in manifest.blob_digests()}


def blobs_on_disk(root: Path) -> set[str]:
    return {
        str(p.relative_to(root)) for p in (root / "blobs").rglob("*") if p.is_file() and not p.name.startswith(".tmp-")
    }


def age(root: Path, seconds: float) -> None:
    """Make every file under ``root`` look ``seconds`` older (as if written that long ago)."""
    for path in root.rglob("*"):
        if path.is_file():
            st = path.stat()
            os.utime(path, (st.st_atime - seconds, st.st_mtime - seconds))


def orphan(region: RegionIO, data: bytes) -> str:
    """A blob no manifest names (the leftover of a save that never committed)."""
    key = blob_key(hash_bytes(data))
    region.put_if_absent(key, data)
    return key


# -- list_info ----------------------------------------------------------------------------------------
def test_list_info_local(tmp_path):
    (region,) = regions_at(tmp_path, "r")
    region.put_if_absent("blobs/x/aa/one", b"12345")
    region.put_if_absent("blobs/x/bb/two", b"")
    os.utime(tmp_path / "r" / "blobs/x/aa/one", (1_000_000_000, 1_000_000_000.5))
    (tmp_path / "r" / "blobs" / "x" / "bb" / ".tmp-two-123").write_bytes(b"torn")
    info = region.list_info("blobs")
    assert info["blobs/x/aa/one"] == (5, 1_000_000_000.5)
    assert info["blobs/x/bb/two"][0] == 0 and abs(info["blobs/x/bb/two"][1] - time.time()) < 60
    assert "blobs/x/bb/.tmp-two-123" in info  # temp files are listed: GC ages them too
    assert region.list_info("blobs/x/aa/one") == {"blobs/x/aa/one": (5, 1_000_000_000.5)}
    assert region.list_info("nothing/here") == {}
    assert set(region.list_info("")) == set(info)


@pytest.fixture(scope="module")
def emulators(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Emulator]]:
    with running_emulators(("s3", "gcs", "azure"), ("ckpt",), log_dir=tmp_path_factory.mktemp("emu-logs")) as running:
        yield running


@pytest.mark.parametrize("kind", ["s3", "gcs", "azure"])
def test_list_info_on_object_stores(emulators, kind):
    em = emulators[kind]
    region = open_region(em.url_for(unique("gc")), em.storage_options)
    before = time.time()
    region.put_if_absent("blobs/blake3/aa/one", b"12345")
    region.put_if_absent("blobs/blake3/bb/two", b"xy")
    region.put_if_absent("preflight/probe", b"p")
    info = region.list_info("blobs")
    assert set(info) == {"blobs/blake3/aa/one", "blobs/blake3/bb/two"}
    assert info["blobs/blake3/aa/one"][0] == 5 and info["blobs/blake3/bb/two"][0] == 2
    for _size, mtime in info.values():
        # S3 times have 1 s resolution; emulators run on this host's clock.
        assert before - 5 < mtime < time.time() + 5, (kind, mtime, before)
    assert region.list_info("blobs/blake3/aa/one") == {"blobs/blake3/aa/one": info["blobs/blake3/aa/one"]}
    assert region.list_info("nothing") == {}
    assert set(region.list_info("")) == {*info, "preflight/probe"}


@pytest.mark.parametrize("kind", ["s3", "gcs", "azure"])
def test_gc_on_object_stores(emulators, kind):
    """Mark-and-sweep through the object-store code path: only the unreferenced blob goes, by its backend time."""
    em = emulators[kind]
    region = open_region(em.url_for(unique("gc")), em.storage_options)
    store = make_store([region], quorum=1)
    commit(store, "run", 1)
    commit(store, "run", 2)
    garbage = orphan(region, b"left by a save that never committed")
    young = collect_garbage(store)  # just written: younger than grace
    assert young.swept and young.deleted == {} and young.kept_young == 1
    later = datetime.now(UTC) + timedelta(hours=2)  # as if GC ran two hours later
    report = collect_garbage(store, now=later)
    assert report.deleted == {region.name: [garbage]} and report.bytes_freed == {region.name: 35}
    assert not region.exists(garbage)
    for v in (1, 2):
        assert load(store, "run", v) == entries_for("run", v)
    assert collect_garbage(store, now=later).deleted == {}


# -- retention, then GC -----------------------------------------------------------------------------------
def test_retention_then_gc_frees_exactly_the_deleted_versions_blobs(tmp_path):
    regions = regions_at(tmp_path, "a", "b")
    store = make_store(regions)
    for i in range(1, 7):
        commit(store, "run", i, trigger="milestone:best" if i == 2 else "every_n_steps")
        commit(store, "run.steps", i)
    keys = {v: blob_keys_of(store, "run", v) for v in range(1, 7)}
    steps_keys = set().union(*(blob_keys_of(store, "run.steps", v) for v in range(1, 7)))
    crashed = orphan(regions[0], b"a save that never committed")
    torn = f"blobs/blake3/ab/.tmp-{'ab' * 16}-{'0' * 32}"  # as LocalRegionIO names its temp files
    (tmp_path / "a" / torn).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "a" / torn).write_bytes(b"torn")
    regions[1].put_if_absent("preflight/0123abcd", b"probe left by a killed recovery")
    age(tmp_path, 2 * HOUR)
    young = orphan(regions[1], b"a save still writing")  # unreferenced, but only just written

    plan = plan_retention(store, RetentionPolicy(keep_last=2))
    assert [d.version for d in plan.to_delete] == [1, 3, 4]
    apply_retention(store, plan)
    expected = (keys[1] | keys[3] | keys[4]) - (keys[2] | keys[5] | keys[6]) - steps_keys
    assert expected and all("shared" not in k for k in expected)

    report = collect_garbage(store)
    assert report.swept and not report.refusals, report
    a, b = store.region_names
    assert set(report.deleted[a]) == expected | {crashed, torn}
    assert set(report.deleted[b]) == expected | {"preflight/0123abcd"}
    assert report.blobs_deleted == {a: len(expected) + 1, b: len(expected)}
    assert report.temp_files_deleted == {a: 1} and report.probes_deleted == {b: 1}
    assert report.bytes_freed[b] == sum(len(entries_for("run", i)["w"]) for i in (1, 3, 4)) + len(
        b"probe left by a killed recovery"
    )
    assert report.kept_young == 1 and report.blobs_referenced == len(set().union(keys[2], keys[5], keys[6], steps_keys))
    for root in ("a", "b"):
        on_disk = blobs_on_disk(tmp_path / root)
        assert not on_disk & expected
        assert keys[2] | keys[5] | keys[6] | steps_keys <= on_disk
    assert (tmp_path / "b" / young).exists()
    for v in (2, 5, 6):
        assert load(store, "run", v) == entries_for("run", v)
    for v in range(1, 7):
        assert load(store, "run.steps", v) == entries_for("run.steps", v)

    again = collect_garbage(store)
    assert again.swept and again.total_blobs_deleted == 0 and again.deleted == {} and again.kept_young == 1


def test_dry_run_deletes_nothing(tmp_path):
    regions = regions_at(tmp_path, "a")
    store = make_store(regions, quorum=1)
    commit(store, "run", 1)
    key = orphan(regions[0], b"garbage")
    age(tmp_path, 2 * HOUR)
    report = collect_garbage(store, dry_run=True)
    assert report.deleted == {store.region_names[0]: [key]} and not report.swept and report.dry_run
    assert (tmp_path / "a" / key).exists()
    assert collect_garbage(store).deleted == {store.region_names[0]: [key]}
    assert not (tmp_path / "a" / key).exists()


# -- refusals ------------------------------------------------------------------------------------------------
def test_gc_refuses_with_an_unreadable_manifest(tmp_path):
    regions = regions_at(tmp_path, "a", "b")
    store = make_store(regions)
    commit(store, "run", 1)
    key = orphan(regions[0], b"garbage")
    manifest_file = next((tmp_path / "b" / "lineages" / "run" / "manifests").iterdir())
    manifest_file.write_bytes(manifest_file.read_bytes()[:-20])  # truncated: cannot be parsed
    age(tmp_path, 2 * HOUR)
    report = collect_garbage(store)
    assert not report.swept and report.deleted == {}
    (refusal,) = report.refusals
    assert "cannot be parsed" in refusal and "verify --repair" in refusal and "run/manifests" in refusal
    assert (tmp_path / "a" / key).exists()


def test_gc_refuses_with_a_region_down(tmp_path):
    regions = regions_at(tmp_path, "a", "b")
    store = make_store(regions, quorum=1)
    commit(store, "run", 1)
    key = orphan(regions[0], b"garbage")
    age(tmp_path, 2 * HOUR)
    (tmp_path / "b").rename(tmp_path / "b-away")
    report = collect_garbage(store)
    assert not report.swept and report.deleted == {}
    (refusal,) = report.refusals
    assert store.region_names[1] in refusal and "could not be read" in refusal
    assert (tmp_path / "a" / key).exists()


def test_grace_below_the_minimum_is_refused(tmp_path):
    store = make_store(regions_at(tmp_path, "a"), quorum=1)
    with pytest.raises(ValueError, match="shorter than"):
        collect_garbage(store, grace=timedelta(0))
    with pytest.raises(ValueError, match="longest save"):
        collect_garbage(store, grace=MIN_GRACE - timedelta(seconds=1))


# -- GC beside saves ------------------------------------------------------------------------------------------
class SlowManifests(LocalRegionIO):
    """A real local region whose manifest writes wait until ``release`` is set (a slow save)."""

    def __init__(self, url: str):
        super().__init__(url)
        self.reached = threading.Event()
        self.release = threading.Event()

    def put_if_absent(self, key, data):
        if "/manifests/" in key:
            self.reached.set()
            assert self.release.wait(30), "the test never released the manifest"
        return super().put_if_absent(key, data)


@pytest.mark.parametrize("too_late", [False, True], ids=["within-grace", "save-outlived-grace"])
def test_gc_beside_a_slow_save(tmp_path, too_late):
    """A save has written every blob and waits on its manifest while GC runs.

    Within grace the save's blobs are young: GC sweeps the old garbage beside them, keeps them,
    and the save commits and loads bit-identically. If the save outlives grace (GC's clock two
    hours on, as if the save had taken that long), the danger is real: its blobs are swept and
    the version it then commits is not consistent (it cannot be loaded; reads fall back).
    """
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    slow = [SlowManifests(str(tmp_path / "a")), SlowManifests(str(tmp_path / "b"))]
    saver = make_store(slow)
    gc_store = make_store([LocalRegionIO(str(tmp_path / "a")), LocalRegionIO(str(tmp_path / "b"))])
    slow[0].release.set()
    slow[1].release.set()
    commit(saver, "run", 1)
    old = orphan(gc_store.regions[0], b"garbage of a crashed save")
    age(tmp_path, 2 * HOUR)
    for region in slow:
        region.reached.clear()
        region.release.clear()

    done: dict[str, object] = {}

    def save() -> None:
        try:
            done["version"] = commit(saver, "run", 2)
        except BaseException as exc:  # handed to the test
            done["error"] = exc

    thread = threading.Thread(target=save)
    thread.start()
    try:
        assert slow[0].reached.wait(30), "the save never reached its manifest"
        in_flight = {blob_key(d) for d in _digests(entries_for("run", 2))} - blobs_for(gc_store, "run", 1)
        assert in_flight and all((tmp_path / "b" / k).exists() for k in in_flight)
        now = datetime.now(UTC) + (timedelta(hours=2) if too_late else timedelta(0))
        report = collect_garbage(gc_store, grace=MIN_GRACE, now=now)
    finally:
        for region in slow:
            region.release.set()
        thread.join(30)
    assert "error" not in done, done
    assert report.swept and old in report.deleted[gc_store.region_names[0]]
    swept = set(report.deleted.get(gc_store.region_names[1], []))
    assert load(gc_store, "run", 1) == entries_for("run", 1)
    if not too_late:
        assert not swept & in_flight and report.kept_young == 2 * len(in_flight)
        assert done["version"] == 2 and load(gc_store, "run", 2) == entries_for("run", 2)
        assert collect_garbage(gc_store).deleted == {}
    else:
        assert swept == in_flight
        with pytest.raises(CheckpointNotFoundError):
            load(gc_store, "run", 2)
        assert load(gc_store, "run")["w"] == entries_for("run", 1)["w"]  # the latest consistent is v1


def _digests(entries: dict[str, bytes]) -> set[str]:
    return {hash_bytes(data[i : i + CHUNK]) for data in entries.values() for i in range(0, len(data), CHUNK)}


def blobs_for(store: Store, lineage: str, version: int) -> set[str]:
    return blob_keys_of(store, lineage, version)


class Hooked(LocalRegionIO):
    """A real local region that runs ``hook`` once, on the n-th call of ``method`` (GC's timeline)."""

    def __init__(self, url: str, method: str, n: int, hook):
        super().__init__(url)
        self.method, self.n, self.hook, self.calls = method, n, hook, 0

    def _maybe(self, method: str, key: str) -> None:
        if method == self.method and key.startswith("blobs"):
            self.calls += 1
            if self.calls == self.n:
                self.hook()

    def list_info(self, prefix):
        self._maybe("list_info", prefix)
        return super().list_info(prefix)

    def delete(self, key):
        self._maybe("delete", key)
        super().delete(key)


@pytest.mark.parametrize("when", ["before-re-mark", "after-re-mark"])
def test_a_save_reusing_an_old_unreferenced_blob(tmp_path, when):
    """The remaining race: a save finds an old unreferenced blob in place (deduplication: not
    written again, so not younger) and commits while GC runs. Committed before GC's re-mark, the
    blob is spared (``rescued``); committed between the re-mark and the delete, the blob is lost
    and GC says so (``lost_after_sweep``) and the version is not consistent."""
    (tmp_path / "a").mkdir()
    plain = LocalRegionIO(str(tmp_path / "a"))
    writer = make_store([plain], quorum=1)
    commit(writer, "run", 1)
    reused = entries_for("run", 2)
    for data in reused.values():
        for i in range(0, len(data), CHUNK):
            orphan(plain, data[i : i + CHUNK])
    age(tmp_path, 2 * HOUR)
    garbage = {blob_key(d) for d in _digests(reused)} - blobs_for(writer, "run", 1)
    assert garbage

    committed: dict[str, int] = {}

    def save_now() -> None:
        committed["version"] = commit(writer, "run", 2)  # every blob exists with the right size: nothing written

    # list_info("blobs") #1 is the inventory, #2 the re-list right before the re-mark; delete #1 follows the re-mark.
    hooked = Hooked(str(tmp_path / "a"), *(("list_info", 2) if when == "before-re-mark" else ("delete", 1)), save_now)
    report = collect_garbage(make_store([hooked], quorum=1))
    assert committed["version"] == 2
    if when == "before-re-mark":
        assert report.rescued == len(garbage) and report.deleted == {} and report.lost_after_sweep == []
        assert load(writer, "run", 2) == reused
    else:
        assert set(report.deleted[hooked.name]) == garbage
        assert report.lost_after_sweep == sorted(hash_bytes_of(k) for k in garbage)
        assert any("committed during the sweep" in note for note in report.notes)
        with pytest.raises(CheckpointNotFoundError):
            load(writer, "run", 2)


def hash_bytes_of(key: str) -> str:
    _blobs, algo, _hh, hexdigest = key.split("/")
    return f"{algo}:{hexdigest}"


# -- stale uncommitted manifests ---------------------------------------------------------------------------------
class Crashable(LocalRegionIO):
    """A real local region whose manifest writes (``refuse_manifests``) or manifest deletions
    (``keep_manifests``) fail like a lost connection. Both together on two regions replay a save
    whose process died after the arbiter region took its manifest: the other region never got
    it, and the withdrawal of the arbiter's copy never happened."""

    def __init__(self, url: str):
        super().__init__(url)
        self.refuse_manifests = False
        self.keep_manifests = False

    def put_if_absent(self, key, data):
        if self.refuse_manifests and "/manifests/" in key:
            raise RegionUnavailableError(self.name, f"writing {key}: connection reset")
        return super().put_if_absent(key, data)

    def delete(self, key):
        if self.keep_manifests and "/manifests/" in key:
            raise RegionUnavailableError(self.name, f"deleting {key}: connection reset")
        super().delete(key)


def crashable_store(tmp_path: Path, keyring: Keyring | None = None) -> tuple[Store, Crashable, Crashable]:
    a, b = (Crashable(str(tmp_path / name)) for name in ("a", "b"))
    for name in ("a", "b"):
        (tmp_path / name).mkdir(exist_ok=True)
    store = Store([a, b], write_quorum=2, chunk_bytes=CHUNK, straggler_grace=None, keyring=keyring)
    return store, a, b


def crash_save(store: Store, lineage: str, i: int) -> int:
    """A save of ``entries_for(lineage, i)`` that dies after the arbiter (first region) took its
    manifest: every blob is in every region, the manifest only in the arbiter. Its version."""
    arbiter, *others = store.regions
    before = set(store.versions(lineage))
    arbiter.keep_manifests = True
    for region in others:
        region.refuse_manifests = True
    try:
        with pytest.raises(QuorumNotMetError):
            commit(store, lineage, i)
    finally:
        arbiter.keep_manifests = False
        for region in others:
            region.refuse_manifests = False
    (version,) = set(store.versions(lineage)) - before
    assert store.versions(lineage)[version] == [arbiter.name]
    return version


def manifest_blobs(root: Path, lineage: str, version: int) -> set[str]:
    """The blob keys the manifest file of ``version`` in region ``root`` names (committed or not)."""
    data = (root / manifest_key(lineage, version)).read_bytes()
    return {blob_key(d) for d in decode_manifest(data).blob_digests()}


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_gc_collects_the_manifest_of_a_crashed_save_and_its_blobs(tmp_path):
    """A save crashed after the arbiter took its manifest (quorum 2): v2 is in region a only, its
    blobs in both. Once a newer version is committed and grace has passed, GC deletes v2's
    manifest and, in the same run, the blobs only v2 named; a dry run first says exactly that
    and deletes nothing. Every committed version still loads bit-identically."""
    store, a, b = crashable_store(tmp_path)
    assert commit(store, "run", 1) == 1
    crashed = crash_save(store, "run", 2)
    assert crashed == 2 and commit(store, "run", 3) == 3
    note = [n for n in verify_store(store).notes if "run v2" in n]
    assert note and "left for garbage collection" in note[0]
    only_v2 = manifest_blobs(tmp_path / "a", "run", 2) - blob_keys_of(store, "run", 1) - blob_keys_of(store, "run", 3)
    assert only_v2 and all((tmp_path / root / key).exists() for root in ("a", "b") for key in only_v2)
    key = manifest_key("run", 2)
    age(tmp_path, 2 * HOUR)

    before = (files_under(tmp_path / "a"), files_under(tmp_path / "b"))
    dry = collect_garbage(store, dry_run=True)
    assert (files_under(tmp_path / "a"), files_under(tmp_path / "b")) == before
    assert dry.dry_run and not dry.swept and not dry.refusals, dry
    assert dry.stale_manifests_deleted == {a.name: [key]} and dry.uncommitted_kept == {}
    assert set(dry.deleted[a.name]) == {key} | only_v2 and set(dry.deleted[b.name]) == only_v2

    report = collect_garbage(store)
    assert report.swept and not report.refusals, report
    assert report.stale_manifests_deleted == {a.name: [key]} and report.uncommitted_kept == {}
    assert set(report.deleted[a.name]) == {key} | only_v2 and set(report.deleted[b.name]) == only_v2
    assert report.blobs_deleted == {a.name: len(only_v2), b.name: len(only_v2)}
    assert report.bytes_freed == dry.bytes_freed
    assert report.lost_after_sweep == [] and report.rescued == 0
    assert not (tmp_path / "a" / key).exists()
    for root in ("a", "b"):
        assert not blobs_on_disk(tmp_path / root) & only_v2
    assert store.versions("run") == {1: [a.name, b.name], 3: [a.name, b.name]}
    for v in (1, 3):
        assert load(store, "run", v) == entries_for("run", v)
    assert verify_store(store).notes == []

    again = collect_garbage(store)
    assert again.swept and again.deleted == {} and again.stale_manifests_deleted == {}
    assert commit(store, "run", 4) == 4 and load(store, "run") == entries_for("run", 4)


def test_gc_finishes_a_half_failed_retention_deletion(tmp_path):
    """Retention deleted v1 and v2 in region a but not in b (connection lost): below quorum,
    they are no checkpoints. GC deletes the copies left in b and the blobs only they named."""
    store, a, b = crashable_store(tmp_path)
    for i in range(1, 5):
        commit(store, "run", i)
    keys = {v: blob_keys_of(store, "run", v) for v in range(1, 5)}
    b.keep_manifests = True
    results = apply_retention(store, plan_retention(store, RetentionPolicy(keep_last=2, keep_milestones=False)))
    b.keep_manifests = False
    assert [(r.version, r.deleted, list(r.failed)) for r in results] == [
        (1, [a.name], [b.name]),
        (2, [a.name], [b.name]),
    ]
    age(tmp_path, 2 * HOUR)

    report = collect_garbage(store)
    assert report.swept and report.stale_manifests_deleted == {b.name: [manifest_key("run", 1), manifest_key("run", 2)]}
    freed = (keys[1] | keys[2]) - (keys[3] | keys[4])
    assert freed and set(report.deleted[a.name]) == freed
    assert set(report.deleted[b.name]) == freed | {manifest_key("run", v) for v in (1, 2)}
    assert list(store.versions("run")) == [3, 4]
    for v in (3, 4):
        assert load(store, "run", v) == entries_for("run", v)


def test_gc_keeps_a_young_uncommitted_manifest(tmp_path):
    """A save crashed minutes ago (its manifest younger than grace): kept with its blobs, even
    with a newer committed version; two hours later it goes."""
    store, a, _b = crashable_store(tmp_path)
    commit(store, "run", 1)
    age(tmp_path, 2 * HOUR)
    crash_save(store, "run", 2)
    commit(store, "run", 3)
    only_v2 = manifest_blobs(tmp_path / "a", "run", 2) - blob_keys_of(store, "run", 3)

    report = collect_garbage(store)
    assert report.swept and report.deleted == {} and report.stale_manifests_deleted == {}
    assert list(report.uncommitted_kept) == ["run v2"] and "younger than grace" in report.uncommitted_kept["run v2"]
    assert (tmp_path / "a" / manifest_key("run", 2)).exists() and only_v2 <= blobs_on_disk(tmp_path / "b")

    later = collect_garbage(store, now=datetime.now(UTC) + timedelta(hours=2))
    assert later.stale_manifests_deleted == {a.name: [manifest_key("run", 2)]}
    assert not only_v2 & blobs_on_disk(tmp_path / "b")
    for v in (1, 3):
        assert load(store, "run", v) == entries_for("run", v)


def test_gc_keeps_the_highest_version_and_one_without_a_newer_consistent_version(tmp_path):
    """Two saves in a row crashed (v2, v3 in region a only), old: v3 is the highest version (its
    number must stay listed) and v2 has no consistent version above it; both stay, with their
    blobs, and the next save takes v4. Once v4 is committed (and old), both go."""
    store, a, _b = crashable_store(tmp_path)
    commit(store, "run", 1)
    crash_save(store, "run", 2)
    crash_save(store, "run", 3)
    uncommitted = manifest_blobs(tmp_path / "a", "run", 2) | manifest_blobs(tmp_path / "a", "run", 3)
    age(tmp_path, 2 * HOUR)

    report = collect_garbage(store)
    assert report.swept and report.deleted == {}, report
    assert "highest version" in report.uncommitted_kept["run v3"]
    assert "no higher version of its lineage is consistent" in report.uncommitted_kept["run v2"]
    assert uncommitted <= blobs_on_disk(tmp_path / "a") and uncommitted <= blobs_on_disk(tmp_path / "b")

    assert commit(store, "run", 4) == 4  # no number reused
    age(tmp_path, 2 * HOUR)
    report = collect_garbage(store)
    assert report.stale_manifests_deleted == {a.name: [manifest_key("run", 2), manifest_key("run", 3)]}
    assert report.uncommitted_kept == {}
    assert list(store.versions("run")) == [1, 4]
    for v in (1, 4):
        assert load(store, "run", v) == entries_for("run", v)


def test_gc_counts_a_damaged_copy_toward_the_quorum(tmp_path):
    """Signed store, quorum 2. v1's copy in region b was forged after the commit (resealed, so it
    parses but its signature fails): it still counts toward the quorum, v1 is committed, and its
    repair is the audit's job; GC keeps it. v2's copy in b is *gone* instead: one copy cannot be
    told from a crashed save (README, known limitations), so once v3 is consistent GC deletes v2."""
    store, a, _b = crashable_store(tmp_path, Keyring(hmac_key("k1", "0123456789abcdef" * 4)))
    for i in range(1, 4):
        commit(store, "run", i)
    forged = tmp_path / "b" / manifest_key("run", 1)
    raw = json.loads(forged.read_bytes())
    raw["metadata"]["approved_by"] = "mallory"
    forged.write_bytes(reseal(raw))
    (tmp_path / "b" / manifest_key("run", 2)).unlink()
    age(tmp_path, 2 * HOUR)

    report = collect_garbage(store)
    assert report.swept and not report.refusals, report
    assert report.stale_manifests_deleted == {a.name: [manifest_key("run", 2)]}
    assert report.uncommitted_kept == {}
    assert forged.exists() and (tmp_path / "a" / manifest_key("run", 1)).exists()
    # GC reads again only versions listed by fewer regions than the quorum, which already spares
    # v1; the store's rule, applied to its copies, keeps it too (one verified + one damaged).
    cutoff = (datetime.now(UTC) - timedelta(hours=1)).timestamp()
    listing = {1: {a.name, _b.name}, 3: {a.name, _b.name}}
    assert _check_stale(store, "run", 1, listing, cutoff, {}, set()) == (None, None)
    for v in (1, 3):
        assert load(store, "run", v) == entries_for("run", v)
    assert list(store.versions("run")) == [1, 3]


def test_gc_keeps_a_journaled_checkpoint_that_lost_copies_but_collects_a_crashed_save(tmp_path):
    """A pipeline lineage's journal records each committed version (``checkpoint_committed``). v2 was committed
    and later lost its copy in region b (below quorum now, like a crashed save): the journal says it committed,
    so GC keeps it, with the reason. v3 crashed before its commit (never journaled): GC collects it."""
    store, a, _b = crashable_store(tmp_path)
    journal = Journal(store, "run")
    for i in (1, 2):
        version = commit(store, "run", i)
        journal.append("checkpoint_committed", run_id="run-1", data={"version": version, "step": i})
    crashed = crash_save(store, "run", 3)
    version = commit(store, "run", 4)
    journal.append("checkpoint_committed", run_id="run-1", data={"version": version, "step": 4})
    (tmp_path / "b" / manifest_key("run", 2)).unlink()  # a copy lost after the commit
    age(tmp_path, 2 * HOUR)

    report = collect_garbage(store)
    assert report.swept and not report.refusals, report
    assert report.stale_manifests_deleted == {a.name: [manifest_key("run", crashed)]}
    assert "journal records it as committed" in report.uncommitted_kept["run v2"], report.uncommitted_kept
    assert (tmp_path / "a" / manifest_key("run", 2)).exists()
    # what the journaled checkpoint names is all still there: copying its manifest back restores it
    (tmp_path / "b" / manifest_key("run", 2)).write_bytes((tmp_path / "a" / manifest_key("run", 2)).read_bytes())
    for v in (1, 2, 4):
        assert load(store, "run", v) == entries_for("run", v)


def test_gc_keeps_single_region_placement_manifests(tmp_path):
    """The light tier writes placement "primary" manifests to one region at quorum 1: in a store
    of write_quorum 2 they are committed all the same, and GC keeps every one."""
    store, a, _b = crashable_store(tmp_path)
    light = store.derive([a], write_quorum=1, placement="primary")
    for i in range(1, 4):
        commit(light, "run.light", i)
    commit(store, "run", 1)
    age(tmp_path, 2 * HOUR)
    report = collect_garbage(store)
    assert report.swept and report.deleted == {} and report.uncommitted_kept == {}, report
    for v in (1, 2, 3):
        assert load(store, "run.light", v) == entries_for("run.light", v)


class LateCopy(Crashable):
    """Lists its manifests normally until the n-th listing of ``lineage``'s manifests, which
    first writes ``copy`` into this region (as if a replica of it landed right then)."""

    def __init__(self, url: str, n: int, copy: tuple[str, bytes]):
        super().__init__(url)
        self.n, self.copy, self.calls = n, copy, 0

    def list(self, prefix):
        if prefix == "lineages/run/manifests":
            self.calls += 1
            if self.calls == self.n:
                super().put_if_absent(*self.copy)
        return super().list(prefix)


def test_the_re_check_before_deleting_spares_a_manifest_that_changed(tmp_path):
    """Between finding v2 stale and deleting it, a copy of it appears in region b (GC's second
    listing of the lineage, the re-check's own): the re-check sees the version committed now and
    leaves it, and its blobs, alone."""
    store, a, _b = crashable_store(tmp_path)
    commit(store, "run", 1)
    crash_save(store, "run", 2)
    commit(store, "run", 3)
    age(tmp_path, 2 * HOUR)
    key = manifest_key("run", 2)
    late = LateCopy(str(tmp_path / "b"), 2, (key, (tmp_path / "a" / key).read_bytes()))
    gc_store = Store([a, late], write_quorum=2, chunk_bytes=CHUNK, straggler_grace=None)

    report = collect_garbage(gc_store)
    assert report.swept and report.deleted == {} and report.stale_manifests_deleted == {}, report
    assert "spared by the re-check" in report.uncommitted_kept["run v2"]
    for v in (1, 2, 3):
        assert load(gc_store, "run", v) == entries_for("run", v)
