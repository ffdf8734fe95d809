"""Two runs of the same state that round differently are told apart by how their processes computed.

Issue 18: runs of the same seed sometimes differed by about 1e-6 in the weights with identical RNGs and data,
i.e. by rounding, not by a random draw. Every checkpoint now records its process's execution fingerprint
(CPU, the instruction set ATen dispatches to, thread pools, kernel-selecting environment variables), and
``history --against`` names the fields in which the two diverging processes differed. Here a real second
process is made to compute with ATen's portable kernels (``ATEN_CPU_CAPABILITY=default``), which round
differently from the vectorized ones this machine uses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from typer.testing import CliRunner

from prefect_recovery.cli import app
from prefect_recovery.training.determinism import execution_fingerprint, fingerprint_differences

TRAIN = """
import sys
from prefect_recovery import CheckpointStore
from prefect_recovery.examples import workload
store = CheckpointStore.default(sys.argv[1])
workload.train(store, sys.argv[2], workload.make_data(0), steps=10, seed=0)
"""


def train(home: Path, lineage: str, **env: str) -> None:
    environment = {key: value for key, value in os.environ.items() if key != "ATEN_CPU_CAPABILITY"} | env
    done = subprocess.run([sys.executable, "-c", TRAIN, str(home), lineage], env=environment, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def history(home: Path, a: str, b: str, *options: str) -> str:
    regions = ["--region", str(home / "regions" / "region-a"), "--region", str(home / "regions" / "region-b")]
    result = CliRunner().invoke(app, ["history", "--lineage", a, "--against", b, *regions, *options])
    assert result.exit_code == 0, result.output
    return result.output


def test_the_fingerprint_describes_this_process() -> None:
    fingerprint = execution_fingerprint()
    assert fingerprint["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert fingerprint["torch_threads"] == torch.get_num_threads()
    assert fingerprint["cpu"]  # the CPU model, read from /proc/cpuinfo
    other = {**fingerprint, "torch_threads": fingerprint["torch_threads"] + 1,
             "environment": {**fingerprint["environment"], "MKL_CBWR": "COMPATIBLE"}}  # fmt: skip
    assert fingerprint_differences(fingerprint, other) == {
        "environment.MKL_CBWR": [fingerprint["environment"].get("MKL_CBWR"), "COMPATIBLE"],
        "torch_threads": [fingerprint["torch_threads"], fingerprint["torch_threads"] + 1],
    }
    assert fingerprint_differences(fingerprint, None) == {}  # a checkpoint saved before fingerprints existed


def test_history_against_names_how_two_diverging_processes_computed(tmp_path: Path) -> None:
    capability = torch.backends.cpu.get_cpu_capability()
    assert capability != "DEFAULT", "this test needs a CPU with vector kernels (AVX2 or better)"
    train(tmp_path, "vectorized")
    train(tmp_path, "again")
    train(tmp_path, "portable", ATEN_CPU_CAPABILITY="default")

    same = json.loads(history(tmp_path, "vectorized", "again", "--json"))
    assert same["identical"] is True

    found = json.loads(history(tmp_path, "vectorized", "portable", "--json"))["first_divergence"]
    assert found["step"] == 10 and found["tier"] == "light"
    assert not any(name.startswith(("rng", "counters", "data")) for name in found["differing"]), found
    assert any(name.startswith("model/") for name in found["differing"])
    assert found["execution_differences"]["cpu_capability"] == [capability, "DEFAULT"]
    assert found["execution_differences"]["environment.ATEN_CPU_CAPABILITY"] == [None, "default"]

    human = " ".join(history(tmp_path, "vectorized", "portable").split())  # rich wraps long lines
    assert "first differ at step 10" in human
    assert f"cpu_capability '{capability}' vs 'DEFAULT'" in human


def test_a_recovery_on_other_kernels_is_warned_that_it_may_round_differently() -> None:
    """The recovery's environment preflight compares the crashed run's recorded fingerprint with this
    process's: another CPU or instruction set is a warning (the result may not be bit-identical), not a
    refusal; the thread count is not (a checkpoint restores it)."""
    from prefect_recovery.tasks.pipeline_run import environment, environment_differences

    now = environment()
    assert now["execution"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert environment_differences(now, now) == ([], [])

    elsewhere = {**now, "execution": {**now["execution"], "cpu_capability": "AVX2", "cpu": "another CPU",
                                      "cpus_allowed": 64}}  # fmt: skip
    problems, warnings = environment_differences(elsewhere, now)
    assert problems == []
    assert len(warnings) == 2 and all("not bit-identical" in warning for warning in warnings), warnings
    assert any("cpu_capability" in w and "'AVX2'" in w for w in warnings)
    assert any("cpu=" in w and "'another CPU'" in w for w in warnings)

    recorded_before_fingerprints = {key: value for key, value in now.items() if key != "execution"}
    assert environment_differences(recorded_before_fingerprints, now) == ([], [])
