"""The store as a torch.distributed.checkpoint (DCP) storage backend (prefect_recovery/distributed).

Single-process saves and loads (no process group) check the format, interop with DCP's own
FileSystemWriter, async_save, partial restore, corruption, signatures and refusals in
milliseconds. Real torchrun jobs (gloo on CPU, tests/helpers/dcp_worker.py) check DDP and FSDP2
with resharding 2 -> 4 -> 2 ranks, and a rank killed or hung between its blob writes and the
commit. Several scenarios share one torchrun job: on a 2-core machine starting the ranks costs
more than the scenarios.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers.tamper import flip_byte, reseal

from prefect_recovery.core.errors import BlobUnavailableError, ManifestSignatureError
from prefect_recovery.core.gc import MIN_GRACE, collect_garbage
from prefect_recovery.core.layout import blob_key, manifest_key
from prefect_recovery.core.region import LocalRegionIO
from prefect_recovery.core.signing import Keyring, hmac_key
from prefect_recovery.core.store import EntryPlan, Store
from prefect_recovery.distributed import (
    METADATA_ENTRY,
    DCPArgumentError,
    DCPMetadataError,
    DCPVersionMismatchError,
    NotADCPCheckpointError,
    UnsafeBytesItemError,
    committed_version,
    dcp_reader,
    dcp_writer,
    rank_errors,
)
from prefect_recovery.distributed.dcp import dcp_tree
from prefect_recovery.training.state_io import save_state

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "helpers" / "dcp_worker.py"
REGIONS = ("eu", "us")

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


# -- helpers ----------------------------------------------------------------------------------------
def region_roots(root: Path) -> list[Path]:
    roots = [root / name for name in REGIONS]
    for path in roots:
        path.mkdir(parents=True, exist_ok=True)
    return roots


def make_store(root: Path, keyring: Keyring | None = None, observers: list[Any] | None = None) -> Store:
    regions = [LocalRegionIO(str(path), name=path.name) for path in region_roots(root)]
    return Store(regions, write_quorum=2, chunk_bytes=1024, keyring=keyring, observers=observers or [])


def trained(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(10, 24), torch.nn.ReLU(), torch.nn.Linear(24, 5))
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(2):
        optim.zero_grad()
        model(torch.randn(6, 10)).pow(2).mean().backward()
        optim.step()
    return model, optim


def state_of(seed: int) -> dict[str, Any]:
    model, optim = trained(seed)
    return {
        "model": model.state_dict(),
        "optim": optim.state_dict(),
        "extra": {"epoch": seed, "note": f"seed {seed}", "mask": torch.arange(seed, seed + 9) % 2 == 0},
    }


def clone(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: clone(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(clone(v) for v in value)
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def assert_same(expected: Any, actual: Any, path: str = "") -> None:
    """Equal states; tensors bit for bit (dtype, shape and bytes)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(expected) == set(actual), path
        for key in expected:
            assert_same(expected[key], actual[key], f"{path}/{key}")
    elif isinstance(expected, list | tuple):
        assert isinstance(actual, list | tuple) and len(expected) == len(actual), path
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            assert_same(e, a, f"{path}/{i}")
    elif isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), path
        assert (expected.dtype, expected.shape) == (actual.dtype, actual.shape), path
        assert torch.equal(expected.reshape(-1).view(torch.uint8), actual.reshape(-1).view(torch.uint8)), path
    else:
        assert expected == actual, path


def load_into(template: dict[str, Any], reader: Any) -> dict[str, Any]:
    target = clone(template)
    dcp.load(target, storage_reader=reader)
    return target


def load_error(template: dict[str, Any], reader: Any) -> BaseException:
    """The one typed error a failed dcp.load reports (DCP wraps it per rank)."""
    with pytest.raises(BaseException) as caught:
        dcp.load(clone(template), storage_reader=reader)
    errors = list(rank_errors(caught.value).values())
    assert len(errors) == 1
    return errors[0]


