"""Save/restore throughput of CheckpointStore against the usual ways, in one run.

Every method writes the same state (default 64 tensors of 16 MiB = 1 GiB) to the same disk and
makes it durable (fsync) before the clock stops; then each reads it back. Prints JSON.

    python benchmarks/save_restore.py --json [--tensors 64] [--mib 16] [--dir DIR] [--repeat 2]
        [--values trained|random] [--codecs none,auto,bytegroup-zstd,auto+none]

The state (``--values trained``, the default) has the values of a training state: an MLP
trained here with AdamW in fp32 and in bf16, its weights, ``exp_avg`` and ``exp_avg_sq``; each
16 MiB tensor is drawn (with replacement) from one of these six classes, so it has that class's
value distribution (what a codec compresses) while no two tensors or chunks are equal (which
content addressing would dedup). Half the bytes are fp32, half bf16. ``--values random`` is the
earlier state: fp32 normal noise, which ``auto`` stores raw.

The store is measured once per codec (``--codecs``): each is its own method. ``auto+none`` is a
store of two regions on the same disk with a codec each (region codecs), the compressed one listed
first: what a store with a compressed cloud region and a raw local disk costs to save and load. Each method runs
in a fresh process (same memory warm-up), so no method reuses memory another one faulted in.
Methods alternate round by round (``--repeat`` rounds, best of them). Reads come from the page
cache for every method alike (the files were just written); compare ratios within one run, not
absolute numbers across machines. The load average is recorded before each method.
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
from prefect_recovery.core.codecs import check_codec

CLASSES = ("weight", "exp_avg", "exp_avg_sq")


def trained_classes(steps: int) -> list[tuple[str, torch.Tensor]]:
    """(name, values) of each class of a trained MLP's state: weights and AdamW moments, fp32 and
    bf16 (the same model and data as benchmarks/codecs.py's MLP)."""
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(512, 1024),
            torch.nn.GELU(),
            torch.nn.Linear(1024, 1024),
            torch.nn.GELU(),
            torch.nn.Linear(1024, 512),
        ).to(dtype)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(1)
        for _ in range(steps):
            optimizer.zero_grad()
            x = torch.randn(64, 512, generator=generator).to(dtype)
            (model(x).float() - x.float()).square().mean().backward()
            optimizer.step()
        params = list(model.parameters())
        values = {
            "weight": params,
            "exp_avg": [optimizer.state[p]["exp_avg"] for p in params],
            "exp_avg_sq": [optimizer.state[p]["exp_avg_sq"] for p in params],
        }
        for kind in CLASSES:
            flat = torch.cat([t.detach().reshape(-1) for t in values[kind]])
            out.append((f"{str(dtype).removeprefix('torch.')}/{kind}", flat))
    return out


def make_state(tensors: int, mib: int, values: str = "trained", steps: int = 150) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    if values == "random":
        numel = mib * 2**20 // 4
        return {f"layer{i:03d}.weight": torch.randn(numel, generator=generator) for i in range(tensors)}
    sources = trained_classes(steps)
    state = {}
    for i in range(tensors):
        name, source = sources[i % len(sources)]
        numel = mib * 2**20 // source.element_size()
        picks = torch.randint(0, source.numel(), (numel,), generator=generator)
        state[f"layer{i:03d}.{name.replace('/', '.')}"] = source[picks]
    return state


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
            view = memoryview(tensor.view(torch.uint8).numpy())
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
            handle.readinto(memoryview(tensor.view(torch.uint8).numpy()))
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


STORE_PREFIX = "checkpoint_store"  # the store with codec X is method "checkpoint_store/X"


def run_one(method: str, source: Path, root: Path) -> dict[str, float]:
    """One method in this (fresh) process: save, load, check; seconds for each."""
    state = {name: tensor.clone() for name, tensor in load_file(str(source)).items()}  # owned memory
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
    # "auto" one region with that codec; "auto+none" two regions, one codec each (region codecs), in that order
    per_region = method.split("/", 1)[1].split("@", 1)[0].split("+")
    regions = [root / f"store-region-{i}" for i in range(len(per_region))]
    for region in regions:
        region.mkdir()
    store = CheckpointStore(
        regions=[str(region) for region in regions],
        write_quorum=len(regions),
        codec=per_region[0],
        region_codecs={str(r): c for r, c in zip(regions, per_region, strict=True)} if len(regions) > 1 else {},
    )
    result["save_s"], info = timed(lambda: store.save(state, lineage="bench", step=1))
    result["bytes_written"] = info.bytes_written
    result["load_s"], loaded = timed(lambda: store.load(lineage="bench"))
    check(loaded)
    del loaded
    result["restore_into_s"], restored = timed(lambda: store.load(lineage="bench", into=live))
    check(restored)
    assert all(restored[name] is live[name] for name in live), "load(into=) did not fill the live tensors"
    result["unchanged_save_s"], again = timed(lambda: store.save(state, lineage="bench", step=2))
    result["unchanged_bytes_written"] = again.bytes_written
    return result


