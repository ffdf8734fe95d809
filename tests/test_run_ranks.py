"""``run_ranks`` stops a job whose ranks hang and names every rank's exit.

A rank stuck in a collective (its peer died, a storage call never answers) would otherwise hold
the Prefect task run, and the worker slot, forever: ``timeout`` is the bound a user sets. Real
torchrun, real rank processes (no torch.distributed group is needed to hang).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from prefect_recovery.distributed.launch import RanksFailedError, run_ranks

HANGING_RANK = """
import os, sys, time
from pathlib import Path
rank = int(os.environ["RANK"])
Path(sys.argv[1], f"rank{rank}.pid").write_text(str(os.getpid()))
print(f"rank {rank} started", flush=True)
if rank == int(sys.argv[2]):
    sys.exit(3)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is not running
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def rank_pids(where: Path) -> list[int]:
    """The ranks that started (the job is over: a rank that did not start by now never will)."""
    return [int(text) for path in where.glob("rank*.pid") if (text := path.read_text())]


def test_a_hanging_job_is_stopped_at_its_timeout_and_every_rank_is_gone(tmp_path: Path) -> None:
    script = tmp_path / "hang.py"
    script.write_text(HANGING_RANK)
    started = time.monotonic()
    with pytest.raises(RanksFailedError) as failed:
        run_ranks(script, nproc_per_node=2, args=[str(tmp_path), "-1"], timeout=20)
    took = time.monotonic() - started
    message = str(failed.value)
    assert "timed out after 20" in message and "was stopped" in message, message
    assert "every rank was sent SIGTERM" in message and "before any rank ran" not in message, message
    assert "SignalException" not in message  # torchrun's own traceback says nothing about the ranks
    assert took < 20 + 60, took  # SIGTERM, then at most 30 s before SIGKILL: never the ranks' 600 s sleep
    for pid in rank_pids(tmp_path):  # on a loaded machine a rank may not have started within the timeout
        assert not alive(pid), f"rank process {pid} outlived the stopped job"
    assert failed.value.returncode != 0


def test_one_failing_rank_is_named_with_its_exit_code(tmp_path: Path) -> None:
    script = tmp_path / "fail.py"
    script.write_text(HANGING_RANK)
    with pytest.raises(RanksFailedError) as failed:
        run_ranks(script, nproc_per_node=2, args=[str(tmp_path), "1"], timeout=120)
    # torchrun stops the surviving rank once one fails: rank 1's own code is what names the cause
    assert failed.value.exit_codes.get(1) == 3, failed.value.exit_codes
    assert "rank 1 exit code 3" in str(failed.value), str(failed.value)
    assert "timed out" not in str(failed.value)
    assert (tmp_path / "rank1.pid").exists()
    for pid in rank_pids(tmp_path):
        assert not alive(pid)
