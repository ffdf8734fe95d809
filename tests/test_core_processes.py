"""The core commit protocol against real processes: concurrent writers and a writer killed mid-save."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prefect_recovery.core import EntryPlan, Store, open_region, verify_store
from prefect_recovery.core.digest import DIGEST_PATTERN, hash_bytes
from prefect_recovery.core.layout import blob_key, manifest_key

REPO = Path(__file__).resolve().parents[1]
SAVER = Path(__file__).resolve().parent / "helpers" / "core_saver.py"
SHARED = bytes(range(256)) * 12  # same as core_saver.SHARED

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")


def _expected(tag: str, i: int, size: int = 5000) -> bytes:
    """Same as core_saver.expected."""
    return random.Random(f"{tag}-{i}").randbytes(size)


def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SAVER), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _read_line(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=30)
        raise AssertionError(f"saver exited early (rc={proc.returncode}): {proc.stderr.read()[-3000:]}")
    return line.strip()


def _load(store: Store, lineage: str, version: int | None = None):
    manifest, _ = store.resolve(lineage, version)
    buffers = {entry.name: bytearray(entry.size) for entry in manifest.entries}
    store.read_entries_into([(entry, memoryview(buffers[entry.name])) for entry in manifest.entries])
    return manifest, {name: bytes(buf) for name, buf in buffers.items()}


def test_two_processes_saving_to_one_lineage_at_once_get_distinct_loadable_versions(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    barrier = tmp_path / "go"
    per_writer = 8
    tags = ["left", "right"]
    procs = [_spawn("loop", str(a), str(b), "lin", tag, str(per_writer), str(barrier)) for tag in tags]
    try:
        for proc in procs:
            assert _read_line(proc) == "ready"
        barrier.touch()  # both start committing at the same moment
        outputs = [proc.communicate(timeout=60) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, (_out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]

    reported = [json.loads(line) for out, _ in outputs for line in out.splitlines()]
    assert len(reported) == 2 * per_writer
    versions = [r["version"] for r in reported]
    assert len(set(versions)) == len(versions), f"two saves got the same version: {sorted(versions)}"

    store = Store([open_region(str(a)), open_region(str(b))], write_quorum=2, chunk_bytes=1024)
    listed = store.list("lin")
    assert sorted(info.version for info in listed) == sorted(versions)
    assert all(info.regions == [str(a), str(b)] for info in listed)
    by_version = {r["version"]: (r["tag"], r["i"]) for r in reported}
    for version, (tag, i) in by_version.items():
        manifest, loaded = _load(store, "lin", version)
        assert manifest.metadata == {"tag": tag, "i": i}
        assert loaded == {"w": _expected(tag, i), "shared": SHARED}
    # each writer's own saves are in its commit order
    for tag in tags:
        mine = [r["version"] for r in reported if r["tag"] == tag]
        assert mine == sorted(mine)
    assert store.resolve("lin")[0].version == max(versions)
    report = verify_store(store)
    assert report.healthy, report.problems
    assert report.versions == 2 * per_writer


def _blob_file_count(region: Path) -> int:
    return sum(len(files) for _dir, _dirs, files in os.walk(region / "blobs"))


def test_saver_killed_mid_save_leaves_the_previous_version_latest_and_only_unreferenced_leftovers(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    # 256 MiB in 32 KiB chunks: 8192 blobs per region, far more than are written before the kill.
    proc = _spawn("big", str(a), str(b), "lin", "256")
    try:
        assert _read_line(proc) == "committed 1"
        base_a = _blob_file_count(a)
        assert _read_line(proc) == "saving"
        deadline = time.monotonic() + 60
        while _blob_file_count(a) < base_a + 32:
            assert proc.poll() is None, f"saver exited before it was killed: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "saver wrote no blobs within 60 s"
            time.sleep(0.002)
        manifest_existed = (a / manifest_key("lin", 2)).exists() or (b / manifest_key("lin", 2)).exists()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not manifest_existed, "the kill came too late: the big save had already committed"

    store = Store([open_region(str(a)), open_region(str(b))], write_quorum=2)
    manifest, loaded = _load(store, "lin")
    assert manifest.version == 1
    assert loaded == {"w": _expected("base", 0)}
    assert [info.version for info in store.list("lin")] == [1]

    referenced = {blob_key(digest) for digest in manifest.blob_digests()}
    unreferenced = 0
    for region in (a, b):
        for path in sorted(p for p in region.rglob("*") if p.is_file()):
            key = path.relative_to(region).as_posix()
            if path.name.startswith(".tmp-"):
                continue  # an interrupted create-only write: never referenced by anything
            if key.startswith("lineages/"):
                assert key == manifest_key("lin", 1), f"unexpected file {key} in {region}"
                continue
            parts = key.split("/")
            assert len(parts) == 4 and parts[0] == "blobs", f"unexpected file {key} in {region}"
            digest = f"{parts[1]}:{parts[3]}"
            assert DIGEST_PATTERN.match(digest) and parts[2] == parts[3][:2], key
            # published blobs are never partial: each one's content matches its name
            assert hash_bytes(path.read_bytes(), parts[1]) == digest, f"partial or corrupt blob {key}"
            if key not in referenced:
                unreferenced += 1
    assert unreferenced >= 32  # the killed save's blobs are there, unreferenced, for GC

    assert verify_store(store).healthy
    info = store.commit("lin", [EntryPlan(name="w", kind="bytes", data=memoryview(b"after the crash"))])
    assert info.version == 2
    assert _load(store, "lin")[1] == {"w": b"after the crash"}
    assert _load(store, "lin", 1)[1] == {"w": _expected("base", 0)}
