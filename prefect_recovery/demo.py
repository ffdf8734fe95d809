"""The store walk-through behind ``prefect-recovery demo`` (until the example pipeline lands)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .blocks import CheckpointStore


def _small_model(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inputs, targets = torch.randn(128, 32), torch.randint(0, 4, (128,))
    for _ in range(5):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    return model, optimizer


def run_store_demo(*, lineage: str, seed: int, say: Callable[[str], Any] | None) -> dict[str, Any]:
    say = say or (lambda _message: None)
    store = CheckpointStore.default()
    say(f"store: {len(store.regions)} local regions, write_quorum={store.write_quorum}")
    for region in store.regions:
        say(f"  region {region.url}")
    model, optimizer = _small_model(seed)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": {"torch": torch.get_rng_state()},
        "step": 5,
    }
    info = store.save(state, lineage=lineage, step=5, metadata={"seed": seed})
    say(
        f"saved {lineage} v{info.version}: {info.total_bytes} bytes, {info.bytes_written} new bytes "
        f"written, committed in {len(info.regions)} regions"
    )
    listed = store.list(lineage)
    say(f"listed {len(listed)} consistent versions of {lineage}: {[i.version for i in listed]}")
    report = store.verify(lineage=lineage)
    say(f"verified: {'healthy' if report.healthy else 'PROBLEMS'}, {report.blobs} blobs re-hashed")
    restored = store.load(lineage=lineage, version=info.version)
    identical = all(
        torch.equal(value, restored["model"][key]) for key, value in state["model"].items()
    ) and torch.equal(restored["rng"]["torch"], state["rng"]["torch"])
    say(f"restored v{info.version}: tensors bit-identical to the saved state: {identical}")
    return {
        "lineage": lineage,
        "status": "ok" if identical and report.healthy else "failed",
        "version": info.version,
        "manifest_digest": info.manifest_digest,
        "regions": info.regions,
        "versions": [i.version for i in listed],
        "healthy": report.healthy,
        "bit_identical": identical,
    }
