"""The example pipeline's steps as Prefect tasks (thin wrappers over training.example)."""

from __future__ import annotations

from typing import Any

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ..blocks import CheckpointStore
from ..training import example
from ..training.schedule import CheckpointSchedule
from .run_journal import RunJournal

FINAL_MILESTONE = "final"

# Tensors flow between these steps in memory; the checkpoint store is their durable record.
_STEP_OPTIONS: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}


@task(name="prepare-data", **_STEP_OPTIONS)
def prepare_data(seed: int) -> dict[str, torch.Tensor]:
    """Synthetic, seeded data: the same seed always gives the same bytes."""
    data = example.make_data(seed)
    get_run_logger().info(
        "prepared %s train / %s test samples (seed %s)", example.TRAIN_SAMPLES, example.TEST_SAMPLES, seed
    )
    return data


@task(name="train", **_STEP_OPTIONS)
def train(
    store: CheckpointStore,
    lineage: str,
    data: dict[str, torch.Tensor],
    steps: int,
    seed: int,
    schedule: CheckpointSchedule | None = None,
    journal: RunJournal | None = None,
) -> dict[str, Any]:
    """Train to ``steps``, resuming from the latest consistent checkpoint of ``lineage``."""
    logger = get_run_logger()

    def progress(step: int) -> None:
        if step % 50 == 0 or step == steps:
            logger.info("step %s/%s", step, steps)

    on_commit = journal.checkpoint_committed if journal is not None else None
    result = example.train(
        store, lineage, data, steps=steps, seed=seed, schedule=schedule, on_step=progress, on_commit=on_commit
    )
    if result["resumed_from"]:
        logger.info("resumed from version %(version)s at step %(step)s", result["resumed_from"])
    return result


@task(name="evaluate", **_STEP_OPTIONS)
def evaluate(store: CheckpointStore, lineage: str, data: dict[str, torch.Tensor]) -> dict[str, float]:
    """Evaluate the model of the latest checkpoint (reads only its weights)."""
    metrics = example.evaluate(store.load(lineage=lineage, keys=["model"]), data)
    get_run_logger().info("test loss %.4f, accuracy %.4f", metrics["test_loss"], metrics["test_accuracy"])
    return metrics


@task(name="finalize", **_STEP_OPTIONS)
def finalize(store: CheckpointStore, lineage: str, metrics: dict[str, float]) -> dict[str, Any]:
    """The final heavy checkpoint: the trained state plus its metrics, milestone ``final``."""
    state = store.load(lineage=lineage)
    state["metrics"] = metrics
    latest = store.latest(lineage)
    info = store.save_checkpoint(
        state,
        lineage=lineage,
        step=latest.step if latest else None,
        metadata={"tier": "heavy", "trigger": f"milestone:{FINAL_MILESTONE}", "complete": True, "final": True},
    )
    get_run_logger().info("final checkpoint %s v%s", lineage, info.version)
    return {"version": info.version, "step": info.step, "state_digest": final_digest(store, lineage, info.version)}


def data_digest(data: dict[str, torch.Tensor]) -> str:
    """Digest of a dataset's tensors (names, dtypes, shapes and bytes): its provenance record."""
    from ..core.digest import hash_bytes
    from ..training.encoding import tensor_bytes

    parts = [
        f"{name}:{tensor.dtype}:{list(tensor.shape)}:{hash_bytes(tensor_bytes(tensor.contiguous()))}"
        for name, tensor in sorted(data.items())
    ]
    return hash_bytes("\n".join(parts).encode())


def final_digest(store: CheckpointStore, lineage: str, version: int) -> str:
    manifest, _holders = store.core.resolve(lineage, version)
    return manifest.state_digest()
