"""What an audit costs: scrub a two-region local store at read_data 1.0 and 0.1, one run.

The store holds ``--versions`` checkpoints of ``--tensors`` fp32 tensors of ``--mib-per-tensor``
MiB each, every version with fresh values (nothing deduplicated), in two local regions. Timed
in the same run, after a cache-warming pass so every method reads from the page cache:

* ``raw_read_hash``: read every blob file of both regions and hash it with BLAKE3 (the floor of
  a full scrub: same bytes, same hash, no parsing);
* ``audit_full``: ``audit_store(read_data=1.0)`` (every manifest parsed and signature-checked,
  every blob re-hashed in every region, rows built), repair on, no retention;
* ``audit_sample``: ``read_data=0.1`` (presence and size of every blob, a tenth re-hashed);
* ``audit_signed_full``: the same full scrub of a store whose manifests are HMAC-signed;
* ``save_median_seconds``: the median save while filling the unsigned and the signed store.

    python benchmarks/audit.py --json [--versions 8] [--tensors 8] [--mib-per-tensor 8] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import blake3
import torch

from prefect_recovery.core import Keyring, Store, audit_store, hmac_key, open_region
from prefect_recovery.training.state_io import save_state


def make_store(root: Path, keyring: Keyring | None) -> Store:
    paths = [root / "a", root / "b"]
    for path in paths:
        path.mkdir(parents=True, exist_ok=True)
    return Store([open_region(str(path)) for path in paths], write_quorum=2, keyring=keyring)


def fill(store: Store, versions: int, tensors: int, mib: int) -> list[float]:
    """Save ``versions`` fresh states; the seconds each save took."""
    generator = torch.Generator().manual_seed(0)
    took = []
    for version in range(versions):
        state = {f"layer{i:03d}": torch.randn(mib * 2**18, generator=generator) for i in range(tensors)}
        start = time.perf_counter()
        save_state(store, state, lineage="bench", step=version)
        took.append(time.perf_counter() - start)
    return took


def raw_read_hash(root: Path) -> float:
    start = time.perf_counter()
    for path in sorted(root.rglob("blobs/*/*/*")):
        blake3.blake3(path.read_bytes(), max_threads=blake3.blake3.AUTO).digest()
    return time.perf_counter() - start


def timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, default=8)
    parser.add_argument("--tensors", type=int, default=8)
    parser.add_argument("--mib-per-tensor", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        plain_root, signed_root = Path(scratch) / "plain", Path(scratch) / "signed"
        plain = make_store(plain_root, None)
        signed = make_store(signed_root, Keyring(hmac_key("bench", b"k" * 32)))
        plain_saves = fill(plain, args.versions, args.tensors, args.mib_per_tensor)
        signed_saves = fill(signed, args.versions, args.tensors, args.mib_per_tensor)
        raw_read_hash(plain_root)  # warm the page cache for every method alike
        best: dict[str, float] = {}
        for _ in range(args.repeat):
            runs = {
                "raw_read_hash": lambda: raw_read_hash(plain_root),
                "audit_full": lambda: audit_store(plain, read_data=1.0, apply_retention_policy=False),
                "audit_sample": lambda: audit_store(plain, read_data=0.1, seed=0, apply_retention_policy=False),
                "audit_signed_full": lambda: audit_store(signed, read_data=1.0, apply_retention_policy=False),
            }
            for name, run in runs.items():
                best[name] = min(best.get(name, float("inf")), timed(run))
        report = audit_store(plain, read_data=1.0, apply_retention_policy=False)
        assert report.healthy and report.scrub.versions == args.versions, report.scrub
        scrubbed = report.scrub.bytes_checked

    result = {
        "host": platform.node(),
        "torch": torch.__version__,
        "versions": args.versions,
        "bytes_per_region": scrubbed // 2,
        "bytes_scrubbed": scrubbed,
        "seconds": {name: round(value, 3) for name, value in best.items()},
        "gib_per_second": {
            name: round(scrubbed / best[name] / 2**30, 2)
            for name in ("raw_read_hash", "audit_full", "audit_signed_full")
        },
        "audit_full_vs_raw": round(best["audit_full"] / best["raw_read_hash"], 2),
        "audit_sample_vs_full": round(best["audit_sample"] / best["audit_full"], 2),
        "save_median_seconds": {
            "unsigned": round(statistics.median(plain_saves), 3),
            "signed": round(statistics.median(signed_saves), 3),
        },
    }
    print(json.dumps(result, indent=2) if args.json else result)


if __name__ == "__main__":
    main()
