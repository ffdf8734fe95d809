"""What a checkpoint's manifest costs as ranks grow: commit latency, root size, what a rank reads.

Simulated in one process (no torch.distributed): for each rank count (``--ranks``, default 1, 8,
64, 256, 1024) and entries per rank (``--entries``, default 100 and 1000), ``N`` fake ranks each
hand the committer a ``WrittenEntries`` of ``E`` DCP-like tensor shards (names with offsets,
``shard`` = global shape, offsets, rank), as ``Store.write_entries`` returns them; plus one
coordinator part (DCP's metadata). The entries' chunk digests are BLAKE3 digests of tiny
distinct payloads; the data blobs themselves are not written (a commit never reads them: it
writes the manifest, and in the paged form the entry pages, which are written for real, in two
local regions at write quorum 2). Timed in the same run, side by side:

* ``single_file``: ``commit_entries`` with paging off (``page_entries=None``): today's one JSON
  manifest. Its size is what every rank reads on restore. Above ``MAX_MANIFEST_BYTES`` (64 MiB)
  no reader accepts it; it is still written and measured, and flagged ``readable: false``.
* ``default_store``: ``commit_entries`` with the default ``page_entries`` (4,096): small
  manifests stay one file (``paged: false``); above, the committer encodes and writes every
  rank's entry pages, then the root.
* ``paged_by_ranks``: every rank runs ``write_entry_pages`` on its own part (timed per rank:
  on a real cluster they run in parallel, so the slowest rank is the wall time), then the
  committer's ``commit_entries`` only lists the pages: the commit overhead at scale.
* ``rank_restore``: what one rank (rank N/2) reads to learn its entries: the root plus the
  pages of its rank and of no rank (``Store.manifest_entries(manifest, ranks=[r])``), counted
  at the region (``resolve`` reads the root from every region holding it: two here), against
  the single-file manifest every rank reads whole (from both regions too).

    python benchmarks/ranks.py --json [--ranks 1 8 64 256 1024] [--entries 100 1000] [--dir DIR]

With ``--dcp`` it measures instead (issue 14's part (b)) save and restore throughput through
torch.distributed.checkpoint at 1, 2 and 4 ranks (``--dcp-ranks``; torchrun, gloo, CPU): the
store's ``dcp_writer``/``dcp_reader`` (one local region; every byte BLAKE3-hashed on save and
re-hashed on load) against DCP's ``FileSystemWriter``/``FileSystemReader`` (fsync on) to the
same disk, in the same run, each rank holding ``--mib`` / ranks MiB of fp32 tensors of its own
(``--tensors`` per rank); the clock runs from a barrier before to a barrier after. Each load
goes into new tensors (``--resident``: tensors written first, as a live model's are), and the
page faults of the loads are reported:

    python benchmarks/ranks.py --json --dcp [--dcp-ranks 1 2 4] [--mib 256] [--tensors 16] [--resident]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import blake3

from prefect_recovery.core import LocalRegionIO, Store
from prefect_recovery.core.layout import manifest_key
from prefect_recovery.core.manifest import MAX_MANIFEST_BYTES, ChunkRef, Entry, ShardInfo
from prefect_recovery.core.store import WrittenEntries

SHAPE = [1024, 256]  # each fake shard: a 1 MiB fp32 slice (the size only shows in the entry)


class CountingRegion(LocalRegionIO):
    """A local region that counts the bytes read from it."""

    def __init__(self, url: str):
        super().__init__(url)
        self.read: Counter[str] = Counter()

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        data = super().get(key, max_bytes)
        self.read[key] += len(data)
        return data


def fake_parts(ranks: int, per_rank: int) -> list[WrittenEntries]:
    """What ``ranks`` ranks' ``write_entries`` would return for ``per_rank`` shards each."""
    parts = []
    size = SHAPE[0] * SHAPE[1] * 4
    for rank in range(ranks):
        entries = []
        for i in range(per_rank):
            digest = "blake3:" + blake3.blake3(f"{rank}/{i}".encode()).hexdigest()
            entries.append(
                Entry(
                    name=f"model/layers.{i}.weight@{rank * SHAPE[0]},0",
                    kind="tensor",
                    size=size,
                    chunks=[ChunkRef(digest=digest, size=size)],
                    dtype="float32",
                    shape=SHAPE,
                    component="model",
                    shard=ShardInfo(global_shape=[SHAPE[0] * ranks, SHAPE[1]], offsets=[rank * SHAPE[0], 0], rank=rank),
                )
            )
        parts.append(WrittenEntries(entries, {}, 0))
    meta = "blake3:" + blake3.blake3(b"dcp metadata").hexdigest()
    parts.append(
        WrittenEntries(
            [Entry(name=".dcp_metadata", kind="bytes", size=4096, chunks=[ChunkRef(digest=meta, size=4096)])], {}, 0
        )
    )
    return parts


