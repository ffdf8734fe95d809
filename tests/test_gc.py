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

import os
import random
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers.emulators import Emulator, running_emulators, unique

from prefect_recovery.core import EntryPlan, LocalRegionIO, RegionIO, Store, open_region
from prefect_recovery.core.digest import hash_bytes
from prefect_recovery.core.errors import CheckpointNotFoundError
from prefect_recovery.core.gc import MIN_GRACE, collect_garbage
from prefect_recovery.core.layout import blob_key
from prefect_recovery.core.retention import RetentionPolicy, apply_retention, plan_retention

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
    (tmp_path / "a" / "blobs" / ".tmp-torn-write").write_bytes(b"torn")
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
    assert set(report.deleted[a]) == expected | {crashed, "blobs/.tmp-torn-write"}
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
