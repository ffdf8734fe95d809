"""CUDA checks of the training layer, for a machine with a GPU (CI has none). Prints JSON.

1. Bit-identical resume on CUDA: a model trained with AMP (float16 autocast + GradScaler),
   dropout and CUDA-RNG-drawn batches, "crashed" part-way and resumed from its checkpoint in
   fresh objects, ends with exactly the parameters, optimizer and scaler state of a run that
   never stopped (deterministic algorithms on, CUBLAS_WORKSPACE_CONFIG set).
2. Training stall with a multi-GB state on the GPU: async Checkpointer (device-to-host copy
   into pinned staging buffers) versus synchronous ``torch.save`` + fsync of the same state.

    CUBLAS_WORKSPACE_CONFIG=:4096:8 python benchmarks/gpu_check.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch

from prefect_recovery.core import Store, open_region
from prefect_recovery.training.checkpointer import Checkpointer
from prefect_recovery.training.schedule import CheckpointSchedule, EveryNSteps

DEVICE = "cuda"


def make_store(root: Path) -> Store:
    regions = [root / "a", root / "b"]
    for region in regions:
        region.mkdir(parents=True, exist_ok=True)
    return Store([open_region(str(r)) for r in regions], write_quorum=2)


def train(store: Store, lineage: str, steps: int, crash_at: int | None = None) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(1024, 10)
    ).to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=20, gamma=0.5)
    scaler = torch.amp.GradScaler("cuda")
    data_gen = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randn(4096, 256, device=DEVICE, generator=data_gen)
    y = torch.randint(0, 10, (4096,), device=DEVICE, generator=data_gen)
    schedule = CheckpointSchedule(triggers=[EveryNSteps(every=10)])
    with Checkpointer(
        store, lineage, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
        schedule=schedule, seed=0, handle_sigterm=False,
    ) as ckpt:  # fmt: skip
        while ckpt.step_count < steps:
            index = torch.randint(0, 4096, (128,), device=DEVICE)  # the CUDA default generator
            with torch.autocast("cuda", dtype=torch.float16):
                loss = torch.nn.functional.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            ckpt.step()
            if crash_at is not None and ckpt.step_count == crash_at:
                raise KeyboardInterrupt  # a crash: pending saves finish, nothing after this step does
        ckpt.flush()
    state = {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
    for index, per_param in optimizer.state_dict()["state"].items():
        for key, value in per_param.items():
            state[f"optimizer.{index}.{key}"] = value.detach().cpu()
    state["scaler.scale"] = torch.tensor(scaler.get_scale())
    state["cuda_rng"] = torch.cuda.get_rng_state()
    return state


def raw(tensor: torch.Tensor) -> torch.Tensor:
    """Bytes, so NaN payloads compare too."""
    return tensor.reshape(-1).view(torch.uint8)


def resume_check(root: Path) -> dict[str, object]:
    torch.use_deterministic_algorithms(True)
    store = make_store(root / "resume")
    reference = train(store, "reference", 60)
    try:
        train(store, "crashed", 60, crash_at=37)
    except KeyboardInterrupt:
        pass
    resumed_from = store.resolve("crashed")[0].step
    resumed = train(store, "crashed", 60)
    differ = [key for key in reference if not torch.equal(raw(reference[key]), raw(resumed[key]))]
    torch.use_deterministic_algorithms(False)
    return {"resumed_from_step": resumed_from, "compared": len(reference), "differing": differ,
            "bit_identical": not differ}  # fmt: skip


def stall_check(root: Path, gib: float, saves: int) -> dict[str, object]:
    width = int((gib * 2**30 / 4 / 3 / 8) ** 0.5)  # 8 square layers, weights + 2 Adam moments
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(8)]).to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(4, width, device=DEVICE)).sum().backward()
    optimizer.step()
    state_bytes = sum(p.numel() * 4 * 3 for p in model.parameters())
    store = make_store(root / "stall")
    ckpt = Checkpointer(
        store, "stall", model=model, optimizer=optimizer, handle_sigterm=False,
        schedule=CheckpointSchedule(triggers=[EveryNSteps(every=1)], max_in_flight=2),
    )  # fmt: skip
    ckpt.restore()
    async_stalls = []
    for _ in range(saves):
        torch.cuda.synchronize()
        start = time.perf_counter()
        ckpt.step()  # snapshot to pinned host buffers; hashing and writing go on in the background
        async_stalls.append(time.perf_counter() - start)
        ckpt.flush()  # let the write finish before the next measured stall
    ckpt.close()
    sync_stalls = []
    for _ in range(saves):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with open(root / "sync.pt", "wb") as handle:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        sync_stalls.append(time.perf_counter() - start)
    async_median, sync_median = statistics.median(async_stalls[1:]), statistics.median(sync_stalls)
    return {
        "state_bytes": state_bytes,
        "async_checkpointer_stall_s": {
            "first": round(async_stalls[0], 3),
            "median_after_first": round(async_median, 3),
        },
        "sync_torch_save_stall_s": round(sync_median, 3),
        "ratio_async_to_sync": round(async_median / sync_median, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=3.0, help="state size for the stall check")
    parser.add_argument("--saves", type=int, default=4)
    parser.add_argument("--json", action="store_true", help="print JSON (the only output format)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        result = {
            "device": torch.cuda.get_device_name(0),
            "torch": torch.__version__,
            "resume": resume_check(root),
            "stall": stall_check(root, args.gib, args.saves),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