def make_store(root: Path, page_entries: int | None) -> tuple[Store, list[CountingRegion]]:
    regions = []
    for name in ("a", "b"):
        (root / name).mkdir(parents=True, exist_ok=True)
        regions.append(CountingRegion(str(root / name)))
    return Store(regions, write_quorum=2, straggler_grace=None, page_entries=page_entries), regions


def timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def point(root: Path, ranks: int, per_rank: int, skip_single_above: int) -> dict[str, Any]:
    parts = fake_parts(ranks, per_rank)
    total = sum(len(part.entries) for part in parts)
    out: dict[str, Any] = {"ranks": ranks, "entries_per_rank": per_rank, "entries": total}
    lineage = f"r{ranks}-e{per_rank}"
    rank = ranks // 2

    if total <= skip_single_above:
        single, regions = make_store(root, page_entries=None)
        _, seconds = timed(lambda: single.commit_entries(lineage + "-single", parts))
        size = (Path(regions[0].url) / manifest_key(lineage + "-single", 1)).stat().st_size
        out["single_file"] = {
            "commit_seconds": round(seconds, 4),
            "manifest_bytes": size,
            "readable": size <= MAX_MANIFEST_BYTES,
            # Every rank reads the whole manifest, from each region holding it (resolve), as the root.
            "rank_restore_bytes": size * len(regions),
        }
    else:
        out["single_file"] = {"skipped": f"more than {skip_single_above} entries (--skip-single-above)"}
    gc.collect()

    store, regions = make_store(root, page_entries=4096)
    info, seconds = timed(lambda: store.commit_entries(lineage + "-paged", parts))
    path = Path(regions[0].url) / manifest_key(lineage + "-paged", info.version)
    root_bytes = path.stat().st_size
    out["default_store"] = {
        "paged": json.loads(path.read_bytes())["format_version"] == 2,
        "commit_seconds": round(seconds, 4),
        "manifest_bytes": root_bytes,
    }

    paged_parts, page_seconds = [], []
    for part in parts:
        paged_part, seconds = timed(lambda part=part: store.write_entry_pages(part))
        paged_parts.append(paged_part)
        page_seconds.append(seconds)
    info, seconds = timed(lambda: store.commit_entries(lineage + "-ranks", paged_parts))
    manifest_path = Path(regions[0].url) / manifest_key(lineage + "-ranks", info.version)
    out["paged_by_ranks"] = {
        "rank_page_seconds_max": round(max(page_seconds), 4),
        "rank_page_seconds_mean": round(sum(page_seconds) / len(page_seconds), 4),
        "commit_seconds": round(seconds, 4),
        "root_bytes": manifest_path.stat().st_size,
        "pages": sum(len(part.pages or ()) for part in paged_parts),
    }

    for region in regions:
        region.read.clear()
    (manifest, holders), resolve_seconds = timed(lambda: store.resolve(lineage + "-ranks"))
    mine, pages_seconds = timed(lambda: store.manifest_entries(manifest, ranks=[rank], prefer=holders))
    read = sum(sum(region.read.values()) for region in regions)
    page_bytes = sum(n for region in regions for key, n in region.read.items() if key.startswith("blobs/"))
    out["rank_restore"] = {
        "rank": rank,
        "entries": len(mine),
        "bytes_read": read,
        "root_bytes_read": read - page_bytes,  # the root, from each region holding it (resolve)
        "page_bytes_read": page_bytes,
        "pages_read": sum(1 for region in regions for key in region.read if key.startswith("blobs/")),
        "resolve_seconds": round(resolve_seconds, 4),
        "read_pages_seconds": round(pages_seconds, 4),
    }
    if "rank_restore_bytes" in out["single_file"]:
        out["rank_restore"]["vs_single_file"] = round(read / out["single_file"]["rank_restore_bytes"], 5)
    gc.collect()
    return out


