"""MKL computes in its run-to-run reproducible mode (CNR) wherever prefect_recovery trains.

Issue 18: PyTorch's CPU build does its matrix products with Intel MKL, whose default is not run-to-run
reproducible (Intel: bitwise-identical results from run to run need ``MKL_CBWR`` set, a fixed thread count and
``MKL_DYNAMIC=FALSE``). ``import prefect_recovery`` asks for CNR before torch first computes; a process where
it came too late is named by a warning (an error under strict determinism) and in every checkpoint's
execution fingerprint, so ``history --against`` and a recovery's preflight name it. Each case runs a real
fresh process: MKL fixes its mode at its first computation, once per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prefect_recovery.tasks.pipeline_run import environment_differences

pytestmark = pytest.mark.skipif(
    not torch.backends.mkl.is_available(), reason="this torch build does not compute with MKL (nothing to set)"
)

PROBE = """
import json, os, sys, warnings
warnings.simplefilter("always")
order = sys.argv[1]
if order == "torch-first":
    import torch
    torch.ones(8, 8) @ torch.ones(8, 8)  # MKL's first computation, before prefect_recovery is imported
import torch
from prefect_recovery import CheckpointStore, Checkpointer, DeterminismError
from prefect_recovery.training.determinism import execution_fingerprint, mkl_cnr
torch.ones(8, 8) @ torch.ones(8, 8)
store = CheckpointStore.default(sys.argv[2])
model = torch.nn.Linear(4, 4)
with warnings.catch_warnings(record=True) as caught:
    Checkpointer(store, "a", model=model)
    Checkpointer(store, "b", model=model)
try:
    Checkpointer(store, "c", model=model, strict_determinism=True)
    strict = None
except DeterminismError as error:
    strict = str(error)
print(json.dumps({
    "mkl_cnr": mkl_cnr(),
    "fingerprint": execution_fingerprint()["mkl_cnr"],
    "environment": {name: os.environ.get(name) for name in ("MKL_CBWR", "MKL_DYNAMIC")},
    "warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
    "strict": strict,
}))
"""


def probe(tmp_path: Path, order: str = "prefect-recovery-first", **env: str) -> dict:
    environment = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "MKL_DYNAMIC")} | env
    done = subprocess.run([sys.executable, "-c", PROBE, order, str(tmp_path / "store")], env=environment,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_prefect_recovery_first_turns_on_mkl_reproducibility(tmp_path: Path) -> None:
    seen = probe(tmp_path)
    assert seen["mkl_cnr"] == seen["fingerprint"] == "auto"
    assert seen["environment"] == {"MKL_CBWR": "AUTO", "MKL_DYNAMIC": "FALSE"}
    assert seen["warnings"] == [] and seen["strict"] is None


def test_the_users_own_mkl_settings_are_kept(tmp_path: Path) -> None:
    seen = probe(tmp_path, MKL_CBWR="COMPATIBLE", MKL_DYNAMIC="TRUE")
    assert seen["mkl_cnr"] == "compatible"
    assert seen["environment"] == {"MKL_CBWR": "COMPATIBLE", "MKL_DYNAMIC": "TRUE"}
    assert seen["warnings"] == [] and seen["strict"] is None


@pytest.mark.parametrize("how", ["torch computed first", "opted out"])
def test_a_process_computing_without_reproducibility_is_told_once_and_strict_mode_refuses(
    tmp_path: Path, how: str
) -> None:
    if how == "torch computed first":
        seen = probe(tmp_path, "torch-first")
    else:
        seen = probe(tmp_path, PREFECT_RECOVERY_REPRODUCIBLE_KERNELS="0")
        assert seen["environment"] == {"MKL_CBWR": None, "MKL_DYNAMIC": None}
    assert seen["mkl_cnr"] == seen["fingerprint"] == "off"
    assert len(seen["warnings"]) == 1, seen["warnings"]  # two Checkpointers, one warning per process
    warning = seen["warnings"][0]
    assert warning.startswith("NonReproducibleKernelsWarning")
    assert "MKL_CBWR=AUTO" in warning and "Import prefect_recovery before torch" in warning
    assert seen["strict"] is not None and "MKL_CBWR=AUTO" in seen["strict"]


def test_a_recovery_in_a_process_without_reproducible_kernels_is_warned() -> None:
    """The mode is part of the fingerprint a recovery's preflight compares with the crashed run's."""
    from prefect_recovery.tasks.pipeline_run import environment

    now = environment()
    assert now["execution"]["mkl_cnr"] == "auto"  # this test process imported prefect_recovery first
    off = {**now, "execution": {**now["execution"], "mkl_cnr": "off"}}
    problems, warnings = environment_differences(now, off)
    assert problems == []
    assert len(warnings) == 1 and "mkl_cnr='off'" in warnings[0] and "'auto'" in warnings[0], warnings
