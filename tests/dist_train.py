"""A user's torchrun training script (DDP or FSDP2 on gloo/CPU), checkpointed by an unchanged
``Checkpointer``: ``torchrun --nproc-per-node N tests/dist_train.py --lineage L --dump DIR``.

The model has dropout and the loss adds noise from torch's, NumPy's and Python's RNGs, so a
resume that restored any rank's RNG wrongly would train differently. Data come from a
``DistributedResumableSampler``. At the end every rank writes what it ended with to
``DIR/rank<r>.pt`` (its local shards, the full model and optimizer, its RNG states, its data
position, the batches it trained on), which the tests compare between runs.

Test instrumentation only (not what a user writes), by environment variable:

* ``DIST_KILL_AT=<rank>:<step>``: that rank SIGKILLs itself right after ``ckpt.step()`` of that step;
* ``DIST_SIGTERM_AT=<rank>:<step>``: that rank sends itself SIGTERM (a preemption notice) after that step;
* ``DIST_KILL_IN_SAVE=<rank>:<n>``: that rank SIGKILLs itself in its n-th heavy save, after writing part
  of its blobs and before the commit (inside ``Store.write_entries``).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from prefect_recovery import Checkpointer, CheckpointSchedule, EveryNSteps, Milestones, seed_everything
from prefect_recovery.core.region import open_region
from prefect_recovery.core.store import Store
from prefect_recovery.distributed.sampler import DistributedResumableSampler

SAMPLES, FEATURES, CLASSES, BATCH = 96, 8, 4, 4


def build_model(mode: str, world: int) -> torch.nn.Module:
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 32),
        torch.nn.GELU(),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(32, CLASSES),
    )
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in (model[0], model[3]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def install_kill_in_save() -> None:
    spec = os.environ.get("DIST_KILL_IN_SAVE")
    if not spec:
        return
    rank, nth = (int(part) for part in spec.split(":"))
    if dist.get_rank() != rank:
        return
    from prefect_recovery.core.store import Store

    original = Store.write_entries
    calls = {"n": 0}

    def write_entries(self, entries, **options):
        if len(self.regions) == 1:  # a light save (first region only): not counted
            return original(self, entries, **options)
        calls["n"] += 1
        if calls["n"] == nth and len(entries) > 1:
            original(self, list(entries)[: len(entries) // 2], **options)  # part of this rank's blobs land
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, entries, **options)

    Store.write_entries = write_entries


def default_store() -> Store:
    """The embedded default store (``CheckpointStore.default()``'s regions) opened through the core, so
    the ranks do not import Prefect: torchrun starts one interpreter per rank on these 2 cores."""
    home = Path(os.environ["PREFECT_RECOVERY_HOME"]).absolute() / "regions"
    return Store([open_region(str(home / "region-a")), open_region(str(home / "region-b"))], write_quorum=1)


def local(value):
    return value.to_local() if hasattr(value, "to_local") else value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lineage", required=True)
    parser.add_argument("--mode", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=20, help="stop here, mid-epoch by default")
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--dump", required=True)
    parser.add_argument("--restore-only", action="store_true", help="restore, dump, look at the next batch, stop")
    parser.add_argument("--distributed", action="store_true", help="Checkpointer(distributed=True): for one rank")
    parser.add_argument("--plain-sampler", action="store_true", help="torch's DistributedSampler instead")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    install_kill_in_save()
    kill_rank, kill_step = (int(p) for p in os.environ.get("DIST_KILL_AT", "-1:-1").split(":"))
    term_rank, term_step = (int(p) for p in os.environ.get("DIST_SIGTERM_AT", "-1:-1").split(":"))

    store = default_store()
    seed_everything(args.seed)  # before the model: its initial weights
    model = build_model(args.mode, world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.8)
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.randn(SAMPLES, FEATURES, generator=generator)
    y = (x[:, :CLASSES]).argmax(dim=1)
    sampler = DistributedResumableSampler(SAMPLES, seed=args.seed, batch_size=BATCH)
    index = torch.arange(SAMPLES)  # which samples a batch holds: the tests check the data position with it
    loader = StatefulDataLoader(TensorDataset(x, y, index), sampler=sampler, batch_size=None)
    if args.plain_sampler:  # a per-rank position that cannot be re-split at another world size
        from torch.utils.data import DistributedSampler

        plain = DistributedSampler(TensorDataset(x, y, index), seed=args.seed)
        loader = StatefulDataLoader(TensorDataset(x, y, index), sampler=plain, batch_size=BATCH)
    schedule = CheckpointSchedule(
        triggers=[
            EveryNSteps(every=args.every),  # heavy, asynchronous (dcp.async_save)
            EveryNSteps(every=3, tier="light"),  # light: weights, RNG, data position; first region
            Milestones(names=["train_end"]),
        ]
    )

    # seed=args.seed + rank: each rank draws its own dropout masks and noise (a per-rank RNG stream)
    with Checkpointer(store, args.lineage, model=model, optimizer=optimizer, scheduler=scheduler, data=loader,
                      schedule=schedule, seed=args.seed + rank,
                      distributed=True if args.distributed else None) as ckpt:  # fmt: skip
        print(f"resumed from {ckpt.resumed_from} at world size {world}", flush=True)
        rng_at_restore = {
            "torch": torch.get_rng_state(),
            "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
            "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
        }
        if args.restore_only:
            resumed = dict(ckpt.resumed_from or {})
            saved_world = ckpt.saved_world_size
            next_batch = next(iter(loader))[2].tolist()  # the loader applies its restored position here
        else:
            for _epoch in range(ckpt.epoch, args.epochs):
                if ckpt.step_count >= args.max_steps:
                    break
                model.train()
                for batch_x, batch_y, _index in loader:
                    noise = 0.01 * torch.randn_like(batch_x) + 0.001 * float(np.random.rand()) + 0.001 * random.random()
                    loss = torch.nn.functional.cross_entropy(model(batch_x + noise), batch_y)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    ckpt.step()
                    if ckpt.step_count % 5 == 0:
                        print(f"step {ckpt.step_count} loss {loss.item():.4f}", flush=True)
                    if (rank, ckpt.step_count) == (kill_rank, kill_step):
                        os.kill(os.getpid(), signal.SIGKILL)
                    if (rank, ckpt.step_count) == (term_rank, term_step):
                        os.kill(os.getpid(), signal.SIGTERM)  # a preemption notice, on this rank only
                    if ckpt.step_count >= args.max_steps:
                        break
                else:
                    ckpt.end_epoch()
            ckpt.milestone("train_end")
            ckpt.flush()
            resumed = dict(ckpt.resumed_from or {})
            saved_world = ckpt.saved_world_size
            next_batch = None
        step, epoch = ckpt.step_count, ckpt.epoch

    full = StateDictOptions(full_state_dict=True)  # on every rank (cpu_offload would keep it on rank 0 only)
    model_full, optim_full = get_state_dict(model, optimizers=[optimizer], options=full)
    model_local = {key: local(value).clone() for key, value in model.state_dict().items()}
    dump = {
        "rank": rank,
        "world": world,
        "step": step,
        "epoch": epoch,
        "resumed_from": resumed,
        "saved_world": saved_world,
        "model_full": model_full,
        "optimizer_full": optim_full,
        "model_local": model_local,
        "scheduler": scheduler.state_dict(),
        "rng_now": torch.get_rng_state(),
        "rng_at_restore": rng_at_restore,
        "data_now": sampler.state_dict(),
        "next_batch": next_batch,
        "threads": torch.get_num_threads(),
    }
    Path(args.dump).mkdir(parents=True, exist_ok=True)
    torch.save(dump, Path(args.dump) / f"rank{rank}.pt")
    dist.barrier()  # every rank wrote its dump
    sys.stdout.flush()
    sys.stderr.flush()
    # torch 2.13's gloo teardown sometimes aborts a rank that finished its work ("terminate called
    # without an active exception", SIGABRT, about 1 three-rank job in 10): skip the teardown.
    os._exit(0)


if __name__ == "__main__":
    main()
