"""The example pipeline: prepare data -> train (checkpointed) -> evaluate -> finalize.

A run of a lineage that already has checkpoints but no ``final`` one resumes from the latest
consistent checkpoint; a finished lineage is reported, not run again.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from ..blocks import CheckpointStore
from ..tasks.example_steps import (
    FINAL_MILESTONE,
    data_digest,
    evaluate,
    final_digest,
    finalize,
    prepare_data,
    train,
)
from ..tasks.run_journal import RunJournal
from ..training.schedule import CheckpointSchedule

DEFAULT_STEPS = 1000


def lineage_status(store: CheckpointStore, lineage: str) -> dict[str, Any]:
    """``finished`` (has a final checkpoint), ``unfinished`` (has others) or ``new``."""
    infos = store.list(lineage)
    for info in reversed(infos):
        if info.metadata.get("trigger") == f"milestone:{FINAL_MILESTONE}":
            return {"status": "finished", "final": info}
    if infos:
        return {"status": "unfinished", "latest": infos[-1]}
    return {"status": "new"}


@flow(name="example-pipeline", log_prints=True)
def example_pipeline(
    lineage: str = "demo",
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    schedule: CheckpointSchedule | None = None,
    store_block: str | None = None,
) -> dict[str, Any]:
    """Train a small model with checkpoints; resume the lineage if it has an unfinished run.

    Args:
        lineage: Name of the run history in the checkpoint store.
        steps: Training steps.
        seed: Seed of the data, the model and every RNG.
        schedule: When to checkpoint (default: heavy every 50 steps, light every 10).
        store_block: Name of a saved CheckpointStore block; default the embedded local store.
    """
    logger = get_run_logger()
    store = CheckpointStore.load(store_block) if store_block else CheckpointStore.default()
    status = lineage_status(store, lineage)
    if status["status"] == "finished":
        final = status["final"]
        logger.info("lineage %s already finished at version %s; nothing to do", lineage, final.version)
        return {
            "lineage": lineage,
            "status": "finished",
            "final_version": final.version,
            "final_digest": final_digest(store, lineage, final.version),
            "resumed_from": None,
        }
    journal = RunJournal(store.core, lineage)
    latest = status.get("latest")
    journal.run_started(
        parameters={
            "lineage": lineage,
            "steps": steps,
            "seed": seed,
            "schedule": schedule.model_dump(mode="json") if schedule else None,
        },
        resumed_from={"version": latest.version, "step": latest.step} if latest else None,
    )
    with journal.step("prepare-data", seed=seed) as out:
        data = prepare_data(seed)
        out["data_digest"] = data_digest(data)
    with journal.step("train", steps=steps, seed=seed) as out:
        trained = train(store, lineage, data, steps, seed, schedule, journal)
        out.update(steps=trained["steps"], trained_steps=trained["trained_steps"])
    with journal.step("evaluate") as out:
        metrics = evaluate(store, lineage, data)
        out.update(metrics)
    with journal.step("finalize") as out:
        final = finalize(store, lineage, metrics)
        out.update(version=final["version"], state_digest=final["state_digest"])
    journal.append("run_finished", final_version=final["version"], final_digest=final["state_digest"])
    return {
        "lineage": lineage,
        "status": "completed",
        "final_version": final["version"],
        "final_digest": final["state_digest"],
        "resumed_from": trained["resumed_from"],
        "metrics": metrics,
    }


__all__ = ["example_pipeline", "lineage_status"]
