"""Chunk codecs and delta chunks against ZipNN, side by side in one run (issue 17). Prints JSON.

    python benchmarks/codecs.py --json [--steps 150] [--finetune-steps 100] [--repeat 3]

1. Per tensor class (weights, exp_avg, exp_avg_sq) of small models trained here with AdamW (an
   MLP and a small transformer, fp32 and bf16): compression ratio and compress / decompress
   throughput of ZipNN 0.5.4, zstd, bytegroup-zstd and auto, each over the same bytes split
   into the same chunks, with the same number of threads (the store's io_threads; ZipNN gets
   it as ``threads``). Best of ``--repeat`` runs: the VM is shared, the best is the least
   disturbed.
2. End to end: the trained state saved through the store to one region throttled to
   100 MB/s (an fsspec filesystem that sleeps per byte written), codec ``auto`` vs ``none``;
   to local disk (fsync'd), ``auto`` vs ``none``. Loads and restores with each codec against
   ``torch.load`` (and + the copy ``load_state_dict`` makes) are measured at 1 GiB, with the
   other methods, by benchmarks/save_restore.py --codecs none,auto.
3. Delta: the transformer fine-tuned at lr 1e-5 for ``--finetune-steps`` steps from the base,
   saved every 10 steps: bytes written with ``auto`` + delta vs full checkpoints (``none``)
   and vs ``auto`` alone, model weights alone and the whole state (weights + AdamW moments).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import fsspec
import torch
import zipnn
from fsspec.implementations.local import LocalFileSystem

from prefect_recovery.core import Store, open_region
from prefect_recovery.core import codecs as codecs_mod
from prefect_recovery.training.state_io import save_state

CHUNK = 1 << 20  # codec table: 1 MiB chunks so small tensors still spread over the threads
CODECS = ("zstd", "bytegroup-zstd", "auto")
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


# -- models -------------------------------------------------------------------------------------
class Block(torch.nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(width)
        self.attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = torch.nn.LayerNorm(width)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(width, 4 * width), torch.nn.GELU(), torch.nn.Linear(4 * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyTransformer(torch.nn.Module):
    def __init__(self, vocab: int = 4096, width: int = 256, layers: int = 4, heads: int = 4):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.blocks = torch.nn.Sequential(*[Block(width, heads) for _ in range(layers)])
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(tokens)))


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(512, 1024),
        torch.nn.GELU(),
        torch.nn.Linear(1024, 1024),
        torch.nn.GELU(),
        torch.nn.Linear(1024, 512),
    )


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, kind: str, steps: int, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad()
        if kind == "transformer":
            tokens = torch.randint(0, 4096, (8, 64), generator=generator)
            logits = model(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, 4096), tokens[:, 1:].reshape(-1))
        else:
            x = torch.randn(64, 512, generator=generator).to(dtype)
            loss = (model(x).float() - x.float()).square().mean()
        loss.backward()
        optimizer.step()


def trained(kind: str, dtype: torch.dtype, steps: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = (TinyTransformer() if kind == "transformer" else mlp()).to(dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(model, optimizer, kind, steps, dtype)
    return model, optimizer


def classes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, bytes]:
    """Each tensor class's bytes, concatenated (floating-point parameters only)."""
    params = [p for p in model.parameters() if p.is_floating_point()]

    def cat(tensors: list[torch.Tensor]) -> bytes:
        return b"".join(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for t in tensors)

    return {
        "weights": cat(params),
        "exp_avg": cat([optimizer.state[p]["exp_avg"] for p in params]),
        "exp_avg_sq": cat([optimizer.state[p]["exp_avg_sq"] for p in params]),
    }