# -- single process ---------------------------------------------------------------------------------
def test_single_process_save_and_load_are_bit_identical_and_one_manifest_names_every_entry(tmp_path):
    events: list[Any] = []
    store = make_store(tmp_path, observers=[events.append])
    saved = state_of(1)
    metadata = dcp.save(saved, storage_writer=dcp_writer(store, "run", step=7, metadata={"who": "test"}))
    assert committed_version(metadata) == 1
    assert [(e.kind, e.version, e.step) for e in events] == [("checkpoint_committed", 1, 7)]  # telemetry hears it
    later = state_of(2)
    assert committed_version(dcp.save(later, storage_writer=dcp_writer(store, "run", step=8))) == 2

    assert_same(saved, load_into(state_of(3), dcp_reader(store, "run", version=1)))
    assert_same(later, load_into(state_of(3), dcp_reader(store, "run")))  # None: the latest

    manifest, _holders = store.resolve("run", 1)
    assert (manifest.step, manifest.metadata, manifest.tree) == (7, {"who": "test"}, dcp_tree())
    names = {entry.name: entry for entry in manifest.entries}
    weight = names["model.0.weight/@0,0"]
    assert (weight.kind, weight.dtype, weight.shape, weight.component) == ("tensor", "float32", [24, 10], "model")
    assert weight.shard is not None and (weight.shard.global_shape, weight.shard.offsets) == ([24, 10], [0, 0])
    assert names["extra.note"].kind == "bytes"  # DCP's non-tensor items
    assert names[METADATA_ENTRY].kind == "bytes"
    assert {c.name for c in manifest.components} == {"model", "optim", "extra"}
    # The DCP metadata is JSON, not pickle.
    blobs = [(tmp_path / "eu" / blob_key(chunk.digest)).read_bytes() for chunk in names[METADATA_ENTRY].chunks]
    stored = json.loads(b"".join(blobs))
    assert stored["format"] == "prefect-recovery/dcp-metadata"
    assert {"fqn": "model.0.weight", "offset": [0, 0], "entry": "model.0.weight/@0,0"} in stored["storage"]


def test_the_block_gives_the_same_writer_and_reader(tmp_path):
    from prefect_recovery import CheckpointStore

    block = CheckpointStore(regions=[str(path) for path in region_roots(tmp_path)], write_quorum=2)
    saved = state_of(1)
    dcp.save(saved, storage_writer=block.dcp_writer("run", step=1))
    assert block.latest("run").step == 1
    assert_same(saved, load_into(state_of(2), block.dcp_reader("run")))


