"""Issue 16 from outside: the CheckpointStore used the way a Prefect user uses a storage block.

Ordinary ``@task``/``@flow`` code with the store as ``result_storage`` (a saved block, its slug, or
Prefect's default-result-storage setting), against the session's real Prefect server: results of
many types and sizes, caching with expiry and refresh, retries, ``result_storage_key`` templates,
cache records kept apart (``key_storage``), concurrent writers (threads, async tasks, processes),
results read back from a run's state in another process, a region down, corrupt copies, block
documents edited through the API (invalid values, renamed regions), and a credentials block whose
secret never shows in any output.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import CLI
from helpers.emulators import refused_endpoint, s3_emulator, unreachable_emulator
from helpers.tamper import flip_byte
from prefect import flow, task
from prefect.cache_policies import INPUTS
from prefect.results import ResultRecord

from prefect_recovery import CheckpointStore, ResultUnavailableError
from prefect_recovery.blocks.result_storage import result_paths
from prefect_recovery.core.layout import blob_key

SECRET = "outside-review-secret-4f1c9e"  # must never be printed


# -- helpers ----------------------------------------------------------------------------------
def regions(tmp_path: Path, *names: str) -> list[Path]:
    made = []
    for name in names:
        (tmp_path / name).mkdir()
        made.append(tmp_path / name)
    return made


def saved_store(tmp_path: Path, quorum: int = 2, **options: Any) -> tuple[CheckpointStore, Path, Path, str]:
    a, b = regions(tmp_path, "region-a", "region-b")
    store = CheckpointStore(regions=[str(a), str(b)], write_quorum=quorum, **options)
    name = f"outside-{uuid.uuid4().hex[:10]}"
    store.save(name)
    return store, a, b, name


def blobs_of(store: CheckpointStore, path: str, region: Path) -> list[Path]:
    manifest, _ = store.core.resolve(store.result_lineage(path))
    return [region / blob_key(chunk.digest) for entry in manifest.entries for chunk in entry.chunks]


def task_value(store: CheckpointStore, path: str) -> Any:
    return ResultRecord.deserialize(store.read_path(path)).result


def api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


def run_python(code: str, tmp_path: Path, timeout: float = 240, **env: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a new Python process against the session's Prefect server."""
    script = tmp_path / f"script-{uuid.uuid4().hex[:8]}.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run(
        [sys.executable, str(script)],
        env={**os.environ, "PREFECT_API_URL": api_url(), "COLUMNS": "500", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
    )


def flow_run_logs(flow_run_id: Any) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


# -- results of ordinary tasks ----------------------------------------------------------------
VALUES: dict[str, Any] = {
    "dict": {"rows": 3, "names": ["a", "b"], "nested": {"x": [1.5, None]}},
    "none": None,
    "bytes": b"\x00\xff" * 100,
    "set": {1, 2, 3},
    "datetime": dt.datetime(2026, 12, 7, 13, 0, tzinfo=dt.UTC),
    "decimal": Decimal("1.10"),
    "numpy": np.arange(12, dtype=np.float64).reshape(3, 4),
    "tensor": torch.linspace(0, 1, 1000, dtype=torch.bfloat16),
    # several chunks (chunk_bytes is 1 MiB below) and larger than any single read buffer
    "large": np.random.default_rng(7).integers(0, 255, size=9 * 2**20 + 13, dtype=np.uint8),
}


def same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return type(a) is type(b) and a == b


def test_results_of_many_types_and_sizes_are_stored_in_every_region_and_served_as_cache_hits(
    prefect_server, tmp_path: Path
) -> None:
    store, a, b, _ = saved_store(tmp_path, chunk_bytes=2**20)
    runs: list[str] = []
    tag = uuid.uuid4().hex  # cache keys no other test run wrote

    @task(result_storage=store, persist_result=True, cache_policy=INPUTS)
    def produce(kind: str, tag: str) -> Any:
        runs.append(kind)
        return VALUES[kind]

    @task(result_storage=store, persist_result=True, cache_policy=INPUTS, result_serializer="json")
    def produce_json(n: int, tag: str) -> dict[str, Any]:
        runs.append(f"json-{n}")
        return {"n": n, "items": list(range(n)), "ok": True}

    @flow
    def many(tag: str) -> dict[str, Any]:
        out = {kind: produce(kind, tag) for kind in VALUES}
        out["json"] = produce_json(4, tag)
        return out

    first = many(tag)
    assert sorted(runs) == sorted([*VALUES, "json-4"])
    second = many(tag)  # every task a cache hit: read back from the store
    assert len(runs) == len(VALUES) + 1, "a cached task ran again"
    for kind, value in VALUES.items():
        assert same(first[kind], value), kind
        assert same(second[kind], value), kind
    assert second["json"] == {"n": 4, "items": [0, 1, 2, 3], "ok": True}

    paths = result_paths(store)
    assert len(paths) == len(VALUES) + 1
    stored = {path: task_value(store, path) for path in paths}
    assert any(same(value, VALUES["large"]) for value in stored.values())
    for path in paths:
        info = store.latest(store.result_lineage(path))
        assert info is not None and info.regions == [str(a), str(b)] and not info.lagging
        assert all(blob.is_file() for region in (a, b) for blob in blobs_of(store, path, region))
    # the json serializer's record is JSON a person can read, not a pickle
    [json_path] = [p for p, v in stored.items() if isinstance(v, dict) and v.get("items") == [0, 1, 2, 3]]
    assert json.loads(store.read_path(json_path))["metadata"]["serializer"]["type"] == "json"
    assert store.verify().healthy


