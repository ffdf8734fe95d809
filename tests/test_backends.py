"""The checkpoint store on real protocol peers: S3 (moto), GCS (gcp-storage-emulator), Azure Blob (azurite).

One suite runs against four stores (``STORES``): two buckets of one backend (``s3``, ``gcs``,
``azure``; ``write_quorum`` 2), and a ``mixed`` store of a local directory, S3, GCS and Azure
(``write_quorum`` 3). The emulators run once for the module (tests/helpers/emulators.py); each
test works under its own prefix. Damage (a corrupted or deleted blob) is done through another
client of the same storage, as another process would.

What each backend guarantees for a create-only write is pinned by ``test_create_only_*``:
moto and azurite refuse a second create (``FileExistsError``), the GCS emulator overwrites
(it ignores ``ifGenerationMatch=0``, which Google Cloud Storage itself enforces).

"Region down" scenarios run in child processes started when the module starts (they overlap
the other tests): each operation must return within ``DOWN_LIMIT_S`` seconds, or the child
reports the operation that was still running and exits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.emulators import (
    Emulator,
    refused_endpoint,
    running_emulators,
    unique,
    unreachable_emulator,
)
from helpers.step_values import differing_leaves, same

from prefect_recovery import CheckpointStore
from prefect_recovery.core import open_region
from prefect_recovery.core.layout import blob_key
from prefect_recovery.core.region import PutOutcome

KINDS = ("s3", "gcs", "azure")
STORES = (*KINDS, "mixed")
BUCKETS = ("ckpt-a", "ckpt-b")
CHUNK = 4096  # small chunks: every tensor of the test state spans several blobs
DOWN_LIMIT_S = float(os.environ.get("BACKENDS_DOWN_LIMIT_S", "45"))


# -- states -------------------------------------------------------------------------------------
def make_state(seed: int) -> dict[str, Any]:
    """A training-like state: several dtypes, multi-chunk tensors, special floats, bytes, scalars."""
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {
            "weight": torch.randn(32, 40, generator=g),  # 5 KiB: 2 chunks
            "bias": torch.randn(40, generator=g).to(torch.bfloat16),
            "embedding": torch.randint(-(2**40), 2**40, (100,), generator=g, dtype=torch.int64),
            "mask": torch.rand(33, generator=g) > 0.5,
        },
        "optimizer": {
            "state": {0: {"exp_avg": torch.randn(32, 40, generator=g), "step": torch.tensor(float(seed))}},
            "param_groups": [{"lr": 1e-3 * (seed + 1), "betas": (0.9, 0.999), "params": [0]}],
        },
        "special": torch.tensor([float("nan"), float("-inf"), -0.0, 1e-45, seed]),
        "rng": bytes(range(256)) + seed.to_bytes(4, "little"),
        "step": seed,
        "note": f"state {seed}",
        "empty": torch.empty(0, 3),
        "nothing": None,
    }


def assert_same(loaded: Any, expected: Any) -> None:
    assert same(loaded, expected), f"differs at {differing_leaves(loaded, expected)}"


# -- stores -------------------------------------------------------------------------------------
@dataclass
class Place:
    """One region of a test store: its block config and a second client to reach its objects."""

    name: str
    url: str
    storage_options: dict[str, Any]
    emulator: Emulator | None  # None: a local directory
    _other: Any = None

    @property
    def other_client(self) -> Any:
        """A filesystem instance of its own, not the store's: damage comes from outside the store."""
        if self._other is None:
            self._other = self.emulator.fs()
        return self._other

    def config(self, own_client: bool = False) -> dict[str, Any]:
        options = dict(self.storage_options)
        if own_client and self.emulator is not None:
            options["skip_instance_cache"] = True  # a client of its own, as in another process
        return {"url": self.url, "storage_options": options, "name": self.name}

    def path(self, key: str) -> str:
        return f"{self.url.split('://', 1)[1]}/{key}" if self.emulator else f"{self.url}/{key}"

    def read(self, key: str) -> bytes:
        if self.emulator is None:
            return Path(self.path(key)).read_bytes()
        return self.other_client.cat_file(self.path(key))

    def overwrite(self, key: str, data: bytes) -> None:
        if self.emulator is None:
            Path(self.path(key)).write_bytes(data)
        else:
            self.other_client.pipe_file(self.path(key), data)

    def remove(self, key: str) -> None:
        if self.emulator is None:
            Path(self.path(key)).unlink()
        else:
            self.other_client.rm_file(self.path(key))


