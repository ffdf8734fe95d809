"""How long the event loop stalls while an async flow saves and loads a checkpoint (issue 16).

A coroutine wakes every 5 ms and records when; the longest gap between two wake-ups is the
longest the loop was blocked (plus the 5 ms it slept). Measured in one run, one process, on a
two-region local store (write quorum 2), fresh values per save:

* ``idle``: the ticker alone for as long as the async save took: the machine's own scheduling
  noise, the floor of every other figure;
* ``async_save`` / ``async_load``: ``await store.save_checkpoint(...)`` /
  ``await store.load_checkpoint(...)`` (the blocking work in a worker thread,
  blocks/async_api.py);
* ``blocking_save``: ``store.save_checkpoint(..., _sync=True)`` called on the loop, what an
  async flow got before the async API: the loop stalls for the whole save.

    python benchmarks/async_loop.py --json [--mib 256] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from prefect_recovery import CheckpointStore

TICK = 0.005


class Ticker:
    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.running = True

    async def run(self) -> None:
        while self.running:
            self.stamps.append(time.perf_counter())
            await asyncio.sleep(TICK)

    def gap_ms(self, start: float, end: float) -> float:
        edges = [start, *[s for s in self.stamps if start < s < end], end]
        return round(1000 * max(b - a for a, b in itertools.pairwise(edges)), 1)


async def one_round(store: CheckpointStore, mib: int, seed: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    state = {"w": torch.randn(mib * 2**18, generator=generator)}  # fresh values: nothing deduplicated
    ticker = Ticker()
    ticking = asyncio.create_task(ticker.run())
    await asyncio.sleep(0.05)
    t0 = time.perf_counter()
    await store.save_checkpoint(state, lineage="bench", step=seed)
    t1 = time.perf_counter()
    await store.load_checkpoint(lineage="bench")
    t2 = time.perf_counter()
    await asyncio.sleep(t1 - t0)  # idle, as long as the save took
    t3 = time.perf_counter()
    state["w"].add_(1.0)  # new bytes for the blocking save
    store.save_checkpoint(state, lineage="bench", step=seed, _sync=True)
    await asyncio.sleep(0.02)  # let the ticker record the end of the stall
    t4 = time.perf_counter()
    ticker.running = False
    await ticking
    return {
        "idle_max_gap_ms": ticker.gap_ms(t2, t3),
        "async_save_max_gap_ms": ticker.gap_ms(t0, t1),
        "async_load_max_gap_ms": ticker.gap_ms(t1, t2),
        "blocking_save_max_gap_ms": ticker.gap_ms(t3, t4),
        "save_seconds": round(t1 - t0, 3),
        "load_seconds": round(t2 - t1, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        regions = [Path(root) / "a", Path(root) / "b"]
        for region in regions:
            region.mkdir()
        store = CheckpointStore(regions=[str(region) for region in regions], write_quorum=2)
        rounds = [asyncio.run(one_round(store, args.mib, seed)) for seed in range(args.repeat)]
    result = {
        "benchmark": "async_loop",
        "mib": args.mib,
        "tick_ms": TICK * 1000,
        "machine": platform.machine(),
        "rounds": rounds,
        "median": {key: sorted(r[key] for r in rounds)[len(rounds) // 2] for key in rounds[0]},
    }
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
