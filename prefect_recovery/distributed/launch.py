"""``run_ranks``: a ``@step`` runs a multi-rank training job with torchrun.

::

    @step(ignore=["store"])
    def train(store: CheckpointStore, lineage: str, steps: int, resume: ResumePoint) -> dict:
        run_ranks("train_ddp.py", nproc_per_node=4, args=["--steps", str(steps)], resume_from=resume)
        return {"version": store.latest(lineage).version}

    with PipelineRun(store, lineage, ...) as run:
        train(store, lineage, steps, run.resume_point())

``run_ranks`` starts ``torchrun`` (``prefect_recovery.distributed.torchrun``: torchrun's own
parser and elastic agent, plus a record of every rank's exit code), streams every line the
ranks print into the Prefect task run's log with the rank it came from, and raises
``RanksFailedError`` with every rank's exit code when the job fails (a SIGKILLed rank shows as
signal 9; the ranks torchrun then stopped as signal 15).

Given the run's resume point (``resume_from=``), it hands the ranks, through the environment
(``context.py``), the lineage, the checkpoint a recovery selected and the run's id. A distributed ``Checkpointer`` of
that lineage then resumes every rank from that checkpoint and journals its commits for the run,
so ``prefect-recovery recover`` re-runs the step and every rank continues from the last
consistent distributed checkpoint (docs/DISTRIBUTED.md).

This module is the tasks layer of the distributed package: it imports Prefect (lazily, only to
find the task run's logger and the pipeline run).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..training.context import ResumePoint
from .context import launch_environment

_RANK_LINE = re.compile(r"^\[(?P<role>[A-Za-z_][\w-]*?)(?P<rank>\d+)\]:(?P<text>.*)$")
_RENDEZVOUS = ("--standalone", "--rdzv", "--nnodes", "--master", "--node")


class RanksFailedError(RuntimeError):
    """A torchrun job launched by ``run_ranks`` failed; ``exit_codes`` has every rank's exit code
    (negative: the signal that killed it)."""

    def __init__(self, message: str, exit_codes: dict[int, int], returncode: int):
        super().__init__(message)
        self.exit_codes = exit_codes
        self.returncode = returncode

    @property
    def signals(self) -> dict[int, int]:
        """The ranks a signal ended, with the signal number."""
        return {rank: -code for rank, code in self.exit_codes.items() if code < 0}


@dataclasses.dataclass(frozen=True)
class RanksResult:
    """A finished torchrun job: every rank exited 0."""

    world_size: int
    exit_codes: dict[int, int]
    seconds: float


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "an unknown signal"
        return f"killed by signal {-code} ({name})"
    return "exited 0" if code == 0 else f"exit code {code}"


def _logger() -> logging.Logger | logging.LoggerAdapter[Any]:
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # outside a flow or task run
        return logging.getLogger("prefect_recovery.distributed")


def _handoff(resume_from: Any) -> dict[str, str]:
    """What the ranks are told: the lineage and version of ``resume_from``, and the id of the
    enclosing pipeline run of that lineage (rank 0 journals each commit for it) and its store block."""
    if resume_from is None:
        return {}
    run = None
    try:
        from ..tasks.pipeline_run import current_run

        run = current_run()
    except ImportError:  # pragma: no cover - Prefect is a dependency
        pass
    run_id = store_block = None
    if run is not None and run.lineage == resume_from.lineage:
        run_id = run.run_id
        store_block = getattr(getattr(run, "checkpoint_store", None), "_block_document_name", None)
    return launch_environment(
        resume_from.lineage, resume_version=resume_from.version, run_id=run_id, store_block=store_block
    )


def run_ranks(
    target: str | os.PathLike[str],
    *,
    nproc_per_node: int = 2,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    module: bool = False,
    resume_from: ResumePoint | None = None,
    torchrun_args: Sequence[str] = (),
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
) -> RanksResult:
    """Run ``target`` on ``nproc_per_node`` ranks with torchrun and wait for every rank.

    Args:
        target: The training script (or module, with ``module=True``) each rank runs.
        nproc_per_node: Ranks on this machine (torchrun's ``--nproc-per-node``).
        args: Arguments of the script.
        env: Extra environment variables of the ranks (added to this process's).
        module: Run ``target`` as ``python -m target``.
        resume_from: The pipeline run's resume point (``run.resume_point()``, handed to the step
            as an argument): its lineage and version reach every rank, whose ``Checkpointer`` of
            that lineage restores that version (a recovery's choice; None: the latest consistent
            one) and journals its commits for the run. None: the ranks are told nothing.
        torchrun_args: More torchrun options (``--nnodes``, ``--rdzv-endpoint``... replace the
            default ``--standalone``).
        cwd: Working directory of the job.
        timeout: Seconds before the job is stopped (SIGTERM, then SIGKILL) and fails.

    Raises:
        RanksFailedError: a rank failed (or the job timed out); ``exit_codes`` has every rank's.
    """
    log = _logger()
    handoff = _handoff(resume_from)
    with tempfile.TemporaryDirectory(prefix="prefect-recovery-ranks-") as scratch:
        codes_path = Path(scratch) / "exit_codes.json"
        command = [sys.executable, "-m", "prefect_recovery.distributed.torchrun", str(codes_path)]
        if not any(arg.startswith(_RENDEZVOUS) for arg in torchrun_args):
            command.append("--standalone")
        command += [f"--nproc-per-node={nproc_per_node}", "--tee=3", f"--log-dir={scratch}/logs", *torchrun_args]
        command += ["-m", str(target)] if module else [str(target)]
        command += [str(arg) for arg in args]
        environment = {**os.environ, **handoff, **(env or {}), "PYTHONUNBUFFERED": "1"}
        log.info(
            "starting %s ranks of %s (lineage %s, resume %s)",
            nproc_per_node,
            target,
            handoff.get("PREFECT_RECOVERY_LINEAGE"),
            handoff.get("PREFECT_RECOVERY_RESUME_VERSION", "latest"),
        )
        started = time.monotonic()
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment, cwd=cwd, text=True, bufsize=1
        )
        timer = None
        timed_out = threading.Event()
        if timeout is not None:

            def stop() -> None:
                timed_out.set()
                process.terminate()  # torchrun forwards SIGTERM to every rank
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()

            timer = threading.Timer(timeout, stop)
            timer.daemon = True
            timer.start()
        tail: list[str] = []
        rank_tail: list[str] = []  # the ranks' own lines: what a stopped job was doing
        try:
            assert process.stdout is not None
            for line in process.stdout:
                line = line.rstrip("\n")
                match = _RANK_LINE.match(line)
                if match:
                    log.info("[rank %s] %s", match["rank"], match["text"])
                    rank_tail = [*rank_tail[-19:], line]
                else:
                    log.info("[torchrun] %s", line)
                tail = [*tail[-19:], line]
            returncode = process.wait()
        except BaseException:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
        finally:
            if timer is not None:
                timer.cancel()
        seconds = time.monotonic() - started
        exit_codes = {}
        if codes_path.exists():
            exit_codes = {int(rank): int(code) for rank, code in json.loads(codes_path.read_text()).items()}
    if returncode == 0 and not timed_out.is_set():
        log.info("all %s ranks of %s exited 0 in %.1fs", nproc_per_node, target, seconds)
        return RanksResult(world_size=len(exit_codes) or nproc_per_node, exit_codes=exit_codes, seconds=seconds)
    ranks = ", ".join(f"rank {rank} {describe_exit(code)}" for rank, code in sorted(exit_codes.items()))
    what = "failed"
    if timed_out.is_set():
        # torchrun, stopped, forwards SIGTERM to every rank and reports no exit codes; its own
        # traceback (SignalException) says nothing about where the ranks were.
        what = f"timed out after {timeout}s and was stopped"
        ranks = ranks or f"every rank was sent SIGTERM ({nproc_per_node} per node)"
        tail = rank_tail
    lineage_name = handoff.get("PREFECT_RECOVERY_LINEAGE")
    message = (
        f"torchrun job {target} {what}: {ranks or f'torchrun exited {returncode} before any rank ran'}. "
        "Every rank's output is in this task run's log. "
    )
    if lineage_name:
        message += (
            f"Lineage {lineage_name!r} keeps its last consistent checkpoint: "
            f"`prefect-recovery recover --lineage {lineage_name}` resumes every rank from it."
        )
    elif tail:
        message += "Last lines: " + " | ".join(tail[-5:])
    raise RanksFailedError(message, exit_codes, returncode)


__all__ = ["RanksFailedError", "RanksResult", "describe_exit", "run_ranks"]
