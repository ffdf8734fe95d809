"""Issue 14 tried from outside: a DCP user's own FSDP2 rank script and a user's Checkpointer script.

Real torchrun jobs (gloo on CPU), each rank script written here as a user would write it from
docs/DISTRIBUTED.md, not the shipped test workloads. Cases the other distributed tests do not
cover: a 2-rank FSDP2 + user DTensor + non-tensor objects checkpoint (``dcp.async_save`` then
``dcp.save``) loaded resharded on 3 ranks and in one process; a shard blob of one rank damaged in
every region (every rank gets the typed error, none hangs); a save while one of two regions is
broken at quorum 2 (typed error on every rank, nothing committed) and at quorum 1 (committed,
lagging); the CLI (ls, verify, export) on the distributed checkpoint. Every subprocess has a timeout.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers.tamper import flip_byte

from prefect_recovery.core.errors import BlobUnavailableError, QuorumNotMetError, RegionUnavailableError
from prefect_recovery.core.layout import blob_key, manifest_key
from prefect_recovery.core.region import LocalRegionIO
from prefect_recovery.core.store import Store
from prefect_recovery.distributed import dcp_reader, dcp_writer

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 180  # a hung gloo collective must not hang pytest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

DCP_USER_SCRIPT = r'''"""A DCP user's rank script: FSDP2, a DTensor and objects through the store's DCP backend."""

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from prefect_recovery.core.region import LocalRegionIO
from prefect_recovery.core.store import Store
from prefect_recovery.distributed import committed_version, dcp_reader, dcp_writer, rank_errors

scenario, root, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank, world = dist.get_rank(), dist.get_world_size()
mesh = init_device_mesh("cpu", (world,))


def store(name: str, quorum: int) -> Store:
    regions = [LocalRegionIO(str(root / name / r), name=r) for r in ("eu", "us")]
    return Store(regions, write_quorum=quorum, chunk_bytes=256)


def model_and_optim(seed: int):
    torch.manual_seed(seed)
    # 7 and 5 rows: FSDP2 shards of unequal length on 2 and on 3 ranks.
    model = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=0.02)


def train(model, optim, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed * 100 + rank)
    for _ in range(steps):
        optim.zero_grad()
        model(torch.randn(4, 6, generator=generator)).square().mean().backward()
        optim.step()


def state_of(model, optim, fill: float | None = None):
    msd, osd = get_state_dict(model, optim)
    rows = torch.arange(7 * 3, dtype=torch.float32).reshape(7, 3).bfloat16()
    cols = torch.arange(4 * 5, dtype=torch.float64).reshape(4, 5) / 3  # 5 columns: split 3+2, then 2+2+1
    kept = torch.tensor([[1, -2], [3, 2**40]], dtype=torch.int64)
    extra = {
        "epoch": 3,
        "name": "rün/1 ✓",
        "nested": {"list": [1, 2.5, "x", None], "flags": {"on": True}},
        "mask": torch.tensor([True, False, True]),
        "ids": torch.arange(5, dtype=torch.int64) * (2**40),
        "empty": torch.empty(0, 3),
        "half": torch.linspace(-2, 2, 9).bfloat16(),
    }
    if fill is not None:  # a load template: other values of the same kinds
        rows = torch.full_like(rows, fill)
        cols, kept = torch.full_like(cols, fill), torch.zeros_like(kept)
        extra = {
            "epoch": -1,
            "name": "",
            "nested": {"list": [0, 0.0, "", 1], "flags": {"on": False}},
            "mask": torch.zeros(3, dtype=torch.bool),
            "ids": torch.zeros(5, dtype=torch.int64),
            "empty": torch.empty(0, 3),
            "half": torch.zeros(9, dtype=torch.bfloat16),
        }
    return {
        "model": msd,
        "optim": osd,
        "rows": distribute_tensor(rows, mesh, [Shard(0)]),  # a user's own DTensor, 7 rows over the ranks
        "cols": distribute_tensor(cols, mesh, [Shard(1)]),
        "kept": distribute_tensor(kept, mesh, [Replicate()]),
        "extra": extra,
    }


def full(state):
    """Every DTensor made whole: what a resharded load must reproduce."""
    if isinstance(state, dict):
        return {k: full(v) for k, v in state.items()}
    if isinstance(state, list):
        return [full(v) for v in state]
    if hasattr(state, "full_tensor"):
        return state.full_tensor()
    return state.detach().clone() if isinstance(state, torch.Tensor) else state


def failure(exc: BaseException) -> dict:
    return {str(r): [type(e).__name__, str(e)[:400]] for r, e in rank_errors(exc).items()}


report: dict = {"rank": rank, "world": world}
if scenario == "save":
    good = store("good", 2)
    model, optim = model_and_optim(1)
    train(model, optim, 2, seed=1)
    state = state_of(model, optim)
    # async_save, as DISTRIBUTED.md says the writer supports
    v1 = dcp.async_save(state, storage_writer=dcp_writer(good, "fsdp", step=2)).result()
    whole = full(state)  # full_tensor is a collective: every rank
    if rank == 0:
        torch.save(whole, out / "v1.pt")
    train(model, optim, 1, seed=2)
    state = state_of(model, optim)
    v2 = dcp.save(state, storage_writer=dcp_writer(good, "fsdp", step=3))
    whole = full(state)
    if rank == 0:
        torch.save(whole, out / "v2.pt")
    report["versions"] = [committed_version(v1), committed_version(v2)]
    # A user's mistake: a lineage per rank in one dcp.save (one manifest cannot land in both).
    try:
        dcp.save(state, storage_writer=dcp_writer(good, f"mine-{rank}", step=3))
        report["per_rank_lineage"] = "saved"
    except BaseException as exc:
        report["per_rank_lineage"] = failure(exc)
    # One of two regions is broken (the test put a file where its directory was).
    for name, quorum in (("broken", 2), ("lenient", 1)):
        try:
            done = dcp.save(state, storage_writer=dcp_writer(store(name, quorum), "q", step=3))
            report[name] = {"version": committed_version(done)}
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            report[name] = {"error": failure(exc)}
elif scenario == "load":
    good = store("good", 2)
    model, optim = model_and_optim(99)
    train(model, optim, 1, seed=5)  # optimizer state exists, with other values
    state = state_of(model, optim, fill=-7.0)
    dcp.load(state, storage_reader=dcp_reader(good, "fsdp", version=1))
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = get_state_dict(model, optim, options=options)
    loaded = {"model": msd, "optim": osd, **{k: state[k].full_tensor() for k in ("rows", "cols", "kept")}}
    loaded["extra"] = full(state["extra"])
    if rank == 0:
        torch.save(loaded, out / f"loaded-{world}.pt")
    # Version 2 has a shard blob the test damaged in every region: every rank must fail, none hang.
    try:
        dcp.load(state_of(model, optim, fill=0.0), storage_reader=dcp_reader(good, "fsdp", version=2))
        report["damaged"] = "loaded"
    except BaseException as exc:
        report["damaged"] = failure(exc)
elif scenario == "commit-kill":
    # Test instrumentation: rank 0, the coordinator, dies (SIGKILL) in the middle of the commit,
    # after the manifest landed in region eu (the arbiter) and before it reaches us.
    import os
    import signal

    class DiesOnManifest(LocalRegionIO):
        armed = False

        def put_if_absent(self, key, data):
            if DiesOnManifest.armed and rank == 0 and "/manifests/" in key:
                os.kill(os.getpid(), signal.SIGKILL)
            return super().put_if_absent(key, data)

    regions = [LocalRegionIO(str(root / "ck" / "eu"), name="eu"), DiesOnManifest(str(root / "ck" / "us"), name="us")]
    ck = Store(regions, write_quorum=2, chunk_bytes=256)
    model, optim = model_and_optim(1)
    train(model, optim, 1, seed=1)
    state = state_of(model, optim)
    dcp.save(state, storage_writer=dcp_writer(ck, "ck", step=1))
    whole = full(state)
    if rank == 0:
        torch.save(whole, out / "ck-v1.pt")
    train(model, optim, 1, seed=2)
    DiesOnManifest.armed = True
    dcp.save(state_of(model, optim), storage_writer=dcp_writer(ck, "ck", step=2))
    report["survived"] = True
elif scenario == "after-commit-kill":
    ck = store("ck", 2)
    model, optim = model_and_optim(99)
    train(model, optim, 1, seed=5)
    state = state_of(model, optim, fill=3.0)
    loaded = dcp.load(state, storage_reader=dcp_reader(ck, "ck"))  # the latest consistent version
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    whole = full(state_of(model, optim) | {k: state[k] for k in ("rows", "cols", "kept", "extra")})
    if rank == 0:
        torch.save(whole, out / "ck-loaded.pt")
    train(model, optim, 1, seed=2)
    report["saved"] = committed_version(dcp.save(state_of(model, optim), storage_writer=dcp_writer(ck, "ck", step=2)))
(out / f"{scenario}-{world}-rank{rank}.json").write_text(json.dumps(report))
dist.barrier()  # every rank is done: the job's work and reports are complete
sys.stdout.flush()
sys.stderr.flush()
# torch 2.13's gloo teardown sometimes aborts a finished rank ("terminate called without an active
# exception", SIGABRT; seen about 1 load in 10 with DCP's own FileSystemReader too): skip it.
os._exit(0)
'''


def open_store(root: Path, name: str, quorum: int) -> Store:
    regions = [LocalRegionIO(str(root / name / r), name=r) for r in ("eu", "us")]
    return Store(regions, write_quorum=quorum, chunk_bytes=256)


def launch(command: list[str], **options: Any) -> subprocess.CompletedProcess[str]:
    """``subprocess.run`` of a torchrun job, once more if its rendezvous port was taken meanwhile
    (``--standalone`` picks a free port, then binds it: another job on the machine can win the race)."""
    done = subprocess.run(command, **options)
    if done.returncode != 0 and "EADDRINUSE" in done.stdout + done.stderr:
        done = subprocess.run(command, **options)
    return done


def torchrun(script: Path, ranks: int, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", str(script)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    return launch([*command, *args], cwd=script.parent, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "prefect_recovery.cli", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)


def differences(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Where two states differ: tensors bit for bit (dtype, shape, bytes), other values by ==."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict) or set(expected) != set(actual):
            return [f"{path}: keys differ"]
        return [d for k in expected for d in differences(expected[k], actual[k], f"{path}/{k}")]
    if isinstance(expected, list | tuple):
        if not isinstance(actual, list | tuple) or len(expected) != len(actual):
            return [f"{path}: lengths differ"]
        pairs = enumerate(zip(expected, actual, strict=True))
        return [d for i, (e, a) in pairs for d in differences(e, a, f"{path}/{i}")]
    if isinstance(expected, torch.Tensor):
        same = (
            isinstance(actual, torch.Tensor)
            and (expected.dtype, expected.shape) == (actual.dtype, actual.shape)
            and torch.equal(
                expected.contiguous().reshape(-1).view(torch.uint8), actual.contiguous().reshape(-1).view(torch.uint8)
            )
        )
        return [] if same else [f"{path}: tensors differ"]
    return [] if expected == actual else [f"{path}: {expected!r} != {actual!r}"]


def emptied(value: Any) -> Any:
    """A load template: the same structure, every tensor zeroed and every other leaf changed."""
    if isinstance(value, dict):
        return {k: emptied(v) for k, v in value.items()}
    if isinstance(value, list):
        return [emptied(v) for v in value]
    if isinstance(value, torch.Tensor):
        return torch.zeros_like(value)
    return None if value is not None else 0


@pytest.fixture(scope="module")
def dcp_jobs(tmp_path_factory) -> Path:
    """2 ranks save (FSDP2, a DTensor, objects; also into two stores with a broken region), the test
    damages one shard blob of version 2, then 3 ranks load version 1 resharded and try version 2."""
    root = tmp_path_factory.mktemp("dcp-user")
    (root / "out").mkdir()
    for name in ("good", "broken", "lenient"):
        for region in ("eu", "us"):
            (root / name / region).mkdir(parents=True)
    for name in ("broken", "lenient"):  # a first version while both regions were up
        dcp.save({"before": torch.ones(3)}, storage_writer=dcp_writer(open_store(root, name, 2), "q", step=1))
        region = root / name / "us"  # then region us breaks: a file where its directory was
        for path in sorted(region.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        region.rmdir()
        region.write_text("not a directory")
    script = root / "dcp_user.py"
    script.write_text(DCP_USER_SCRIPT)
    saved = torchrun(script, 2, "save", str(root), str(root / "out"))
    assert saved.returncode == 0, saved.stderr[-4000:]
    # One shard of rank 1 in version 2, damaged in both regions (bit rot everywhere).
    store = open_store(root, "good", 2)
    before = {c.digest for e in store.resolve("fsdp", 1)[0].entries for c in e.chunks}
    shard = next(
        e
        for e in store.resolve("fsdp", 2)[0].entries
        if e.shard and e.shard.rank == 1 and e.shape != e.shard.global_shape
        if not {c.digest for c in e.chunks} & before
    )
    for region in ("eu", "us"):
        flip_byte(root / "good" / region / blob_key(shard.chunks[0].digest), 3, 0x10)
    (root / "out" / "damaged.json").write_text(json.dumps({"entry": shard.name, "digest": shard.chunks[0].digest}))
    loaded = torchrun(script, 3, "load", str(root), str(root / "out"))
    assert loaded.returncode == 0, loaded.stderr[-4000:]
    return root


def reports(root: Path, scenario: str, world: int) -> list[dict[str, Any]]:
    return [json.loads((root / "out" / f"{scenario}-{world}-rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.slow
def test_fsdp2_checkpoint_of_two_ranks_loads_resharded_on_three_equal_to_what_was_saved(dcp_jobs):
    assert [r["versions"] for r in reports(dcp_jobs, "save", 2)] == [[1, 2], [1, 2]]  # async_save, then save
    saved = torch.load(dcp_jobs / "out" / "v1.pt", weights_only=True)
    loaded = torch.load(dcp_jobs / "out" / "loaded-3.pt", weights_only=True)
    # Model and optimizer (7- and 5-row layers, re-split 4+3 -> 3+2+2), the user's DTensors (bf16
    # Shard(0) of 7 rows, float64 Shard(1) of 5 columns, int64 Replicate) and the objects (ints, a
    # unicode string, nested lists/dicts, bool/int64/empty/bf16 tensors).
    assert differences(saved, loaded) == []
    assert loaded["extra"]["name"] == "rün/1 ✓" and loaded["extra"]["ids"][-1] == 4 * 2**40


@pytest.mark.slow
def test_the_two_rank_checkpoint_loads_in_one_process_without_torchrun(dcp_jobs):
    saved = torch.load(dcp_jobs / "out" / "v1.pt", weights_only=True)
    target = emptied(saved)
    dcp.load(target, storage_reader=dcp_reader(open_store(dcp_jobs, "good", 2), "fsdp", version=1), no_dist=True)
    assert differences(saved, target) == []


@pytest.mark.slow
def test_a_shard_blob_damaged_everywhere_fails_every_rank_with_the_typed_error(dcp_jobs):
    """Before the fix every rank got ``TypeError: BlobUnavailableError.__init__() missing 1 required
    positional argument`` (the error did not survive DCP's pickled gather), and a rank aborted."""
    damaged = json.loads((dcp_jobs / "out" / "damaged.json").read_text())
    for report in reports(dcp_jobs, "load", 3):
        failures = report["damaged"]
        assert failures != "loaded" and failures, report
        for kind, message in failures.values():
            assert kind == "BlobUnavailableError", (kind, message)
            assert damaged["digest"] in message and "verify" in message


@pytest.mark.slow
def test_a_save_with_one_region_down_is_refused_on_every_rank_at_quorum_2_and_committed_at_quorum_1(dcp_jobs):
    for report in reports(dcp_jobs, "save", 2):
        failures = report["broken"]["error"]
        assert [kind for kind, _ in failures.values()] == ["QuorumNotMetError"], report  # the coordinator's
        assert all("1 of 2 regions" in message and "us" in message for _, message in failures.values())
        assert report["lenient"] == {"version": 2}
    broken = open_store(dcp_jobs, "broken", 2)
    assert [info.version for info in broken.list("q")] == [1]  # nothing committed half
    assert not (dcp_jobs / "broken" / "eu" / manifest_key("q", 2)).exists()
    lenient = open_store(dcp_jobs, "lenient", 1)
    latest = lenient.latest("q")
    assert latest is not None and latest.version == 2 and latest.regions == ["eu"] and "us" in latest.lagging
    saved = torch.load(dcp_jobs / "out" / "v2.pt", weights_only=True)
    target = emptied(saved)
    dcp.load(target, storage_reader=dcp_reader(lenient, "q"), no_dist=True)
    assert differences(saved, target) == []


@pytest.mark.slow
def test_ranks_passing_writers_of_different_lineages_are_refused_before_any_blob_is_written(dcp_jobs):
    """It committed one manifest naming both ranks' entries under rank 0's lineage, silently."""
    for report in reports(dcp_jobs, "save", 2):
        failures = report["per_rank_lineage"]
        assert failures != "saved" and [kind for kind, _ in failures.values()] == ["DCPArgumentError"], report
        assert "mine-0, mine-1" in next(iter(failures.values()))[1]
    store = open_store(dcp_jobs, "good", 2)
    assert store.latest("mine-0") is None and store.latest("mine-1") is None


@pytest.mark.slow
def test_the_cli_lists_and_verifies_the_distributed_checkpoint(dcp_jobs):
    regions = ["--region", str(dcp_jobs / "good" / "eu"), "--region", str(dcp_jobs / "good" / "us"), "--quorum", "2"]
    listed = cli("ls", *regions, "--json")
    assert listed.returncode == 0, listed.stderr
    assert [(c["version"], c["step"]) for c in json.loads(listed.stdout) if c["lineage"] == "fsdp"] == [(1, 2), (2, 3)]
    verified = cli("verify", *regions, "--json")
    assert verified.returncode == 1, verified.stdout + verified.stderr
    report = json.loads(verified.stdout)
    digest = json.loads((dcp_jobs / "out" / "damaged.json").read_text())["digest"]
    # The damaged shard is named in both regions, as version 2's; version 1 stays whole.
    assert (
        sorted((p["kind"], p["version"], p["object"].rsplit("/", 1)[1]) for p in report["problems"])
        == [("corrupt", 2, digest.split(":", 1)[1])] * 2
    )
    states = {c["version"]: set(c["regions"].values()) for c in report["checkpoints"] if c["lineage"] == "fsdp"}
    assert states == {1: {"ok"}, 2: {"corrupt"}}


@pytest.mark.slow
def test_the_cli_exports_the_distributed_checkpoints_tensors(dcp_jobs, tmp_path):
    regions = ["--region", str(dcp_jobs / "good" / "eu"), "--region", str(dcp_jobs / "good" / "us"), "--quorum", "2"]
    exported = cli("export", "--lineage", "fsdp", "--version", "1", "--to", str(tmp_path / "x"), *regions, "--json")
    assert exported.returncode == 0, exported.stderr
    from safetensors.torch import load_file

    def tensors(value: Any, path: str = "") -> dict[str, torch.Tensor]:
        if isinstance(value, dict):
            return {k: t for key, v in value.items() for k, t in tensors(v, f"{path}/{key}".lstrip("/")).items()}
        return {path: value} if isinstance(value, torch.Tensor) else {}

    # Every tensor of the 2-rank checkpoint, shards joined whole: model, optimizer, DTensors, objects' tensors.
    saved = tensors(torch.load(dcp_jobs / "out" / "v1.pt", weights_only=True))
    assert differences(saved, load_file(str(tmp_path / "x" / "tensors.safetensors"))) == []


@pytest.mark.slow
def test_the_coordinator_killed_mid_commit_leaves_the_previous_version_latest_and_the_next_save_commits(tmp_path):
    """Rank 0 SIGKILLed after its manifest reached region eu and before us (quorum 2): the half
    commit is not a version; a new job loads the previous one and its own save commits after it."""
    for region in ("eu", "us"):
        (tmp_path / "ck" / region).mkdir(parents=True)
    (tmp_path / "out").mkdir()
    script = tmp_path / "dcp_user.py"
    script.write_text(DCP_USER_SCRIPT)
    killed = torchrun(script, 2, "commit-kill", str(tmp_path), str(tmp_path / "out"))
    assert killed.returncode != 0 and not (tmp_path / "out" / "commit-kill-2-rank0.json").exists()
    store = open_store(tmp_path, "ck", 2)
    assert [info.version for info in store.list("ck")] == [1]
    half = manifest_key("ck", 2)
    assert (tmp_path / "ck" / "eu" / half).exists() and not (tmp_path / "ck" / "us" / half).exists()
    after = torchrun(script, 2, "after-commit-kill", str(tmp_path), str(tmp_path / "out"))
    assert after.returncode == 0, after.stderr[-4000:]
    saved = torch.load(tmp_path / "out" / "ck-v1.pt", weights_only=True)
    assert differences(saved, torch.load(tmp_path / "out" / "ck-loaded.pt", weights_only=True)) == []
    assert [r["saved"] for r in reports(tmp_path, "after-commit-kill", 2)] == [3, 3]  # number 2 stays the dead one's
    assert [(info.version, info.step) for info in store.list("ck")] == [(1, 1), (3, 2)]


CKPT_USER_SCRIPT = r'''"""A user's FSDP2 training script with the Checkpointer, as docs/DISTRIBUTED.md shows it.

The model has BatchNorm (float buffers and an int64 step counter, replicated, not sharded), a
frozen embedding-like layer (requires_grad=False: no optimizer state) and dropout; AdamW with a
StepLR; data from DistributedResumableSampler. ``KILL=<rank>:<step>`` SIGKILLs that rank in the
middle of that step (after backward, before the optimizer step).
"""

import os
import signal
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from prefect_recovery import Checkpointer, CheckpointSchedule, seed_everything
from prefect_recovery.core.region import LocalRegionIO
from prefect_recovery.core.store import Store
from prefect_recovery.distributed import DistributedResumableSampler

root, out, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
kill_rank, kill_step = (int(p) for p in os.environ.get("KILL", "-1:-1").split(":"))
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank, world = dist.get_rank(), dist.get_world_size()
store = Store([LocalRegionIO(str(root / r), name=r) for r in ("eu", "us")], write_quorum=2, chunk_bytes=512)

seed_everything(3)
frozen = torch.nn.Linear(6, 10)
frozen.requires_grad_(False)
model = torch.nn.Sequential(
    frozen, torch.nn.BatchNorm1d(10), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(10, 3)
)
mesh = init_device_mesh("cpu", (world,))
fully_shard(model[4], mesh=mesh)
fully_shard(model, mesh=mesh)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
x = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
y = x[:, :3].argmax(dim=1)
sampler = DistributedResumableSampler(len(x), seed=0, batch_size=4)
loader = StatefulDataLoader(TensorDataset(x, y), sampler=sampler, batch_size=None)
seen = []
with Checkpointer(store, "user-fsdp", model=model, optimizer=optimizer, scheduler=scheduler, data=loader,
                  schedule=CheckpointSchedule.every(3), seed=3 + rank) as ckpt:  # fmt: skip
    while ckpt.step_count < steps:
        for xb, yb in loader:
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            if rank == kill_rank and ckpt.step_count + 1 == kill_step:
                os.kill(os.getpid(), signal.SIGKILL)
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            ckpt.step()
            if ckpt.step_count >= steps:
                break
        else:
            ckpt.end_epoch()
options = StateDictOptions(full_state_dict=True, cpu_offload=True)
msd, osd = get_state_dict(model, optimizer, options=options)
loader.state_dict()  # a restored loader hands its sampler the saved position when asked (or iterated)
dump = {
    "model": msd,
    "optim": osd,
    "scheduler": scheduler.state_dict(),
    "rng": torch.get_rng_state(),
    "data": sampler.state_dict(),
    "step": ckpt.step_count,
    "resumed_from": ckpt.resumed_from,
    "buffers": {name: b.detach().clone() for name, b in model.named_buffers()},  # this rank's own
}
torch.save(dump, out / f"rank{rank}.pt")
dist.barrier()  # every rank is done: the job's work and reports are complete
sys.stdout.flush()
sys.stderr.flush()
# torch 2.13's gloo teardown sometimes aborts a finished rank ("terminate called without an active
# exception", SIGABRT; seen about 1 load in 10 with DCP's own FileSystemReader too): skip it.
os._exit(0)
'''


def ckpt_job(root: Path, name: str, steps: int, ranks: int = 2, **env: str) -> subprocess.CompletedProcess[str]:
    (root / name).mkdir(parents=True, exist_ok=True)
    script = root / "ckpt_user.py"
    script.write_text(CKPT_USER_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", str(script)]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **env}
    return launch(
        [*command, str(root / "store"), str(root / name), str(steps)],
        cwd=root,
        env=environment,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def dumped(directory: Path) -> dict[int, dict[str, Any]]:
    return {int(path.stem[4:]): torch.load(path, weights_only=False) for path in sorted(directory.glob("rank*.pt"))}


def without(state: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k not in keys}


@pytest.fixture(scope="module")
def batchnorm_reference(tmp_path_factory) -> Path:
    """The user's FSDP2 + BatchNorm script, 12 steps on 2 ranks, never interrupted (saves at 3, 6, 9, 12)."""
    root = tmp_path_factory.mktemp("bn-reference")
    for region in ("eu", "us"):
        (root / "store" / region).mkdir(parents=True)
    done = ckpt_job(root, "out", 12)
    assert done.returncode == 0, done.stderr[-4000:]
    return root


@pytest.mark.slow
def test_fsdp2_with_rank_local_batchnorm_statistics_resumes_bit_identically_after_a_rank_is_killed(
    batchnorm_reference, tmp_path
):
    """FSDP2 leaves BatchNorm's running statistics local to each rank (DDP would broadcast them).
    Before the fix the Checkpointer kept one rank's copy in the global state (DCP's dedup), so after
    a SIGKILL and resume both ranks had the same statistics and rank 0's differed from an
    uninterrupted run's."""
    for region in ("eu", "us"):
        (tmp_path / "store" / region).mkdir(parents=True)
    killed = ckpt_job(tmp_path, "first", 12, KILL="1:10")  # mid-step 10, after the save of step 9
    assert killed.returncode != 0 and not (tmp_path / "first" / "rank0.pt").exists()
    resumed = ckpt_job(tmp_path, "out", 12)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    reference, again = dumped(batchnorm_reference / "out"), dumped(tmp_path / "out")
    # The ranks' statistics really differ: one global copy could not serve both.
    assert differences(reference[0]["buffers"], reference[1]["buffers"]) != []
    for rank in (0, 1):
        assert again[rank]["resumed_from"] is not None and reference[rank]["resumed_from"] is None
        assert again[rank]["step"] == reference[rank]["step"] == 12
        # Model and optimizer (full, on rank 0), this rank's buffers, scheduler, RNG and data position.
        assert differences(without(reference[rank], "resumed_from"), without(again[rank], "resumed_from")) == []


@pytest.mark.slow
def test_the_batchnorm_checkpoint_of_two_ranks_resumes_on_three_with_each_ranks_documented_state(
    batchnorm_reference,
):
    """DISTRIBUTED.md: model and optimizer resharded equal; ranks 0 and 1 keep their own buffers and
    RNG; new rank 2 takes saved rank 0's buffers (r % W) and a derived RNG, with a warning."""
    three = ckpt_job(batchnorm_reference, "three", 12, ranks=3)  # restores step 12 and stops there
    assert three.returncode == 0, three.stderr[-4000:]
    assert "rank 2 did not exist" in three.stderr + three.stdout
    reference, resized = dumped(batchnorm_reference / "out"), dumped(batchnorm_reference / "three")
    assert sorted(resized) == [0, 1, 2] and all(resized[r]["resumed_from"]["step"] == 12 for r in resized)
    assert differences(reference[0]["model"], resized[0]["model"]) == []
    assert differences(reference[0]["optim"], resized[0]["optim"]) == []
    for rank, source in ((0, 0), (1, 1), (2, 0)):
        assert differences(reference[source]["buffers"], resized[rank]["buffers"]) == [], rank
        assert resized[rank]["data"] == {**reference[0]["data"], "world_size": 3}  # the global cursor
    for rank in (0, 1):
        assert torch.equal(reference[rank]["rng"], resized[rank]["rng"])
    assert not torch.equal(reference[0]["rng"], resized[2]["rng"])


GENERATORS_USER_SCRIPT = r'''"""A user's DDP script: each rank draws from private generators passed as extras."""

import os
import random
import signal
import sys
from datetime import timedelta
from pathlib import Path
import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from prefect_recovery import Checkpointer, CheckpointSchedule, seed_everything
from prefect_recovery.core.region import LocalRegionIO
from prefect_recovery.core.store import Store

root, out, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
kill_rank, kill_step = (int(p) for p in os.environ.get("KILL", "-1:-1").split(":"))
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank = dist.get_rank()
store = Store([LocalRegionIO(str(root / r), name=r) for r in ("eu", "us")], write_quorum=2)
seed_everything(0)
model = DistributedDataParallel(torch.nn.Linear(4, 2))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
noise = torch.Generator().manual_seed(100 + rank)          # this rank's private generators
picks = np.random.default_rng(200 + rank)
coin = random.Random(300 + rank)
with Checkpointer(store, "gen", model=model, optimizer=optimizer, schedule=CheckpointSchedule.every(2), seed=rank,
                  extras={"noise": noise, "picks": picks, "coin": coin, "note": {"rank0": rank}}) as ckpt:
    while ckpt.step_count < steps:
        x = torch.randn(3, 4, generator=noise) * float(picks.random()) + coin.random()
        model(x).square().mean().backward()
        if rank == kill_rank and ckpt.step_count + 1 == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        optimizer.step()
        optimizer.zero_grad()
        ckpt.step()
final = {"noise": noise.get_state(), "picks": picks.random(), "coin": coin.random(), "resumed": ckpt.resumed_from}
torch.save({**final, "w": model.module.weight.detach().clone()}, out / f"rank{rank}.pt")
dist.barrier()  # every rank is done: the job's work and reports are complete
sys.stdout.flush()
sys.stderr.flush()
# torch 2.13's gloo teardown sometimes aborts a finished rank ("terminate called without an active
# exception", SIGABRT; seen about 1 load in 10 with DCP's own FileSystemReader too): skip it.
os._exit(0)
'''


@pytest.mark.slow
def test_private_generators_of_each_rank_given_as_extras_resume_bit_identically(tmp_path):
    """DETERMINISM.md: a private generator passed as an extra is saved and restored. Before the fix a
    distributed job with one failed its first save (UnsupportedValueError: 'global/extras/noise'
    cannot be checkpointed without pickle); and extras were rank 0's, while each rank's generator
    is its own."""
    script = tmp_path / "gen_user.py"
    script.write_text(GENERATORS_USER_SCRIPT)
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for name, jobs in (("reference", [{}]), ("killed", [{"KILL": "1:6"}, {}])):
        for region in ("eu", "us"):
            (tmp_path / name / region).mkdir(parents=True)
        for attempt, env in enumerate(jobs):
            out = tmp_path / name / f"out{attempt}"
            out.mkdir()
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
            done = launch(
                [*command, str(script), str(tmp_path / name), str(out), "7"],
                cwd=tmp_path,
                env={**os.environ, "PYTHONPATH": str(REPO), **env},
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
            )
            assert (done.returncode == 0) == ("KILL" not in env), done.stderr[-4000:]
        runs[name] = dumped(out)
    for rank in (0, 1):
        assert runs["killed"][rank]["resumed"] is not None
        assert differences(without(runs["reference"][rank], "resumed"), without(runs["killed"][rank], "resumed")) == []
    assert runs["reference"][0]["coin"] != runs["reference"][1]["coin"]  # each rank's own stream


PLAIN_DCP_THEN_CHECKPOINTER = r'''"""dcp.save through the store, then a Checkpointer on the same lineage."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from prefect_recovery import Checkpointer
from prefect_recovery.core.region import LocalRegionIO
from prefect_recovery.core.store import Store
from prefect_recovery.distributed import dcp_writer

root = Path(sys.argv[1])
dist.init_process_group("gloo")
store = Store([LocalRegionIO(str(root / r), name=r) for r in ("eu", "us")], write_quorum=2)
model = torch.nn.Linear(3, 2)
dcp.save({"model": model.state_dict()}, storage_writer=dcp_writer(store, "mine", step=5))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
with Checkpointer(store, "mine", model=model, optimizer=optimizer, distributed=True) as ckpt:
    pass
'''


@pytest.mark.slow
def test_a_checkpointer_pointed_at_a_lineage_saved_by_plain_dcp_says_so(tmp_path):
    """It said "written by a single process, not by torch.distributed ranks" (wrong: ranks wrote it)."""
    for region in ("eu", "us"):
        (tmp_path / region).mkdir()
    script = tmp_path / "mine.py"
    script.write_text(PLAIN_DCP_THEN_CHECKPOINTER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", str(script)]
    done = launch(
        [*command, str(tmp_path)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "WorldSizeChangeError" in output and "saved by dcp.save through dcp_writer" in output, output[-3000:]
    assert "single process" not in output


# -- in this process ---------------------------------------------------------------------------------
def test_store_errors_survive_the_pickling_that_carries_them_between_ranks():
    import prefect_recovery.distributed  # noqa: F401  (registers the reduction, as any rank using dcp_writer does)

    errors = [
        BlobUnavailableError("blake3:" + "ab" * 32, {"eu": "corrupt", "us": "missing"}),
        QuorumNotMetError("save of lineage 'x' not committed", {"us": "down"}),
        RegionUnavailableError("us", "connection refused"),
    ]
    for error in errors:
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error) and copy.__dict__ == error.__dict__


def test_two_async_saves_in_flight_to_one_lineage_commit_in_the_order_they_finish(tmp_path):
    """Documented (DISTRIBUTED.md): wait for one async_save's future before the next, as DCP asks."""
    store = open_store(tmp_path, "s", 2)
    for region in ("eu", "us"):
        (tmp_path / "s" / region).mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = dcp.async_save({"w": torch.ones(3)}, storage_writer=dcp_writer(store, "run", step=1))
        first.result()
        second = dcp.async_save({"w": torch.full((3,), 2.0)}, storage_writer=dcp_writer(store, "run", step=2))
        second.result()
    assert [(info.version, info.step) for info in store.list("run")] == [(1, 1), (2, 2)]
    target = {"w": torch.zeros(3)}
    dcp.load(target, storage_reader=dcp_reader(store, "run"))
    assert torch.equal(target["w"], torch.full((3,), 2.0))
