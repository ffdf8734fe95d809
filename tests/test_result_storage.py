"""The CheckpointStore as Prefect result storage (issue 16): results, cache records and their reads.

A flow with ``result_storage`` set to the store, ``persist_result=True`` and an INPUTS cache
policy, on the real Prefect server: the task's result lands in every region at the write
quorum, a new process gets it back as a cache hit (the task does not run again), a corrupted
copy in one region is detected and the value served from the other, and with every copy
corrupt no value is returned: a direct read raises, a cached task is recomputed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from helpers.result_flow import pipeline
from helpers.tamper import flip_byte
from prefect.results import ResultRecord

from prefect_recovery import CheckpointStore, QuorumNotMetError, ResultNotFoundError, ResultUnavailableError
from prefect_recovery.blocks.result_storage import result_paths
from prefect_recovery.core.errors import InvalidNameError
from prefect_recovery.core.layout import blob_key

HELPER = Path(__file__).parent / "helpers" / "result_flow.py"


def two_regions(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "region-a", tmp_path / "region-b"
    a.mkdir()
    b.mkdir()
    return a, b


def blob_files(store: CheckpointStore, path: str, region: Path) -> list[Path]:
    """The files in ``region`` that hold the bytes of the result stored under ``path``."""
    manifest, _holders = store.core.resolve(store.result_lineage(path))
    return [region / blob_key(chunk.digest) for entry in manifest.entries for chunk in entry.chunks]


def record_value(raw: bytes) -> object:
    """The value of a task's result record (a flow's result is stored without its record: None)."""
    try:
        return ResultRecord.deserialize(raw).result
    except ValueError:
        return None


def run_in_new_process(storage: str, xs: list[int], marker: Path) -> tuple[list[int], str]:
    """Run the flow once per x in a fresh Python process; its results and its whole output."""
    from prefect.settings import PREFECT_API_URL

    env = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "RESULT_FLOW_MARKER": str(marker),
        "COLUMNS": "500",
    }
    done = subprocess.run(
        [sys.executable, str(HELPER), storage, *map(str, xs)], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])["results"], done.stdout + done.stderr


def test_cached_task_result_is_replicated_read_back_verified_in_a_new_process_and_survives_a_corrupt_copy(
    prefect_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = two_regions(tmp_path)
    store = CheckpointStore(regions=[str(a), str(b)], write_quorum=2)
    name = f"results-{uuid.uuid4().hex[:10]}"
    store.save(name)
    storage = f"checkpoint-store/{name}"
    marker = tmp_path / "executions.txt"
    monkeypatch.setenv("RESULT_FLOW_MARKER", str(marker))
    x = 1000 + uuid.uuid4().int % 10**6  # cache keys (INPUTS) no other test run has written
    y = x + 1

    # 1. This process: the task runs; its result and the flow's are committed in both regions.
    assert pipeline(storage)(x) == x * x
    assert pipeline(storage)(y) == y * y
    assert len(marker.read_text().splitlines()) == 2
    paths = result_paths(store)
    assert len(paths) == 4  # per run: the task's result record and the flow's result
    [task_path] = [path for path in paths if record_value(store.read_path(path)) == {"x": y, "square": y * y}]
    for path in paths:
        info = store.latest(store.result_lineage(path))
        assert info is not None and info.regions == [str(a), str(b)] and not info.lagging
        for region in (a, b):
            assert (region / "lineages" / info.lineage / "manifests" / f"{info.version:012d}.json").is_file()
            assert all(blob.is_file() for blob in blob_files(store, path, region))
    assert store.verify().healthy

    # Region a's copy of y's cached result rots.
    for blob in blob_files(store, task_path, a):
        flip_byte(blob, offset=blob.stat().st_size // 2)

    # 2. A new process: both are cache hits read back from the store (the task does not run again);
    # 3. y's corrupt copy in region a is detected (logged, naming the region) and the value served from b.
    values, output = run_in_new_process(storage, [x, y], marker)
    assert values == [x * x, y * y]
    assert len(marker.read_text().splitlines()) == 2, "cache hits must not run the task"
    assert "passed over" in output and str(a) in output and "does not match its digest" in output
    assert f"served from {b}" in output
    warned = [line for line in output.splitlines() if "passed over" in line]
    assert warned and all(repr(task_path) in line for line in warned)  # only y's result was damaged

    # verify --repair heals result copies like checkpoint copies (they are checkpoints of a result lineage).
    report = store.verify(repair=True)
    assert report.problems and all(problem.repaired for problem in report.problems)
    assert store.verify().healthy

    # 4. Both copies rot: no value is returned, and the error names both regions.
    for region in (a, b):
        for blob in blob_files(store, task_path, region):
            flip_byte(blob, offset=0)
    with pytest.raises(ResultUnavailableError) as caught:
        store.read_path(task_path)
    assert str(a) in str(caught.value) and str(b) in str(caught.value)
    assert set(caught.value.causes) == {str(a), str(b)}
    # Prefect's cache lookup reads a failed read as a miss: the task runs again, the value is right,
    # and its rewrite replaces the rotten copies, so the next run is a cache hit again.
    assert pipeline(storage)(y) == y * y
    assert len(marker.read_text().splitlines()) == 3
    assert record_value(store.read_path(task_path)) == {"x": y, "square": y * y}
    assert pipeline(storage)(y) == y * y
    assert len(marker.read_text().splitlines()) == 3


def test_write_and_read_path_sync_and_async(tmp_path: Path) -> None:
    import asyncio

    a, b = two_regions(tmp_path)
    store = CheckpointStore(regions=[str(a), str(b)], write_quorum=2)
    assert store.write_path("reports/latest.json", b"{}") == "reports/latest.json"
    assert store.read_path("reports/latest.json") == b"{}"
    store.write_path("reports/latest.json", b'{"v": 2}')  # overwriting is a new version
    assert store.read_path("reports/latest.json") == b'{"v": 2}'
    assert [info.version for info in store.list(store.result_lineage("reports/latest.json"))] == [1, 2]

    async def from_async_code() -> bytes:
        await store.write_path("async-key", b"\x00" * 10)  # dispatched to awrite_path
        return await store.aread_path("async-key")

    assert asyncio.run(from_async_code()) == b"\x00" * 10

    with pytest.raises(ResultNotFoundError, match="no Prefect result stored under 'never-written'") as missing:
        store.read_path("never-written")
    assert isinstance(missing.value, FileNotFoundError)  # what Prefect's other storage blocks raise
    with pytest.raises(InvalidNameError, match="reserved for Prefect results"):
        store.save_checkpoint({"x": 1}, lineage=store.result_lineage("reports/latest.json"))


def test_write_below_quorum_fails_and_persists_nothing(tmp_path: Path) -> None:
    a, b = two_regions(tmp_path)
    b.rmdir()  # an unmounted disk: a save never creates a local region's root (FORMAT.md)
    store = CheckpointStore(regions=[str(a), str(b)], write_quorum=2)
    with pytest.raises(QuorumNotMetError):
        store.write_path("key", b"value")
    with pytest.raises(ResultNotFoundError):
        store.read_path("key")


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_rewriting_a_result_whose_every_copy_rotted_heals_it(tmp_path: Path, codec: str) -> None:
    a, b = two_regions(tmp_path)
    store = CheckpointStore(regions=[str(a), str(b)], write_quorum=2, codec=codec)
    value = b"the value " * 1000  # compressible: with zstd the blob is smaller than the result
    store.write_path("key", value)
    for region in (a, b):
        for blob in blob_files(store, "key", region):
            flip_byte(blob)
    with pytest.raises(ResultUnavailableError):
        store.read_path("key")
    # What Prefect does when it recomputes the task: the same bytes again. A save would keep the
    # rotten blobs (same name, same size); the result write finds them, deletes them, writes anew.
    store.write_path("key", value)
    assert store.read_path("key") == value
    assert store.verify().healthy


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_a_result_written_whole_is_not_read_back(tmp_path: Path, codec: str, monkeypatch) -> None:
    # Only a save that reused stored blobs has copies to re-hash; one that wrote every blob now
    # (raw or compressed) reads nothing back: a result write costs its bytes, not twice that.
    a, b = two_regions(tmp_path)
    store = CheckpointStore(regions=[str(a), str(b)], write_quorum=2, codec=codec)
    reads: list[str] = []
    for region in store.core.regions:
        original = region.get
        monkeypatch.setattr(
            region, "get", lambda key, *args, _get=original, **kw: reads.append(key) or _get(key, *args, **kw)
        )
    store.write_path("fresh", b"a new value " * 1000)
    assert not [key for key in reads if key.startswith("blobs/")]
    store.write_path("again", b"a new value " * 1000)  # same bytes under another path: reused blobs
    assert [key for key in reads if key.startswith("blobs/")]  # so their copies are re-hashed


def test_a_prefect_transaction_commits_its_record_into_the_store(tmp_path: Path) -> None:
    from prefect.results import ResultStore
    from prefect.transactions import transaction

    a, b = two_regions(tmp_path)
    store = CheckpointStore(regions=[str(a), str(b)], write_quorum=2)
    with transaction(key="nightly-2026-12-07", store=ResultStore(result_storage=store)) as txn:
        txn.stage({"rows": 1234})
    assert result_paths(store) == {"nightly-2026-12-07": store.result_lineage("nightly-2026-12-07")}
    assert store.latest(store.result_lineage("nightly-2026-12-07")).regions == [str(a), str(b)]
    with transaction(key="nightly-2026-12-07", store=ResultStore(result_storage=store)) as again:
        assert again.is_committed()
        assert again.read().result == {"rows": 1234}


def test_a_result_is_read_from_the_raw_region_when_the_compressed_one_is_listed_first(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    # Region codecs (issue 17): a result's chunks are read in their cheapest form like a checkpoint's,
    # not in the order the regions are listed; the compressed form serves a chunk whose raw copy rotted,
    # and the warning names the copy passed over.
    packed, raw = two_regions(tmp_path)
    store = CheckpointStore(
        regions=[{"url": str(packed), "name": "packed"}, {"url": str(raw), "name": "raw"}],
        region_codecs={"packed": "zstd"},
        write_quorum=2,
        chunk_bytes=64 * 1024,
    )
    value = b"".join(b"result line %d\n" % i for i in range(40_000))  # compressible, no two chunks alike
    store.write_path("key", value)
    manifest, _holders = store.core.resolve(store.result_lineage("key"))
    chunks = [chunk for entry in manifest.entries for chunk in entry.chunks]
    assert len(chunks) > 1 and all(chunk.forms for chunk in chunks)  # a raw and a zstd form each

    asked: dict[str, list[str]] = {"packed": [], "raw": []}
    for region in store.core.regions:
        original = region.read_into
        monkeypatch.setattr(
            region,
            "read_into",
            lambda key, *a, _f=original, _n=region.name, **kw: asked[_n].append(key) or _f(key, *a, **kw),
        )
    assert store.read_path("key") == value
    assert asked["packed"] == [] and len(asked["raw"]) == len(chunks)

    [first_raw] = [form for form in chunks[0].stored_forms() if form.stored_raw]
    flip_byte(raw / blob_key(first_raw.digest))
    with caplog.at_level("WARNING"):
        assert store.read_path("key") == value
    [packed_form] = [form for form in chunks[0].stored_forms() if not form.stored_raw]
    assert asked["packed"] == [blob_key(packed_form.digest)]  # that chunk alone, in its compressed form
    [warning] = [r.getMessage() for r in caplog.records if "passed over" in r.getMessage()]
    assert "raw: content does not match its digest" in warning
    assert "served from packed, raw" in warning  # chunk 0 from packed, the others from raw
