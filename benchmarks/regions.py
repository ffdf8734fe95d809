"""What writing several regions costs: one save of the same state to 1, 2 and 4 regions, one run.

Regions: a local directory and the storage emulators the tests use (moto for S3,
gcp-storage-emulator for GCS, azurite for Azure; tests/helpers/emulators.py starts them on
127.0.0.1). Every configuration saves the same state (default 16 fp32 tensors of 16 MiB =
256 MiB) as a new lineage, so nothing is deduplicated; the clock covers the whole commit
(hashing, every region's blobs, the manifest). Baselines in the same run: ``torch.save`` and
a raw write of the same bytes to the local disk, both fsynced.

    python benchmarks/regions.py --json [--mib-per-tensor 16] [--tensors 16] [--repeat 2]

Goal (issue "Cloud regions"): N regions cost at most 1.3x the slowest of those regions alone.
The emulators run on the same 2-core machine as the saver, so on this box they compete with
it (and with each other) for CPU; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers.emulators import emulator  # noqa: E402  (the tests' emulator launcher)

from prefect_recovery import CheckpointStore  # noqa: E402


def make_state(tensors: int, mib: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {f"layer{i:03d}": torch.randn(mib * 2**18, generator=generator) for i in range(tensors)}


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def time_save(regions: list[dict[str, Any]], state: dict[str, torch.Tensor]) -> float:
    store = CheckpointStore(regions=regions, write_quorum=len(regions), straggler_grace_seconds=None)
    start = time.perf_counter()
    info = store.save(state, lineage=f"bench-{uuid.uuid4().hex[:8]}", step=0)
    elapsed = time.perf_counter() - start
    assert not info.lagging, info.lagging
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--mib-per-tensor", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2, help="runs per configuration; the fastest counts")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()
    say = (lambda *_: None) if args.json else (lambda *parts: print(*parts, file=sys.stderr))
    state = make_state(args.tensors, args.mib_per_tensor)
    total = sum(t.numel() * t.element_size() for t in state.values())

    with tempfile.TemporaryDirectory(prefix="bench-regions-") as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        say("starting emulators...")
        emulators = {kind: stack.enter_context(emulator(kind, log_dir=root)) for kind in ("s3", "gcs", "azure")}

        def local(run: str) -> dict[str, Any]:
            path = root / f"local-{run}"
            path.mkdir()
            return {"url": str(path)}

        region_of = {
            "local": local,
            **{kind: (lambda run, e=e: e.region(prefix=f"run-{run}")) for kind, e in emulators.items()},
        }
        configurations = {
            "local": ["local"],
            "s3": ["s3"],
            "gcs": ["gcs"],
            "azure": ["azure"],
            "local+s3": ["local", "s3"],
            "local+s3+gcs+azure": ["local", "s3", "gcs", "azure"],
        }
        seconds: dict[str, float] = {}
        for name, kinds in configurations.items():
            runs = []
            for _ in range(args.repeat):
                run = uuid.uuid4().hex[:8]
                runs.append(time_save([region_of[kind](run) for kind in kinds], state))
            seconds[name] = min(runs)
            say(f"{name:>20}: {seconds[name]:.2f} s ({total / seconds[name] / 2**20:.0f} MiB/s)")

        baselines: dict[str, float] = {}
        path = root / "torch.pt"
        start = time.perf_counter()
        torch.save(state, path)
        fsync_file(path)
        baselines["torch_save_local"] = time.perf_counter() - start
        raw = root / "raw.bin"
        start = time.perf_counter()
        with raw.open("wb") as handle:
            for tensor in state.values():
                handle.write(memoryview(tensor.numpy()).cast("B"))
            handle.flush()
            os.fsync(handle.fileno())
        baselines["raw_write_local"] = time.perf_counter() - start

    ratios = {}
    for name, kinds in configurations.items():
        if len(kinds) > 1:
            slowest = max(seconds[kind] for kind in kinds)
            ratios[name] = {"seconds": seconds[name], "slowest_single": slowest, "ratio": seconds[name] / slowest}
    report = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "state_bytes": total,
        "save_seconds": seconds,
        "baselines_seconds": baselines,
        "multi_region_vs_slowest_single": ratios,
        "goal": "ratio <= 1.3",
        "goal_met": {name: value["ratio"] <= 1.3 for name, value in ratios.items()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
