"""The example pipeline's steps: idempotent ``@step`` tasks over the workload (``workload.py``).

Each step's result is kept in the store, so a later run of the same lineage (a recovery)
reuses the steps that finished; ``train`` resumes from the lineage's checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch
from prefect import get_run_logger

from ..blocks import CheckpointStore
from ..tasks.errors import StepInputError
from ..tasks.pipeline_run import current_run
from ..tasks.step import step
from ..training.context import ResumePoint
from ..training.schedule import CheckpointSchedule
from . import workload

FINAL_MILESTONE = "final"


@step(name="prepare-data")
def prepare_data(seed: int, data_path: str | None = None, data_digest: str | None = None) -> dict[str, torch.Tensor]:
    """The dataset: read from ``data_path`` (safetensors) or made from ``seed``.

    ``data_digest`` (the file's digest) is part of the inputs so a changed file is a new step.
    """
    if data_path is not None:
        try:
            data = workload.load_data(data_path)
        except (OSError, ValueError) as exc:
            raise StepInputError(f"cannot read the dataset {data_path}: {exc}") from None
    else:
        data = workload.make_data(seed)
    get_run_logger().info("prepared %s train / %s test samples", len(data["x_train"]), len(data["x_test"]))
    return data


@step(name="train", ignore=["store"])
def train(
    store: CheckpointStore,
    lineage: str,
    data: dict[str, torch.Tensor],
    steps: int,
    seed: int,
    schedule: CheckpointSchedule | None = None,
    resume: ResumePoint | None = None,
) -> dict[str, Any]:
    """Train to ``steps``, resuming where ``resume`` says: the lineage's latest checkpoint, or the one a
    recovery chose (``run.resume_point()``; not part of the cache key)."""
    if steps < 1:
        raise StepInputError(f"steps must be at least 1, got {steps}")
    logger = get_run_logger()

    def progress(step: int) -> None:
        if step % 50 == 0 or step == steps:
            logger.info("step %s/%s", step, steps)

    result = workload.train(
        store,
        lineage,
        data,
        steps=steps,
        seed=seed,
        schedule=schedule,
        on_step=progress,
        resume_from=resume,  # the version a recovery chose, and journaling every commit
    )
    if result["resumed_from"]:
        logger.info("resumed from version %(version)s at step %(step)s", result["resumed_from"])
    return result


@step(name="evaluate", ignore=["store"])
def evaluate(
    store: CheckpointStore, lineage: str, trained: dict[str, Any], data: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Evaluate the trained model (reads only the weights of the training's last checkpoint)."""
    weights = store.load_checkpoint(lineage=lineage, version=trained["version"], keys=["model"])
    metrics = workload.evaluate(weights, data)
    get_run_logger().info("test loss %.4f, accuracy %.4f", metrics["test_loss"], metrics["test_accuracy"])
    return metrics


@step(name="finalize", ignore=["store"])
def finalize(
    store: CheckpointStore, lineage: str, trained: dict[str, Any], metrics: dict[str, float]
) -> dict[str, Any]:
    """The final heavy checkpoint: the trained state plus its metrics, milestone ``final``."""
    state = store.load_checkpoint(lineage=lineage, version=trained["version"])
    state["metrics"] = metrics
    info = store.save_checkpoint(
        state,
        lineage=lineage,
        step=trained["steps"],
        metadata={"tier": "heavy", "trigger": f"milestone:{FINAL_MILESTONE}", "complete": True, "final": True},
    )
    run = current_run()
    if run is not None:
        run.checkpoint_committed(info)
    get_run_logger().info("final checkpoint %s v%s", lineage, info.version)
    return {"version": info.version, "step": info.step, "state_digest": final_digest(store, lineage, info.version)}


def final_digest(store: CheckpointStore, lineage: str, version: int) -> str:
    manifest, _holders = store.core.resolve(lineage, version)
    return store.core.state_digest(manifest)
