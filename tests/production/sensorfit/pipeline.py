"""The SensorFit pipeline: make-readings -> fit (checkpointed) -> score.

Written the way docs/PIPELINES.md says: ``@step`` steps, a ``PipelineRun`` around them, the training step's
``Checkpointer`` resuming from ``run.resume_point()``, ``@register_pipeline`` so ``recover`` finds the flow by
name, and the store opened with ``open_store(store_block)`` so a recovery hands the pipeline its own store.

``pace`` sleeps after each optimizer step: it stands in for a heavier model so that a test can kill a run
mid-training. It changes wall-clock time only, never a value, so it is neither part of the fit step's cache key
nor of the parameters the run records: a recovery re-runs the pipeline with the recorded ones, at full speed.
Run from a shell as ``python -m sensorfit.pipeline LINEAGE [SEED] [EPOCHS] [STORE_BLOCK]``.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
from prefect import flow
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from prefect_recovery import (
    Checkpointer,
    CheckpointSchedule,
    EveryNSteps,
    Milestones,
    PipelineRun,
    register_pipeline,
    seed_everything,
    step,
)
from prefect_recovery.blocks import open_store

from .model import CHANNELS, WINDOW, SensorNet

PIPELINE = "sensorfit"
SAMPLES, HELD_OUT, BATCH = 192, 64, 16  # 12 optimizer steps an epoch


@step(name="make-readings")
def make_readings(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SAMPLES + HELD_OUT, CHANNELS, WINDOW, generator=generator)
    drift = torch.linspace(0, 1, WINDOW)
    y = (x * drift).sum(dim=(1, 2)) / WINDOW + 0.05 * torch.randn(SAMPLES + HELD_OUT, generator=generator)
    return {"x": x, "y": y}


@step(ignore=["store", "pace"])
def fit(store: Any, lineage: str, data: dict[str, torch.Tensor], seed: int, epochs: int, pace: float,
        resume: Any = None) -> dict[str, int]:  # fmt: skip
    seed_everything(seed)  # before the model is built: its initial weights come from the seed
    model = SensorNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    steps = epochs * (SAMPLES // BATCH)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    loader = StatefulDataLoader(TensorDataset(data["x"][:SAMPLES], data["y"][:SAMPLES]), batch_size=BATCH, shuffle=True)
    schedule = CheckpointSchedule(triggers=[EveryNSteps(every=5), Milestones(names=["epoch_end", "train_end"])])
    with Checkpointer(store, lineage, model=model, optimizer=optimizer, scheduler=scheduler, data=loader,
                      schedule=schedule, seed=seed, resume_from=resume) as ckpt:  # fmt: skip
        for _epoch in range(ckpt.epoch, epochs):
            model.train()
            for x, y in loader:
                optimizer.zero_grad(set_to_none=True)
                torch.nn.functional.mse_loss(model(x), y).backward()
                optimizer.step()
                scheduler.step()
                ckpt.step()
                time.sleep(pace)
            ckpt.end_epoch()
        ckpt.milestone("train_end")
        ckpt.flush()
        return {"version": store.latest(lineage).version, "steps": ckpt.step_count}


@step(ignore=["store"])
def score(store: Any, lineage: str, fitted: dict[str, int], data: dict[str, torch.Tensor]) -> float:
    model = SensorNet()
    model.load_state_dict(store.load_checkpoint(lineage=lineage, version=fitted["version"], keys=["model"])["model"])
    model.eval()
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(data["x"][SAMPLES:]), data["y"][SAMPLES:]))


@register_pipeline
@flow(name=PIPELINE)
def sensorfit(
    lineage: str, seed: int = 0, epochs: int = 4, pace: float = 0.0, store_block: str | None = None
) -> dict[str, Any]:
    """Fit SensorNet on synthetic sensor windows with checkpoints; a crashed run is recovered by ``recover``.

    Args:
        lineage: Name of the run history in the checkpoint store.
        seed: Seed of the data, the model and every RNG.
        epochs: Training epochs (12 optimizer steps each).
        pace: Seconds to sleep after each optimizer step (wall-clock only).
        store_block: Name of a saved CheckpointStore block; default the embedded local store.
    """
    store = open_store(store_block)
    parameters = {"lineage": lineage, "seed": seed, "epochs": epochs, "store_block": store_block}
    with PipelineRun(store, lineage, pipeline=PIPELINE, parameters=parameters) as run:
        data = make_readings(seed)
        fitted = fit(store, lineage, data, seed, epochs, pace, run.resume_point())
        mse = score(store, lineage, fitted, data)
    return {"lineage": lineage, "mse": mse, **fitted}


if __name__ == "__main__":
    args = sys.argv[1:]
    sensorfit(
        lineage=args[0],
        seed=int(args[1]) if len(args) > 1 else 0,
        epochs=int(args[2]) if len(args) > 2 else 4,
        store_block=args[3] if len(args) > 3 else None,
    )