def test_cache_expiration_refresh_and_a_templated_storage_key(prefect_server, tmp_path: Path) -> None:
    import time
    from datetime import timedelta

    store, _, _, name = saved_store(tmp_path)
    runs: list[int] = []
    day = f"2026-12-{uuid.uuid4().hex[:6]}"

    @task(persist_result=True, cache_policy=INPUTS, cache_expiration=timedelta(seconds=2))
    def expiring(x: int, day: str) -> int:
        runs.append(x)
        return x * 10 + len(runs)

    @task(persist_result=True, cache_policy=INPUTS, refresh_cache=True)
    def refreshed(x: int, day: str) -> int:
        runs.append(-x)
        return len(runs)

    @task(persist_result=True, result_storage_key="reports/{parameters[day]}.json", result_serializer="json")
    def report(day: str) -> dict[str, str]:
        return {"day": day}

    @flow(result_storage=f"checkpoint-store/{name}", persist_result=True)  # the slug form
    def nightly(day: str) -> tuple[int, int, dict[str, str]]:
        return expiring(1, day), refreshed(2, day), report(day)

    first = nightly(day)
    second = nightly(day)  # expiring: hit; refreshed: recomputed, and the new value stored
    assert second[0] == first[0] and len(runs) == 3 and second[1] == 3
    time.sleep(2.5)  # Prefect's own expiry: the record is stale, the task runs again
    third = nightly(day)
    assert third[0] != first[0] and len(runs) == 5

    assert first[2] == {"day": day}
    key = f"reports/{day}.json"
    assert key in result_paths(store)
    assert task_value(store, key) == {"day": day}
    # Prefect keys the cache on result_storage_key: the later runs were cache hits, one version
    assert len(store.list(store.result_lineage(key))) == 1


def test_retries_persist_one_result_the_successful_one(prefect_server, tmp_path: Path) -> None:
    store, _, _, _ = saved_store(tmp_path)
    attempts: list[int] = []

    @task(result_storage=store, persist_result=True, retries=2, retry_delay_seconds=0)
    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("transient")
        return "third time lucky"

    @flow
    def with_retries() -> str:
        return flaky()

    assert with_retries() == "third time lucky" and len(attempts) == 3
    [path] = result_paths(store)
    assert task_value(store, path) == "third time lucky"
    assert len(store.list(store.result_lineage(path))) == 1


def test_cache_records_can_live_in_the_store_while_values_live_elsewhere(prefect_server, tmp_path: Path) -> None:
    records, _, _, _ = saved_store(tmp_path)
    c, d = regions(tmp_path, "values-c", "values-d")
    values = CheckpointStore(regions=[str(c), str(d)], write_quorum=1)
    values.save(f"values-{uuid.uuid4().hex[:8]}")
    runs: list[int] = []
    x = uuid.uuid4().int % 10**9

    @task(persist_result=True, result_storage=values, cache_policy=INPUTS.configure(key_storage=records))
    def plus_one(x: int) -> int:
        runs.append(x)
        return x + 1

    @flow
    def keyed(x: int) -> int:
        return plus_one(x)

    assert keyed(x) == x + 1 and keyed(x) == x + 1 and runs == [x]
    [key] = result_paths(records)
    assert list(result_paths(values)) == [key]
    metadata = json.loads(records.read_path(key))  # the cache record: metadata only
    assert "result" not in metadata and metadata["storage_key"] == key
    assert ResultRecord.deserialize_from_result_and_metadata(values.read_path(key), records.read_path(key)).result == (
        x + 1
    )


def test_concurrent_threaded_and_async_tasks_each_persist_their_own_result(prefect_server, tmp_path: Path) -> None:
    from prefect.task_runners import ThreadPoolTaskRunner

    store, _, _, _ = saved_store(tmp_path)
    tag = uuid.uuid4().hex

    @task(result_storage=store, persist_result=True, cache_policy=INPUTS)
    def square(i: int, tag: str) -> dict[str, int]:
        return {"i": i, "square": i * i}

    @task(result_storage=store, persist_result=True, cache_policy=INPUTS)
    async def cube(i: int, tag: str) -> dict[str, int]:
        await asyncio.sleep(0.01)
        return {"i": i, "cube": i**3}

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=8))
    def threaded(tag: str) -> list[int]:
        return [r["square"] for r in square.map(range(16), tag=tag).result()]

    @flow
    async def concurrent(tag: str) -> list[int]:
        # another tag: INPUTS keys on the inputs alone, so cube(i, tag) would hit square(i, tag)'s record
        return [r["cube"] for r in await asyncio.gather(*(cube(i, tag + "-cube") for i in range(12)))]

    assert threaded(tag) == [i * i for i in range(16)]
    assert asyncio.run(concurrent(tag)) == [i**3 for i in range(12)]
    stored = sorted((v["i"], sorted(v)) for v in (task_value(store, p) for p in result_paths(store)))
    assert stored == sorted([(i, ["i", "square"]) for i in range(16)] + [(i, ["cube", "i"]) for i in range(12)])
    assert store.verify().healthy


