"""``prefect-recovery crash-test``: the product's promise, shown end to end.

1. run the demo pipeline uninterrupted (lineage ``<prefix>-reference``);
2. run it again under another lineage and SIGKILL its whole process group once ``kill_after``
   checkpoints are committed (no goodbye, like a lost node);
3. run ``recover`` on that lineage: preflight checks, then the pipeline resumes from the latest
   consistent checkpoint, reusing the steps that had finished;
4. compare the final state digests: they must be equal (bit-identical weights, optimizer,
   scheduler, RNG and data position).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from .blocks import CheckpointStore


def _demo(lineage: str, steps: int, seed: int) -> list[str]:
    return [sys.executable, "-m", "prefect_recovery.cli", "demo", "--json", "--lineage", lineage,
            "--steps", str(steps), "--seed", str(seed)]  # fmt: skip


def _run_json(command: list[str]) -> dict[str, Any]:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[2:])} failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def run_crash_test(*, steps: int, seed: int, kill_after: int, say: Callable[[str], Any] | None) -> dict[str, Any]:
    say = say or (lambda _message: None)
    prefix = f"crash-test-{uuid.uuid4().hex[:6]}"
    reference_lineage, crashed_lineage = f"{prefix}-reference", f"{prefix}-crashed"

    say(f"1/3 uninterrupted run ({reference_lineage}, {steps} steps)")
    reference = _run_json(_demo(reference_lineage, steps, seed))
    say(f"    final version {reference['final_version']}, digest {reference['final_digest']}")

    say(f"2/3 run {crashed_lineage}; SIGKILL after {kill_after} committed checkpoints")
    store = CheckpointStore.default()
    process = subprocess.Popen(
        _demo(crashed_lineage, steps, seed),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    killed_at = None
    while process.poll() is None:
        committed = store.list(crashed_lineage)
        if len(committed) >= kill_after:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            killed_at = {"version": committed[-1].version, "step": committed[-1].step}
            break
        time.sleep(0.05)
    if killed_at is None:
        say("    the run finished before it could be killed; use more --steps")
    else:
        say(f"    killed; latest committed checkpoint then: v{killed_at['version']} at step {killed_at['step']}")

    say(f"3/3 prefect-recovery recover --lineage {crashed_lineage}")
    resumed = _run_json(
        [sys.executable, "-m", "prefect_recovery.cli", "recover", "--json", "--lineage", crashed_lineage]
    )
    identical = resumed["final_digest"] == reference["final_digest"]
    failed = [row["check"] for row in resumed.get("preflight", []) if row["status"] != "pass"]
    say(f"    preflight: {'all checks passed' if not failed else 'not passed: ' + ', '.join(failed)}")
    say(
        f"    resumed from {resumed['resumed_from']} at step {resumed.get('failed_step')!r}, reused steps "
        f"{resumed.get('reused_steps')}, final digest {resumed['final_digest']}"
    )
    say("identical to the uninterrupted run: bit-for-bit" if identical else "DIFFERENT from the uninterrupted run")
    return {
        "identical": identical,
        "killed": killed_at is not None,
        "killed_after": killed_at,
        "reference": reference,
        "resumed": resumed,
    }
