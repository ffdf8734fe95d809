"""One process's first use of a store, for tests/test_first_use_race.py: open it, wait for the start file, save.

``python -m helpers.first_use KIND ROOT LINEAGE GO``: KIND ``block`` opens ``CheckpointStore(regions=[ROOT/a,
ROOT/b], write_quorum=2)`` (directories the test made, empty), ``default`` opens ``CheckpointStore.default(ROOT)``
(which creates its regions) with write quorum 2. Everything is imported before the wait, so the processes
reach the store together; prints the saved version's regions as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from prefect_recovery import CheckpointStore
from prefect_recovery.core.journal import Journal


def main() -> None:
    kind, root, lineage, go = sys.argv[1:5]
    open(f"{go}.ready.{lineage}", "w").close()  # imports done: the test releases everyone at once
    deadline = time.monotonic() + 300
    while not os.path.exists(go):
        assert time.monotonic() < deadline, "no start signal"
        time.sleep(0.001)
    if kind == "block":
        store = CheckpointStore(regions=[f"{root}/a", f"{root}/b"], write_quorum=2, straggler_grace_seconds=None)
    else:
        store = CheckpointStore.default(root)
        store.write_quorum = 2
    time.sleep(float(sys.argv[5]) if len(sys.argv) > 5 else 0.0)  # staggered: one opens while another writes
    Journal(store.core, lineage).append("run_started", run_id=lineage, data={"pipeline": "first-use"})
    info = store.save_checkpoint({"w": torch.arange(1000.0)}, lineage=lineage, step=1)
    print(json.dumps({"regions": sorted(info.regions), "lagging": info.lagging}))


if __name__ == "__main__":
    main()
