"""replay-check's ``first_difference`` names the earliest cause: a differing RNG or data position comes before the
weights it made differ (prefect_recovery/training/replay.py ``CAUSE_ORDER``)."""

from __future__ import annotations

import torch

from prefect_recovery import CheckpointStore
from prefect_recovery.training.replay import compare_state
from prefect_recovery.training.state_io import save_state


def test_the_first_difference_is_the_rng_not_the_weights(tmp_path):
    store = CheckpointStore.default(tmp_path / "store")
    stored = {
        "model": {"weight": torch.ones(3)},
        "optimizer": {"lr": 0.1},
        "data": {"generator": torch.zeros(4, dtype=torch.uint8)},
        "rng": {"torch": torch.zeros(8, dtype=torch.uint8)},
    }
    info = save_state(store.core, stored, lineage="run")
    replayed = {
        "model": {"weight": torch.full((3,), 2.0)},
        "optimizer": {"lr": 0.1},
        "data": {"generator": torch.ones(4, dtype=torch.uint8)},
        "rng": {"torch": torch.ones(8, dtype=torch.uint8)},
    }
    manifest, _ = store.core.resolve("run", info.version)
    comparison = compare_state(store.core, manifest, replayed)
    assert comparison.first_difference.name == "rng/torch"
    assert comparison.differing == ["rng/torch", "data/generator", "model/weight"]
