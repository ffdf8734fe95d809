"""The example pipeline: prepare data -> train (checkpointed) -> evaluate -> finalize.

Every step is an idempotent ``@step``: a run of a lineage that already has finished steps
reuses them (their code does not run again) and the training resumes from the latest
consistent checkpoint. A finished lineage is reported, not run again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger

from ..blocks import CheckpointStore, store_block_name
from ..flows.lineage_status import finished_result, lineage_status, open_store
from ..flows.registry import register_pipeline
from ..tasks.pipeline_run import PipelineRun, file_input
from ..tasks.step import code_digest
from ..training.schedule import CheckpointSchedule
from . import workload
from .steps import evaluate, finalize, prepare_data, train

if TYPE_CHECKING:
    from ..flows.replay import ReplaySegment

DEFAULT_STEPS = 1000


def replay_training(segment: ReplaySegment) -> dict[str, Any]:
    """Replay hook (``prefect-recovery replay-check``): the training state at ``segment.to_step``,
    re-run from checkpoint ``segment.from_version`` on the data the run's ``prepare-data`` step
    produced, with the run's recorded steps and seed. Saves nothing."""
    parameters = segment.parameters
    data = segment.step_result("prepare-data")
    if data is None:  # no stored step result: make the data again from the parameters
        path = parameters.get("data_path")
        data = workload.load_data(path) if path else workload.make_data(int(parameters["seed"]))
    return workload.replay_segment(
        segment.store,
        segment.lineage,
        data,
        from_version=segment.from_version,
        to_step=segment.to_step,
        steps=int(parameters["steps"]),
        seed=int(parameters["seed"]),
    )


@register_pipeline(replay=replay_training)
@flow(name="example-pipeline", log_prints=True)
def example_pipeline(
    lineage: str = "demo",
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    schedule: CheckpointSchedule | None = None,
    store_block: CheckpointStore | str | None = None,
    data_path: str | None = None,
    regions: list[str] | None = None,
    write_quorum: int = 1,
) -> dict[str, Any]:
    """Train a small model with checkpoints; a lineage with an unfinished run is resumed.

    Args:
        lineage: Name of the run history in the checkpoint store.
        steps: Training steps.
        seed: Seed of the data, the model and every RNG.
        schedule: When to checkpoint (default: heavy every 50 steps, light every 10).
        store_block: A CheckpointStore block (the UI's Custom run form offers a picker) or a saved one's
            name (the CLI's form); default the embedded local store.
        data_path: A dataset file (safetensors: x_train, y_train, x_test, y_test); default: synthetic
            data made from the seed.
        regions: Region URLs of the store instead of a block (with ``write_quorum``).
        write_quorum: Write quorum of ``regions``.
    """
    logger = get_run_logger()
    store = open_store(store_block, regions, write_quorum)
    status = lineage_status(store, lineage)
    if status.status == "finished":
        logger.info("lineage %s already finished; nothing to do", lineage)
        return finished_result(store, status)
    parameters = {
        "lineage": lineage,
        "steps": steps,
        "seed": seed,
        "schedule": schedule.model_dump(mode="json") if schedule else None,
        "store_block": store_block_name(store_block),  # a picked block is recorded by name
        "data_path": data_path,
    }
    if regions:  # recorded only when used, so runs recorded before this option re-run unchanged
        parameters |= {"regions": list(regions), "write_quorum": write_quorum}
    inputs = {"dataset": file_input(data_path)} if data_path else {"dataset": {"synthetic_seed": seed}}
    run = PipelineRun(
        store,
        lineage,
        pipeline=example_pipeline.name,
        parameters=parameters,
        inputs=inputs,
        code_digest=code_digest(example_pipeline.fn),
    )
    with run:
        digest = inputs["dataset"].get("digest") if data_path else None
        data = prepare_data(seed, data_path, digest)
        trained = train(store, lineage, data, steps, seed, schedule, run.resume_point())
        metrics = evaluate(store, lineage, trained, data)
        final = finalize(store, lineage, trained, metrics)
        run.finish(final_version=final["version"], final_digest=final["state_digest"])
    return {
        "lineage": lineage,
        "status": "completed",
        "final_version": final["version"],
        "final_digest": final["state_digest"],
        "resumed_from": trained["resumed_from"],
        "metrics": metrics,
    }


__all__ = ["DEFAULT_STEPS", "example_pipeline", "replay_training"]
