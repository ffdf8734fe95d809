"""Save/restore throughput of CheckpointStore against the usual ways, in one run.

Every method writes the same state (default 64 fp32 tensors of 16 MiB = 1 GiB) to the same
disk and makes it durable (fsync) before the clock stops; then each reads it back. Prints JSON.

    python benchmarks/save_restore.py --json [--tensors 64] [--mib 16] [--dir DIR] [--repeat 2]

Reads come from the page cache for every method alike (the files were just written); compare
ratios within one run, not absolute numbers across machines.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
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


def run(tensors: int, mib: int, root: Path, repeat: int) -> dict[str, object]:
    state = make_state(tensors, mib)
    total = sum(t.numel() * t.element_size() for t in state.values())
    results: dict[str, dict[str, float]] = {}

    def record(method: str, kind: str, seconds: float) -> None:
        entry = results.setdefault(method, {})
        entry[f"{kind}_s"] = min(seconds, entry.get(f"{kind}_s", float("inf")))
        entry[f"{kind}_gbps"] = round(total / entry[f"{kind}_s"] / 1e9, 3)

    def check(loaded: dict[str, torch.Tensor]) -> None:
        assert all(torch.equal(loaded[name], tensor) for name, tensor in state.items()), "round trip differs"

    second_save: dict[str, int] = {}
    for _ in range(repeat):
        for method, save, load in (
            ("raw_write_fsync", raw_save, raw_load),
            ("torch_save", torch_save, lambda s, p: torch.load(p, weights_only=True)),
            ("safetensors", safetensors_save, lambda s, p: load_file(str(p))),
            ("torch_dcp", dcp_save, dcp_load),
        ):
            target = root / method
            shutil.rmtree(target, ignore_errors=True)
            seconds, _ = timed(lambda save=save, target=target: save(state, target))
            record(method, "save", seconds)
            seconds, loaded = timed(lambda load=load, target=target: load(state, target))
            record(method, "load", seconds)
            check(loaded)
            del loaded
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink()

        region = root / "store-region"
        shutil.rmtree(region, ignore_errors=True)
        region.mkdir()
        store = CheckpointStore(regions=[str(region)], write_quorum=1)
        seconds, _ = timed(lambda store=store: store.save(state, lineage="bench", step=1))
        record("checkpoint_store", "save", seconds)
        seconds, loaded = timed(lambda store=store: store.load(lineage="bench"))
        record("checkpoint_store", "load", seconds)
        check(loaded)
        del loaded
        seconds, again = timed(lambda store=store: store.save(state, lineage="bench", step=2))
        record("checkpoint_store_unchanged", "save", seconds)
        second_save = {"bytes_written": again.bytes_written, "total_bytes": again.total_bytes}
        shutil.rmtree(region)

    store_save = results["checkpoint_store"]["save_s"]
    store_load = results["checkpoint_store"]["load_s"]
    return {
        "benchmark": "save_restore",
        "state_bytes": total,
        "tensors": tensors,
        "tensor_mib": mib,
        "repeat": repeat,
        "host": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
        "methods": results,
        "ratios": {
            "save_vs_torch_save": round(results["torch_save"]["save_s"] / store_save, 2),
            "save_vs_raw_write_fsync": round(results["raw_write_fsync"]["save_s"] / store_save, 2),
            "save_vs_safetensors": round(results["safetensors"]["save_s"] / store_save, 2),
            "save_vs_torch_dcp": round(results["torch_dcp"]["save_s"] / store_save, 2),
            "load_vs_torch_load": round(results["torch_save"]["load_s"] / store_load, 2),
            "load_vs_safetensors": round(results["safetensors"]["load_s"] / store_load, 2),
            "load_vs_torch_dcp": round(results["torch_dcp"]["load_s"] / store_load, 2),
            "unchanged_second_save_written_fraction": round(
                second_save["bytes_written"] / second_save["total_bytes"], 6
            ),
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
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-", dir=args.dir))
    try:
        print(json.dumps(run(args.tensors, args.mib, root, args.repeat), indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