def run(
    tensors: int,
    mib: int,
    root: Path,
    repeat: int,
    values: str,
    codecs: list[str],
    steps: int,
    baseline: Path | None = None,
) -> dict[str, object]:
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    state = make_state(tensors, mib, values, steps)
    total = sum(t.numel() * t.element_size() for t in state.values())
    source = root / "source.safetensors"
    save_file(state, str(source))
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in state.values()})
    del state
    methods = [*METHODS, *(f"{STORE_PREFIX}/{codec}" for codec in codecs)]
    if baseline is not None:  # the same store methods from another checkout, in the same rounds
        methods += [f"{STORE_PREFIX}/{codec}@baseline" for codec in codecs]
    results: dict[str, dict[str, float]] = {}
    load_averages: dict[str, list[float]] = {}
    for _ in range(repeat):
        for method in methods:
            workdir = Path(tempfile.mkdtemp(prefix=f"{method.replace('/', '-')}-", dir=root))
            load_averages.setdefault(method, []).append(round(os.getloadavg()[0], 2))
            command = [sys.executable, __file__, "--one", method, "--source", str(source), "--dir", str(workdir)]
            env = None
            if method.endswith("@baseline"):  # prefect_recovery imported from the baseline checkout
                env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(baseline), os.environ.get("PYTHONPATH", "")])}
            done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
            shutil.rmtree(workdir, ignore_errors=True)
            measured = json.loads(done.stdout)
            entry = results.setdefault(method, {})
            for kind in ("save", "load", "restore_into", "unchanged_save"):
                if f"{kind}_s" not in measured:
                    continue
                seconds = min(measured[f"{kind}_s"], entry.get(f"{kind}_s", float("inf")))
                entry[f"{kind}_s"] = round(seconds, 4)
                if kind != "unchanged_save":
                    entry[f"{kind}_gbps"] = round(total / seconds / 1e9, 3)
            if method.startswith(STORE_PREFIX):
                entry["bytes_written"] = measured["bytes_written"]
                entry["ratio"] = round(total / measured["bytes_written"], 4)
                entry["unchanged_bytes_written"] = measured["unchanged_bytes_written"]

    ratios: dict[str, dict[str, float]] = {}
    for codec in [*codecs, *(f"{codec}@baseline" for codec in codecs if baseline is not None)]:
        store = results[f"{STORE_PREFIX}/{codec}"]
        ratios[codec] = {
            "save_vs_torch_save": round(results["torch_save"]["save_s"] / store["save_s"], 2),
            "save_vs_raw_write_fsync": round(results["raw_write_fsync"]["save_s"] / store["save_s"], 2),
            "save_vs_safetensors": round(results["safetensors"]["save_s"] / store["save_s"], 2),
            "save_vs_torch_dcp": round(results["torch_dcp"]["save_s"] / store["save_s"], 2),
            "load_vs_torch_load": round(results["torch_save"]["load_s"] / store["load_s"], 2),
            "restore_into_vs_torch_load_and_copy": round(
                results["torch_save"]["restore_into_s"] / store["restore_into_s"], 2
            ),
            "load_vs_safetensors": round(results["safetensors"]["load_s"] / store["load_s"], 2),
            "load_vs_torch_dcp": round(results["torch_dcp"]["load_s"] / store["load_s"], 2),
            "unchanged_second_save_written_fraction": round(store["unchanged_bytes_written"] / total, 6),
        }
    return {
        "benchmark": "save_restore",
        "state_bytes": total,
        "tensors": tensors,
        "tensor_mib": mib,
        "values": values,
        "dtypes": dtypes,
        "train_steps": steps if values == "trained" else None,
        "repeat": repeat,
        "baseline_checkout": str(baseline) if baseline is not None else None,
        "note": "each method runs in a fresh process after the same memory warm-up; methods alternate round by "
        "round; best of `repeat`",
        "host": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "node": platform.node(),
        },
        "started": started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average_before_each_round": load_averages,
        "methods": results,
        "ratios": ratios,
        "goals": {
            "save_vs_torch_save": ">= 1.5",
            "save_vs_raw_write_fsync": ">= 0.8",
            "load_vs_torch_load": ">= 1.5",
            "restore_into_vs_torch_load_and_copy": ">= 3",
            "unchanged_second_save_written_fraction": "< 0.01",
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=64)
    parser.add_argument("--mib", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2, help="best of N runs per method")
    parser.add_argument("--dir", type=Path, default=None, help="directory on the disk to measure")
    parser.add_argument("--values", choices=("trained", "random"), default="trained", help="see the docstring")
    parser.add_argument("--train-steps", type=int, default=150, help="AdamW steps of the MLP the values come from")
    parser.add_argument(
        "--codecs", default="none,auto", help="the store's codecs to measure, comma-separated; a+b: two regions"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="a checkout of another commit (e.g. `git worktree add /tmp/base HEAD~3`): its store is measured too, "
        "as checkpoint_store/CODEC@baseline, in the same rounds (old vs new in one run)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON (the only output format)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one method, this process
    parser.add_argument("--source", type=Path, default=None, help=argparse.SUPPRESS)  # internal: the state
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.source, args.dir)))
        return
    codecs = ["+".join(check_codec(c) for c in name.split("+")) for name in args.codecs.split(",") if name]
    root = Path(tempfile.mkdtemp(prefix="bench-", dir=args.dir))
    try:
        report = run(args.tensors, args.mib, root, args.repeat, args.values, codecs, args.train_steps, args.baseline)
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