@dataclass
class Layout:
    places: list[Place]
    quorum: int

    def store(self, own_clients: bool = False) -> CheckpointStore:
        return CheckpointStore(
            regions=[place.config(own_clients) for place in self.places],
            write_quorum=self.quorum,
            chunk_bytes=CHUNK,
        )


def places_for(kind: str, emulators: dict[str, Emulator], prefix: str, local: Path) -> tuple[list[Place], int]:
    if kind == "mixed":
        local.mkdir(parents=True, exist_ok=True)
        places = [Place("local", str(local), {}, None)]
        for cloud in KINDS:
            em = emulators[cloud]
            places.append(Place(cloud, em.url_for(prefix, BUCKETS[0]), em.storage_options, em))
        return places, 3
    em = emulators[kind]
    return [Place(f"{kind}-{b[-1]}", em.url_for(prefix, b), em.storage_options, em) for b in BUCKETS], 2


@pytest.fixture(scope="module")
def emulators(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Emulator]]:
    with running_emulators(KINDS, BUCKETS, log_dir=tmp_path_factory.mktemp("emulator-logs")) as running:
        yield running


@pytest.fixture(params=STORES)
def layout(request: pytest.FixtureRequest, emulators: dict[str, Emulator], tmp_path: Path) -> Layout:
    for em in emulators.values():
        if not em.alive:
            pytest.fail(f"the {em.kind} emulator has exited ({em.process.returncode}){em.log_tail()}")
    places, quorum = places_for(request.param, emulators, unique("t"), tmp_path / "local-region")
    return Layout(places, quorum)


def blob_keys(store: CheckpointStore, lineage: str, version: int | None = None) -> list[str]:
    manifest, _holders = store.core.resolve(lineage, version)
    return sorted({blob_key(chunk.digest) for entry in manifest.entries for chunk in entry.chunks})


# -- the suite, per store -----------------------------------------------------------------------
def test_round_trip_list_and_latest(layout: Layout) -> None:
    store = layout.store()
    reader = layout.store(own_clients=True)  # a long-lived client of its own, as another process
    first, second = make_state(1), make_state(2)

    info = store.save(first, lineage="run", step=10)
    assert (info.version, info.step, info.lagging) == (1, 10, {})
    assert info.regions == [place.name for place in layout.places]
    assert_same(store.load(lineage="run"), first)
    assert_same(reader.load(lineage="run"), first)

    info2 = store.save(second, lineage="run", step=20, metadata={"epoch": 2})
    assert info2.version == 2
    listed = store.list("run")
    assert [(i.version, i.step) for i in listed] == [(1, 10), (2, 20)]
    assert listed[-1].metadata == {"epoch": 2}
    assert store.latest("run").version == 2
    assert store.lineages() == ["run"]

    assert reader.latest("run").version == 2  # no stale listing of the version it read before
    assert_same(reader.load(lineage="run"), second)
    assert_same(reader.load(lineage="run", version=1), first)
    assert_same(reader.load(lineage="run", keys=["model"]), {"model": second["model"]})


def test_unchanged_save_writes_no_bytes(layout: Layout) -> None:
    store = layout.store()
    state = make_state(3)
    first = store.save(state, lineage="dedup", step=1)
    assert first.bytes_written and first.bytes_written > 0

    again = store.save(state, lineage="dedup", step=2)
    assert (again.version, again.bytes_written) == (2, 0)

    state["model"]["bias"] = state["model"]["bias"] + 1  # one small tensor changed: only it is written
    changed = store.save(state, lineage="dedup", step=3)
    assert 0 < changed.bytes_written <= state["model"]["bias"].nbytes * len(layout.places)


