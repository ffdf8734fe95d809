"""One rank of a torchrun job that saves and loads through the store's DCP writer and reader.

Run by tests/test_dcp.py as ``python -m torch.distributed.run --nproc-per-node N dcp_worker.py
SCENARIO[,SCENARIO...] --regions A,B --out DIR`` (gloo, CPU; several scenarios share one job's
start-up, which costs more than the scenarios on a small machine). Each rank writes what it saw to
``DIR/<scenario>-rank<r>.json``; reference tensors (the full state a load must reproduce) go
through torch.save into DIR, which is the test's own bookkeeping, never the product's load path.

Scenarios:
- ddp-save / ddp-load: DDP model and Adam, saved on every rank, reloaded after a restart.
- fsdp-save / fsdp-load: FSDP2 (``fully_shard`` on a CPU mesh) model and optimizer through
  get_state_dict/set_state_dict; a load compares the resharded full state with the reference
  saved by the job that wrote the checkpoint, then saves the next version with its own reference.
- kill: one good save, then rank 1 SIGKILLs itself after its blobs are written, before the commit.
- hang: rank 1 stops (sleeps) after its blobs are written; the process group times out.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from prefect_recovery.core.region import LocalRegionIO
from prefect_recovery.core.store import Store
from prefect_recovery.core.store_pages import DEFAULT_PAGE_ENTRIES
from prefect_recovery.distributed import StoreWriter, committed_version, dcp_reader, dcp_writer


def open_store(regions: str, page_entries: int | None = DEFAULT_PAGE_ENTRIES, delta: bool = False) -> Store:
    roots = regions.split(",")
    return Store(
        [LocalRegionIO(root, name=Path(root).name) for root in roots],
        write_quorum=len(roots),
        chunk_bytes=512,
        page_entries=page_entries,
        codec="zstd" if delta else "none",
        delta=delta,
    )


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    # Odd sizes: FSDP2 shards of unequal length on 2 and 4 ranks.
    return torch.nn.Sequential(
        torch.nn.Linear(12, 30), torch.nn.ReLU(), torch.nn.Linear(30, 18), torch.nn.Linear(18, 6)
    )


def train(model: torch.nn.Module, optim: torch.optim.Optimizer, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed + dist.get_rank())
    for _ in range(steps):
        optim.zero_grad()
        model(torch.randn(8, 12, generator=generator)).pow(2).mean().backward()
        optim.step()


def plain(value: Any) -> Any:
    """A state with every DTensor made a full local tensor, for comparisons."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(plain(v) for v in value)
    if hasattr(value, "full_tensor"):
        return value.full_tensor()
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return value


