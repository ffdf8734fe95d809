"""The multi-region core store: commit protocol, dedup, quorum, consistent reads, verify/repair."""

from __future__ import annotations

import json
import random
from array import array
from pathlib import Path

import pytest
from helpers.snapshot import snapshot
from helpers.tamper import flip_byte, reseal

from prefect_recovery.core import (
    BlobUnavailableError,
    CheckpointNotFoundError,
    EntryPlan,
    InvalidArgumentError,
    InvalidNameError,
    LocalRegionIO,
    Manifest,
    QuorumNotMetError,
    RegionUnavailableError,
    Store,
    open_region,
    verify_store,
)
from prefect_recovery.core.digest import hash_bytes
from prefect_recovery.core.layout import blob_key, manifest_key
from prefect_recovery.core.manifest import canonical_json

CHUNK = 1024


def _bytes(seed: str, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _dirs(tmp_path: Path, *names: str) -> list[Path]:
    paths = []
    for name in names:
        (tmp_path / name).mkdir()
        paths.append(tmp_path / name)
    return paths


def _store(paths: list[Path], quorum: int = 1, region_cls=None) -> Store:
    regions = [(region_cls or open_region)(str(p)) for p in paths]
    return Store(regions, write_quorum=quorum, chunk_bytes=CHUNK, io_threads=4)


def _plan(**entries: bytes) -> list[EntryPlan]:
    return [EntryPlan(name=name, kind="bytes", data=memoryview(data)) for name, data in entries.items()]


def _load(store: Store, lineage: str, version: int | None = None) -> tuple[Manifest, dict[str, bytes]]:
    manifest, _holders = store.resolve(lineage, version)
    buffers = {entry.name: bytearray(entry.size) for entry in manifest.entries}
    store.read_entries_into([(entry, memoryview(buffers[entry.name])) for entry in manifest.entries])
    return manifest, {name: bytes(buf) for name, buf in buffers.items()}


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _blob_files(root: Path) -> set[str]:
    return {f for f in _files(root) if f.startswith("blobs/")}


def _manifest_files(root: Path) -> set[str]:
    return {f for f in _files(root) if f.startswith("lineages/")}


def _only_in(manifest_new: Manifest, manifest_old: Manifest) -> list[str]:
    return sorted(set(manifest_new.blob_digests()) - set(manifest_old.blob_digests()))


# -- round trip, versions, dedup ------------------------------------------------------------


def test_round_trip_of_several_entries_including_empty_and_multi_chunk(tmp_path):
    a, b = _dirs(tmp_path, "a", "b")
    state = {
        "empty": b"",
        "one": b"x",
        "small": b"hello world",
        "exact": _bytes("exact", 2 * CHUNK),
        "multi": _bytes("multi", 5 * CHUNK + 17),
        "model/layer.0/weight": _bytes("w", 3000),
    }
    info = _store([a, b]).commit("lin", _plan(**state), step=11, metadata={"epoch": 2})
    assert info.version == 1
    assert info.regions == [str(a), str(b)]
    assert info.lagging == {}
    assert info.total_bytes == sum(len(v) for v in state.values())

    fresh = _store([a, b])  # a new Store over the same directories: everything comes from disk
    manifest, loaded = _load(fresh, "lin")
    assert loaded == state
    assert manifest.step == 11
    assert manifest.metadata == {"epoch": 2}
    chunks = {entry.name: len(entry.chunks) for entry in manifest.entries}
    assert chunks["empty"] == 0
    assert chunks["exact"] == 2
    assert chunks["multi"] == 6
    assert [e.name for e in manifest.entries] == list(state)


def test_tensor_entries_keep_dtype_and_shape(tmp_path):
    (a,) = _dirs(tmp_path, "a")
    raw = array("f", [1.5, -2.0, 3.25, 0.0, 7.0, 8.0]).tobytes()
    plan = EntryPlan(
        name="t", kind="tensor", data=memoryview(raw).cast("B"), dtype="float32", shape=[2, 3], component="model"
    )
    _store([a]).commit("lin", [plan])
    manifest, loaded = _load(_store([a]), "lin")
    assert loaded == {"t": raw}
    assert (manifest.entries[0].dtype, manifest.entries[0].shape, manifest.entries[0].component) == (
        "float32",
        [2, 3],
        "model",
    )


def test_commit_accepts_a_typed_memoryview(tmp_path):
    (a,) = _dirs(tmp_path, "a")
    values = array("f", [1.0, 2.0, 3.0, 4.0])
    plan = EntryPlan(name="t", kind="tensor", data=memoryview(values), dtype="float32", shape=[4])
    _store([a]).commit("lin", [plan])
    _, loaded = _load(_store([a]), "lin")
    assert loaded == {"t": values.tobytes()}


def test_versions_increase_and_each_version_keeps_its_data(tmp_path):
    a, b = _dirs(tmp_path, "a", "b")
    store = _store([a, b], quorum=2)
    versions = [store.commit("lin", _plan(w=_bytes(f"v{i}", 3000)), step=i * 10).version for i in range(3)]
    assert versions == [1, 2, 3]
    assert [info.version for info in store.list("lin")] == [1, 2, 3]
    assert [info.step for info in store.list("lin")] == [0, 10, 20]
    assert store.resolve("lin")[0].version == 3
    for i in range(3):
        _, loaded = _load(store, "lin", i + 1)
        assert loaded == {"w": _bytes(f"v{i}", 3000)}
    # lineages are independent
    assert store.commit("other", _plan(w=b"x")).version == 1
    assert store.lineages() == ["lin", "other"]


def test_saving_the_same_state_twice_writes_no_new_blob_bytes(tmp_path):
    a, b = _dirs(tmp_path, "a", "b")
    store = _store([a, b])
    state = {"w": _bytes("w", 4 * CHUNK + 100), "empty": b"", "s": b"small"}
    first = store.commit("lin", _plan(**state))
    assert first.bytes_written == 2 * (4 * CHUNK + 100 + 5)  # summed over both regions
    blobs_before = (_blob_files(a), _blob_files(b))

    second = store.commit("lin", _plan(**state))
    assert second.version == 2
    assert second.bytes_written == 0
    assert (_blob_files(a), _blob_files(b)) == blobs_before
    assert _load(store, "lin", 2)[1] == state


def test_repeated_chunks_inside_one_save_are_stored_once(tmp_path):
    (a,) = _dirs(tmp_path, "a")
    block = _bytes("block", CHUNK)
    info = _store([a]).commit("lin", _plan(w=block * 6, copy=block))
    assert info.bytes_written == CHUNK
    assert len(_blob_files(a)) == 1
    assert _load(_store([a]), "lin")[1] == {"w": block * 6, "copy": block}


def test_a_slightly_changed_state_writes_only_the_changed_chunk(tmp_path):
    a, b = _dirs(tmp_path, "a", "b")
    store = _store([a, b])
    frozen = _bytes("frozen", 3 * CHUNK)
    weights = bytearray(_bytes("weights", 8 * CHUNK))
    store.commit("lin", _plan(frozen=frozen, weights=bytes(weights)))
    blobs_before = _blob_files(a)

    weights[3 * CHUNK + 5] ^= 0x01  # one byte in the 4th chunk
    info = store.commit("lin", _plan(frozen=frozen, weights=bytes(weights)))
    assert info.bytes_written == 2 * CHUNK  # one chunk, in each of the two regions
    assert len(_blob_files(a) - blobs_before) == 1
    assert _blob_files(a) == _blob_files(b)
    assert _load(store, "lin")[1] == {"frozen": frozen, "weights": bytes(weights)}
    assert _load(store, "lin", 1)[1]["weights"] != bytes(weights)


def test_store_configuration_is_validated(tmp_path):
    a, b = _dirs(tmp_path, "a", "b")
    regions = [open_region(str(a)), open_region(str(b))]
    for quorum in (0, 3):
        with pytest.raises(InvalidArgumentError, match="write_quorum") as raised:
            Store(regions, write_quorum=quorum)
        assert not isinstance(raised.value, InvalidNameError)  # a number out of range is not a bad name
    with pytest.raises(InvalidArgumentError, match="distinct"):
        Store([open_region(str(a)), open_region(str(a))])
    with pytest.raises(InvalidArgumentError):
        Store([])
    with pytest.raises(InvalidArgumentError, match="read_data") as raised:
        verify_store(Store(regions), read_data=1.5)
    assert not isinstance(raised.value, InvalidNameError)


# -- unreachable regions and quorum -----------------------------------------------------------


@pytest.mark.parametrize("bad_first", [False, True])
def test_unreachable_region_with_quorum_1_commits_and_reports_it_lagging(tmp_path, bad_first):
    (good,) = _dirs(tmp_path, "good")
    missing = tmp_path / "missing"  # never created
    paths = [missing, good] if bad_first else [good, missing]
    store = _store(paths, quorum=1)
    info = store.commit("lin", _plan(w=_bytes("w", 3 * CHUNK)))
    assert info.version == 1
    assert info.regions == [str(good)]
    assert list(info.lagging) == [str(missing)]
    assert "does not exist" in info.lagging[str(missing)]
    assert not missing.exists()
    assert _load(store, "lin")[1] == {"w": _bytes("w", 3 * CHUNK)}


@pytest.mark.parametrize("bad_first", [False, True])
def test_unreachable_region_with_quorum_2_fails_and_commits_nothing(tmp_path, bad_first):
    (good,) = _dirs(tmp_path, "good")
    missing = tmp_path / "missing"
    paths = [missing, good] if bad_first else [good, missing]
    store = _store(paths, quorum=2)
    with pytest.raises(QuorumNotMetError) as info:
        store.commit("lin", _plan(w=_bytes("w", 3 * CHUNK)))
    assert str(missing) in info.value.causes
    assert str(missing) in str(info.value)
    assert "does not exist" in str(info.value)
    assert _manifest_files(good) == set()  # no manifest claims a commit that did not happen
    with pytest.raises(CheckpointNotFoundError):
        store.resolve("lin")
    assert store.list("lin") == []

    missing.mkdir()  # the region comes back: the next save is version 1
    assert store.commit("lin", _plan(w=b"again")).version == 1


class _RefusesManifests(LocalRegionIO):
    """Takes blobs but fails every manifest write, like a region that dies between the two."""

    def put_if_absent(self, key, data):
        if key.startswith("lineages/"):
            raise RegionUnavailableError(self.name, "connection reset while writing the manifest")
        return super().put_if_absent(key, data)


@pytest.mark.parametrize("bad_first", [False, True])
def test_manifest_that_misses_quorum_is_withdrawn(tmp_path, bad_first):
    good, flaky = _dirs(tmp_path, "good", "flaky")
    regions = [open_region(str(good)), _RefusesManifests(str(flaky))]
    if bad_first:
        regions.reverse()
    store = Store(regions, write_quorum=2, chunk_bytes=CHUNK)
    with pytest.raises(QuorumNotMetError) as info:
        store.commit("lin", _plan(w=_bytes("w", 2 * CHUNK)))
    assert str(flaky) in info.value.causes
    assert "connection reset" in str(info.value)
    assert _manifest_files(good) == set()
    assert _manifest_files(flaky) == set()
    with pytest.raises(CheckpointNotFoundError):
        store.resolve("lin")


def test_verify_reports_an_unreachable_region(tmp_path):
    a, b = _dirs(tmp_path, "a", "b")
    _store([a, b]).commit("lin", _plan(w=b"data"))
    b.rename(tmp_path / "b-gone")
    store = _store([a, b])
    assert _load(store, "lin")[1] == {"w": b"data"}
    report = verify_store(store)
    assert not report.healthy
    assert [(p.region, p.kind) for p in report.problems] == [(str(b), "unreachable region")]


# -- damaged blobs ---------------------------------------------------------------------------


def _two_region_checkpoint(tmp_path, quorum: int = 1):
    a, b = _dirs(tmp_path, "a", "b")
    store = _store([a, b], quorum=quorum)
    state = {"w": _bytes("w", 3 * CHUNK), "bias": _bytes("bias", 100)}
    store.commit("lin", _plan(**state))
    manifest, _ = store.resolve("lin")
    return store, a, b, state, manifest


def test_corrupt_blob_falls_back_to_another_region_and_verify_repairs_it(tmp_path):
    store, a, _, state, manifest = _two_region_checkpoint(tmp_path)
    digest = manifest.entries[0].chunks[1].digest
    key = blob_key(digest)
    original = (a / key).read_bytes()
    flip_byte(a / key, 10)

    assert _load(store, "lin")[1] == state  # region a is tried first; its copy is rejected

    report = verify_store(store)
    assert not report.healthy
    assert [(p.region, p.object, p.kind, p.repaired) for p in report.problems] == [(str(a), key, "corrupt", False)]
    assert (a / key).read_bytes() != original  # verify without repair changes nothing

    repaired = verify_store(store, repair=True)
    assert [(p.region, p.object, p.kind, p.repaired) for p in repaired.problems] == [(str(a), key, "corrupt", True)]
    assert repaired.healthy
    assert (a / key).read_bytes() == original

    again = verify_store(store)
    assert again.healthy and again.problems == []
    assert verify_store(store, repair=True).problems == []  # repairing twice finds nothing
    assert _load(_store([a]), "lin")[1] == state  # region a alone is whole again


def test_truncated_blob_is_corrupt_and_repaired(tmp_path):
    store, a, b, state, manifest = _two_region_checkpoint(tmp_path)
    key = blob_key(manifest.entries[1].chunks[0].digest)
    original = (b / key).read_bytes()
    (b / key).write_bytes(original[:-1])
    assert _load(_store([b, a]), "lin")[1] == state
    report = verify_store(store, repair=True)
    assert [(p.region, p.object, p.kind, p.repaired) for p in report.problems] == [(str(b), key, "corrupt", True)]
    assert (b / key).read_bytes() == original
    assert verify_store(store).problems == []


def test_deleted_blob_is_reported_missing_and_repaired(tmp_path):
    store, a, b, state, manifest = _two_region_checkpoint(tmp_path)
    key = blob_key(manifest.entries[0].chunks[0].digest)
    original = (b / key).read_bytes()
    (b / key).unlink()

    assert _load(_store([b, a]), "lin")[1] == state
    report = verify_store(store)
    assert [(p.region, p.object, p.kind) for p in report.problems] == [(str(b), key, "missing")]
    assert not report.healthy

    repaired = verify_store(store, repair=True)
    assert [(p.region, p.kind, p.repaired) for p in repaired.problems] == [(str(b), "missing", True)]
    assert (b / key).read_bytes() == original
    assert verify_store(store, repair=True).problems == []


def test_blob_corrupt_in_every_region_raises_blob_unavailable(tmp_path):
    store, a, b, _, manifest = _two_region_checkpoint(tmp_path)
    digest = manifest.entries[0].chunks[2].digest
    for root in (a, b):
        flip_byte(root / blob_key(digest))

    with pytest.raises(BlobUnavailableError) as info:
        _load(store, "lin")
    assert info.value.digest == digest
    assert set(info.value.causes) == {str(a), str(b)}
    assert digest in str(info.value)
    assert "corrupt" in str(info.value)
    assert "verify" in str(info.value)

    report = verify_store(store, repair=True)
    assert not report.healthy
    assert {(p.region, p.kind, p.repaired) for p in report.problems} == {
        (str(a), "corrupt", False),
        (str(b), "corrupt", False),
    }
    assert all("no intact copy" in p.detail for p in report.problems)


# -- damaged manifests and 'latest' -----------------------------------------------------------


def test_manifest_missing_from_one_region_is_reported_and_copied_back(tmp_path):
    store, a, b, state, _ = _two_region_checkpoint(tmp_path)
    key = manifest_key("lin", 1)
    original = (a / key).read_bytes()
    (b / key).unlink()

    assert _load(store, "lin")[1] == state
    assert store.list("lin")[0].lagging == {str(b): "manifest missing"}
    report = verify_store(store)
    assert [(p.region, p.object, p.kind) for p in report.problems] == [(str(b), key, "missing")]

    repaired = verify_store(store, repair=True)
    assert [(p.region, p.kind, p.repaired) for p in repaired.problems] == [(str(b), "missing", True)]
    assert (b / key).read_bytes() == original
    assert verify_store(store, repair=True).problems == []
    assert store.list("lin")[0].regions == [str(a), str(b)]


def test_truncated_manifest_is_unreadable_and_restored_by_repair(tmp_path):
    store, a, b, state, _ = _two_region_checkpoint(tmp_path)
    key = manifest_key("lin", 1)
    original = (a / key).read_bytes()
    (b / key).write_bytes(original[: len(original) // 2])

    assert _load(store, "lin")[1] == state
    report = verify_store(store)
    assert [(p.region, p.object, p.kind) for p in report.problems] == [(str(b), key, "unreadable manifest")]
    assert "JSON" in report.problems[0].detail

    repaired = verify_store(store, repair=True)
    assert [(p.region, p.kind, p.repaired) for p in repaired.problems] == [(str(b), "unreadable manifest", True)]
    assert (b / key).read_bytes() == original
    assert verify_store(store).healthy
    assert verify_store(store, repair=True).problems == []


def test_bit_rot_in_a_manifest_that_still_parses_is_caught(tmp_path):
    store, a, b, state, _ = _two_region_checkpoint(tmp_path)
    key = manifest_key("lin", 1)
    original = (a / key).read_bytes()
    raw = json.loads(original)
    raw["entries"][0]["component"] = "optimizer"  # still valid JSON and schema
    (a / key).write_bytes(canonical_json(raw))

    assert store.resolve("lin")[1] == [str(b)]  # only b's copy is trusted
    assert _load(store, "lin")[1] == state
    report = verify_store(store, repair=True)
    assert [(p.region, p.kind, p.repaired) for p in report.problems] == [(str(a), "unreadable manifest", True)]
    assert "manifest_digest" in report.problems[0].detail
    assert (a / key).read_bytes() == original


def test_latest_skips_a_manifest_below_write_quorum(tmp_path):
    a, b = _dirs(tmp_path, "a", "b")
    store = _store([a, b], quorum=2)
    store.commit("lin", _plan(w=b"one"))
    store.commit("lin", _plan(w=b"two"))
    # A writer that died after its first region took the manifest: version 3 exists only in a.
    claim = _store([a], quorum=1).commit("lin", _plan(w=b"three"))
    assert claim.version == 3
    assert (a / manifest_key("lin", 3)).exists() and not (b / manifest_key("lin", 3)).exists()

    manifest, loaded = _load(store, "lin")
    assert manifest.version == 2
    assert loaded == {"w": b"two"}
    assert [info.version for info in store.list("lin")] == [1, 2]
    with pytest.raises(CheckpointNotFoundError, match="no consistent version 3"):
        store.resolve("lin", 3)
    report = verify_store(store)
    assert report.healthy
    assert any("v3" in note and "uncommitted" in note for note in report.notes)


def test_latest_skips_a_version_whose_blobs_are_gone(tmp_path):
    a, b = _dirs(tmp_path, "a", "b")
    store = _store([a, b], quorum=2)
    store.commit("lin", _plan(w=_bytes("one", 2 * CHUNK)))
    first, _ = store.resolve("lin")
    store.commit("lin", _plan(w=_bytes("one", CHUNK) + _bytes("two", CHUNK)))
    second, _ = store.resolve("lin")
    assert second.version == 2
    (gone,) = _only_in(second, first)
    for root in (a, b):
        (root / blob_key(gone)).unlink()

    manifest, loaded = _load(store, "lin")
    assert manifest.version == 1
    assert loaded == {"w": _bytes("one", 2 * CHUNK)}
    with pytest.raises(CheckpointNotFoundError):
        store.resolve("lin", 2)


def test_latest_is_not_the_newest_file_when_a_newer_manifest_is_damaged_everywhere(tmp_path):
    a, b = _dirs(tmp_path, "a", "b")
    store = _store([a, b], quorum=1)
    store.commit("lin", _plan(w=b"one"))
    store.commit("lin", _plan(w=b"two"))
    for root in (a, b):
        path = root / manifest_key("lin", 2)
        path.write_bytes(path.read_bytes()[:-5])
    assert _load(store, "lin")[1] == {"w": b"one"}
    # the next save does not reuse the damaged version's number
    assert store.commit("lin", _plan(w=b"three")).version == 3


class _Recording(LocalRegionIO):
    """Records every key read or probed, to prove what a rejected manifest made us touch."""

    touched: list[str]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.touched = []

    def get(self, key, max_bytes=None):
        self.touched.append(key)
        return super().get(key, max_bytes)

    def read_into(self, key, buffer, hasher=None):
        self.touched.append(key)
        return super().read_into(key, buffer, hasher)

    def size(self, key):
        self.touched.append(key)
        return super().size(key)


@pytest.mark.parametrize("name", ["../../../outside/x", "/etc/passwd", "a/../../b", "..\\..\\x", "C:x", "a\x00b"])
def test_planted_manifest_with_escaping_entry_name_is_rejected_before_any_blob_is_read(tmp_path, name):
    a, b = _dirs(tmp_path, "regions-a", "regions-b")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x").write_bytes(b"do not touch")
    writer = _store([a, b], quorum=2)
    writer.commit("lin", _plan(w=_bytes("w", 2 * CHUNK)))
    good, _ = writer.resolve("lin")

    # A manifest with a correct self digest and an intact blob of its own, but a malicious entry name.
    payload = b"planted payload"
    digest = hash_bytes(payload)
    raw = json.loads(good.encode())
    raw["version"] = 2
    raw["entries"] = [
        {**raw["entries"][0], "name": name, "size": len(payload), "chunks": [{"digest": digest, "size": len(payload)}]}
    ]
    planted = reseal(raw)
    for root in (a, b):
        (root / manifest_key("lin", 2)).write_bytes(planted)
        (root / blob_key(digest)).parent.mkdir(parents=True, exist_ok=True)
        (root / blob_key(digest)).write_bytes(payload)
    before = snapshot(tmp_path, exclude=[a, b])

    regions = [_Recording(str(a)), _Recording(str(b))]
    store = Store(regions, write_quorum=2, chunk_bytes=CHUNK)
    with pytest.raises(CheckpointNotFoundError, match="entry name"):  # the damage is named
        store.resolve("lin", 2)
    touched = [key for region in regions for key in region.touched]
    assert manifest_key("lin", 2) in touched
    assert blob_key(digest) not in touched
    assert store.resolve("lin")[0].version == 1

    report = verify_store(store, repair=True)
    bad = [p for p in report.problems if p.object == manifest_key("lin", 2)]
    assert sorted((p.region, p.kind, p.repaired) for p in bad) == [
        (str(a), "unreadable manifest", False),
        (str(b), "unreadable manifest", False),
    ]
    assert all("entry name" in p.detail for p in bad)
    assert not report.healthy
    assert snapshot(tmp_path, exclude=[a, b]) == before
    assert (tmp_path / "outside" / "x").read_bytes() == b"do not touch"
    assert _load(store, "lin")[1] == {"w": _bytes("w", 2 * CHUNK)}


def test_manifest_copied_from_another_lineage_is_rejected(tmp_path):
    a, b = _dirs(tmp_path, "a", "b")
    store = _store([a, b], quorum=2)
    store.commit("alpha", _plan(w=b"alpha data"))
    store.commit("beta", _plan(w=b"beta data"))
    for root in (a, b):
        (root / manifest_key("beta", 2)).write_bytes((root / manifest_key("alpha", 1)).read_bytes())
        (root / manifest_key("gamma", 1)).parent.mkdir(parents=True)
        (root / manifest_key("gamma", 1)).write_bytes((root / manifest_key("alpha", 1)).read_bytes())

    assert _load(store, "beta")[1] == {"w": b"beta data"}
    with pytest.raises(CheckpointNotFoundError):
        store.resolve("beta", 2)
    with pytest.raises(CheckpointNotFoundError):
        store.resolve("gamma")
    assert store.list("gamma") == []
    report = verify_store(store)
    details = {(p.object, p.region): p.detail for p in report.problems if p.kind == "unreadable manifest"}
    assert set(details) == {(manifest_key(lin, v), str(r)) for lin, v in (("beta", 2), ("gamma", 1)) for r in (a, b)}
    assert "belongs to lineage 'alpha'" in details[(manifest_key("gamma", 1), str(a))]


def test_resolve_of_an_unknown_lineage_or_version_says_what_exists(tmp_path):
    (a,) = _dirs(tmp_path, "a")
    store = _store([a])
    with pytest.raises(CheckpointNotFoundError, match="no consistent checkpoint"):
        store.resolve("nothing-here")
    store.commit("lin", _plan(w=b"x"))
    with pytest.raises(CheckpointNotFoundError, match=r"consistent versions: \[1\]"):
        store.resolve("lin", 7)


def test_invalid_entry_name_is_refused_before_anything_is_written(tmp_path):
    (a,) = _dirs(tmp_path, "a")
    store = _store([a])
    with pytest.raises(InvalidNameError):
        store.commit("lin", _plan(**{"../escape": b"payload"}))
    assert _files(a) == set()


def test_invalid_entry_name_never_commits(tmp_path):
    (a,) = _dirs(tmp_path, "a")
    store = _store([a])
    with pytest.raises(ValueError, match="invalid entry name"):
        store.commit("lin", _plan(**{"../escape": b"payload"}))
    with pytest.raises(ValueError, match="duplicate"):
        store.commit("lin", [*_plan(w=b"1"), *_plan(w=b"2")])
    assert _manifest_files(a) == set()
    assert not (tmp_path / "escape").exists()
    with pytest.raises(CheckpointNotFoundError):
        store.resolve("lin")


def _resident(view: memoryview) -> list[bool]:
    """Which pages of ``view`` (page-aligned, writable) are present, as ``mincore`` says."""
    import ctypes
    import mmap as mmap_module

    libc = ctypes.CDLL(None, use_errno=True)
    pages = -(-len(view) // mmap_module.PAGESIZE)
    vector = (ctypes.c_ubyte * pages)()
    anchor = ctypes.c_char.from_buffer(view)
    assert libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(len(view)), vector) == 0
    del anchor
    return [bool(v & 1) for v in vector]


class _Threads(LocalRegionIO):
    """Records the thread each blob read ran on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.threads: list[int] = []

    def read_into(self, key, buffer, hasher=None):
        import threading

        self.threads.append(threading.get_ident())
        return super().read_into(key, buffer, hasher)


def test_one_reader_reads_on_the_calling_thread_into_prefaulted_fresh_pages_and_refuses_a_corrupt_blob(tmp_path):
    import mmap as mmap_module
    import threading

    from prefect_recovery.core.region_local import PREFAULT_BYTES, _libc_calls, prefault

    (a,) = _dirs(tmp_path, "a")
    size = 2 * PREFAULT_BYTES
    region = _Threads(str(a))
    store = Store([region], write_quorum=1, chunk_bytes=PREFAULT_BYTES)
    payload = _bytes("big", size)
    store.commit("lin", _plan(w=payload))
    manifest, _ = store.resolve("lin")
    (entry,) = manifest.entries

    # prefault: a fresh mapping's pages become present, contents untouched (zeros); written pages keep their bytes
    fresh = mmap_module.mmap(-1, size)
    assert not any(_resident(memoryview(fresh)))
    prefault(memoryview(fresh))
    assert all(_resident(memoryview(fresh))) == bool(_libc_calls())
    assert fresh[:] == bytes(size)
    fresh[:] = payload
    prefault(memoryview(fresh))
    assert fresh[:] == payload
    prefault(memoryview(bytes(size)))  # read-only: nothing to do, no error

    # One reading thread: every chunk is read (and hashed) on the caller's thread, straight into the buffer.
    destination = mmap_module.mmap(-1, size)
    store.read_entries_into([(entry, memoryview(destination))], threads=1)
    assert destination[:] == payload
    assert region.threads == [threading.get_ident()] * len(entry.chunks) and len(entry.chunks) == 2

    # A damaged blob is refused (the read fails), not handed out.
    flip_byte(a / blob_key(entry.chunks[1].digest), 7, 0x01)
    with pytest.raises(BlobUnavailableError, match="corrupt"):
        store.read_entries_into([(entry, memoryview(mmap_module.mmap(-1, size)))], threads=1)
