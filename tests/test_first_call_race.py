"""Issue 18's cause, reproduced and fixed: MKL's vector math races at its first call in a process.

ATen hands ``sqrt``, ``exp``, ``log``, ``erf``, ``tanh``... of contiguous float tensors to Intel MKL's
vector math library (VML), which sets itself up at its first call in a process. In the example's training
that first call is AdamW's ``exp_avg_sq.sqrt()`` in step 1, run by ATen on both OpenMP threads at once;
on MKL's Intel code paths one racing first caller sometimes computes with another implementation, so the
first parameter's update differs by rounding: the 1e-6 divergence of one process among several, under load,
from its first checkpoint on (docs/DETERMINISM.md, "The cause"). ``training.first_calls.settle()`` (called by
the Checkpointer and ``seed_everything``) makes those first calls on one thread before training.

MKL takes its Intel paths by itself on an Intel CPU. On an AMD CPU it takes generic ones, where the racing
callers compute alike (no divergence in any run here); there the test stands in for an Intel host by
interposing MKL's CPU-vendor check (``tests/helpers/mkl_intel_paths.c``, LD_PRELOAD: MKL asks it through the
PLT), so MKL runs its Intel kernels on this CPU. Every run is a real fresh process training the example's
first step through a real Checkpointer, four at a time on the machine's cores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter

import pytest
import torch
from conftest import REPO

from prefect_recovery.training.determinism import execution_fingerprint

PARALLEL = 4
PROCESSES = int(os.environ.get("PREFECT_RECOVERY_FIRST_CALL_PROCESSES", "40"))
CONTROL_LIMIT = 240  # the control runs fresh processes until one diverges, at most this many

# One fresh process: the example's first training step under a Checkpointer; prints the first weight's digest.
FIRST_STEP = """
import hashlib, sys, tempfile
import torch
import prefect_recovery
from prefect_recovery import CheckpointStore, CheckpointSchedule
from prefect_recovery.examples import workload
from prefect_recovery.training import first_calls
if sys.argv[1] == "unsettled":
    first_calls.settle = lambda: None  # the control: what every process did before the fix
data = workload.make_data(11)
with tempfile.TemporaryDirectory() as home:
    ckpt, (model, optimizer, _, loader) = workload._checkpointed(
        CheckpointStore.default(home), "first-step", data, steps=80, seed=11, schedule=CheckpointSchedule(triggers=[]))
    with ckpt:
        x, y = next(iter(loader))
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        print(hashlib.sha256(next(model.parameters()).detach().numpy().tobytes()).hexdigest())
"""

PROBE_BRANCH = """
import ctypes, os, torch
lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
print(lib.mkl_serv_cbwr_get_auto_branch())
"""


@pytest.fixture(scope="module")
def intel_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment under which MKL takes its Intel code paths: nothing on an Intel CPU, the vendor-check
    stand-in elsewhere (skipped, with the reason, where MKL cannot take them)."""
    if not torch.backends.mkl.is_available():
        pytest.skip("this torch build does not compute with MKL")
    if execution_fingerprint()["cpu"].startswith("GenuineIntel"):  # the fingerprint's CPU: vendor first
        return {}
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None or not sys.platform.startswith("linux"):
        pytest.skip("the Intel-host stand-in needs a C compiler on Linux")
    shim = tmp_path_factory.mktemp("mkl-intel-paths") / "libmkl_intel_paths.so"
    source = REPO / "tests" / "helpers" / "mkl_intel_paths.c"
    subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(shim), str(source)], check=True)
    env = {"LD_PRELOAD": str(shim)}
    probe = subprocess.run([sys.executable, "-c", PROBE_BRANCH], env={**os.environ, **env}, capture_output=True,
                           text=True, timeout=120, check=True)  # fmt: skip
    branch = int(probe.stdout.strip())
    if branch < 10:  # MKL_CBWR_AVX2 and up are Intel branches; 2 (AUTO) means MKL still sees a non-Intel CPU
        pytest.skip(f"MKL does not take its Intel code paths on this CPU (its branch is {branch})")
    return env


def first_steps(env: dict[str, str], mode: str, count: int, stop_at_divergence: bool = False) -> Counter[str]:
    """Digests of the first weight after step 1 in ``count`` fresh processes, ``PARALLEL`` at a time."""
    seen: Counter[str] = Counter()
    environment = {**os.environ, **env}
    started = 0
    while started < count:
        batch = [
            subprocess.Popen(
                [sys.executable, "-c", FIRST_STEP, mode],
                env=environment,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(min(PARALLEL, count - started))
        ]
        started += len(batch)
        for process in batch:
            out, err = process.communicate(timeout=300)
            assert process.returncode == 0, err[-3000:]
            seen[out.strip().splitlines()[-1]] += 1
        if stop_at_divergence and len(seen) > 1:
            break
    return seen


def test_without_the_settled_first_calls_a_fresh_process_sometimes_rounds_its_first_step_differently(intel_paths):
    """The control: the race is real on this host (what made issue 18 intermittent). Fresh processes run until
    one's first step differs from the others'; before the fix about one process in ten did (7 of 80 here)."""
    seen = first_steps(intel_paths, "unsettled", CONTROL_LIMIT, stop_at_divergence=True)
    assert len(seen) > 1, f"no divergence in {sum(seen.values())} fresh processes without settle(): {seen}"


def test_every_fresh_process_trains_its_first_step_bit_identically(intel_paths):
    """The fix: with the Checkpointer settling the math libraries' first calls, every fresh process computes
    the same first step (before it, ``PROCESSES`` = 40 processes all agreed with probability under 3%)."""
    seen = first_steps(intel_paths, "settled", PROCESSES)
    assert len(seen) == 1, f"fresh processes disagree after step 1: {dict(seen)}"