def differences(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Where two states differ: tensors bit for bit (dtype, shape, bytes), other values by ==."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        if set(expected) != set(actual):
            return [f"{path}: keys {sorted(map(str, expected))} != {sorted(map(str, actual))}"]
        return [d for k in expected for d in differences(expected[k], actual[k], f"{path}/{k}")]
    if isinstance(expected, list | tuple) and isinstance(actual, list | tuple):
        if len(expected) != len(actual):
            return [f"{path}: length {len(expected)} != {len(actual)}"]
        return [
            d for i, (e, a) in enumerate(zip(expected, actual, strict=True)) for d in differences(e, a, f"{path}/{i}")
        ]
    if isinstance(expected, torch.Tensor) or isinstance(actual, torch.Tensor):
        same = (
            isinstance(expected, torch.Tensor)
            and isinstance(actual, torch.Tensor)
            and expected.dtype == actual.dtype
            and expected.shape == actual.shape
            and torch.equal(expected.view(-1).view(torch.uint8), actual.view(-1).view(torch.uint8))
        )
        return [] if same else [f"{path}: tensors differ"]
    return [] if expected == actual else [f"{path}: {expected!r} != {actual!r}"]


def report(args: argparse.Namespace, **fields: Any) -> None:
    path = Path(args.out) / f"{args.scenario}-rank{dist.get_rank()}.json"
    path.write_text(json.dumps({"rank": dist.get_rank(), "world": dist.get_world_size(), **fields}))


def full_state(model: torch.nn.Module, optim: torch.optim.Optimizer) -> dict[str, Any]:
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(model, optim, options=options)
    return {"model": model_state, "optim": optim_state}


# -- DDP ------------------------------------------------------------------------------------------
def ddp_model(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.parallel.DistributedDataParallel(make_model(seed))
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def ddp_save(args: argparse.Namespace, store: Store) -> None:
    model, optim = ddp_model(seed=1)
    train(model, optim, 3, seed=10)
    state = {"model": model.state_dict(), "optim": optim.state_dict()}
    sync = dcp.save(state, storage_writer=dcp_writer(store, LINEAGE[args.scenario], step=3))
    if dist.get_rank() == 0:
        torch.save(plain(state), Path(args.out) / "ddp-v1.pt")
    train(model, optim, 1, seed=20)
    state = {"model": model.state_dict(), "optim": optim.state_dict()}
    # async_save with the same kind of writer: staged on the CPU, written and committed in the background.
    asynchronous = dcp.async_save(state, storage_writer=dcp_writer(store, LINEAGE[args.scenario], step=4)).result()
    if dist.get_rank() == 0:
        torch.save(plain(state), Path(args.out) / "ddp-v2.pt")
    report(args, versions=[committed_version(sync), committed_version(asynchronous)])


def ddp_load(args: argparse.Namespace, store: Store) -> None:
    found = {}
    for version in (1, 2):
        model, optim = ddp_model(seed=99)  # other weights
        train(model, optim, 1, seed=5)  # optimizer state exists, with other values
        state = {"model": model.state_dict(), "optim": optim.state_dict()}
        dcp.load(state, storage_reader=dcp_reader(store, LINEAGE[args.scenario], version))
        model.load_state_dict(state["model"])
        optim.load_state_dict(state["optim"])
        expected = torch.load(Path(args.out) / f"ddp-v{version}.pt", weights_only=True)
        found[version] = differences(expected, plain({"model": model.state_dict(), "optim": optim.state_dict()}))
    report(args, differences=found)


# -- FSDP2 ----------------------------------------------------------------------------------------
def fsdp_model(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = make_model(seed)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def fsdp_save_checkpoint(args: argparse.Namespace, store: Store, model: torch.nn.Module, optim: Any, tag: str) -> int:
    model_state, optim_state = get_state_dict(model, optim)
    metadata = dcp.save(
        {"model": model_state, "optim": optim_state}, storage_writer=dcp_writer(store, LINEAGE[args.scenario], step=3)
    )
    reference = full_state(model, optim)
    if dist.get_rank() == 0:
        torch.save(reference, Path(args.out) / f"fsdp-{tag}.pt")
    version = committed_version(metadata)
    assert version is not None
    return version


def fsdp_save(args: argparse.Namespace, store: Store) -> None:
    model, optim = fsdp_model(seed=1)
    train(model, optim, 3, seed=10)
    version = fsdp_save_checkpoint(args, store, model, optim, f"v-world{dist.get_world_size()}")
    report(args, version=version)


def fsdp_load(args: argparse.Namespace, store: Store) -> None:
    model, optim = fsdp_model(seed=77)
    train(model, optim, 1, seed=3)
    model_state, optim_state = get_state_dict(model, optim)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, storage_reader=dcp_reader(store, LINEAGE[args.scenario], args.version))
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    loaded = full_state(model, optim)
    found = None
    if dist.get_rank() == 0:
        expected = torch.load(Path(args.out) / f"fsdp-v-world{args.saved_world}.pt", weights_only=True)
        found = differences(expected, loaded)
    # Train on and save from this world size, for the load in the other direction.
    train(model, optim, 1, seed=30)
    version = fsdp_save_checkpoint(args, store, model, optim, f"v-world{dist.get_world_size()}")
    report(args, differences=found, version=version)


# -- failures -------------------------------------------------------------------------------------
class StopsAfterWriting(StoreWriter):
    """A writer whose rank 1 dies (SIGKILL) or stops (sleeps) once its blobs are written."""

    mode = "kill"
    out = "."

    def write_data(self, plan: Any, planner: Any) -> Any:
        future = super().write_data(plan, planner)
        if dist.get_rank() == 1:
            digests = sorted({c.digest for r in future.value() for c in r.storage_data.entry.chunks})
            Path(self.out, f"rank1-{self.mode}-digests.json").write_text(json.dumps(digests))
            if self.mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(600)  # hung: the process group's timeout must end the save, not this
        return future


def failure(args: argparse.Namespace, store: Store) -> None:
    model, optim = ddp_model(seed=1)
    train(model, optim, 1, seed=10)
    dcp.save({"model": model.state_dict()}, storage_writer=dcp_writer(store, LINEAGE[args.scenario], step=1))
    train(model, optim, 1, seed=11)  # new values: the second save writes new blobs
    writer = StopsAfterWriting(store, LINEAGE[args.scenario], step=2)
    writer.mode, writer.out = args.scenario, args.out
    started = time.monotonic()
    try:
        dcp.save({"model": model.state_dict()}, storage_writer=writer)
    except BaseException as exc:  # what a surviving rank sees, recorded for the test and the docs
        report(
            args,
            error=type(exc).__name__,
            message=str(exc)[:2000],
            seconds=time.monotonic() - started,
            trace=traceback.format_exc()[-3000:],
        )
        sys.exit(3)
    report(args, error=None)


LINEAGE = {
    "ddp-save": "ddp",
    "ddp-load": "ddp",
    "fsdp-save": "fsdp",
    "fsdp-load": "fsdp",
    "kill": "fail",
    "hang": "fail",
}
SCENARIOS = {
    "ddp-save": ddp_save,
    "ddp-load": ddp_load,
    "fsdp-save": fsdp_save,
    "fsdp-load": fsdp_load,
    "kill": failure,
    "hang": failure,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenarios", help=f"comma-separated, run in order: {', '.join(SCENARIOS)}")
    parser.add_argument("--regions", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--version", type=int, default=None)
    parser.add_argument("--saved-world", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--page-entries", type=int, default=DEFAULT_PAGE_ENTRIES, help="low: paged")
    parser.add_argument("--delta", action="store_true", help="a zstd store with delta chunks")
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))
    try:
        for scenario in args.scenarios.split(","):
            args.scenario = scenario
            SCENARIOS[scenario](args, open_store(args.regions, args.page_entries, args.delta))
    except BaseException:  # a failing rank (a failure scenario's sys.exit(3) too) exits as it raised
        dist.destroy_process_group()
        raise
    dist.barrier()  # every rank finished its scenarios and wrote its reports
    sys.stdout.flush()
    sys.stderr.flush()
    # torch 2.13's gloo teardown sometimes aborts a rank that finished its work ("terminate called
    # without an active exception", SIGABRT, about 1 three-rank job in 10): skip the teardown.
    os._exit(0)


if __name__ == "__main__":
    main()