def _damage_one_blob_per_region(layout: Layout, store: CheckpointStore, action: str) -> dict[str, bytes]:
    """Damage one blob in each region (a different blob each), so every blob keeps intact copies."""
    keys = blob_keys(store, "damaged")
    assert len(keys) >= len(layout.places)
    originals = {}
    for place, key in zip(layout.places, keys, strict=False):
        originals[key] = good = place.read(key)
        if action == "corrupt":  # same size, one bit flipped: only the digest can tell
            place.overwrite(key, bytes([good[0] ^ 1]) + good[1:])
        else:
            place.remove(key)
    return originals


@pytest.mark.parametrize("action", ["corrupt", "delete"])
def test_damaged_blob_in_one_region_is_read_elsewhere_and_repaired(layout: Layout, action: str) -> None:
    store = layout.store()
    state = make_state(4)
    store.save(state, lineage="damaged", step=1)
    originals = _damage_one_blob_per_region(layout, store, action)

    assert_same(layout.store(own_clients=True).load(lineage="damaged"), state)

    report = store.verify()
    assert not report.healthy
    kind = "corrupt" if action == "corrupt" else "missing"
    damaged = {(p.region, p.object) for p in report.problems if p.kind == kind and p.object.startswith("blobs/")}
    expected = {(place.name, key) for place, key in zip(layout.places, originals, strict=True)}
    assert damaged == expected, report.problems
    assert len(report.problems) == len(expected), report.problems

    repaired = store.verify(repair=True)
    assert all(p.repaired for p in repaired.problems), repaired.problems
    after = store.verify()
    assert after.healthy and not after.problems, after.problems
    for place, (key, good) in zip(layout.places, originals.items(), strict=True):
        assert place.read(key) == good
    assert_same(store.load(lineage="damaged"), state)


def test_put_if_absent_is_create_only(layout: Layout) -> None:
    key = f"probe/{unique('obj')}"
    for place in layout.places:
        region = open_region(place.url, place.storage_options, place.name)
        assert region.put_if_absent(key, b"first") is PutOutcome.CREATED
        assert region.put_if_absent(key, b"second, longer") is PutOutcome.EXISTED
        assert region.get(key) == b"first"
        assert place.read(key) == b"first"


def test_concurrent_writers_of_one_lineage_lose_no_version(layout: Layout, request: pytest.FixtureRequest) -> None:
    """Two writers (each with its own clients, as two processes) commit the same lineage at once."""
    if request.node.callspec.params["layout"] == "gcs":
        # Two buckets of the GCS emulator, which ignores ifGenerationMatch=0 (pinned by
        # test_create_only_gcs_emulator_ignores_if_generation_match_and_overwrites): the store's read-back
        # catches a manifest overwritten before it reads it back, not one overwritten after, so two writers
        # racing for one version can both think they created it. Google Cloud Storage enforces the
        # precondition; this emulator cannot show it. Seen once in a fresh-clone rehearsal under load.
        request.applymarker(
            pytest.mark.xfail(reason="the GCS emulator ignores create-only preconditions", strict=False)
        )
    writers = [layout.store(own_clients=True) for _ in range(2)]
    saves_each = 2
    barrier = threading.Barrier(len(writers))

    def write(index: int) -> list[tuple[int, dict[str, Any]]]:
        barrier.wait()
        done = []
        for n in range(saves_each):
            state = make_state(100 * (index + 1) + n)
            done.append((writers[index].save(state, lineage="race", step=n).version, state))
        return done

    with ThreadPoolExecutor(len(writers)) as pool:
        results = [item for items in pool.map(write, range(len(writers))) for item in items]

    versions = [version for version, _state in results]
    assert len(set(versions)) == len(versions), f"two saves were given the same version: {sorted(versions)}"
    reader = layout.store(own_clients=True)
    assert [info.version for info in reader.list("race")] == sorted(versions)
    for version, state in results:
        assert_same(reader.load(lineage="race", version=version), state)


# -- create-only, per backend, straight through fsspec ---------------------------------------------
def _create_twice(em: Emulator) -> tuple[BaseException | None, bytes]:
    fs = em.fs()
    path = f"{BUCKETS[0]}/{unique('create-only')}/object"
    fs.pipe_file(path, b"first", mode="create")
    try:
        fs.pipe_file(path, b"second", mode="create")
    except Exception as exc:
        return exc, fs.cat_file(path)
    return None, fs.cat_file(path)