@task(persist_result=True, cache_policy=INPUTS)
def in_a_process(i: int, tag: str) -> dict[str, int]:
    """Module level, so ProcessPoolTaskRunner's worker processes import it."""
    return {"i": i, "pid": os.getpid()}


def test_tasks_in_a_process_pool_write_results_the_next_run_reads(prefect_server, tmp_path: Path) -> None:
    from prefect.task_runners import ProcessPoolTaskRunner

    store, _, _, name = saved_store(tmp_path)
    tag = uuid.uuid4().hex

    @flow(task_runner=ProcessPoolTaskRunner(max_workers=2), result_storage=f"checkpoint-store/{name}")
    def pooled(tag: str) -> list[dict[str, int]]:
        return in_a_process.map(range(6), tag=tag).result()

    @flow(result_storage=f"checkpoint-store/{name}")
    def here(tag: str) -> list[dict[str, int]]:
        return in_a_process.map(range(6), tag=tag).result()

    first = pooled(tag)
    assert [r["i"] for r in first] == list(range(6))
    assert os.getpid() not in {r["pid"] for r in first}  # computed in the pool's processes
    assert here(tag) == first  # cache hits in this process: the records the workers wrote, their pids
    task_records = [p for p in result_paths(store) if b'"metadata"' in store.read_path(p)]
    assert sorted(task_value(store, p)["i"] for p in task_records) == list(range(6))


RESULT_FLOW = """
    import json, os, sys
    from prefect import flow, task
    from prefect.cache_policies import INPUTS

    @task(cache_policy=INPUTS, persist_result=True)
    def square(x: int) -> dict:
        with open(os.environ["MARKER"], "a") as marker:
            marker.write(f"{os.getpid()}\\n")
        return {"x": x, "square": x * x}

    @flow(result_storage=sys.argv[1], persist_result=True)
    def squares(x: int) -> int:
        return square(x)["square"]

    state = squares(int(sys.argv[2]), return_state=True)
    print(json.dumps({"flow_run_id": str(state.state_details.flow_run_id), "value": state.result()}))
"""


def test_two_processes_computing_the_same_cached_task_at_once_both_complete(prefect_server, tmp_path: Path) -> None:
    store, _, _, name = saved_store(tmp_path)
    script = tmp_path / "squares.py"
    script.write_text(textwrap.dedent(RESULT_FLOW))
    marker = tmp_path / "ran.txt"
    x = uuid.uuid4().int % 10**6
    env = {**os.environ, "PREFECT_API_URL": api_url(), "MARKER": str(marker), "COLUMNS": "500"}
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), f"checkpoint-store/{name}", str(x)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=240) for process in processes]
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, out + err
        assert json.loads(out.strip().splitlines()[-1])["value"] == x * x
        assert "| ERROR" not in err and "has not been persisted" not in err, err  # no failed write or read
    # Each process ran the task or hit the other's cache entry; whatever the interleaving, the stored
    # record is intact and the next run anywhere is a cache hit.
    ran = len(marker.read_text().splitlines())
    assert ran in (1, 2)
    again = subprocess.run(
        [sys.executable, str(script), f"checkpoint-store/{name}", str(x)], env=env, capture_output=True, text=True
    )
    assert again.returncode == 0 and json.loads(again.stdout.strip().splitlines()[-1])["value"] == x * x
    assert len(marker.read_text().splitlines()) == ran, "the stored record was not a cache hit"
    assert store.verify().healthy


READ_STATE = """
    import asyncio, sys
    from prefect.client.orchestration import get_client

    async def main():
        async with get_client() as client:
            for run_id in sys.argv[1:]:
                run = await client.read_flow_run(run_id)
                try:
                    print("VALUE", await run.state.result())
                except KeyError as exc:  # a failed run's persisted exception, raised again
                    print("RAISED", type(exc).__name__, exc)

    asyncio.run(main())
"""


