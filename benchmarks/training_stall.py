"""How much checkpointing costs a training loop: async Checkpointer vs synchronous torch.save.

In one run, on the same model, data and disk:

* ``stall``: how long the training thread is blocked per checkpoint: ``Checkpointer.step()``
  on a saving step (host-memory snapshot + hand-off) versus ``torch.save`` + fsync of the same
  state (model, optimizer, scheduler, RNG, data position);
* ``overhead``: wall time of the whole run with a heavy checkpoint every ``--every`` steps
  versus checkpoints off (runs alternate, best of ``--repeat``).

    python benchmarks/training_stall.py --json [--steps 300] [--every 50] [--hidden 1536]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from prefect_recovery import CheckpointStore
from prefect_recovery.training.checkpointer import Checkpointer
from prefect_recovery.training.determinism import capture_rng
from prefect_recovery.training.sampling import ResumableRandomSampler
from prefect_recovery.training.schedule import CheckpointSchedule, EveryNSteps

FEATURES, CLASSES, BATCH, SAMPLES = 256, 10, 256, 16384


def build(hidden: int, seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, hidden),
        torch.nn.GELU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.GELU(),
        torch.nn.Linear(hidden, CLASSES),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=100)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SAMPLES, FEATURES, generator=generator)
    y = torch.randint(0, CLASSES, (SAMPLES,), generator=generator)
    sampler = ResumableRandomSampler(SAMPLES, seed=seed, batch_size=BATCH)
    loader = StatefulDataLoader(
        TensorDataset(x, y), batch_size=None, sampler=sampler, generator=torch.Generator().manual_seed(seed)
    )
    return model, optimizer, scheduler, loader


def train(steps: int, hidden: int, checkpointer_args: dict | None, store_dir: Path) -> dict:
    model, optimizer, scheduler, loader = build(hidden, seed=0)
    stalls: list[float] = []
    ckpt = None
    if checkpointer_args is not None:
        store = CheckpointStore(regions=[str(store_dir)], write_quorum=1)
        ckpt = Checkpointer(
            store, f"bench-{time.monotonic_ns()}", model=model, optimizer=optimizer, scheduler=scheduler,
            data=loader, handle_sigterm=False, **checkpointer_args,
        )  # fmt: skip
        ckpt.restore()
    batches = iter(loader)
    start = time.perf_counter()
    for _ in range(steps):
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        scheduler.step()
        if ckpt is not None:
            saves_before = ckpt._saver.in_flight + len(ckpt._saver.committed)
            t0 = time.perf_counter()
            ckpt.step()
            if ckpt._saver.in_flight + len(ckpt._saver.committed) != saves_before:
                stalls.append(time.perf_counter() - t0)
    loop_seconds = time.perf_counter() - start
    if ckpt is not None:
        ckpt.close()  # the last saves finish in the background; not part of the loop time
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"seconds": loop_seconds, "stalls": stalls, "model_bytes": state_bytes, "model": model,
            "optimizer": optimizer, "scheduler": scheduler, "loader": loader}  # fmt: skip


def torch_save_stall(run: dict, path: Path, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        state = {
            "model": run["model"].state_dict(),
            "optimizer": run["optimizer"].state_dict(),
            "scheduler": run["scheduler"].state_dict(),
            "data": run["loader"].state_dict(),
            "rng": capture_rng(),
        }
        with open(path, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--json", action="store_true", help="print JSON (the only output format)")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    root = Path(tempfile.mkdtemp(prefix="stall-", dir=args.dir))
    try:
        schedule = CheckpointSchedule(triggers=[EveryNSteps(every=args.every)], max_in_flight=2)
        off, on, stalls = [], [], []
        last = None
        for index in range(args.repeat):
            off.append(train(args.steps, args.hidden, None, root)["seconds"])
            region = root / f"region-{index}"
            region.mkdir()
            last = train(args.steps, args.hidden, {"schedule": schedule}, region)
            on.append(last["seconds"])
            stalls.extend(last["stalls"])
            shutil.rmtree(region)
        sync = torch_save_stall(last, root / "sync.pt", repeat=max(3, args.repeat))
        checkpoint_bytes = sum(
            t.numel() * t.element_size()
            for t in [*last["model"].state_dict().values()]
            + [v for s in last["optimizer"].state_dict()["state"].values() for v in s.values() if torch.is_tensor(v)]
        )
        stall = statistics.median(stalls)
        sync_stall = statistics.median(sync)
        result = {
            "benchmark": "training_stall",
            "steps": args.steps,
            "checkpoint_every": args.every,
            "checkpoints_per_run": len(last["stalls"]),
            "checkpoint_bytes": checkpoint_bytes,
            "host": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
            "stall_seconds": {
                "async_checkpointer_median": round(stall, 4),
                "async_checkpointer_max": round(max(stalls), 4),
                "sync_torch_save_median": round(sync_stall, 4),
                "ratio_async_to_sync": round(stall / sync_stall, 3),
            },
            "run_seconds": {
                "checkpoints_off_best": round(min(off), 3),
                "checkpoints_on_best": round(min(on), 3),
                "overhead_percent": round(100 * (min(on) / min(off) - 1), 2),
            },
            "goals": {"ratio_async_to_sync": "<= 0.2", "overhead_percent": "<= 3.5"},
        }
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