def test_a_state_saved_by_dcps_filesystem_writer_and_through_the_store_load_the_same(tmp_path):
    store = make_store(tmp_path / "store")
    saved = state_of(1)
    dcp.save(saved, storage_writer=dcp.FileSystemWriter(str(tmp_path / "fs")))
    dcp.save(saved, storage_writer=dcp_writer(store, "run"))
    from_files = load_into(state_of(2), dcp.FileSystemReader(str(tmp_path / "fs")))
    from_store = load_into(state_of(2), dcp_reader(store, "run"))
    assert_same(from_files, from_store)
    assert_same(saved, from_store)
    # Without a template, DCP rebuilds the nesting from the planner's flattening map (planner_data),
    # which the store keeps as JSON: the same structure as from DCP's pickled metadata.
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    rebuilt: list[dict[str, Any]] = [{}, {}]
    readers = [dcp.FileSystemReader(str(tmp_path / "fs")), dcp_reader(store, "run")]
    for into, reader in zip(rebuilt, readers, strict=True):
        _load_state_dict(into, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    assert_same(rebuilt[0], rebuilt[1])
    assert_same(saved["model"], rebuilt[1]["model"])


def test_async_save_commits_through_the_same_writer(tmp_path):
    store = make_store(tmp_path)
    saved = state_of(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metadata = dcp.async_save(saved, storage_writer=dcp_writer(store, "run", step=5)).result()
    assert committed_version(metadata) == 1 and store.latest("run").step == 5
    assert_same(saved, load_into(state_of(2), dcp_reader(store, "run")))


def test_a_partial_restore_reads_only_the_entries_it_asks_for(tmp_path):
    store = make_store(tmp_path)
    saved = state_of(1)
    dcp.save(saved, storage_writer=dcp_writer(store, "run"))
    read: list[str] = []
    real = store.read_entries_into

    def recording(targets, prefer=(), threads=None):
        read.extend(entry.name for entry, _buffer in targets)
        return real(targets, prefer, threads)

    store.read_entries_into = recording  # type: ignore[method-assign]
    model_only = load_into({"model": state_of(2)["model"]}, dcp_reader(store, "run"))
    assert_same(saved["model"], model_only["model"])
    assert sorted(read) == sorted(
        [METADATA_ENTRY] + [f"model.{k}/@{'0,0' if 'weight' in k else '0'}" for k in saved["model"]]
    )


def test_a_corrupted_blob_is_detected_and_another_regions_copy_serves(tmp_path):
    store = make_store(tmp_path)
    saved = state_of(1)
    dcp.save(saved, storage_writer=dcp_writer(store, "run"))
    manifest, _ = store.resolve("run")
    digest = next(e for e in manifest.entries if e.name == "model.0.weight/@0,0").chunks[0].digest
    flip_byte(tmp_path / "eu" / blob_key(digest), 5, 0x01)
    assert_same(saved, load_into(state_of(2), dcp_reader(store, "run")))  # eu's copy fails its digest; us serves
    flip_byte(tmp_path / "us" / blob_key(digest), 5, 0x01)
    error = load_error(state_of(2), dcp_reader(store, "run"))
    assert isinstance(error, BlobUnavailableError) and "corrupt" in str(error)


class _ReadsRecorded(LocalRegionIO):
    """Records each blob read: the thread it ran on and the address of the buffer it filled."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.reads: list[tuple[int, int]] = []

    def read_into(self, key: str, buffer: memoryview, hasher: Any = None) -> int:
        import ctypes
        import threading

        self.reads.append((threading.get_ident(), ctypes.addressof(ctypes.c_char.from_buffer(buffer))))
        return super().read_into(key, buffer, hasher)


def test_a_rank_with_one_reading_thread_reads_on_its_own_thread_straight_into_the_tensors(tmp_path, monkeypatch):
    import threading

    # 64 ranks on this machine: each rank's share of the cores is one reading thread (rank_read_threads).
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    (root,) = region_roots(tmp_path)[:1]
    region = _ReadsRecorded(str(root), name="eu")
    store = Store([region], write_quorum=1, chunk_bytes=1 << 20)
    saved = {"w": torch.randn(3 << 18), "b": torch.randn(7)}  # w: 3 MiB, 3 chunks
    dcp.save(saved, storage_writer=dcp_writer(store, "run"))
    target = {"w": torch.empty_like(saved["w"]), "b": torch.empty_like(saved["b"])}
    region.reads.clear()
    dcp.load(target, storage_reader=dcp_reader(store, "run"))
    assert_same(saved, target)
    start, end = target["w"].data_ptr(), target["w"].data_ptr() + target["w"].nbytes
    assert {thread for thread, _ in region.reads} == {threading.get_ident()}
    assert sum(start <= address < end for _, address in region.reads) == 3  # no temporary buffer, no copy

    manifest, _ = store.resolve("run")
    digest = next(e for e in manifest.entries if e.name.startswith("w/")).chunks[2].digest
    flip_byte(root / blob_key(digest), 9, 0x01)
    error = load_error({"w": torch.empty_like(saved["w"]), "b": torch.empty_like(saved["b"])}, dcp_reader(store, "run"))
    assert isinstance(error, BlobUnavailableError) and "corrupt" in str(error)


def test_a_signed_stores_checkpoint_is_signed_and_a_tampered_one_refused(tmp_path):
    keyring = Keyring(hmac_key("k1", "ab" * 32))
    store = make_store(tmp_path, keyring)
    saved = state_of(1)
    dcp.save(saved, storage_writer=dcp_writer(store, "run", step=1))
    manifest, _ = store.resolve("run")
    assert manifest.signature is not None and manifest.signature.key_id == "k1"
    assert_same(saved, load_into(state_of(2), dcp_reader(store, "run")))
    for region in REGIONS:  # an edit with a recomputed digest: only the signature can tell
        path = tmp_path / region / manifest_key("run", 1)
        raw = json.loads(path.read_bytes())
        raw["step"] = 99
        path.write_bytes(reseal(raw))
    error = load_error(state_of(2), dcp_reader(store, "run", version=1))
    assert isinstance(error, ManifestSignatureError)


def test_a_checkpoint_not_written_by_dcp_is_refused_with_a_typed_error(tmp_path):
    store = make_store(tmp_path)
    save_state(store, {"model": {"w": torch.ones(3)}}, lineage="run")
    error = load_error(state_of(1), dcp_reader(store, "run"))
    assert isinstance(error, NotADCPCheckpointError) and "load_checkpoint" in str(error)


@pytest.mark.parametrize(
    "metadata",
    [
        b"\x80\x04\x95 not json: a pickle",
        json.dumps({"format": "prefect-recovery/dcp-metadata", "format_version": 2}).encode(),
        json.dumps(
            {
                "format": "prefect-recovery/dcp-metadata",
                "format_version": 1,
                "dcp_version": "1.0.0",
                "items": [{"fqn": "w", "kind": "bytes"}],
                "planner_data": None,
                "storage": [{"fqn": "w", "offset": None, "entry": "missing-entry"}],
                "storage_meta": None,
            }
        ).encode(),
    ],
    ids=["pickle", "unknown-version", "names-a-missing-entry"],
)
def test_dcp_metadata_that_does_not_parse_is_refused(tmp_path, metadata):
    store = make_store(tmp_path)
    plan = EntryPlan(name=METADATA_ENTRY, kind="bytes", data=memoryview(metadata))
    store.commit("run", [plan], tree=dcp_tree())
    error = load_error({"w": b"x"}, dcp_reader(store, "run"))
    assert isinstance(error, DCPMetadataError)


class Opaque:
    """A value DCP can only save by pickling a reference to this class."""

    def __init__(self, value: int):
        self.value = value


def test_a_non_tensor_item_that_needs_full_unpickling_is_refused(tmp_path):
    store = make_store(tmp_path)
    dcp.save({"w": torch.ones(2), "thing": Opaque(3)}, storage_writer=dcp_writer(store, "run"))
    error = load_error({"w": torch.zeros(2), "thing": Opaque(0)}, dcp_reader(store, "run"))
    assert isinstance(error, UnsafeBytesItemError) and "thing" in str(error)


# -- torchrun jobs (gloo on CPU) ----------------------------------------------------------------------
def torchrun(root: Path, ranks: int, scenarios: str, *extra: str) -> subprocess.CompletedProcess[str]:
    out = root / "out"
    out.mkdir(parents=True, exist_ok=True)
    regions = ",".join(str(path) for path in region_roots(root))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    command += [str(WORKER), scenarios, "--regions", regions, "--out", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def reports(root: Path, scenario: str) -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted((root / "out").glob(f"{scenario}-rank*.json"))]


@pytest.fixture(scope="module")
def two_rank_job(tmp_path_factory) -> Path:
    """DDP save (sync and async), DDP load, and an FSDP2 save, on 2 ranks."""
    root = tmp_path_factory.mktemp("dcp-jobs")
    done = torchrun(root, 2, "ddp-save,ddp-load,fsdp-save")
    assert done.returncode == 0, done.stderr[-4000:]
    return root


@pytest.fixture(scope="module")
def resharded_jobs(two_rank_job) -> Path:
    """The 2-rank FSDP2 checkpoint loaded on 4 ranks (which save again), then loaded on 2."""
    up = torchrun(two_rank_job, 4, "fsdp-load", "--version", "1", "--saved-world", "2")
    assert up.returncode == 0, up.stderr[-4000:]
    return two_rank_job


def test_ddp_on_two_ranks_saves_once_per_tensor_and_loads_bit_identical(two_rank_job):
    saved = reports(two_rank_job, "ddp-save")
    assert [r["versions"] for r in saved] == [[1, 2], [1, 2]]  # every rank learns the committed versions
    loaded = reports(two_rank_job, "ddp-load")
    assert len(loaded) == 2 and all(r["differences"] == {"1": [], "2": []} for r in loaded)
    store = make_store(two_rank_job)
    manifest, _ = store.resolve("ddp", 1)
    tensors = [e for e in manifest.entries if e.kind == "tensor"]
    # DDP's replicated tensors are written once (DCP's dedup), spread over both ranks, in one manifest.
    assert len({e.name for e in tensors}) == len(tensors)
    assert {e.shard.rank for e in tensors if e.shard} == {0, 1}
    assert [info.step for info in store.list("ddp")] == [3, 4]


def test_ddp_on_two_ranks_with_a_paged_manifest_pages_on_each_rank_and_loads_bit_identical(tmp_path):
    """A store with a low page_entries: each rank writes its own part's pages in write_data, the
    coordinator's manifest lists them (and the metadata's page), and both ranks load bit-identically."""
    from prefect_recovery.distributed.dcp import METADATA_ENTRY

    done = torchrun(tmp_path, 2, "ddp-save,ddp-load", "--page-entries", "4")
    assert done.returncode == 0, done.stderr[-4000:]
    loaded = reports(tmp_path, "ddp-load")
    assert len(loaded) == 2 and all(r["differences"] == {"1": [], "2": []} for r in loaded)
    store = make_store(tmp_path)
    manifest, holders = store.resolve("ddp", 1)
    assert manifest.paged
    assert {tuple(page.ranks) for page in manifest.pages} >= {(0,), (1,)}  # a part per rank, paged apart
    meta = [page for page in manifest.pages if page.first <= METADATA_ENTRY <= page.last and not page.ranks]
    assert [(page.first, page.last, page.entries) for page in meta] == [(METADATA_ENTRY, METADATA_ENTRY, 1)]
    entries = store.manifest_entries(manifest, prefer=holders)
    assert len({e.name for e in entries}) == len(entries) == sum(page.entries for page in manifest.pages)


def test_fsdp2_saved_on_two_ranks_loads_resharded_on_four(resharded_jobs):
    four = reports(resharded_jobs, "fsdp-load")
    assert len(four) == 4 and four[0]["world"] == 4
    assert four[0]["differences"] == []  # model and optimizer equal to the full tensors saved on 2 ranks
    manifest, _ = make_store(resharded_jobs).resolve("fsdp", 1)
    sharded = [e for e in manifest.entries if e.shard and e.shard.global_shape != e.shape]
    assert {e.shard.rank for e in sharded} == {0, 1}  # each rank wrote its own shards


def test_fsdp2_saved_on_four_ranks_loads_resharded_on_two(resharded_jobs):
    version = reports(resharded_jobs, "fsdp-load")[0]["version"]
    for path in (resharded_jobs / "out").glob("fsdp-load-rank*.json"):
        path.unlink()
    down = torchrun(resharded_jobs, 2, "fsdp-load", "--version", str(version), "--saved-world", "4")
    assert down.returncode == 0, down.stderr[-4000:]
    two = reports(resharded_jobs, "fsdp-load")
    assert len(two) == 2 and two[0]["world"] == 2 and two[0]["differences"] == []


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_a_rank_lost_between_its_blobs_and_the_commit_leaves_no_version_and_gc_removes_its_blobs(tmp_path, how):
    # hang: a 10 s process-group timeout bounds the survivor's wait.
    done = torchrun(tmp_path, 2, how, "--timeout", "10")
    assert done.returncode != 0
    store = make_store(tmp_path)
    assert [info.version for info in store.list("fail")] == [1]  # the previous version stays the latest
    assert store.versions("fail").keys() == {1}  # no manifest at all for the lost save
    # The survivor got an error rather than a hang: at once for a killed gloo peer, after the timeout for a hung one.
    survivor = reports(tmp_path, how)
    assert len(survivor) <= 1
    if survivor:  # torchrun may stop it (SIGTERM) before it reports (seen for hang too, under heavy load)
        assert survivor[0]["rank"] == 0 and survivor[0]["error"] == "RuntimeError"
        # kill: gloo says "Connection closed by peer" or "Connection reset by peer"; hang: "Timed out waiting".
        assert ("by peer" if how == "kill" else "Timed out") in survivor[0]["message"]
    orphans = json.loads((tmp_path / "out" / f"rank1-{how}-digests.json").read_text())
    referenced = {c.digest for e in store.resolve("fail", 1)[0].entries for c in e.chunks}
    orphans = [digest for digest in orphans if digest not in referenced]
    assert orphans and all((tmp_path / r / blob_key(d)).exists() for r in REGIONS for d in orphans)
    assert collect_garbage(store).blobs_deleted == {}  # younger than the grace period: a save may still be writing
    collect_garbage(store, grace=MIN_GRACE, now=datetime.now(UTC) + 2 * MIN_GRACE)
    assert not any((tmp_path / r / blob_key(d)).exists() for r in REGIONS for d in orphans)
    assert [info.version for info in store.list("fail")] == [1]


def test_planner_data_json_cannot_carry_is_refused_before_any_blob_is_written(tmp_path):
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    class OpaquePlanner(DefaultSavePlanner):
        def create_local_plan(self):
            # A flattening path JSON cannot carry (a key that is an object).
            return dataclasses.replace(super().create_local_plan(), planner_data={"w": (Opaque(1),)})

    store = make_store(tmp_path)
    with pytest.raises(BaseException) as caught:
        dcp.save({"w": torch.ones(4)}, storage_writer=dcp_writer(store, "run"), planner=OpaquePlanner())
    [error] = rank_errors(caught.value).values()
    assert isinstance(error, DCPMetadataError) and "pickle" in str(error)
    assert not list((tmp_path / "eu").rglob("blobs/*/*/*"))  # refused while planning
    assert store.latest("run") is None


def test_options_the_store_cannot_honour_are_refused(tmp_path):
    store = make_store(tmp_path)
    with pytest.raises(BaseException) as caught:
        dcp.save({"w": torch.ones(2)}, storage_writer=dcp_writer(store, "run"), use_collectives=False)
    assert isinstance(next(iter(rank_errors(caught.value).values())), DCPArgumentError)
    with pytest.raises(DCPArgumentError):
        dcp.save({"w": torch.ones(2)}, storage_writer=dcp_writer(store, "run"), checkpoint_id="other-run")


def test_ranks_that_resolved_different_versions_are_refused(tmp_path):
    from torch.distributed.checkpoint.planner import LoadPlan

    store = make_store(tmp_path)
    reader = dcp_reader(store, "run")
    # What the coordinator gets from two ranks when a commit landed between their resolves.
    plans = [
        LoadPlan(items=[], storage_data="blake3:" + "a" * 64),
        LoadPlan(items=[], storage_data="blake3:" + "b" * 64),
    ]
    with pytest.raises(DCPVersionMismatchError, match="version="):
        reader.prepare_global_plan(plans)
    assert reader.prepare_global_plan(plans[:1]) == plans[:1]


def test_export_of_a_dcp_checkpoint_writes_every_tensor_whole(tmp_path):
    # `prefect-recovery export` of a torch.distributed checkpoint: the manifest's tree names only
    # DCP's metadata, so an export that followed it wrote 0 tensors and exited 0. Every item is
    # exported, nested as saved, sharded tensors joined (H4's FSDP2 case: test_distributed_outside).
    from safetensors.torch import load_file

    store = make_store(tmp_path / "store")
    saved = state_of(3)
    dcp.save(saved, storage_writer=dcp_writer(store, "run", step=7), no_dist=True)
    regions = [arg for root in region_roots(tmp_path / "store") for arg in ("--region", str(root))]
    out = tmp_path / "export"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefect_recovery.cli",
            "export",
            "--lineage",
            "run",
            "--to",
            str(out),
            *regions,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["distributed"] is True and summary["step"] == 7
    document = json.loads((out / "state.json").read_text())
    tensors = load_file(str(out / "tensors.safetensors"))

    def rebuild(node: Any) -> Any:  # the exported tree with its tensors, as a user reads it back
        if not isinstance(node, dict):
            return node  # a plain JSON value
        ((tag, body),) = node.items()
        if tag == "tensor":
            return tensors[body]
        if tag == "dict":
            return {key: rebuild(child) for key, child in body}
        if tag in ("list", "tuple"):
            return [rebuild(child) for child in body]
        return body

    exported = rebuild(document["tree"])
    # 4 weights and biases, (step, exp_avg, exp_avg_sq) per parameter, the mask
    assert summary["tensors"] == len(tensors) == 4 + 4 * 3 + 1
    assert_same(saved["model"], exported["model"])
    assert_same(saved["extra"], exported["extra"])
    moments = exported["optim"]["state"]
    assert_same({str(index): value for index, value in saved["optim"]["state"].items()}, moments)


def test_a_quantized_tensor_is_the_writers_typed_error_and_commits_nothing(tmp_path):
    """Its scale and zero-point live outside its bytes, and no reader could rebuild it from the
    manifest (core/state_tree.py DTYPE_SIZES): refused for the item, before any manifest."""
    store = make_store(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates quantize_per_tensor
        quantized = torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8)
    with pytest.raises(BaseException) as caught:
        dcp.save({"q": quantized, "w": torch.ones(2)}, storage_writer=dcp_writer(store, "run"))
    [error] = rank_errors(caught.value).values()
    assert isinstance(error, DCPArgumentError) and "qint8" in str(error) and "'q'" in str(error)
    assert store.latest("run") is None


# -- delta chunks through DCP (issue 17) --------------------------------------------------------------
def test_a_delta_store_keeps_a_fine_tunes_dcp_saves_as_deltas_and_loads_them_bit_identical(tmp_path):
    """``dcp.save`` through a store with ``delta`` on: each shard chunk that changed little since the
    lineage's latest version is stored as an XOR against that version's chunk (a bf16 fine-tune writes a
    fraction of a full save), every version loads bit for bit, chains stay bounded, and retention + GC
    keep the parents the kept version needs."""
    from datetime import UTC, datetime, timedelta

    from prefect_recovery.core.gc import collect_garbage
    from prefect_recovery.core.manifest import MAX_DELTA_CHAIN
    from prefect_recovery.core.retention import RetentionPolicy, apply_retention, plan_retention
    from prefect_recovery.core.verify import verify_store

    regions = [LocalRegionIO(str(path), name=path.name) for path in region_roots(tmp_path)]
    store = Store(regions, write_quorum=2, chunk_bytes=64 * 1024, codec="auto", delta=True)
    generator = torch.Generator().manual_seed(0)
    master = {f"layers.{i}.weight": torch.randn(384, 384, generator=generator) * 0.02 for i in range(3)}

    def bf16_state() -> dict[str, Any]:
        return {"model": {name: w.to(torch.bfloat16) for name, w in master.items()}, "extra": {"note": "ft"}}

    def fine_tune() -> None:  # a few small steps, as a fine-tune at lr 1e-5 takes them (in fp32 master weights)
        for w in master.values():
            w.add_(torch.randn(w.shape, generator=generator) * 1e-5)

    saved: list[dict[str, Any]] = []
    infos = []
    for _ in range(MAX_DELTA_CHAIN + 3):  # past the longest chain a read resolves
        state = bf16_state()
        writer = dcp_writer(store, "ft", step=len(saved))
        dcp.save(state, storage_writer=writer)
        saved.append(clone(state))
        infos.append(writer.info)
        fine_tune()
    deltas = []  # the versions whose weights are stored as deltas, and what each wrote
    for info in infos:
        manifest, _ = store.resolve("ft", info.version)
        if all(c.parent is not None for e in manifest.entries if e.kind == "tensor" for c in e.chunks):
            deltas.append((info.version, info.bytes_written))
    # every save but the first and the one that restarts the chains (past MAX_DELTA_CHAIN) is a delta save,
    # and writes a fraction of a full one
    assert len(deltas) == len(infos) - 2, deltas
    assert all(written < 0.5 * infos[0].bytes_written for _, written in deltas), (infos[0].bytes_written, deltas)
    for version in range(1, len(saved) + 1):
        manifest, _ = store.resolve("ft", version)
        assert max(c.chain_length() for e in manifest.entries for c in e.chunks) <= MAX_DELTA_CHAIN
        assert_same(saved[version - 1], load_into(bf16_state(), dcp_reader(store, "ft", version=version)))
    assert verify_store(store, decode=True).healthy

    apply_retention(store, plan_retention(store, RetentionPolicy(keep_last=1)))
    collect_garbage(store, now=datetime.now(UTC) + timedelta(days=1))
    assert [info.version for info in store.list("ft")] == [len(saved)]
    assert_same(saved[-1], load_into(bf16_state(), dcp_reader(store, "ft")))  # its parents were kept
    assert verify_store(store, read_data=1.0, decode=True).healthy


def test_ddp_on_two_ranks_with_a_delta_store_loads_bit_identical(tmp_path):
    """Each rank writes its part of the second save as deltas against the first save's chunks, which it
    reads itself; both versions load bit for bit on both ranks and every delta decodes to its digest."""
    from prefect_recovery.core.verify import verify_store

    done = torchrun(tmp_path, 2, "ddp-save,ddp-load", "--delta")
    assert done.returncode == 0, done.stderr[-4000:]
    loaded = reports(tmp_path, "ddp-load")
    assert len(loaded) == 2 and all(r["differences"] == {"1": [], "2": []} for r in loaded)
    store = make_store(tmp_path)
    manifest, _ = store.resolve("ddp", 2)
    deltas = [(e.shard.rank, c) for e in manifest.entries if e.kind == "tensor" for c in e.chunks if c.parent]
    assert {rank for rank, _ in deltas} == {0, 1}  # both ranks wrote delta chunks
    assert verify_store(store, decode=True).healthy


def test_ddp_on_two_ranks_with_a_paged_delta_store_finds_each_ranks_base_in_its_own_pages(tmp_path):
    """With a paged manifest each rank reads only its own pages of the base (and the coordinator's):
    both ranks still write delta chunks, and both versions load bit for bit on both ranks."""
    from prefect_recovery.core.verify import verify_store

    done = torchrun(tmp_path, 2, "ddp-save,ddp-load", "--delta", "--page-entries", "4")
    assert done.returncode == 0, done.stderr[-4000:]
    loaded = reports(tmp_path, "ddp-load")
    assert len(loaded) == 2 and all(r["differences"] == {"1": [], "2": []} for r in loaded)
    store = make_store(tmp_path)
    manifest, holders = store.resolve("ddp", 2)
    assert manifest.paged and {tuple(page.ranks) for page in manifest.pages} >= {(0,), (1,)}
    entries = store.manifest_entries(manifest, prefer=holders)
    deltas = [(e.shard.rank, c) for e in entries if e.kind == "tensor" for c in e.chunks if c.parent]
    assert {rank for rank, _ in deltas} == {0, 1}
    assert verify_store(store, decode=True).healthy