def test_a_flow_result_is_read_back_from_its_state_in_another_process_verified(prefect_server, tmp_path: Path) -> None:
    store, a, b, _ = saved_store(tmp_path)
    answer = {"answer": uuid.uuid4().hex}

    @flow(result_storage=store, persist_result=True)
    def produce() -> dict[str, str]:
        return answer

    @flow(result_storage=store, persist_result=True)
    def fails() -> None:
        raise KeyError("the-missing-key")

    produced = produce(return_state=True)
    run_id = str(produced.state_details.flow_run_id)
    path = produced.data.metadata.storage_key  # a flow's result: its serialized value alone
    failed = fails(return_state=True)
    assert failed.is_failed() and len(result_paths(store)) == 2  # the exception is persisted too
    script = tmp_path / "read_state.py"
    script.write_text(textwrap.dedent(READ_STATE))

    def read_in_new_process(*run_ids: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(script), *run_ids],
            env={**os.environ, "PREFECT_API_URL": api_url(), "COLUMNS": "500"},
            capture_output=True,
            text=True,
            timeout=240,
        )

    done = read_in_new_process(run_id, str(failed.state_details.flow_run_id))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-2:] == [f"VALUE {answer}", "RAISED KeyError 'the-missing-key'"]

    # region a is unmounted: the value comes from b
    shutil.move(a, tmp_path / "unmounted")
    done = read_in_new_process(run_id)
    assert done.returncode == 0 and f"VALUE {answer}" in done.stdout, done.stderr
    shutil.move(tmp_path / "unmounted", a)

    # region a's copy rots: still the right value, from b, and the damage is named
    for blob in blobs_of(store, path, a):
        flip_byte(blob, offset=1)
    done = read_in_new_process(run_id)
    assert done.returncode == 0 and f"VALUE {answer}" in done.stdout, done.stderr
    assert "passed over" in done.stderr and f"{a}: content does not match its digest" in done.stderr
    assert f"served from {b}" in done.stderr

    # every copy rots: a typed error naming both regions, never a wrong value
    for blob in blobs_of(store, path, b):
        flip_byte(blob, offset=1)
    done = read_in_new_process(run_id)
    assert done.returncode != 0 and "VALUE" not in done.stdout
    assert "ResultUnavailableError" in done.stderr and "no intact copy" in done.stderr
    assert str(a) in done.stderr and str(b) in done.stderr


def test_prefects_default_result_storage_setting_can_name_the_store(prefect_server, tmp_path: Path) -> None:
    store, a, b, name = saved_store(tmp_path)
    tag = uuid.uuid4().hex
    done = run_python(
        """
        from prefect import flow, task

        @task
        def double(x: int) -> int:
            return 2 * x

        @flow
        def plain() -> int:
            return double(21)

        print("VALUE", plain())
        """,
        tmp_path,
        PREFECT_DEFAULT_RESULT_STORAGE_BLOCK=f"checkpoint-store/{name}",
        PREFECT_RESULTS_PERSIST_BY_DEFAULT="true",
        TAG=tag,
    )
    assert done.returncode == 0 and "VALUE 42" in done.stdout, done.stderr
    paths = result_paths(store)
    assert len(paths) == 2  # the task's record and the flow's
    assert 42 in {task_value(store, p) for p in paths if b'"metadata"' in store.read_path(p)}
    assert all(store.latest(store.result_lineage(p)).regions == [str(a), str(b)] for p in paths)


# -- damage and outages -----------------------------------------------------------------------
def test_a_corrupt_chunk_in_each_region_is_served_from_the_other_and_every_cause_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = regions(tmp_path, "region-a", "region-b")
    store = CheckpointStore(regions=[str(a), str(b)], write_quorum=2, chunk_bytes=2**20)
    value = np.random.default_rng(3).bytes(5 * 2**20 + 5)
    store.write_path("large", value)
    blobs_a, blobs_b = blobs_of(store, "large", a), blobs_of(store, "large", b)
    assert len(blobs_a) == 6
    flip_byte(blobs_a[0], offset=100)  # region a: chunk 0 rotten, chunk 2 gone
    blobs_a[2].unlink()
    flip_byte(blobs_b[1], offset=100)  # region b: chunk 1 rotten (a's copy is good)
    flip_byte(blobs_b[2], offset=100)  # chunk 2: b's copy is rotten too -> no intact copy
    with pytest.raises(ResultUnavailableError) as caught:
        store.read_path("large")
    assert set(caught.value.causes) == {str(a), str(b)}

    start = 2 * 2**20  # chunk 2's copy in b put right again (codec none: a blob is the chunk's bytes)
    blobs_b[2].write_bytes(value[start : start + 2**20])
    caplog.clear()
    assert store.read_path("large") == value  # chunks 0 and 2 from b, chunk 1 from a
    [warning] = [r.getMessage() for r in caplog.records if "passed over" in r.getMessage()]
    assert "does not match its digest" in warning and "does not exist" in warning  # both of a's causes
    report = store.verify(repair=True)
    assert report.problems and all(problem.repaired for problem in report.problems)
    assert store.verify().healthy