# -- codec table --------------------------------------------------------------------------------
def best_of(repeat: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def measure_ours(data: bytes, codec: str, dtype: str, threads: int, repeat: int) -> dict[str, Any]:
    chunks = [memoryview(data)[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    # Named like the store's own pools (ckpt-...), whose threads reuse their codec buffers.
    with ThreadPoolExecutor(threads, thread_name_prefix="ckpt-bench") as pool:
        t_c, encoded = best_of(repeat, lambda: list(pool.map(lambda c: codecs_mod.encode(c, codec, dtype), chunks)))
        out = bytearray(len(data))
        views = [memoryview(out)[i : i + CHUNK] for i in range(0, len(data), CHUNK)]

        def decode_all() -> None:
            def one(pair: tuple[Any, memoryview]) -> None:
                enc, view = pair
                if enc.codec is None:
                    view[:] = enc.data
                else:
                    codecs_mod.decode_into(enc.data, enc.codec, enc.width, view)

            list(pool.map(one, zip(encoded, views, strict=True)))

        t_d, _ = best_of(repeat, decode_all)
    assert out == data, f"{codec} round trip lost bytes"
    stored = sum(len(e.data) for e in encoded)
    return {
        "ratio": round(len(data) / stored, 4),
        "compress_GBps": round(len(data) / t_c / 1e9, 3),
        "decompress_GBps": round(len(data) / t_d / 1e9, 3),
    }


def measure_zipnn(data: bytes, dtype: str, threads: int, repeat: int) -> dict[str, Any]:
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    coder = zipnn.ZipNN(input_format="byte", bytearray_dtype=dtype, threads=threads)
    t_c, encoded = best_of(repeat, lambda: [coder.compress(c) for c in chunks])
    t_d, decoded = best_of(repeat, lambda: [coder.decompress(e) for e in encoded])
    # Recorded, not asserted: ZipNN 0.5.4 has been seen to return other bytes than it was given
    # (mlp-float32 here, 2026-12-07), which is a finding of the comparison.
    lossless = b"".join(bytes(d) for d in decoded) == data
    stored = sum(len(e) for e in encoded)
    return {
        "ratio": round(len(data) / stored, 4),
        "compress_GBps": round(len(data) / t_c / 1e9, 3),
        "decompress_GBps": round(len(data) / t_d / 1e9, 3),
        "lossless": lossless,
    }


# -- a region throttled to a bandwidth ----------------------------------------------------------
class _Throttle:
    """One link of ``rate`` bytes/s shared by every write: each write waits its turn on it."""

    def __init__(self, rate: float):
        self.rate, self.lock, self.free_at = rate, threading.Lock(), 0.0

    def pay(self, nbytes: int) -> None:
        with self.lock:
            start = max(time.monotonic(), self.free_at)
            self.free_at = start + nbytes / self.rate
            until = self.free_at
        time.sleep(max(0.0, until - time.monotonic()))


class ThrottledFileSystem(LocalFileSystem):
    """A directory behind a 100 MB/s uplink: what a cloud region costs a save, measured by
    bytes sent. Reads are not throttled (the save is measured)."""

    protocol = "throttled"
    root_marker = "/"
    throttle = _Throttle(100e6)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, auto_mkdir=True, **kwargs)

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        path = str(path)
        if path.startswith("throttled://"):
            path = path[len("throttled://") :]
        return LocalFileSystem._strip_protocol(path)

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        self.throttle.pay(len(value))
        super().pipe_file(path, value, mode=mode, **kwargs)


fsspec.register_implementation("throttled", ThrottledFileSystem, clobber=True)


def state_of(models: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]) -> dict[str, Any]:
    return {name: {"model": m.state_dict(), "optimizer": o.state_dict()} for name, (m, o) in models.items()}


def state_bytes(state: Any) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(state_bytes(v) for v in state)
    return 0


def end_to_end(state: dict[str, Any], workdir: Path, threads: int, repeat: int) -> dict[str, Any]:
    total = state_bytes(state)
    out: dict[str, Any] = {"state_MB": round(total / 1e6, 1)}
    for target in ("throttled_100MBps", "local_disk"):
        for codec in ("none", "auto"):
            times, written = [], 0
            for attempt in range(repeat):
                root = workdir / f"{target}-{codec}-{attempt}"
                root.mkdir(parents=True)
                url = f"throttled://{root}" if target.startswith("throttled") else str(root)
                store = Store([open_region(url, name="r")], io_threads=threads, codec=codec)
                start = time.perf_counter()
                info = save_state(store, state, lineage="e2e")
                if target == "local_disk":
                    os.sync()  # durable before the clock stops, like the raw baseline in save_restore.py
                times.append(time.perf_counter() - start)
                written = info.bytes_written
                if attempt < repeat - 1:
                    shutil.rmtree(root)
            out[f"{target}/{codec}"] = {
                "save_s": round(min(times), 3),
                "MB_written": round(written / 1e6, 1),
                "save_GBps": round(total / min(times) / 1e9, 3),
            }
    # Loads and restores (vs torch.load, and torch.load + copy) are measured in one place:
    # benchmarks/save_restore.py --codecs none,auto, at the 1 GiB size of its goals.
    return out


def _snapshot(part: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    if part == "weights":
        return {"model": model.state_dict()}
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


# -- delta ----------------------------------------------------------------------------------------
def finetune_bytes(
    base: tuple[torch.nn.Module, torch.optim.Optimizer], dtype: torch.dtype, steps: int, workdir: Path, threads: int
) -> dict[str, Any]:
    """One fine-tune from ``base`` (lr 1e-5), saved every 10 steps to three stores (full
    checkpoints, ``auto``, ``auto`` + delta), weights alone and the whole state as two lineages."""
    model, base_optimizer = base
    tuned = TinyTransformer().to(dtype)
    tuned.load_state_dict(model.state_dict())
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=1e-5)
    optimizer.load_state_dict(base_optimizer.state_dict())
    for group in optimizer.param_groups:
        group["lr"] = 1e-5
    configs = {"full_none": ("none", False), "auto": ("auto", False), "auto_delta": ("auto", True)}
    # Both lineages share each store: the "state" lineage's model chunks dedup against the
    # "weights" lineage's (same bytes, same stored form), so its bytes written are the moments'.
    stores = {}
    for name, (codec, delta) in configs.items():
        root = workdir / f"ft-{DTYPE_NAMES[dtype]}-{name}"
        root.mkdir(parents=True)
        stores[name] = Store([open_region(str(root), name="r")], io_threads=threads, codec=codec, delta=delta)
    written = {part: dict.fromkeys(configs, 0) for part in ("weights", "state")}
    for done in range(0, steps + 1, 10):
        if done:
            train(tuned, optimizer, "transformer", 10, dtype)
        for part in ("weights", "state"):
            for name, store in stores.items():
                info = save_state(store, _snapshot(part, tuned, optimizer), lineage=part, step=done)
                if done:  # the base checkpoint is not counted
                    written[part][name] += info.bytes_written
    return {
        part: {
            "MB_written": {k: round(v / 1e6, 2) for k, v in counts.items()},
            "auto_delta_vs_full": round(counts["auto_delta"] / counts["full_none"], 3),
            "auto_vs_full": round(counts["auto"] / counts["full_none"], 3),
        }
        for part, counts in written.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print JSON (the only output format)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=4, help="the store's io_threads (ZipNN's threads)")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--skip-delta", action="store_true")
    args = parser.parse_args()

    models = {
        f"{kind}-{DTYPE_NAMES[dtype]}": trained(kind, dtype, args.steps)
        for kind in ("mlp", "transformer")
        for dtype in (torch.float32, torch.bfloat16)
    }
    table = []
    for name, (model, optimizer) in models.items():
        dtype = name.split("-", 1)[1]
        for cls, data in classes(model, optimizer).items():
            row: dict[str, Any] = {"model": name, "class": cls, "MB": round(len(data) / 1e6, 2)}
            row["zipnn"] = measure_zipnn(data, dtype, args.threads, args.repeat)
            for codec in CODECS:
                row[codec] = measure_ours(data, codec, dtype, args.threads, args.repeat)
            ours, theirs = row["auto"], row["zipnn"]
            row["auto_vs_zipnn"] = {k: round(ours[k] / theirs[k], 3) for k in ours if k in theirs}
            table.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)

    report: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "zipnn": "0.5.4",
            "threads": args.threads,
            "chunk_bytes": CHUNK,
            "repeat": args.repeat,
        },
        "codec_table": table,
    }
    with tempfile.TemporaryDirectory(prefix="codecs-bench-") as tmp:
        if not args.skip_e2e:
            state = state_of({k: v for k, v in models.items() if k.startswith("transformer")})
            report["end_to_end"] = end_to_end(state, Path(tmp) / "e2e", args.threads, args.repeat)
            print(json.dumps(report["end_to_end"]), file=sys.stderr, flush=True)
        if not args.skip_delta:
            report["delta"] = {
                DTYPE_NAMES[dtype]: finetune_bytes(
                    models[f"transformer-{DTYPE_NAMES[dtype]}"],
                    dtype,
                    args.finetune_steps,
                    Path(tmp) / "delta",
                    args.threads,
                )
                for dtype in (torch.float32, torch.bfloat16)
            }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