def test_create_only_s3_moto_refuses_second_create_with_file_exists_error(emulators: dict[str, Emulator]) -> None:
    """S3 (moto, as AWS): ``If-None-Match: *`` is enforced; a second create gets 412, i.e. FileExistsError."""
    error, content = _create_twice(emulators["s3"])
    assert isinstance(error, FileExistsError), error
    assert content == b"first"


def test_create_only_azurite_refuses_second_create_with_file_exists_error(emulators: dict[str, Emulator]) -> None:
    """Azure Blob (azurite, as Azure): ``overwrite=False`` is enforced; a second create is FileExistsError."""
    error, content = _create_twice(emulators["azure"])
    assert isinstance(error, FileExistsError), error
    assert content == b"first"


def test_create_only_gcs_emulator_ignores_if_generation_match_and_overwrites(emulators: dict[str, Emulator]) -> None:
    """GCS emulator: gcsfs sends ``ifGenerationMatch=0``, the emulator ignores it and the second create
    silently replaces the object. (Google Cloud Storage itself answers 412.) The store must not rely on it:
    RegionIO reads ``gs://`` writes back (see test_concurrent_writers_of_one_lineage_lose_no_version)."""
    error, content = _create_twice(emulators["gcs"])
    assert error is None
    assert content == b"second"


# -- a region that is down --------------------------------------------------------------------------
# The child imports the core only (no torch, no Prefect: a fraction of the start-up CPU), saves
# bytes entries through the core Store and prints one JSON line per operation. A watchdog prints
# the operation still running after the limit and exits at once, whatever the clients are doing.
DOWN_CHILD = r"""
import json, os, random, sys, threading, time
from prefect_recovery.core import EntryPlan, QuorumNotMetError, Store, open_region

config = json.loads(sys.argv[1])
regions = [open_region(r["url"], r["storage_options"], r["name"]) for r in config["regions"]]
met = Store(regions, write_quorum=len(regions) - 1, chunk_bytes=config["chunk"])
unmet = Store(regions, write_quorum=len(regions), chunk_bytes=config["chunk"])
lineage, limit = config["lineage"], config["limit"]
first = {f"part-{i}": random.Random(i).randbytes(3000 * i) for i in range(1, 4)}
second = {name: data[::-1] for name, data in first.items()}

def plan(state):
    return [EntryPlan(name=name, kind="bytes", data=memoryview(data)) for name, data in state.items()]

def save_with_quorum():
    info = met.commit(lineage, plan(first), step=1)
    return {"version": info.version, "regions": info.regions, "lagging": sorted(info.lagging)}

def save_without_quorum():
    try:
        unmet.commit(lineage, plan(second), step=2)
    except QuorumNotMetError as exc:
        return {"error": type(exc).__name__, "causes": sorted(exc.causes), "message": str(exc)[:2000]}
    return {"error": None}

def load():
    manifest, holders = met.resolve(lineage)
    buffers = {entry.name: bytearray(entry.size) for entry in manifest.entries}
    met.read_entries_into([(entry, memoryview(buffers[entry.name])) for entry in manifest.entries], holders)
    return {"version": manifest.version, "same_as_first": {n: bytes(b) for n, b in buffers.items()} == first}

for name, operation in [
    ("save with quorum met", save_with_quorum), ("save without quorum", save_without_quorum), ("load", load)
]:
    def overdue(name=name):
        print(json.dumps({"op": name, "overdue_s": limit}), flush=True)
        os._exit(3)
    watchdog = threading.Timer(limit, overdue)
    watchdog.daemon = True
    started = time.monotonic()
    watchdog.start()
    try:
        result = operation()
    except Exception as exc:
        result = {"raised": f"{type(exc).__name__}: {exc}"[:2000]}
    watchdog.cancel()
    print(json.dumps({"op": name, "seconds": round(time.monotonic() - started, 2), **result}), flush=True)
os._exit(0)  # no waiting for client calls still retrying the down region in the background
"""


