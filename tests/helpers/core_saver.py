"""Subprocess saver for tests/test_core_processes.py: drives ``prefect_recovery.core.Store`` directly.

Modes (first argument):

``loop REGION_A REGION_B LINEAGE TAG COUNT BARRIER``
    Print ``ready``, wait for the file BARRIER to exist, then commit COUNT versions of LINEAGE
    (write_quorum=2). Version ``i`` holds ``expected(TAG, i)`` as entry ``w`` plus one entry that
    every writer shares; its metadata says ``{"tag": TAG, "i": i}``. One JSON line per commit.

``big REGION_A REGION_B LINEAGE MIB``
    Commit a small version (``expected("base", 0)``), print ``committed <version>``, then print
    ``saving`` and start a save of MIB random MiB in 32 KiB chunks (the test kills it midway).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

from prefect_recovery.core import EntryPlan, Store, open_region  # imports neither torch nor Prefect

SHARED = bytes(range(256)) * 12


def expected(tag: str, i: int, size: int = 5000) -> bytes:
    """The bytes a saver stores for (tag, i); the test recomputes them to check loads."""
    return random.Random(f"{tag}-{i}").randbytes(size)


def main(argv: list[str]) -> None:
    mode = argv[0]
    if mode == "loop":
        region_a, region_b, lineage, tag, count, barrier = argv[1:7]
        store = Store([open_region(region_a), open_region(region_b)], write_quorum=2, chunk_bytes=1024)
        print("ready", flush=True)
        deadline = time.monotonic() + 60
        while not os.path.exists(barrier):
            if time.monotonic() > deadline:
                sys.exit("barrier never appeared")
            time.sleep(0.001)
        for i in range(int(count)):
            info = store.commit(
                lineage,
                [
                    EntryPlan(name="w", kind="bytes", data=memoryview(expected(tag, i))),
                    EntryPlan(name="shared", kind="bytes", data=memoryview(SHARED)),
                ],
                step=i,
                metadata={"tag": tag, "i": i},
            )
            # write_quorum=2 of 2: a commit that returned must be held by both regions, racing or not
            assert info.regions == [store.regions[0].name, store.regions[1].name], info
            print(json.dumps({"version": info.version, "tag": tag, "i": i}), flush=True)
    elif mode == "big":
        region_a, region_b, lineage, mib = argv[1:5]
        store = Store([open_region(region_a), open_region(region_b)], write_quorum=2, chunk_bytes=32 * 1024)
        info = store.commit(lineage, [EntryPlan(name="w", kind="bytes", data=memoryview(expected("base", 0)))], step=0)
        print(f"committed {info.version}", flush=True)
        data = os.urandom(int(mib) * 2**20)
        print("saving", flush=True)
        store.commit(lineage, [EntryPlan(name="w", kind="bytes", data=memoryview(data))], step=1)
        print("finished", flush=True)  # the test kills the process before this
    else:
        sys.exit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
