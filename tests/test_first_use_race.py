"""First use of a new multi-region store by several processes at the same instant (docs/PRODUCTION.md, section 7).

A store of empty directories is new; the first process to use it used to write its first event into one region
while a second process, opening the store at that moment, found the other region still empty next to one with
data, took it for an unmounted disk and failed its write quorum (``QuorumNotMetError``). Now every process marks
a new store's empty regions (create-only) before its first write, and a region found empty next to marked but
data-less siblings is a sibling being created, not a mount point. Real processes race on fresh stores, repeatedly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO

from prefect_recovery import CheckpointStore
from prefect_recovery.core.region import open_region
from prefect_recovery.core.region_marker import MARKER_KEY, UnmountedRegionIO, guard_empty_mounts, init_region

PROCESSES = 5
ROUNDS = 3
STAGGER = 0.004  # seconds between the processes' first writes: one opens while another writes


def race(kind: str, root: Path) -> list[subprocess.CompletedProcess[str]]:
    """PROCESSES processes, imports done, released together by a file, each saving its own lineage with write
    quorum 2 (every region must take every write)."""
    go = root / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    target = root / "store" if kind == "default" else root
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "helpers.first_use", kind, str(target), f"l{i}", str(go), str(i * STAGGER)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(PROCESSES)
    ]
    deadline = time.monotonic() + 300
    while len(list(root.glob("go.ready.*"))) < PROCESSES:  # every process imported everything and waits
        assert time.monotonic() < deadline and all(p.poll() is None for p in processes), "a process did not start"
        time.sleep(0.05)
    go.touch()
    done = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return done


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["block", "default"])
def test_processes_racing_on_a_new_store_all_write_every_region(tmp_path: Path, kind: str) -> None:
    for round_ in range(ROUNDS):
        root = tmp_path / f"round-{round_}"
        root.mkdir()
        if kind == "block":  # two disks, mounted and empty: the operator ran no `init`
            (root / "a").mkdir()
            (root / "b").mkdir()
        done = race(kind, root)
        failed = [d.stderr.strip().splitlines()[-1] for d in done if d.returncode != 0]
        assert not failed, f"round {round_}: {failed}"
        for result in done:
            saved = json.loads(result.stdout)
            assert len(saved["regions"]) == 2 and not saved["lagging"], saved
        regions = [root / "a", root / "b"] if kind == "block" else list((root / "store" / "regions").iterdir())
        assert len(regions) == 2
        for region in regions:  # first use marked every region before writing into any
            assert (region / MARKER_KEY).is_file(), f"round {round_}: {region} has no marker"


def test_an_empty_region_next_to_marked_regions_without_data_is_a_new_sibling(tmp_path: Path) -> None:
    """The state another process's first use leaves for an instant: one region marked, no data anywhere yet, the
    other still empty. It is marked and used; once a region holds data, an empty one is a mount point again."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    init_region(open_region(str(a)))
    regions = guard_empty_mounts([open_region(str(a)), open_region(str(b))])
    assert not any(isinstance(region, UnmountedRegionIO) for region in regions)
    assert (b / MARKER_KEY).is_file()
    store = CheckpointStore(regions=[str(a), str(b)], write_quorum=2, straggler_grace_seconds=None)
    store.save_checkpoint({"w": torch.zeros(2)}, lineage="n", step=1)

    for child in sorted(b.rglob("*"), reverse=True):  # b's disk is gone: an empty mount point
        child.rmdir() if child.is_dir() else child.unlink()
    regions = guard_empty_mounts([open_region(str(a)), open_region(str(b))])
    assert isinstance(regions[1], UnmountedRegionIO) and not any(b.iterdir())