def test_a_region_down_while_a_flow_runs(prefect_server, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store, a, _b, _ = saved_store(tmp_path)
    runs: list[int] = []
    tag = uuid.uuid4().hex

    @task(result_storage=store, persist_result=True, cache_policy=INPUTS)
    def square(x: int, tag: str) -> int:
        runs.append(x)
        return x * x

    @flow
    def squares(x: int, tag: str) -> int:
        return square(x, tag)

    assert squares(3, tag) == 9
    shutil.move(a, tmp_path / "unmounted")
    # a cache hit is served from region b
    assert squares(3, tag) == 9 and runs == [3]
    # a new result cannot reach the write quorum of 2: the value is right, nothing half-written is
    # served later, and the failed write is in the logs with the region and what to do
    caplog.clear()
    assert squares(4, tag) == 16 and runs == [3, 4]
    logged = caplog.text
    assert "QuorumNotMetError" in logged and "write_quorum is 2" in logged and str(a) in logged
    shutil.move(tmp_path / "unmounted", a)
    assert squares(4, tag) == 16 and runs == [3, 4, 4], "a write below quorum must not become a cache entry"
    assert squares(4, tag) == 16 and runs == [3, 4, 4]


def test_an_object_store_region_down_with_quorum_one(prefect_server, tmp_path: Path) -> None:
    (local,) = regions(tmp_path, "local")
    with refused_endpoint() as endpoint:
        down = unreachable_emulator("s3", endpoint).region("results", name="s3-down")
        store = CheckpointStore(regions=[{"url": str(local), "name": "local"}, down], write_quorum=1)
        store.save(f"s3-down-{uuid.uuid4().hex[:8]}")

        key = f"results/{uuid.uuid4().hex}"

        @task(result_storage=store, persist_result=True, result_storage_key=key)
        def value() -> list[int]:
            return [1, 2, 3]

        @flow
        def uses_it() -> list[int]:
            return value()

        assert uses_it() == [1, 2, 3]
        info = store.latest(store.result_lineage(key))
        assert info.regions == ["local"] and set(info.lagging) == {"s3-down"}
        assert task_value(store, key) == [1, 2, 3]


# -- block documents edited through the API -----------------------------------------------------
def _document(name: str) -> dict[str, Any]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name(name, "checkpoint-store", include_secrets=False)
    return {"id": document.id, "data": document.data, "schema_id": document.block_schema_id}


def _http(method: str, url: str, **kwargs: Any) -> Any:
    """One API call, retried while the busy SQLite-backed test server answers 503 (seen under the full suite)."""
    import httpx

    for attempt in range(20):
        response = httpx.request(method, url, timeout=30, **kwargs)
        if response.status_code != 503:
            return response
        time.sleep(min(0.25 * 2**attempt, 3))
    return response


def _patch(document_id: Any, data: dict[str, Any]) -> None:
    response = _http(
        "PATCH", f"{api_url()}/block_documents/{document_id}", json={"data": data, "merge_existing_data": False}
    )
    assert response.status_code == 204, response.text


def test_invalid_values_are_named_by_the_servers_form_validation_and_by_load(prefect_server, tmp_path: Path) -> None:

    a, b = regions(tmp_path, "region-a", "region-b")
    name = f"edited-{uuid.uuid4().hex[:8]}"
    CheckpointStore(
        regions=[{"url": str(a), "name": "a"}, {"url": str(b), "name": "b"}],
        region_storage_options={"a": {"token": SECRET}},
        write_quorum=2,
    ).save(name)
    document = _document(name)
    assert SECRET not in json.dumps(document["data"])
    schema = _http("GET", f"{api_url()}/block_schemas/{document['schema_id']}").json()["fields"]

    bad_values = {
        "write_quorum": 0,
        "hash_algorithm": "md5",
        "codec": "gzip",
        "chunk_bytes": 10,
        "regions": [],
        "io_threads": 1000,
    }
    for field, bad in bad_values.items():
        values = {**document["data"], field: bad}
        # what the UI's schema form asks the server before Save
        response = _http("POST", f"{api_url()}/ui/schemas/validate", json={"schema": schema, "values": values})
        assert response.status_code == 200, response.text
        errors = response.json()
        assert not errors["valid"], field
        assert field in json.dumps(errors["errors"]), (field, errors)

        # the API itself stores any JSON (Prefect does not validate block data server-side): a load says
        # which field is wrong, and never shows the secret
        _patch(document["id"], values)
        with pytest.raises(RuntimeError, match="failed validation") as caught:
            CheckpointStore.load(name)
        cause = str(caught.value.__cause__)
        assert field in cause and SECRET not in cause and SECRET not in str(caught.value)

    # values the schema allows but the store cannot run with: typed errors at load, secret-free
    from prefect.blocks.system import Secret

    wrong_kind = Secret(value=SECRET).save(f"not-credentials-{uuid.uuid4().hex[:8]}")
    cases = {
        "a Secret block picked as a region's credentials": (
            {
                "regions": [
                    {"url": str(a), "name": "a", "credentials": {"$ref": {"block_document_id": str(wrong_kind)}}},
                    {"url": str(b), "name": "b"},
                ]
            },
            "a 'secret' block cannot be a region's credentials",
        ),
        "a deleted credentials block": (
            {
                "regions": [
                    {"url": str(a), "name": "a", "credentials": {"$ref": {"block_document_id": str(uuid.uuid4())}}},
                    {"url": str(b), "name": "b"},
                ]
            },
            "was it deleted? Pick another credentials block for this region",
        ),
        "quorum above the region count": ({"write_quorum": 3}, "write_quorum must be between 1 and the number"),
        "a mistyped region field": (
            {"regions": [{"url": str(a), "name": "a", "credential": "x"}, {"url": str(b), "name": "b"}]},
            "unknown field 'credential'; did you mean 'credentials'",
        ),
        # renaming a region in the form while its options still name the old one
        "a renamed region": (
            {"regions": [{"url": str(a), "name": "eu"}, {"url": str(b), "name": "b"}]},
            "key 'a' names no region",
        ),
    }
    for what, (change, message) in cases.items():
        _patch(document["id"], {**document["data"], **change})
        with pytest.raises(Exception) as caught:
            CheckpointStore.load(name).write_path("probe", b"x")
        assert message in str(caught.value), (what, str(caught.value))
        assert SECRET not in str(caught.value) + str(caught.value.__cause__), what

    # the document sent back unchanged (the masked secret as the UI shows it) loads with the secret
    _patch(document["id"], document["data"])
    loaded = CheckpointStore.load(name)
    assert loaded.regions[0].storage_options.get_secret_value() == {"token": SECRET}
    assert loaded.write_quorum == 2


def test_a_region_added_through_the_api_takes_new_results_and_old_ones_still_read(
    prefect_server, tmp_path: Path, caplog
) -> None:
    store, a, b, name = saved_store(tmp_path)
    store.write_path("before", b"written with two regions")
    (c,) = regions(tmp_path, "region-c")
    document = _document(name)
    _patch(document["id"], {**document["data"], "regions": [*document["data"]["regions"], {"url": str(c)}]})

    edited = CheckpointStore.load(name)
    assert [region.url for region in edited.regions] == [str(a), str(b), str(c)]
    assert edited.read_path("before") == b"written with two regions"
    edited.write_path("after", b"written with three")
    # an empty directory in a store that holds data may be an unmounted disk: not written, and said so
    info = edited.latest(edited.result_lineage("after"))
    assert info.regions == [str(a), str(b)] and set(info.lagging) == {str(c)}
    assert f"if it is a new region, run `prefect-recovery init --region {c}`" in caplog.text

    init = subprocess.run([*CLI, "init", "--region", str(c)], capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    edited = CheckpointStore.load(name)
    edited.write_path("after", b"written with three, again")
    assert edited.latest(edited.result_lineage("after")).regions == [str(a), str(b), str(c)]
    # verify --repair copies the older result into the new region as well
    edited.verify(repair=True)
    assert all(blob.is_file() for blob in blobs_of(edited, "before", c))
    shutil.move(a, tmp_path / "away-a")
    shutil.move(b, tmp_path / "away-b")
    assert CheckpointStore.load(name).read_path("before") == b"written with two regions"


# -- a credentials block referenced by the store ------------------------------------------------
def test_a_store_with_an_aws_credentials_block_runs_flows_and_never_prints_the_secret(
    prefect_server, tmp_path: Path
) -> None:
    from prefect_aws import AwsCredentials

    (local,) = regions(tmp_path, "local")
    with s3_emulator(bucket="results", log_dir=tmp_path) as s3:
        creds = f"moto-{uuid.uuid4().hex[:8]}"
        AwsCredentials(
            aws_access_key_id="testing",
            aws_secret_access_key=SECRET,
            region_name="us-east-1",
            aws_client_parameters={"endpoint_url": s3.endpoint},
        ).save(creds)
        name = f"with-creds-{uuid.uuid4().hex[:8]}"
        CheckpointStore(
            regions=[
                {"url": "s3://results/prefect", "name": "s3", "credentials": AwsCredentials.load(creds)},
                {"url": str(local), "name": "local"},
            ],
            write_quorum=2,
        ).save(name)
        code = f"""
            from prefect import flow, task, get_run_logger
            from prefect_recovery import CheckpointStore

            @task(persist_result=True)
            def value() -> dict:
                return {{"rows": 1234}}

            @flow(result_storage="checkpoint-store/{name}", persist_result=True)
            def nightly() -> dict:
                store = CheckpointStore.load("{name}")
                get_run_logger().info("store %r regions %s", store, store.regions)
                return value()

            state = nightly(return_state=True)
            print("RUN", state.state_details.flow_run_id, state.result())
        """
        done = run_python(code, tmp_path, PREFECT_LOGGING_LEVEL="DEBUG")
        assert done.returncode == 0 and "{'rows': 1234}" in done.stdout, done.stderr
        run_id = done.stdout.split("RUN ")[1].split()[0]
        store = CheckpointStore.load(name)
        paths = result_paths(store)
        assert len(paths) == 2
        assert s3.fs().ls("results/prefect/lineages")  # the results really went to the bucket
        assert any(task_value(store, p) == {"rows": 1234} for p in paths if b'"metadata"' in store.read_path(p))

    inspect = subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), "block", "inspect", f"checkpoint-store/{name}"],
        env={**os.environ, "PREFECT_API_URL": api_url(), "COLUMNS": "500"},
        capture_output=True,
        text=True,
    )
    assert inspect.returncode == 0, inspect.stderr
    shown = {
        "flow process output": done.stdout + done.stderr,
        "flow run logs": flow_run_logs(run_id),
        "prefect block inspect": inspect.stdout + inspect.stderr,
        "the store document": json.dumps(_document(name)["data"], default=str),
        "repr": repr(store) + str(store.regions),
    }
    assert "store CheckpointStore(" in shown["flow run logs"]
    for where, text in shown.items():
        assert SECRET not in text, where


