"""A user's pipeline whose training step is a torchrun job: ``train`` runs ``dist_train.py`` on two ranks
with ``run_ranks`` and returns the lineage's last checkpoint; ``report`` reads its manifest.

Run as ``python -m dist_pipeline LINEAGE DUMP_DIR [ddp|fsdp]`` with ``tests/`` on PYTHONPATH;
``prefect-recovery recover --lineage LINEAGE`` (with ``PREFECT_RECOVERY_PIPELINES=dist_pipeline``) finds
it through ``register_pipeline``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow

from prefect_recovery import CheckpointStore, PipelineRun, register_pipeline, step
from prefect_recovery.distributed.launch import run_ranks
from prefect_recovery.training.context import ResumePoint

PIPELINE = "dist-ddp-pipeline"
SCRIPT = Path(__file__).resolve().parent / "dist_train.py"


@step
def train(lineage: str, mode: str, dump: str, max_steps: int, ranks: int, resume: ResumePoint) -> dict[str, int | None]:
    args = ["--lineage", lineage, "--mode", mode, "--dump", dump, "--max-steps", str(max_steps)]
    run_ranks(SCRIPT, nproc_per_node=ranks, args=args, resume_from=resume)  # every rank resumes where `resume` says
    latest = CheckpointStore.default().latest(lineage)
    return {"version": latest.version, "step": latest.step}


@step
def report(lineage: str, trained: dict[str, int | None]) -> dict[str, object]:
    info = CheckpointStore.default().latest(lineage)
    assert info.version == trained["version"], (info, trained)
    return {"step": info.step, "world_size": info.metadata["distributed"]["world_size"]}


@register_pipeline
@flow(name=PIPELINE)
def dist_pipeline(lineage: str, dump: str, mode: str = "ddp", max_steps: int = 20, ranks: int = 2) -> dict:
    store = CheckpointStore.default()
    parameters = {"lineage": lineage, "dump": dump, "mode": mode, "max_steps": max_steps, "ranks": ranks}
    with PipelineRun(store, lineage, pipeline=PIPELINE, parameters=parameters) as run:
        trained = train(lineage, mode, dump, max_steps, ranks, run.resume_point())
        return report(lineage, trained)


if __name__ == "__main__":
    dist_pipeline(lineage=sys.argv[1], dump=sys.argv[2], mode=sys.argv[3] if len(sys.argv) > 3 else "ddp")
