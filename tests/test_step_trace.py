"""PREFECT_RECOVERY_STEP_TRACE: a per-step digest of the weights and gradients, to name the step at which two
runs of the same seed first computed differently (issue 18: a checkpoint shows it only at the next save)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from prefect_recovery.training import step_trace

TRAIN = """
import sys, torch
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader
from prefect_recovery import CheckpointStore, Checkpointer, seed_everything
home, lineage, nudge_at, poke_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
seed_everything(3)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
features = torch.randn(64, 16)
loader = StatefulDataLoader(TensorDataset(features), batch_size=8)
store = CheckpointStore.default(home)
with Checkpointer(store, lineage, model=model, optimizer=optimizer, data=loader, seed=3) as ckpt:
    for step, (x,) in enumerate(loader, start=1):
        optimizer.zero_grad()
        if step == nudge_at:  # one step computed a rounding away from the others
            x = x + 1e-6
        model(x).square().mean().backward()
        optimizer.step()
        if step == poke_at:  # something changed the data under the training (a later batch's rows)
            features[-1, 0] += 1.0
        ckpt.step()
"""


def run(tmp_path: Path, trace: Path, lineage: str, nudge_at: int = 0, poke_at: int = 0) -> None:
    env = {**os.environ, step_trace.ENV: str(trace)}
    done = subprocess.run(
        [sys.executable, "-c", TRAIN, str(tmp_path / "home"), lineage, str(nudge_at), str(poke_at)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def only_trace(directory: Path, lineage: str) -> list[dict]:
    (path,) = directory.glob(f"{lineage}-*.jsonl")
    return step_trace.read(path)


def test_traces_name_the_first_step_that_computed_differently(tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    run(tmp_path, trace, "a")
    run(tmp_path, trace, "b")
    run(tmp_path, trace, "c", nudge_at=5)
    run(tmp_path, trace, "d", poke_at=3)
    a, b, c, d = (only_trace(trace, name) for name in "abcd")

    assert [record["step"] for record in a] == list(range(1, 9))
    first = a[0]  # what the process computed with, and where it saved, once per process
    assert first["lineage"] == "a" and first["seed"] == 3 and first["store"]
    assert first["execution"]["torch_threads"] >= 1 and any("torch" in lib for lib in first["libraries"])
    assert "execution" not in a[1]
    if sys.platform == "linux" and os.uname().machine == "x86_64":
        assert a[0]["mxcsr"] == "0x1f80"  # the default: round to nearest, no flush-to-zero
    assert set(a[0]["parameters"]) == {"0.weight", "0.bias", "2.weight", "2.bias"} == set(a[0]["gradients"])

    assert step_trace.first_difference(a, b) is None  # same seed, same process setup: identical at every step
    found = step_trace.first_difference(a, c)
    # step 5's input differed: its gradients first (the forward/backward), then every later parameter
    assert found is not None and found["step"] == 5
    assert "0.weight" in found["gradients"] and "0.weight" in found["parameters"] and found["dataset"] == []
    # the data changed after step 3's batch was used: named at step 3, before any weight differs
    assert step_trace.first_difference(a, d) == {"step": 3, "gradients": [], "parameters": [], "dataset": [0]}


def test_no_trace_without_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(step_trace.ENV, raising=False)
    import torch

    from prefect_recovery import Checkpointer, CheckpointStore

    model = torch.nn.Linear(2, 2)
    with Checkpointer(CheckpointStore.default(tmp_path / "home"), "quiet", model=model) as ckpt:
        ckpt.step()
    assert ckpt._trace is None
    assert not list(tmp_path.rglob("*.jsonl"))


def test_traces_of_datasets_with_other_tensors_differ_in_the_dataset() -> None:
    """Two traces whose datasets hold a different number of tensors (another pipeline's loader) are told apart,
    not an IndexError."""
    record = {"step": 1, "gradients": {"w": "g"}, "parameters": {"w": "p"}}
    a = [{**record, "dataset": ["x", "y"]}]
    b = [{**record, "dataset": ["x"]}]
    assert step_trace.first_difference(a, b) == {"step": 1, "gradients": [], "parameters": [], "dataset": [1]}
    assert step_trace.first_difference(b, a) == {"step": 1, "gradients": [], "parameters": [], "dataset": [1]}
    assert step_trace.first_difference(a, a) is None
