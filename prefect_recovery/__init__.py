"""prefect-recovery: recoverable, bit-identical ML pipelines on Prefect.

The public names are imported lazily, so ``import prefect_recovery.core`` stays free of torch
and Prefect (the core is bytes only and reusable from any framework). Prefect finds the block
through the ``prefect.collections`` entry point (``prefect_recovery.blocks``), and
``prefect block register -m prefect_recovery`` sees it through ``__dir__``/``__getattr__``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import reproducible_kernels

# Before anything computes: MKL fixes its reproducibility mode at its first computation.
reproducible_kernels.request()

_EXPORTS = {
    "CheckpointStore": "prefect_recovery.blocks",
    "Region": "prefect_recovery.blocks",
    "ResultNotFoundError": "prefect_recovery.blocks.result_storage",
    "ResultUnavailableError": "prefect_recovery.blocks.result_storage",
    "Checkpointer": "prefect_recovery.training.checkpointer",
    "CheckpointSchedule": "prefect_recovery.training.schedule",
    "EveryNSteps": "prefect_recovery.training.schedule",
    "Timebox": "prefect_recovery.training.schedule",
    "Milestones": "prefect_recovery.training.schedule",
    "BlobUnavailableError": "prefect_recovery.core",
    "CheckpointError": "prefect_recovery.core",
    "CheckpointInfo": "prefect_recovery.core",
    "CheckpointNotFoundError": "prefect_recovery.core",
    "ManifestError": "prefect_recovery.core",
    "QuorumNotMetError": "prefect_recovery.core",
    "RegionUnavailableError": "prefect_recovery.core",
    "VerifyReport": "prefect_recovery.core",
    "RetentionPolicy": "prefect_recovery.core",
    "ManifestSignatureError": "prefect_recovery.core",
    "seed_everything": "prefect_recovery.training.determinism",
    "DeterminismError": "prefect_recovery.training.rng_guard",
    "UnsupportedLoaderError": "prefect_recovery.training.loaders",
    "step": "prefect_recovery.tasks.step",
    "LineageBusyError": "prefect_recovery.tasks.errors",
    "PreflightError": "prefect_recovery.tasks.errors",
    "RecoveryError": "prefect_recovery.tasks.errors",
    "ReplayError": "prefect_recovery.tasks.errors",
    "StepInputError": "prefect_recovery.tasks.errors",
    "StepResultError": "prefect_recovery.tasks.errors",
    "PipelineRun": "prefect_recovery.tasks.pipeline_run",
    "file_input": "prefect_recovery.tasks.pipeline_run",
    "state_digest": "prefect_recovery.tasks.pipeline_run",
    "register_pipeline": "prefect_recovery.flows.registry",
    "dcp_writer": "prefect_recovery.distributed.dcp",
    "dcp_reader": "prefect_recovery.distributed.dcp",
    "DCPCheckpointError": "prefect_recovery.distributed.errors",
    "NotADCPCheckpointError": "prefect_recovery.distributed.errors",
    "ResumePoint": "prefect_recovery.training.context",
    "DistributedResumableSampler": "prefect_recovery.distributed.sampler",
    "run_ranks": "prefect_recovery.distributed.launch",
    "RanksFailedError": "prefect_recovery.distributed.launch",
}

__all__ = [
    "BlobUnavailableError",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "CheckpointSchedule",
    "CheckpointStore",
    "Checkpointer",
    "DCPCheckpointError",
    "DeterminismError",
    "DistributedResumableSampler",
    "EveryNSteps",
    "LineageBusyError",
    "ManifestError",
    "ManifestSignatureError",
    "Milestones",
    "NotADCPCheckpointError",
    "PipelineRun",
    "PreflightError",
    "QuorumNotMetError",
    "RanksFailedError",
    "RecoveryError",
    "Region",
    "RegionUnavailableError",
    "ReplayError",
    "ResultNotFoundError",
    "ResultUnavailableError",
    "ResumePoint",
    "RetentionPolicy",
    "StepInputError",
    "StepResultError",
    "Timebox",
    "UnsupportedLoaderError",
    "VerifyReport",
    "dcp_reader",
    "dcp_writer",
    "file_input",
    "register_pipeline",
    "run_ranks",
    "seed_everything",
    "state_digest",
    "step",
]

if TYPE_CHECKING:  # pragma: no cover
    from .blocks import CheckpointStore, Region
    from .blocks.result_storage import ResultNotFoundError, ResultUnavailableError
    from .core import (
        BlobUnavailableError,
        CheckpointError,
        CheckpointInfo,
        CheckpointNotFoundError,
        ManifestError,
        ManifestSignatureError,
        QuorumNotMetError,
        RegionUnavailableError,
        RetentionPolicy,
        VerifyReport,
    )
    from .distributed.dcp import dcp_reader, dcp_writer
    from .distributed.errors import DCPCheckpointError, NotADCPCheckpointError
    from .distributed.launch import RanksFailedError, run_ranks
    from .distributed.sampler import DistributedResumableSampler
    from .flows.registry import register_pipeline
    from .tasks.errors import (
        LineageBusyError,
        PreflightError,
        RecoveryError,
        ReplayError,
        StepInputError,
        StepResultError,
    )
    from .tasks.pipeline_run import PipelineRun, file_input, state_digest
    from .tasks.step import step
    from .training.checkpointer import Checkpointer
    from .training.context import ResumePoint
    from .training.determinism import seed_everything
    from .training.loaders import UnsupportedLoaderError
    from .training.rng_guard import DeterminismError
    from .training.schedule import CheckpointSchedule, EveryNSteps, Milestones, Timebox


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'prefect_recovery' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