@dataclass
class DownRun:
    kind: str
    down: str  # the down region's name
    process: subprocess.Popen
    log: Path

    def results(self, timeout: float) -> dict[str, dict[str, Any]]:
        try:
            out, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
            out, _ = self.process.communicate()
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        return {line["op"]: line for line in lines}

    def stderr_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def down_layout(kind: str, emulators: dict[str, Emulator], endpoint: str, local: Path) -> tuple[list[dict], str]:
    prefix = unique("down")
    if kind == "mixed":  # the S3 region is down, between the local and the other clouds
        places, _ = places_for("mixed", emulators, prefix, local)
        regions = [place.config() for place in places]
        dead = unreachable_emulator("s3", endpoint, BUCKETS[0])
        regions[1] = {"url": dead.url_for(prefix), "storage_options": dead.storage_options, "name": "s3-down"}
        return regions, "s3-down"
    places, _ = places_for(kind, emulators, prefix, local)
    dead = unreachable_emulator(kind, endpoint, BUCKETS[0])
    down = {"url": dead.url_for(prefix), "storage_options": dead.storage_options, "name": f"{kind}-down"}
    return [place.config() for place in places] + [down], f"{kind}-down"


@pytest.fixture(scope="module")
def down_runs(
    request: pytest.FixtureRequest, emulators: dict[str, Emulator], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, DownRun]]:
    """Start the selected region-down scenarios at once, in children; the tests collect the results."""
    wanted = [
        item.callspec.params["down_kind"]
        for item in request.session.items
        if item.module is request.module and getattr(item, "originalname", "") == "test_region_down"
    ]
    tmp = tmp_path_factory.mktemp("down")
    runs: dict[str, DownRun] = {}
    with refused_endpoint() as endpoint:
        for kind in dict.fromkeys(wanted):
            regions, down = down_layout(kind, emulators, endpoint, tmp / f"local-{kind}")
            config = {"regions": regions, "lineage": "down", "limit": DOWN_LIMIT_S, "chunk": CHUNK}
            log = tmp / f"{kind}.stderr"
            with open(log, "wb") as err:
                process = subprocess.Popen(
                    [sys.executable, "-c", DOWN_CHILD, json.dumps(config)],
                    stdout=subprocess.PIPE,
                    stderr=err,
                    text=True,
                    start_new_session=True,
                )
            runs[kind] = DownRun(kind, down, process, log)
        try:
            yield runs
        finally:
            for run in runs.values():
                if run.process.poll() is None:
                    os.killpg(run.process.pid, 9)
                    run.process.wait()


@pytest.fixture(scope="module", autouse=True)
def _start_down_runs_early(down_runs: dict[str, DownRun]) -> None:
    """Instantiated before the module's first test, so the children overlap the rest of the suite."""


DOWN_CASES = [
    "s3",  # the down S3 region is configured to fail fast (FAST_FAIL_OPTIONS): a single botocore attempt
    "gcs",  # RegionIO builds gcsfs with a single try per request (region.CLIENT_DEFAULTS)
    "azure",  # RegionIO sets the BlobServiceClient's retry_total to 0 (region.CLIENT_DEFAULTS)
    "mixed",  # local, S3 (down, fast-failing), GCS, Azure; write_quorum 3 (and 4 for the refused save)
]


@pytest.mark.parametrize("down_kind", DOWN_CASES)
def test_region_down(down_kind: str, down_runs: dict[str, DownRun]) -> None:
    """One region's endpoint refuses connections: a save with quorum commits and names it lagging, a save
    without quorum raises QuorumNotMetError, a load reads the others; each within DOWN_LIMIT_S seconds."""
    run = down_runs[down_kind]
    results = run.results(timeout=3 * DOWN_LIMIT_S + 60)
    where = f"\nresults: {json.dumps(results, indent=1)}\nchild stderr tail:\n{run.stderr_tail()}"
    overdue = [op for op, line in results.items() if "overdue_s" in line]
    if overdue:
        pytest.fail(f"{overdue[0]!r} with region {run.down} down did not return within {DOWN_LIMIT_S} s{where}")
    assert len(results) == 3, where

    saved = results["save with quorum met"]
    assert saved.get("version") == 1, where
    assert saved["lagging"] == [run.down], where
    assert run.down not in saved["regions"], where

    refused = results["save without quorum"]
    assert refused.get("error") == "QuorumNotMetError", where
    assert run.down in refused["causes"], where

    loaded = results["load"]
    assert (loaded.get("version"), loaded.get("same_as_first")) == (1, True), where
