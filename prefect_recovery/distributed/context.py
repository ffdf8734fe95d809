"""What a launcher (``run_ranks``) hands to every rank of a torchrun job, through the environment.

A rank is a fresh process started by torchrun: it shares no memory with the Prefect task that
launched it, so the lineage, the checkpoint a recovery selected and the run that journals the
commits reach it as environment variables, and ``rank_context()`` reads them back:

=====================================  ==================================================
``PREFECT_RECOVERY_LINEAGE``           the lineage the job trains
``PREFECT_RECOVERY_RESUME_VERSION``    the version a recovery selected (absent: latest)
``PREFECT_RECOVERY_RUN_ID``            the pipeline run that journals each commit
``PREFECT_RECOVERY_STORE_BLOCK``       the saved CheckpointStore block, when the step had one
=====================================  ==================================================

A distributed ``Checkpointer`` of that lineage uses the first three without the script passing
them (rank 0 journals ``checkpoint_committed`` as ``PipelineRun`` does in-process); a script may
also read them explicitly (``rank_context().resume_version``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from ..core.journal import Journal
from ..core.models import CheckpointInfo
from ..core.store import core_store
from ..training.context import ResumePoint

ENV_LINEAGE = "PREFECT_RECOVERY_LINEAGE"
ENV_RESUME_VERSION = "PREFECT_RECOVERY_RESUME_VERSION"
ENV_RUN_ID = "PREFECT_RECOVERY_RUN_ID"
ENV_STORE_BLOCK = "PREFECT_RECOVERY_STORE_BLOCK"


@dataclasses.dataclass(frozen=True)
class RankContext:
    """The launcher's hand-over to this rank, and the rank's place in the job (torchrun's env)."""

    lineage: str | None
    resume_version: int | None
    run_id: str | None
    store_block: str | None
    rank: int
    local_rank: int
    world_size: int

    def resume_point(self, store: Any) -> ResumePoint | None:
        """The launching run's resume point, for ``Checkpointer(..., resume_from=...)``: the
        version a recovery selected, and (for the run) journaling every commit; None when no
        launcher named a lineage."""
        if self.lineage is None:
            return None
        on_commit = journal_commits(store, self.lineage, self.run_id) if self.run_id else None
        return ResumePoint(lineage=self.lineage, version=self.resume_version, on_commit=on_commit)


def rank_context(environ: dict[str, str] | None = None) -> RankContext:
    env = os.environ if environ is None else environ
    version = env.get(ENV_RESUME_VERSION)
    return RankContext(
        lineage=env.get(ENV_LINEAGE) or None,
        resume_version=int(version) if version else None,
        run_id=env.get(ENV_RUN_ID) or None,
        store_block=env.get(ENV_STORE_BLOCK) or None,
        rank=int(env.get("RANK", "0")),
        local_rank=int(env.get("LOCAL_RANK", "0")),
        world_size=int(env.get("WORLD_SIZE", "1")),
    )


def launch_environment(
    lineage: str | None, *, resume_version: int | None, run_id: str | None, store_block: str | None
) -> dict[str, str]:
    """The variables ``rank_context`` reads (absent ones are left out)."""
    env = {ENV_LINEAGE: lineage, ENV_RUN_ID: run_id, ENV_STORE_BLOCK: store_block}
    env[ENV_RESUME_VERSION] = None if resume_version is None else str(resume_version)
    return {key: value for key, value in env.items() if value is not None}


def journal_commits(store: Any, lineage: str, run_id: str) -> Callable[[CheckpointInfo], None]:
    """``on_commit`` for rank 0: journal each committed heavy checkpoint for the launching run,
    with the fields ``PipelineRun.checkpoint_committed`` records in-process."""
    journal = Journal(core_store(store), lineage)

    def committed(info: CheckpointInfo) -> None:
        journal.append(
            "checkpoint_committed",
            run_id=run_id,
            data={
                "version": info.version,
                "step": info.step,
                "trigger": info.metadata.get("trigger"),
                "tier": info.metadata.get("tier"),
                "regions": list(info.regions),
                "manifest_digest": info.manifest_digest,
            },
        )

    return committed


__all__ = [
    "ENV_LINEAGE",
    "ENV_RESUME_VERSION",
    "ENV_RUN_ID",
    "ENV_STORE_BLOCK",
    "RankContext",
    "journal_commits",
    "launch_environment",
    "rank_context",
]
