"""Save/restore throughput of CheckpointStore against the usual ways, in one run.

Every method writes the same state (default 64 fp32 tensors of 16 MiB = 1 GiB) to the same
disk and makes it durable (fsync) before the clock stops; then each reads it back. Prints JSON.

    python benchmarks/save_restore.py --json [--tensors 64] [--mib 16] [--dir DIR] [--repeat 2]

Each method runs in a fresh process (same memory warm-up), so no method reuses memory another
one faulted in. Reads come from the page cache for every method alike (the files were just
written); compare ratios within one run, not absolute numbers across machines.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from prefect_recovery import CheckpointStore


def make_state(tensors: int, mib: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    numel = mib * 2**20 // 4
    return {f"layer{i:03d}.weight": torch.randn(numel, generator=generator) for i in range(tensors)}


def fsync_path(path: Path) -> None:
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in paths:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    gc.collect()
    start = time.perf_counter()
    result = fn()
    if isinstance(result, dict):  # lazy loaders (mmap) pay for their reads here, like the rest
        for value in result.values():
            if isinstance(value, torch.Tensor) and value.numel():
                value.view(-1)[:: max(1, 4096 // value.element_size())].sum()
    return time.perf_counter() - start, result


def raw_save(state: dict[str, torch.Tensor], path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for tensor in state.values():
            view = memoryview(tensor.numpy()).cast("B")
            written = 0
            while written < len(view):
                written += os.write(fd, view[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_load(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    out = {name: torch.empty_like(tensor) for name, tensor in state.items()}
    with open(path, "rb", buffering=0) as handle:
        for tensor in out.values():
            handle.readinto(memoryview(tensor.numpy()).cast("B"))
    return out


def torch_save(state: dict[str, torch.Tensor], path: Path) -> None:
    with open(path, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())


def safetensors_save(state: dict[str, torch.Tensor], path: Path) -> None:
    save_file(state, str(path))
    fsync_path(path)


def dcp_save(state: dict[str, torch.Tensor], path: Path) -> None:
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path), sync_files=True))


def dcp_load(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    out = {name: torch.empty_like(tensor) for name, tensor in state.items()}
    dcp.load(out, storage_reader=dcp.FileSystemReader(str(path)))
    return out


def warm_up(nbytes: int) -> None:
    """Touch and free memory first: on a VM the first touch of guest memory is very slow, and it
    would otherwise land on whichever method happens to run first."""
    block = torch.empty(nbytes // 4)
    block.view(-1)[::1024].fill_(1.0)
    del block


METHODS: dict[str, tuple[Callable, Callable]] = {
    "raw_write_fsync": (raw_save, raw_load),
    "torch_save": (torch_save, lambda s, p: torch.load(p, weights_only=True)),
    "safetensors": (safetensors_save, lambda s, p: load_file(str(p))),
    "torch_dcp": (dcp_save, dcp_load),
}


def run_one(method: str, tensors: int, mib: int, root: Path) -> dict[str, float]:
    """One method in this (fresh) process: save, load, check; seconds for each."""
    state = make_state(tensors, mib)
    total = sum(t.numel() * t.element_size() for t in state.values())
    warm_up(2 * total)
    result: dict[str, float] = {}

    def check(loaded: dict[str, torch.Tensor]) -> None:
        assert all(torch.equal(loaded[name], tensor) for name, tensor in state.items()), "round trip differs"

    # A restore into a live model: destination tensors exist (and were touched) already.
    live = {name: torch.zeros_like(tensor) for name, tensor in state.items()}

    if method in METHODS:
        save, load = METHODS[method]
        target = root / method
        result["save_s"], _ = timed(lambda: save(state, target))
        result["load_s"], loaded = timed(lambda: load(state, target))
        check(loaded)
        del loaded
        if method == "torch_save":  # torch.load, then load_state_dict-style copy into the model

            def load_and_copy() -> dict[str, torch.Tensor]:
                loaded = load(state, target)
                for name, tensor in live.items():
                    tensor.copy_(loaded[name])
                return live

            result["restore_into_s"], restored = timed(load_and_copy)
            check(restored)
        return result
    region = root / "store-region"
    region.mkdir()
    store = CheckpointStore(regions=[str(region)], write_quorum=1)
    result["save_s"], _ = timed(lambda: store.save(state, lineage="bench", step=1))
    result["load_s"], loaded = timed(lambda: store.load(lineage="bench"))
    check(loaded)
    del loaded
    result["restore_into_s"], restored = timed(lambda: store.load(lineage="bench", into=live))
    check(restored)
    assert all(restored[name] is live[name] for name in live), "load(into=) did not fill the live tensors"
    result["unchanged_save_s"], again = timed(lambda: store.save(state, lineage="bench", step=2))
    result["unchanged_bytes_written"] = again.bytes_written
    return result


def run(tensors: int, mib: int, root: Path, repeat: int) -> dict[str, object]:
    total = tensors * mib * 2**20
    results: dict[str, dict[str, float]] = {}
    unchanged_written = None
    for _ in range(repeat):
        for method in [*METHODS, "checkpoint_store"]:
            workdir = Path(tempfile.mkdtemp(prefix=f"{method}-", dir=root))
            command = [sys.executable, __file__, "--one", method, "--tensors", str(tensors), "--mib", str(mib),
                       "--dir", str(workdir)]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            shutil.rmtree(workdir, ignore_errors=True)
            measured = json.loads(done.stdout)
            entry = results.setdefault(method, {})
            for kind in ("save", "load", "restore_into"):
                if f"{kind}_s" not in measured:
                    continue
                seconds = min(measured[f"{kind}_s"], entry.get(f"{kind}_s", float("inf")))
                entry[f"{kind}_s"] = round(seconds, 4)
                entry[f"{kind}_gbps"] = round(total / seconds / 1e9, 3)
            if method == "checkpoint_store":
                unchanged = min(measured["unchanged_save_s"], entry.get("unchanged_save_s", float("inf")))
                entry["unchanged_save_s"] = round(unchanged, 4)
                unchanged_written = measured["unchanged_bytes_written"]

    store_save = results["checkpoint_store"]["save_s"]
    store_load = results["checkpoint_store"]["load_s"]
    return {
        "benchmark": "save_restore",
        "state_bytes": total,
        "tensors": tensors,
        "tensor_mib": mib,
        "repeat": repeat,
        "note": "each method runs in a fresh process after the same memory warm-up; best of `repeat`",
        "host": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
        "methods": results,
        "ratios": {
            "save_vs_torch_save": round(results["torch_save"]["save_s"] / store_save, 2),
            "save_vs_raw_write_fsync": round(results["raw_write_fsync"]["save_s"] / store_save, 2),
            "save_vs_safetensors": round(results["safetensors"]["save_s"] / store_save, 2),
            "save_vs_torch_dcp": round(results["torch_dcp"]["save_s"] / store_save, 2),
            "load_vs_torch_load": round(results["torch_save"]["load_s"] / store_load, 2),
            "restore_into_vs_torch_load_and_copy": round(
                results["torch_save"]["restore_into_s"] / results["checkpoint_store"]["restore_into_s"], 2
            ),
            "load_vs_safetensors": round(results["safetensors"]["load_s"] / store_load, 2),
            "load_vs_torch_dcp": round(results["torch_dcp"]["load_s"] / store_load, 2),
            "unchanged_second_save_written_fraction": round((unchanged_written or 0) / total, 6),
        },
        "goals": {
            "save_vs_torch_save": ">= 1.5",
            "save_vs_raw_write_fsync": ">= 0.8",
            "load_vs_torch_load": ">= 1.5",
            "unchanged_second_save_written_fraction": "< 0.01",
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=64)
    parser.add_argument("--mib", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2, help="best of N runs per method")
    parser.add_argument("--dir", type=Path, default=None, help="directory on the disk to measure")
    parser.add_argument("--json", action="store_true", help="print JSON (the only output format)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one method, this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.tensors, args.mib, args.dir)))
        return
    root = Path(tempfile.mkdtemp(prefix="bench-", dir=args.dir))
    try:
        print(json.dumps(run(args.tensors, args.mib, root, args.repeat), indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