def dcp_worker(args: argparse.Namespace) -> None:
    """One torchrun rank of ``--dcp``: save and load through both backends, rank 0 reports."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from prefect_recovery.distributed import dcp_reader, dcp_writer

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    numel = args.mib * 2**18 // world // args.tensors
    root = args.dir
    store = Store([LocalRegionIO(str(root / "store"))], write_quorum=1)
    timings: dict[str, float] = {}
    faults: dict[str, int] = {}  # minor page faults of this rank during each clocked step
    cpu: dict[str, float] = {}  # CPU seconds of this rank (all its threads) in each clocked step

    def clock(name: str, fn: Any, *fn_args: Any, **fn_kwargs: Any) -> None:
        dist.barrier()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start, cpu_start = time.perf_counter(), time.process_time()
        fn(*fn_args, **fn_kwargs)
        cpu[name] = time.process_time() - cpu_start
        dist.barrier()
        timings[name] = time.perf_counter() - start
        faults[name] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    def fresh(state: dict[str, Any]) -> dict[str, Any]:
        # New tensors, as a model built on the meta device and materialized with to_empty() gets:
        # their pages are faulted in by the load. --resident writes them first (a live model's
        # parameters), so the load faults nothing.
        if args.resident:
            return {name: torch.zeros_like(tensor) for name, tensor in state.items()}
        return {name: torch.empty_like(tensor) for name, tensor in state.items()}

    loaded: dict[str, dict[str, Any]] = {}  # each load's destination
    for attempt in range(args.repeat):
        # Fresh values every attempt: a second save of equal tensors would write nothing to the
        # store (content-addressed blobs are deduplicated), which is not what is measured here.
        generator = torch.Generator().manual_seed(1000 * attempt + rank)
        state = {f"rank{rank}/w{i}": torch.randn(numel, generator=generator) for i in range(args.tensors)}
        fs_dir, lineage = str(root / f"fs-{attempt}"), f"bench{attempt}"
        steps = [  # (what, function, backend): each run now, in this attempt's order
            ("fs_save", dcp.save, dcp.FileSystemWriter(fs_dir)),
            ("store_save", dcp.save, dcp_writer(store, lineage)),
            ("fs_load", dcp.load, dcp.FileSystemReader(fs_dir)),
            ("store_load", dcp.load, dcp_reader(store, lineage)),
        ]
        if attempt % 2:  # alternate which backend goes first: neither always meets a cold cache or a busy disk
            steps = [steps[1], steps[0], steps[3], steps[2]]
        # Both loads' destinations are allocated before the attempt's first save, in the order the
        # loads run (it alternates too), after the previous attempt's are freed: which one lands on
        # pages the allocator already holds and which on new ones (faulted in by the load, counted
        # in "*_faults") must not depend on the backend. (Allocated while the previous ones were
        # alive, the first got the pages the old state left and the second new ones.)
        loaded.clear()
        loaded.update({kind: fresh(state) for kind, _fn, _backend in steps if kind.endswith("load")})
        for kind, fn, backend in steps:
            if kind.endswith("save"):
                clock(f"{kind}_{attempt}", fn, state, storage_writer=backend)
            else:
                clock(f"{kind}_{attempt}", fn, loaded[kind], storage_reader=backend)
        for kind, target in loaded.items():
            for name, tensor in state.items():
                assert torch.equal(target[name], tensor), (kind, name)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (faults, cpu))
    if rank == 0:
        kinds = ("fs_save", "store_save", "fs_load", "store_load")
        best = {kind: min(timings[f"{kind}_{a}"] for a in range(args.repeat)) for kind in kinds}
        median = {kind: statistics.median(timings[f"{kind}_{a}"] for a in range(args.repeat)) for kind in kinds}
        mib = numel * 4 * args.tensors * world / 2**20
        args.out.write_text(
            json.dumps(
                {
                    "ranks": world,
                    "mib": round(mib, 1),
                    **{f"{kind}_seconds": round(seconds, 4) for kind, seconds in best.items()},
                    **{f"{kind}_mib_s": round(mib / seconds, 1) for kind, seconds in best.items()},
                    "save_vs_dcp": round(best["fs_save"] / best["store_save"], 3),
                    "load_vs_dcp": round(best["fs_load"] / best["store_load"], 3),
                    # the same ratios of the median attempt: how much of the best case is luck
                    "median_save_vs_dcp": round(median["fs_save"] / median["store_save"], 3),
                    "median_load_vs_dcp": round(median["fs_load"] / median["store_load"], 3),
                    # CPU seconds of all ranks together, median attempt: on a machine shared with other
                    # jobs the wall clock varies from run to run far more than the CPU spent
                    **{
                        f"{kind}_cpu_s": round(
                            statistics.median(sum(c[f"{kind}_{a}"] for _f, c in gathered) for a in range(args.repeat)),
                            4,
                        )
                        for kind in kinds
                    },
                    # minor page faults of all ranks in a load, median attempt: fresh destination
                    # pages cost more CPU than reading and hashing them on a small machine
                    **{
                        f"{kind}_faults": int(
                            statistics.median(sum(f[f"{kind}_{a}"] for f, _c in gathered) for a in range(args.repeat))
                        )
                        for kind in ("fs_load", "store_load")
                    },
                    "resident": args.resident,
                    "repeat": args.repeat,
                }
            )
        )
    dist.destroy_process_group()


def dcp_points(args: argparse.Namespace) -> list[dict[str, Any]]:
    import subprocess
    import sys

    points = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for ranks in args.dcp_ranks:
            where = Path(tmp) / f"dcp-{ranks}"
            (where / "store").mkdir(parents=True)
            out = where / "result.json"
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
            command += [__file__, "--dcp-worker", "--dir", str(where), "--out", str(out)]
            command += ["--mib", str(args.mib), "--tensors", str(args.tensors), "--repeat", str(args.repeat)]
            command += ["--resident"] if args.resident else []
            subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            points.append(json.loads(out.read_text()))
            if not args.json:
                print(json.dumps(points[-1]))
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dcp", action="store_true", help="DCP save/restore throughput at 1, 2, 4 ranks instead")
    parser.add_argument("--dcp-ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--mib", type=int, default=256, help="--dcp: MiB of state over all ranks")
    parser.add_argument("--tensors", type=int, default=16, help="--dcp: tensors per rank")
    parser.add_argument("--repeat", type=int, default=5, help="--dcp: best of this many (order alternates)")
    parser.add_argument(
        "--resident",
        action="store_true",
        help="--dcp: load into tensors whose pages are already written (a live model), not fresh ones",
    )
    parser.add_argument("--dcp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 8, 64, 256, 1024])
    parser.add_argument("--entries", type=int, nargs="+", default=[100, 1000], help="entries per rank")
    parser.add_argument(
        "--skip-single-above", type=int, default=2_000_000, help="entries; the single-file form is skipped above"
    )
    parser.add_argument("--dir", type=Path, default=None, help="where the regions live (default: a temp dir)")
    args = parser.parse_args()
    if args.dcp_worker:
        dcp_worker(args)
        return
    if args.dcp:
        result = {
            "benchmark": "ranks --dcp",
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "points": dcp_points(args),
        }
        print(json.dumps(result, indent=2))
        return

    points = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for per_rank in args.entries:
            for ranks in args.ranks:
                points.append(point(Path(tmp) / f"{ranks}-{per_rank}", ranks, per_rank, args.skip_single_above))
                if not args.json:
                    print(json.dumps(points[-1]))
    result = {
        "benchmark": "ranks",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "simulated": "N ranks' write results built in one process; data blobs not written (digests of tiny "
        "payloads); manifests and entry pages written for real to two local regions, quorum 2",
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "points": points,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