# -- a signing store, sync and async ------------------------------------------------------------
def signed_store(tmp_path: Path) -> tuple[CheckpointStore, str]:
    import secrets

    from prefect.blocks.system import Secret

    key = f"result-key-{uuid.uuid4().hex[:8]}"
    Secret(value=secrets.token_hex(32)).save(key)
    a, b = regions(tmp_path, "region-a", "region-b")
    store = CheckpointStore(regions=[str(a), str(b)], write_quorum=2, signing_key=key)
    name = f"signed-{uuid.uuid4().hex[:8]}"
    store.save(name)
    return store, name


def manifest_signatures(store: CheckpointStore, region: str) -> list[Any]:
    return [
        json.loads(file.read_text()).get("signature")
        for path in result_paths(store)
        for file in (Path(region) / "lineages" / store.result_lineage(path) / "manifests").glob("*.json")
    ]


def test_results_in_a_signing_store_are_signed_and_a_forged_record_is_refused(
    prefect_server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from helpers.tamper import reseal

    store, name = signed_store(tmp_path)
    runs: list[int] = []
    x = uuid.uuid4().int % 10**9

    @task(persist_result=True, cache_policy=INPUTS)
    def plus(x: int) -> int:
        runs.append(x)
        return x + 1

    @flow(result_storage=f"checkpoint-store/{name}", persist_result=True)
    def signed(x: int) -> int:
        return plus(x)

    assert signed(x) == x + 1 and signed(x) == x + 1 and runs == [x]
    signatures = manifest_signatures(store, store.regions[0].url)
    # the task's record and each run's flow result
    assert len(signatures) == 3 and all(sig and sig["key_id"] for sig in signatures)

    # someone with write access but not the key replaces a cached record's manifest (digest recomputed)
    [task_path] = [p for p in result_paths(store) if b'"metadata"' in store.read_path(p)]
    for region in store.regions:
        [file] = (Path(region.url) / "lineages" / store.result_lineage(task_path) / "manifests").glob("*.json")
        raw = json.loads(file.read_text())
        raw["metadata"] = {**raw["metadata"], "forged": True}
        raw.pop("signature", None)
        file.write_bytes(reseal(raw))
    with pytest.raises(Exception, match=r"(?i)sign") as caught:
        CheckpointStore.load(name).read_path(task_path)
    assert "forged" not in str(caught.value)
    # Prefect reads the refused record as a miss: the task runs again rather than trusting it, and
    # the refusal is in the run's log (Prefect's cache lookup itself says nothing)
    caplog.clear()
    assert signed(x) == x + 1 and runs == [x, x]
    assert any(
        record.levelname == "ERROR" and "refused" in record.getMessage() and task_path in record.getMessage()
        for record in caplog.records
    ), caplog.text


def test_an_async_flow_persists_and_reuses_results_in_a_signing_store(prefect_server, tmp_path: Path) -> None:
    store, name = signed_store(tmp_path)
    runs: list[int] = []
    x = uuid.uuid4().int % 10**9

    @task(persist_result=True, cache_policy=INPUTS)
    async def plus(x: int) -> int:
        runs.append(x)
        return x + 1

    @flow(result_storage=f"checkpoint-store/{name}", persist_result=True)
    async def signed(x: int) -> int:
        return await plus(x)

    assert asyncio.run(signed(x)) == x + 1
    assert asyncio.run(signed(x)) == x + 1
    assert len(result_paths(store)) == 3, "nothing was persisted"  # the task's record, each run's flow result
    assert runs == [x], "the second run was not a cache hit"

    @flow
    async def checkpoints() -> int:  # the same cause: the async API on a signing store
        loaded = await CheckpointStore.load(name)
        return (await loaded.save_checkpoint({"w": torch.ones(3)}, lineage="signed-async")).version

    assert asyncio.run(checkpoints()) == 1


def test_an_unsaved_store_is_refused_as_result_storage_with_prefects_message(tmp_path: Path) -> None:
    (a,) = regions(tmp_path, "region-a")
    with pytest.raises(TypeError, match="must be persisted server-side"):

        @task(result_storage=CheckpointStore(regions=[str(a)]), persist_result=True)
        def never() -> None: ...


def test_the_audits_retention_keeps_the_latest_version_of_every_result(tmp_path: Path) -> None:
    from prefect_recovery import RetentionPolicy

    a, b = regions(tmp_path, "region-a", "region-b")
    store = CheckpointStore(regions=[str(a), str(b)], write_quorum=2, retention=RetentionPolicy(keep_last=1))
    for version in range(3):  # a cache entry Prefect refreshed twice
        store.write_path("refreshed", f"value {version}".encode())
    store.write_path("written-once", b"only value")
    store.audit()
    assert [info.version for info in store.list(store.result_lineage("refreshed"))] == [3]
    assert store.read_path("refreshed") == b"value 2"
    assert store.read_path("written-once") == b"only value"
    assert store.verify().healthy


def test_a_passed_over_copy_is_in_the_runs_logs_on_the_server(prefect_server, tmp_path: Path) -> None:
    from helpers.live_prefect import wait_for

    store, a, b, _ = saved_store(tmp_path)
    tag = uuid.uuid4().hex

    @task(result_storage=store, persist_result=True, cache_policy=INPUTS)
    def value(tag: str) -> str:
        return "v"

    @flow
    def cached(tag: str) -> str:
        return value(tag)

    cached(tag)
    [path] = result_paths(store)
    for blob in blobs_of(store, path, a):
        flip_byte(blob)
    state = cached(tag, return_state=True)
    assert state.result() == "v"

    def logged() -> str:
        text = flow_run_logs(state.state_details.flow_run_id)
        return text if "passed over" in text else ""

    text = wait_for(logged, 60, "the warning in the flow run's logs")
    assert f"{a}: content does not match its digest" in text and f"served from {b}" in text


def test_a_transaction_commits_its_records_into_the_store_only_when_it_succeeds(prefect_server, tmp_path: Path) -> None:
    from prefect.transactions import transaction

    store, _, _, _ = saved_store(tmp_path)
    tag = uuid.uuid4().hex
    runs: list[str] = []
    rolled_back: list[str] = []

    @task(result_storage=store, persist_result=True, cache_policy=INPUTS)
    def extract(tag: str) -> list[int]:
        runs.append("extract")
        return [1, 2, 3]

    @extract.on_rollback
    def undo(txn: Any) -> None:
        rolled_back.append("extract")

    @task(result_storage=store, persist_result=True, cache_policy=INPUTS)
    def load(rows: list[int], tag: str, fail: bool) -> int:
        runs.append("load")
        if fail:
            raise RuntimeError("warehouse refused the rows")
        return sum(rows)

    @flow
    def etl(tag: str, fail: bool) -> int:
        with transaction():
            return load(extract(tag), tag, fail)

    with pytest.raises(RuntimeError, match="warehouse refused"):
        etl(tag, True)
    assert rolled_back == ["extract"]
    # Only the failed task's exception is stored (Prefect persists it like a value, under its own key);
    # extract's record was staged in the transaction and never committed
    [failure] = [task_value(store, p) for p in result_paths(store)]
    assert isinstance(failure, RuntimeError)
    assert etl(tag, False) == 6 and runs == ["extract", "load", "extract", "load"]
    values = [task_value(store, p) for p in result_paths(store)]
    assert [1, 2, 3] in values and 6 in values and len(values) == 3
    assert etl(tag, False) == 6 and len(runs) == 4  # both committed records are cache hits now


def test_a_refreshed_cache_entry_whose_record_rotted_everywhere_is_recomputed_not_served_stale(
    prefect_server, tmp_path: Path
) -> None:
    store, a, b, _ = saved_store(tmp_path)
    runs: list[int] = []
    tag = uuid.uuid4().hex

    @task(result_storage=store, persist_result=True, cache_policy=INPUTS)
    def exchange_rate(tag: str) -> int:
        runs.append(1)
        return 100 + len(runs)  # a new value each time it really runs

    @flow
    def rates(tag: str, refresh: bool) -> int:
        return exchange_rate.with_options(refresh_cache=refresh)(tag)

    assert rates(tag, False) == 101
    assert rates(tag, True) == 102  # the refreshed record is version 2 of the same path
    [path] = result_paths(store)
    assert [info.version for info in store.list(store.result_lineage(path))] == [1, 2]
    for region in (a, b):  # version 2's manifest rots in every region
        flip_byte(region / "lineages" / store.result_lineage(path) / "manifests" / "000000000002.json", offset=40)

    # the value last written is gone: version 1 is a stale value, never served in its place
    with pytest.raises(ResultUnavailableError) as caught:
        store.read_path(path)
    assert set(caught.value.causes) == {str(a), str(b)} and "manifest of version 2" in str(caught.value)
    # Prefect reads the failure as a miss: the task runs again, and its rewrite is the newest version
    assert rates(tag, False) == 103 and len(runs) == 3
    assert rates(tag, False) == 103 and len(runs) == 3
    assert task_value(store, path) == 103
