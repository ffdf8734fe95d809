"""The fault suite: what each failure a checkpoint store meets does to prefect_recovery.core.

Faults are injected for real, never by mocking the product: ``tests/helpers/faulty_fs.py``
registers ``faulty://``, a wrapping fsspec filesystem over local directories that behaves like an
object store (atomic, create-only PUTs) and raises, delays, blocks, cuts off or kills per
operation and path; ``open_region("faulty:///...")`` gives the store a plain ``RegionIO`` over it,
so the object-store code path (tenacity retries included) runs against it. Local regions
(``LocalRegionIO``) are faulted at the syscall layer (``SyscallTracer`` wraps ``os.open/write/
fsync/link/unlink/mkdir`` for paths under the test's regions). Savers that must die are real
processes killed with SIGKILL.

One test (or parametrized group) per case, named ``test_caseNN_...``; each docstring says what
is done ("Done") and what passing means ("Pass"). The module ends by printing
``fault suite: N/15 cases passing``. A case whose product behaviour is wrong is marked
``xfail(strict=True)`` with the reason, and counts as not passing.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest
from helpers import faulty_fs
from helpers.faulty_fs import (
    CHUNK,
    SyscallTracer,
    connection_refused,
    connection_reset,
    crash_image,
    disk_full,
    faulty_url,
    forbidden,
    plans,
    service_unavailable,
    snapshot,
    state_for,
    timed_out,
)
from helpers.snapshot import snapshot as file_snapshot
from helpers.tamper import flip_byte, reseal

from prefect_recovery.core import (
    CheckpointError,
    CheckpointNotFoundError,
    EntryPlan,
    InvalidNameError,
    Journal,
    Manifest,
    QuorumNotMetError,
    StorageFullError,
    Store,
    decode_manifest,
    fold_journal,
    open_region,
    verify_store,
)
from prefect_recovery.core.digest import hash_bytes
from prefect_recovery.core.layout import blob_key, manifest_key
from prefect_recovery.core.manifest import canonical_json

REPO = Path(__file__).resolve().parents[1]
HELPER = Path(__file__).resolve().parent / "helpers" / "faulty_fs.py"
CASES = 15


# -- the summary line -------------------------------------------------------------------------------
class _Summary:
    """Collects this module's test reports by case number; prints the pass count at module end."""

    def __init__(self) -> None:
        self.outcomes: dict[int, list[str]] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        match = re.search(r"test_faults\.py::test_case(\d\d)_", report.nodeid)
        if not match:
            return
        outcomes = self.outcomes.setdefault(int(match.group(1)), [])
        if report.when == "call":
            if hasattr(report, "wasxfail"):
                outcomes.append("xpassed" if report.passed else "xfailed")
            else:
                outcomes.append(report.outcome)
        elif report.when == "setup" and not report.passed:
            outcomes.append("skipped" if report.skipped else "error")
        elif report.when == "teardown" and report.failed:
            outcomes.append("error")

    def line(self) -> str:
        passing = [c for c, o in self.outcomes.items() if o and all(x == "passed" for x in o)]
        details = []
        for case in range(1, CASES + 1):
            outcomes = self.outcomes.get(case)
            if not outcomes:
                details.append(f"case {case}: not run")
            elif case not in passing:
                counts = Counter(outcomes)
                details.append(f"case {case}: " + ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())))
        tail = f" (not passing: {'; '.join(details)})" if details else ""
        return f"fault suite: {len(passing)}/{CASES} cases passing{tail}"


@pytest.fixture(scope="module", autouse=True)
def _fault_summary(request: pytest.FixtureRequest):
    summary = _Summary()
    request.config.pluginmanager.register(summary, "fault-suite-summary")
    yield
    request.config.pluginmanager.unregister(summary)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(summary.line())
        return
    with capture.global_and_fixture_disabled():  # visible with and without -s
        reporter.write_line("")
        reporter.write_line(summary.line())


# -- helpers ----------------------------------------------------------------------------------------
@pytest.fixture
def faults():
    """This test's fault rules (released and dropped at the end, so nothing stays blocked)."""
    controller = faulty_fs.new_controller()
    yield controller
    faulty_fs.drop_controller(controller)


def _dirs(tmp_path: Path, *names: str) -> list[Path]:
    out = []
    for name in names:
        (tmp_path / name).mkdir(parents=True)
        out.append(tmp_path / name)
    return out


def _plan(**entries: bytes) -> list[EntryPlan]:
    return [EntryPlan(name=name, kind="bytes", data=memoryview(data)) for name, data in entries.items()]


def _load(store: Store, lineage: str = "lin", version: int | None = None) -> tuple[Manifest, dict[str, bytes]]:
    manifest, holders = store.resolve(lineage, version)
    buffers = {entry.name: bytearray(entry.size) for entry in manifest.entries}
    store.read_entries_into([(entry, memoryview(buffers[entry.name])) for entry in manifest.entries], holders)
    return manifest, {name: bytes(buf) for name, buf in buffers.items()}


def _store(regions, quorum: int = 1, **kwargs) -> Store:
    return Store(regions, write_quorum=quorum, chunk_bytes=CHUNK, io_threads=4, **kwargs)


def _faulty(faults, *paths: Path, attempts: int | None = None):
    return [faulty_fs.region(path, faults, attempts) for path in paths]


def _local(*paths: Path):
    return [open_region(str(path)) for path in paths]


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _whole_objects(root: Path) -> dict[str, int]:
    """Assert every object under a final name in ``root`` is whole; count the invisible leftovers.

    A blob must hash to its name, a manifest must decode. ``.tmp-*`` (LocalRegionIO) and
    ``.faulty-upload-*`` (an abandoned object-store upload) are never listed nor referenced.
    """
    seen = Counter()
    for path in _files(root):
        key = path.relative_to(root).as_posix()
        if path.name.startswith((".tmp-", faulty_fs.UPLOAD_PREFIX)):
            seen["invisible leftovers"] += 1
            continue
        parts = key.split("/")
        if parts[0] == "blobs":
            assert len(parts) == 4 and parts[2] == parts[3][:2], key
            assert hash_bytes(path.read_bytes(), parts[1]) == f"{parts[1]}:{parts[3]}", f"partial blob {key}"
            seen["blobs"] += 1
        elif parts[0] == "lineages" and parts[2] == "manifests":
            decode_manifest(path.read_bytes(), expect_lineage=parts[1], expect_version=int(parts[3][:12]))
            seen["manifests"] += 1
        else:
            seen["other"] += 1
    return dict(seen)


def _manifests(root: Path, lineage: str = "lin") -> list[str]:
    where = root / "lineages" / lineage / "manifests"
    return sorted(p.name for p in where.iterdir() if re.fullmatch(r"\d{12}\.json", p.name)) if where.exists() else []


def _in_thread(fn, timeout: float):
    """Run ``fn`` in a daemon thread; (finished, result or exception) after at most ``timeout`` s."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return False, thread
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return True, box["result"]


def _helper(*args: str, timeout: float = 120) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, str(HELPER), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


# -- 1. SIGKILL at every I/O point of a save -----------------------------------------------------


def _kill_runs(tmp_path: Path, layer: str, quorum: int, points: list[tuple[int, str]] | None) -> list[dict]:
    """Copy ``tmp_path/base`` once per kill point and run the forked savers on the copies."""
    runs = []
    for i, point in enumerate(points or [None]):
        work = tmp_path / f"run-{i}"
        shutil.copytree(tmp_path / "base", work)
        a, b = work / "a", work / "b"
        urls = [faulty_url(a), faulty_url(b)] if layer == "fs" else [str(a), str(b)]
        kill = None if point is None else {"index": point[0], "phase": point[1]}
        runs.append(
            {"id": i, "layer": layer, "regions": urls, "roots": [str(a), str(b)], "quorum": quorum}
            | {"lineage": "lin", "tag": "v2", "step": 2, "kill": kill}
        )
    config = tmp_path / f"runs-{len(runs)}.json"
    config.write_text(json.dumps({"runs": runs}))
    return _helper("killsaves", str(config))


def _check_after_kill(work: Path, layer: str, quorum: int) -> int:
    """The state a killed save left behind is consistent; returns the latest version."""
    a, b = work / "a", work / "b"
    regions = _faulty("default", a, b) if layer == "fs" else _local(a, b)
    store = _store(regions, quorum)
    holders = [r for r in (a, b) if manifest_key("lin", 2).rsplit("/", 1)[1] in _manifests(r)]
    committed = len(holders) >= quorum
    for root in (a, b):
        _whole_objects(root)  # nothing partial under a final name, manifests included
    manifest, loaded = _load(store)
    expected = 2 if committed else 1
    assert manifest.version == expected, (holders, quorum)
    assert loaded == state_for(f"v{expected}")  # bit for bit
    assert [info.version for info in store.list("lin")] == list(range(1, expected + 1))  # no partial version
    report = verify_store(store)
    assert all(p.kind == "missing" for p in report.problems), report.problems  # at most a lagging copy
    assert verify_store(store, repair=True).healthy
    assert verify_store(store).problems == []
    files = [int(name[:12]) for root in (a, b) for name in _manifests(root)]
    after = store.commit("lin", _plan(w=b"after the kill"))
    assert after.version == max(files) + 1  # a withdrawn or uncommitted number is never reused
    assert _load(store)[1] == {"w": b"after the kill"}
    assert _load(store, version=expected)[1] == state_for(f"v{expected}")
    return expected


@pytest.mark.parametrize("quorum", [1, 2])
@pytest.mark.parametrize("layer", ["fs", "os"])
def test_case01_sigkill_at_every_io_point_of_a_save(tmp_path, layer, quorum):
    """Done: a real subprocess saver (forked from a clean helper process) commits v2 over a
    committed v1 (2 regions, write_quorum 1 and 2) and SIGKILLs itself at one I/O point; a dry
    run first enumerates the points of that save. ``fs``: every PUT (``pipe_file``) of the
    object-store path (faulty://), killed before it, in the middle of its upload and after it
    landed. ``os``: every state-changing syscall of ``LocalRegionIO`` (``open(O_CREAT)``, ``write``,
    ``fsync`` of file and directory, ``link``, ``unlink``, ``mkdir``), killed before each one and
    after the last. Pass: for every point, the latest consistent version restores bit for bit
    and is v2 exactly when its manifest reached ``write_quorum`` regions, else v1; only those
    versions are listed; no object under a final name is partial; verify reports at most a
    lagging copy and repair heals it; the next save works."""
    (a, b) = _dirs(tmp_path / "base", "a", "b")
    base = _store(_faulty("default", a, b) if layer == "fs" else _local(a, b), quorum)
    assert base.commit("lin", plans(state_for("v1")), step=1).version == 1

    (dry,) = _kill_runs(tmp_path, layer, quorum, None)
    assert dry["status"] == "finished" and dry["version"] == 2, dry
    ops = dry["ops"]
    if layer == "fs":
        assert ops == ["pipe_file:ok"] * 8  # 3 new blobs x 2 regions + 2 manifests ("shared" is deduplicated)
        points = [(k, phase) for k in range(len(ops)) for phase in ("before", "mid", "after")]
    else:
        assert Counter(ops)["link"] == 8 and Counter(ops)["fsync"] >= 16, Counter(ops)
        points = [(k, "before") for k in range(len(ops))] + [(len(ops) - 1, "after")]
    shutil.rmtree(tmp_path / "run-0")

    results = _kill_runs(tmp_path, layer, quorum, points)
    assert len(results) == len(points)
    latest = Counter()
    for result, point in zip(results, points, strict=True):
        assert result["status"] == "killed", (point, result)
        latest[_check_after_kill(tmp_path / f"run-{result['run']}", layer, quorum)] += 1
    # both outcomes happen: early kills keep v1, kills after the quorum of manifests give v2
    assert latest[1] and latest[2], latest
    print(f"case 1 [{layer}, quorum {quorum}]: {len(points)} kill points over {Counter(ops)}, latest {dict(latest)}")


# -- 2. power loss: only fsynced state survives ----------------------------------------------------


@pytest.mark.parametrize("quorum", [1, 2])
def test_case02_power_loss_keeps_only_what_was_fsynced(tmp_path, quorum):
    """Done (simulated, not a real power cut): the syscalls ``LocalRegionIO`` makes during a save
    of v2 over v1 (2 local regions) are recorded in order by ``SyscallTracer``; for every prefix
    of that record, ``crash_image`` builds what a power loss at that instant could leave under
    the POSIX minimum (pessimistic) model: file bytes survive only as of their last
    ``fsync(fd)``, directory entries (create, link, unlink, mkdir) only once their directory
    was fsynced; not modelled: torn sectors, drives that lie about flushes. A control shows the
    model drops an un-fsynced write. Pass: in every image the latest consistent version is
    v1 or v2 and restores bit for bit; wherever a v2 manifest survived, it is whole and every
    blob it names survived whole in that region; once commit() has returned, v2 survives in
    every region it reported; and the record shows blob data fsynced before its link, and every
    blob link's directory fsynced before the manifest's link."""
    disk = tmp_path / "disk"
    a, b = _dirs(disk, "a", "b")
    store = _store(_local(a, b), quorum)
    store.commit("lin", plans(state_for("v1")))
    initial = snapshot(disk)
    with SyscallTracer([disk]) as tracer:
        info = store.commit("lin", plans(state_for("v2")))
    assert info.version == 2 and info.lagging == {}
    ops = tracer.ops

    # the order the protocol promises, read off the record
    fsynced: set[str] = set()
    blob_links: list[tuple[int, str]] = []
    for index, op in enumerate(ops):
        if op[0] == "fsync" and not op[2]:
            fsynced.add(op[1])
        if op[0] == "link":
            assert op[1] in fsynced, f"{op[2]} linked before its data was fsynced"
            if "/blobs/" in op[2]:
                blob_links.append((index, op[2]))
            else:  # a manifest: every blob of its region was linked and its directory fsynced before
                region = op[2].split("/lineages/")[0]
                mine = [(i, path) for i, path in blob_links if path.startswith(region + "/")]
                assert len(mine) == 3, mine
                for i, path in mine:
                    synced = [j for j, o in enumerate(ops) if j > i and o[:3] == ("fsync", os.path.dirname(path), True)]
                    assert synced and synced[0] < index, f"directory of {path} not fsynced before the manifest"

    outcomes = Counter()
    for cut in range(len(ops) + 1):
        image = tmp_path / f"crash-{cut}"
        crash_image(disk, initial, ops[:cut], image)
        ia, ib = image / "a", image / "b"
        for root in (ia, ib):
            if (root / manifest_key("lin", 2)).exists():
                manifest = decode_manifest((root / manifest_key("lin", 2)).read_bytes())
                for digest in manifest.blob_digests():
                    blob = root / blob_key(digest)
                    assert blob.exists() and hash_bytes(blob.read_bytes()) == digest, (cut, digest)
        crashed = _store(_local(ia, ib), quorum)
        manifest, loaded = _load(crashed)
        assert loaded == state_for(f"v{manifest.version}"), cut
        outcomes[manifest.version] += 1
        if cut == len(ops):
            assert manifest.version == 2
            assert all((image / Path(r).name / manifest_key("lin", 2)).exists() for r in info.regions)
        shutil.rmtree(image)
    assert outcomes[1] and outcomes[2], outcomes

    # control: the model does lose data that was never fsynced (a naive write + link)
    naive = tmp_path / "naive"
    naive.mkdir()
    (naive / "d").mkdir()
    before = snapshot(naive)
    with SyscallTracer([naive]) as control:
        fd = os.open(naive / "d" / "tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        os.write(fd, b"manifest bytes")
        os.close(fd)
        os.link(naive / "d" / "tmp", naive / "d" / "final")
        fd = os.open(naive / "d", os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)
    crash_image(naive, before, control.ops, tmp_path / "naive-crash")
    assert (tmp_path / "naive-crash" / "d" / "final").read_bytes() == b""  # the name survived, the data did not
    print(f"case 2 [quorum {quorum}]: {len(ops) + 1} power-loss images, latest {dict(outcomes)}")


# -- 3. disk full in the middle of a blob ----------------------------------------------------------


@pytest.mark.parametrize("layer", ["object", "local"])
def test_case03_disk_full_in_the_middle_of_a_blob(tmp_path, faults, layer):
    """Done: one region takes v1, then fills up in the middle of v2's first blob: ``object``:
    the faulty:// PUT writes half the blob and raises OSError(ENOSPC); ``local``: the disk has
    700 bytes left (a short ``os.write``, then ENOSPC). Then space is freed and the save retried;
    finally a second, healthy region is added and only the full one fails. Pass: the region
    raises the typed StorageFullError ("no space left ... free space and retry"); the save
    fails with QuorumNotMetError naming the region and that cause; no manifest for v2; no
    temp or partial object under a final name; v1 untouched and loadable; after freeing space
    the retry commits v2; with a healthy region (quorum 1) the save commits and names the full
    region lagging with the cause."""
    (root, other) = _dirs(tmp_path, "full", "other")
    (region,) = _faulty(faults, root) if layer == "object" else _local(root)
    store = _store([region])
    store.commit("lin", plans(state_for("v1")))
    v1_files = {p: p.read_bytes() for p in _files(root)}
    tracer = None
    faults.reset_log()
    if layer == "object":
        faults.add(op="pipe_file", action="partial", error=disk_full)
    else:
        tracer = SyscallTracer([root], free_bytes=700).install()
    try:
        with pytest.raises(StorageFullError, match=r"no space left while writing .*free space and retry"):
            region.put_if_absent(blob_key(hash_bytes(b"probe")), b"probe" * 200)
        if tracer:
            tracer.free_bytes, probed = 700, len(tracer.ops)  # the probe used the space up: 700 bytes again
        with pytest.raises(QuorumNotMetError) as failed:
            store.commit("lin", plans(state_for("v2")))
    finally:
        if tracer:
            tracer.uninstall()
    assert list(failed.value.causes) == [region.name]
    assert "no space left" in failed.value.causes[region.name]
    assert region.name in str(failed.value) and "free space and retry" in str(failed.value)
    if layer == "object":
        assert faults.calls("pipe_file", outcome="fault:raise") == []  # the fault struck mid-write
        assert len(faults.calls("pipe_file", outcome="OSError")) >= 1
        assert len(faults.calls("pipe_file", outcome="OSError")) == len(faults.calls("pipe_file"))  # never retried
    else:
        writes = [len(op[2]) for op in tracer.ops[probed:] if op[0] == "write"]
        assert sum(writes) == 700 and writes[-1] not in (500, CHUNK), writes  # the disk filled up mid-blob
    assert _manifests(root) == ["000000000001.json"]
    whole = _whole_objects(root)
    assert "invisible leftovers" not in whole, whole  # no .tmp-* / upload left either
    assert all(p in v1_files and p.read_bytes() == data for p, data in v1_files.items())
    assert _load(store)[1] == state_for("v1")
    assert verify_store(store).healthy

    faults.clear()  # space was freed
    info = store.commit("lin", plans(state_for("v2")))
    assert info.version == 2 and info.lagging == {}
    assert _load(store)[1] == state_for("v2")

    healthy_first = [open_region(str(other)), region]
    if layer == "object":
        faults.add(op="pipe_file", action="partial", error=disk_full)
    else:
        tracer = SyscallTracer([root], free_bytes=0).install()
    try:
        info = _store(healthy_first).commit("lin", plans(state_for("v3")))
    finally:
        if tracer:
            tracer.uninstall()
    assert info.regions == [str(other)]
    assert "no space left" in info.lagging[region.name]


# -- 4. upload cut off mid-PUT ---------------------------------------------------------------------


def test_case04_upload_cut_off_mid_put_leaves_nothing_partial(tmp_path, faults):
    """Done: region b's PUTs are cut off halfway (half the bytes sent, then ConnectionResetError);
    faulty:// emulates an object store, so a cut-off PUT leaves nothing. (1) Once per object: the
    retry (transient error) completes it. (2) Always: quorum 1 of 2 commits without b; quorum 2
    fails; then b heals and verify --repair fills it. Pass: (1) the save commits with no lag
    after exactly 2 attempts per object; (2) b is lagging with the cause, or QuorumNotMetError
    names b; b never holds a partial object under a final name, reads never see partial data,
    and after repair b alone restores bit for bit."""
    a, b = _dirs(tmp_path, "region-a", "region-b")
    ra, rb = _faulty(faults, a, b, attempts=2)
    faults.add(op="pipe_file", path=f"{b}/*", action="partial", error=connection_reset, per_path=True, times=1)
    info = _store([ra, rb], 2).commit("lin", plans(state_for("v1")))
    assert info.version == 1 and info.lagging == {}
    attempts = Counter(call.path for call in faults.calls("pipe_file", f"{b}/*"))
    assert set(attempts.values()) == {2}, attempts
    assert _whole_objects(b) == {"blobs": 4, "manifests": 1}

    faults.clear()
    faults.add(op="pipe_file", path=f"{b}/*", action="partial", error=connection_reset)
    info = _store([ra, rb], 1).commit("lin", plans(state_for("v2")))
    assert info.regions == [ra.name] and "ConnectionResetError" in info.lagging[rb.name]
    with pytest.raises(QuorumNotMetError) as failed:
        _store([ra, rb], 2).commit("lin", plans(state_for("v3")))
    assert list(failed.value.causes) == [rb.name] and "ConnectionResetError" in str(failed.value)
    assert _whole_objects(b) == {"blobs": 4, "manifests": 1}  # v1's objects, nothing new and nothing partial
    assert _load(_store([rb, ra]), version=2)[1] == state_for("v2")  # b is asked first: misses, no torn data

    faults.clear()
    store = _store([ra, rb], 1)
    assert verify_store(store, repair=True).unrepaired == []
    assert verify_store(store).problems == []
    assert _load(_store(_faulty(faults, b)))[1] == state_for("v2")


def test_case04_torn_upload_on_a_non_atomic_backend_is_not_counted_as_stored(tmp_path, faults):
    """Done: as above, but b emulates a backend without atomic uploads (FORMAT.md: best effort):
    each cut-off PUT leaves its torn half under the final name, every time. Pass: reads never see
    the torn bytes, and b is not reported as holding v1 (it is lagging, or repaired whole)."""
    a, b = _dirs(tmp_path, "region-a", "region-b")
    ra, rb = _faulty(faults, a, b, attempts=2)
    faults.add(op="pipe_file", path=f"{b}/blobs/*", action="partial", atomic=False, error=connection_reset)
    info = _store([ra, rb], 1).commit("lin", plans(state_for("v1")))
    assert _load(_store([rb, ra]))[1] == state_for("v1")  # reads skip the torn copies
    torn = [p for p in _files(b / "blobs") if hash_bytes(p.read_bytes()) != f"blake3:{p.name}"]
    assert torn, "the fault did not tear anything"
    assert rb.name not in info.regions, f"b holds torn blobs {torn} yet was counted: {info}"


# -- 5. one bit flipped in a stored blob -----------------------------------------------------------


def test_case05_bit_flip_in_a_blob_is_read_around_reported_and_repaired(tmp_path, faults):
    """Done: v1 in regions a, b (faulty://); one bit of one blob flipped in a (the preferred
    region). Pass: the restore is bit for bit and that blob comes from b (the log shows a's copy
    read and rejected first); verify names the blob key, region a and "corrupt"; repair puts the
    original bytes back; a second verify is clean and a alone restores. (The local-directory
    variants are in test_core_store.py.)"""
    a, b = _dirs(tmp_path, "region-a", "region-b")
    store = _store(_faulty(faults, a, b), 2)
    store.commit("lin", plans(state_for("v1")))
    manifest, _ = store.resolve("lin")
    chunk = manifest.entries[0].chunks[1]
    key = blob_key(chunk.digest)
    original = (a / key).read_bytes()
    flip_byte(a / key, 100, mask=0x01)

    faults.reset_log()
    assert _load(store)[1] == state_for("v1")
    assert [c.path.split("/")[-5] for c in faults.calls("cat_file", f"*/{key}")] == ["region-a", "region-b"]
    assert store.read_blob_into(chunk.digest, memoryview(bytearray(chunk.size))) == faulty_url(b)

    report = verify_store(store)
    assert [(p.region, p.object, p.kind) for p in report.problems] == [(faulty_url(a), key, "corrupt")]
    assert verify_store(store, repair=True).healthy
    assert (a / key).read_bytes() == original
    assert verify_store(store).problems == []
    assert _load(_store(_faulty(faults, a)))[1] == state_for("v1")


# -- 6. damaged manifests are rejected before any blob is read -------------------------------------


def _damaged(good: bytes, how: str) -> bytes:
    raw = json.loads(good)
    if how == "truncated":
        return good[: len(good) // 2]
    if how == "format_version 3":
        raw["format_version"] = 3
        return reseal(raw)
    if how == "entry size disagrees with its chunks":
        raw["entries"][0]["size"] += 1
        return reseal(raw)
    raw["entries"][0]["chunks"][0]["size"] += 1
    raw["entries"][0]["size"] += 1
    if how == "sizes changed, digest stale":
        return canonical_json(raw)
    if how == "sizes changed and resealed":
        return reseal(raw)
    raise AssertionError(how)


DAMAGE = {  # how -> what the rejection says (lowercase)
    "truncated": "json",
    "format_version 3": "upgrade prefect-recovery",
    "entry size disagrees with its chunks": "chunk sizes do not add up",
    "sizes changed, digest stale": "manifest_digest",
    "sizes changed and resealed": None,  # a valid manifest that lies: caught by the blob size check
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_case06_damaged_manifest_is_rejected_before_any_blob_is_read(tmp_path, faults, how):
    """Done: v1 and v2 committed to a, b (faulty://); v2's manifest is then damaged in both
    regions: truncated, format_version 3 (a future format, resealed), an entry size that disagrees with its
    chunks (resealed), entry and chunk sizes changed without updating manifest_digest, or
    changed and resealed (a valid manifest whose sizes lie about the blobs). The wrapper logs
    every call on blobs/. Pass: resolving v2 fails with
    CheckpointNotFoundError and touches none of the blobs only v2 names (no read, size or
    exists), except for the lying chunk size, where only their sizes are looked up (their
    content is never read); latest stays v1 and restores; verify reports an unreadable
    manifest in each region, with the reason (e.g. "Upgrade prefect-recovery")."""
    a, b = _dirs(tmp_path, "region-a", "region-b")
    store = _store(_faulty(faults, a, b), 2)
    store.commit("lin", plans(state_for("v1")))
    store.commit("lin", plans(state_for("v2")))
    v1, v2 = (store.resolve("lin", v)[0] for v in (1, 2))
    own = [blob_key(d) for d in set(v2.blob_digests()) - set(v1.blob_digests())]  # blobs only v2 names
    assert len(own) == 3
    bad = _damaged((a / manifest_key("lin", 2)).read_bytes(), how)
    for root in (a, b):
        (root / manifest_key("lin", 2)).write_bytes(bad)

    faults.reset_log()
    with pytest.raises(CheckpointNotFoundError):
        store.resolve("lin", 2)
    assert {c.path.split("/")[-5] for c in faults.calls("cat_file", "*/manifests/000000000002.json")} == {
        "region-a",
        "region-b",
    }
    touched = [c for key in own for c in faults.calls("*", f"*/{key}")]
    assert [c for c in touched if c.op == "cat_file"] == []  # not one byte of v2's blobs was read
    if DAMAGE[how] is not None:
        assert touched == []  # not even looked up
    else:
        assert {c.op for c in touched} == {"size"}
    assert _load(store)[1] == state_for("v1")

    report = verify_store(store)
    unreadable = [p for p in report.problems if p.kind == "unreadable manifest"]
    if DAMAGE[how] is not None:
        assert sorted(p.region for p in unreadable) == sorted([faulty_url(a), faulty_url(b)])
        assert all(DAMAGE[how] in p.detail.lower() for p in unreadable), unreadable
    else:
        assert unreadable == [] and report.problems  # the lie shows as a wrong-sized blob


# -- 7. manifest naming a deleted blob -------------------------------------------------------------


def test_case07_manifest_naming_a_deleted_blob(tmp_path, faults):
    """Done: v1 in a, b (faulty://); one blob it names is deleted from a; later the same blob is
    deleted from b too. Pass: with one copy left, the restore is bit for bit from b; verify
    reports the dangling reference (region a, the blob key, "missing") and repair restores it;
    with no copy left, the version is no longer consistent (v1 is not offered as latest, nothing
    partial is served) and verify reports the blob missing in both regions with "no intact
    copy"."""
    a, b = _dirs(tmp_path, "region-a", "region-b")
    store = _store(_faulty(faults, a, b), 2)
    store.commit("lin", plans(state_for("v1")))
    store.commit("lin", plans(state_for("v2")))
    manifest, _ = store.resolve("lin")
    digest = manifest.entries[0].chunks[0].digest
    key = blob_key(digest)
    (a / key).unlink()

    faults.reset_log()
    assert _load(store)[1] == state_for("v2")
    # a's copy is tried first and missing, b's is used
    assert [(c.path.split("/")[-5], c.outcome) for c in faults.calls("cat_file", f"*/{key}")] == [
        ("region-a", "FileNotFoundError"),
        ("region-b", "ok"),
    ]
    report = verify_store(store)
    assert [(p.region, p.object, p.kind) for p in report.problems] == [(faulty_url(a), key, "missing")]
    assert verify_store(store, repair=True).healthy
    assert (a / key).exists() and verify_store(store).problems == []

    for root in (a, b):
        (root / key).unlink()
    assert _load(store)[1] == state_for("v1")  # v2 is not consistent any more: v1 is the latest
    with pytest.raises(CheckpointNotFoundError):
        store.resolve("lin", 2)
    report = verify_store(store, repair=True)
    assert sorted((p.region, p.object, p.kind) for p in report.problems) == [
        (faulty_url(a), key, "missing"),
        (faulty_url(b), key, "missing"),
    ]
    assert all("no intact copy" in p.detail for p in report.problems) and not report.healthy


# -- 8. one region down ---------------------------------------------------------------------------

DOWN = {
    "connection refused": (connection_refused, "ConnectionRefusedError"),
    "503": (service_unavailable, "503"),
    "403": (forbidden, "403"),
}


@pytest.mark.parametrize("cause", list(DOWN))
def test_case08_one_region_down(tmp_path, faults, cause):
    """Done: region b (faulty://, first in order, so the arbiter too) fails every call with
    ConnectionRefusedError, a 503 (``status_code=503``) or a 403 (PermissionError); a holds v1.
    Each region gets 2 attempts per call. Pass: quorum 2 fails with QuorumNotMetError naming b
    and the cause, and no manifest is written anywhere; quorum 1 commits to a, with b lagging
    and the cause; the restore works from a while b is down and verify reports b unreachable;
    the transient causes are retried (2 attempts per call), the 403 is not (1 attempt);
    after b comes back, verify --repair fills it and b alone restores bit for bit."""
    a, b = _dirs(tmp_path, "region-a", "region-b")
    rb, ra = _faulty(faults, b, a, attempts=2)
    _store([ra], 1).commit("lin", plans(state_for("v1")))
    error, text = DOWN[cause]
    faults.add(op="*", path=f"{b}*", action="raise", error=error)

    with pytest.raises(QuorumNotMetError) as failed:
        _store([rb, ra], 2).commit("lin", plans(state_for("v2")))
    assert list(failed.value.causes) == [rb.name] and text in failed.value.causes[rb.name]
    assert rb.name in str(failed.value)
    assert _manifests(a) == ["000000000001.json"] and not (b / "lineages").exists()

    faults.reset_log()
    info = _store([rb, ra], 1).commit("lin", plans(state_for("v2")))
    assert info.version == 2 and info.regions == [ra.name]
    assert text in info.lagging[rb.name]
    tries = Counter((c.op, c.path) for c in faults.calls("*", f"{b}*"))
    assert set(tries.values()) == ({1} if cause == "403" else {2}), tries

    store = _store([ra, rb], 1)  # (with b first, each blob lookup would wait out b's retries first)
    assert _load(store)[1] == state_for("v2")
    report = verify_store(store)
    assert [(p.region, p.kind) for p in report.problems] == [(rb.name, "unreachable region")]

    faults.clear()  # b is back
    repaired = verify_store(store, repair=True)
    assert repaired.unrepaired == [] and {p.region for p in repaired.problems} == {rb.name}
    assert verify_store(store).problems == []
    assert _load(_store([rb]), version=2)[1] == state_for("v2")
    assert _load(_store([rb]), version=1)[1] == state_for("v1")


def test_case08_transient_503_is_retried_and_403_is_not(tmp_path, faults):
    """Done: (1) every PUT to b answers 503 twice, then succeeds (default retry budget, 4
    attempts); (2) every PUT to b answers 403. Pass: (1) the save commits to both regions with
    no lag, each PUT to b having taken exactly 3 attempts; (2) the 403 is tried exactly once,
    the save (quorum 1) commits to a and names b lagging with the 403."""
    a, b = _dirs(tmp_path, "region-a", "region-b")
    ra, rb = _faulty(faults, a, b)
    faults.add(op="pipe_file", path=f"{b}/*", action="raise", error=service_unavailable, per_path=True, times=2)
    info = _store([ra, rb], 2).commit("lin", _plan(w=b"one blob"))
    assert info.regions == [ra.name, rb.name] and info.lagging == {}
    attempts = Counter(c.path for c in faults.calls("pipe_file", f"{b}/*"))
    assert len(attempts) == 2 and set(attempts.values()) == {3}, attempts  # the blob and the manifest

    faults.clear()
    faults.reset_log()
    faults.add(op="pipe_file", path=f"{b}/*", action="raise", error=forbidden)
    info = _store([ra, rb], 1).commit("lin", _plan(w=b"another blob"))
    assert info.regions == [ra.name] and "403" in info.lagging[rb.name]
    assert len(faults.calls("pipe_file", f"{b}/*")) == 1


# -- 9. slow or stalled region --------------------------------------------------------------------


def test_case09_stalled_region_is_left_lagging_after_the_grace(tmp_path, faults):
    """Done: region b's blob PUTs block on an Event (a stall); the store has
    ``straggler_grace=0.5`` and write_quorum 1. Pass: commit() returns (no deadlock) within a
    few seconds with the quorum (region a), ``CheckpointInfo.lagging`` names b as still writing;
    the restore works meanwhile; once the Event is released, verify --repair heals b and b
    alone restores bit for bit."""
    a, b = _dirs(tmp_path, "region-a", "region-b")
    ra, rb = _faulty(faults, a, b)
    stall = threading.Event()
    faults.add(op="pipe_file", path=f"{b}/blobs/*", action="block", event=stall, delay=60)
    store = _store([ra, rb], 1, straggler_grace=0.5)
    started = time.monotonic()
    finished, info = _in_thread(lambda: store.commit("lin", plans(state_for("v1"))), timeout=20)
    elapsed = time.monotonic() - started
    try:
        assert finished, "commit() did not return while a region was stalled"
        assert elapsed < 5, elapsed
        assert info.regions == [ra.name] and "still writing" in info.lagging[rb.name]
        assert _load(store)[1] == state_for("v1")
    finally:
        stall.set()
    deadline = time.monotonic() + 10  # the released PUTs finish in the background
    while faults.calls("pipe_file", f"{b}/blobs/*", outcome="ok") == [] and time.monotonic() < deadline:
        time.sleep(0.05)
    faults.clear()
    assert verify_store(store, repair=True).unrepaired == []
    assert verify_store(store).problems == []
    assert _load(_store([rb]))[1] == state_for("v1")


def test_case09_reads_prefer_a_fast_region(tmp_path, faults):
    """Done: v1 in a and b; then every read call on region b (first in order) blocks on an Event.
    Pass: with read_deadline=1 s the restore still completes within 3 s from region a (the
    stalled region counts as unreachable, so quorum 2 is met by a's copy), and region b is then
    tried last."""
    a, b = _dirs(tmp_path, "region-a", "region-b")
    rb, ra = _faulty(faults, b, a)
    _store([rb, ra], 2).commit("lin", plans(state_for("v1")))
    stall = threading.Event()
    faults.add(op=("ls", "cat_file", "size", "exists", "find"), path=f"{b}*", action="block", event=stall, delay=30)
    try:
        reader = _store([rb, ra], 2, read_deadline=1.0)
        finished, result = _in_thread(lambda: _load(reader)[1], timeout=3)
        assert finished, "restore blocked on the stalled region"
        assert result == state_for("v1")
        assert [region.name for region in reader._read_order()] == [ra.name, rb.name]
    finally:
        stall.set()


# -- 10. two writers racing for one version -------------------------------------------------------


def test_case10_two_writers_committing_the_same_version(tmp_path, faults):
    """Done: two writers (threads, each with its own Store and RegionIOs over the same faulty://
    regions a, b, quorum 2) save different states at once; a Barrier in the first two manifest
    PUTs holds both until each has picked version 2, so both create v2 on the arbiter at the
    same moment. Then both save 6 more versions each without a barrier. Pass: exactly one
    create of v2 succeeds (the other gets FileExistsError), the loser commits v3; every save
    gets its own version, each version restores exactly the state of the save that reported
    it, v1 is unchanged, and verify is clean (nothing overwritten)."""
    a, b = _dirs(tmp_path, "region-a", "region-b")
    _store(_faulty(faults, a, b), 2).commit("lin", plans(state_for("v1")))
    v1 = (a / manifest_key("lin", 1)).read_bytes()
    barrier = threading.Barrier(2)
    faults.add(op="pipe_file", path="*/manifests/*", action="barrier", barrier=barrier, times=2, delay=20)

    def writer(tag: str, count: int) -> list[tuple[int, str, str]]:
        store = _store(_faulty(faults, a, b), 2)
        out = []
        for i in range(count):
            info = store.commit("lin", plans(state_for(f"{tag}{i}")), metadata={"tag": f"{tag}{i}"})
            out.append((info.version, f"{tag}{i}", info.manifest_digest))
        return out

    results: dict[str, list] = {}
    threads = [threading.Thread(target=lambda t=t: results.setdefault(t, writer(t, 7))) for t in ("left", "right")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert set(results) == {"left", "right"}, "a writer failed"
    v2_creates = faults.calls("pipe_file", f"{a}/*/000000000002.json")
    assert sorted(c.outcome for c in v2_creates) == ["FileExistsError", "ok"]
    firsts = sorted([results["left"][0][0], results["right"][0][0]])
    assert firsts[0] == 2 and firsts[1] > 2, firsts  # the loser moved on to a later number

    saves = results["left"] + results["right"]
    versions = [v for v, _, _ in saves]
    assert len(set(versions)) == len(versions) == 14
    store = _store(_faulty(faults, a, b), 2)
    assert [i.version for i in store.list("lin")] == sorted([1, *versions])
    for version, tag, digest in saves:
        manifest, loaded = _load(store, version=version)
        assert (manifest.manifest_digest, manifest.metadata["tag"]) == (digest, tag)
        assert loaded == state_for(tag)
    assert (a / manifest_key("lin", 1)).read_bytes() == v1
    assert verify_store(store).problems == []


# -- 11. save beside restore and verify -----------------------------------------------------------


@pytest.mark.parametrize("layer", ["local", "object"])
def test_case11_readers_never_see_a_partial_version(tmp_path, faults, layer):
    """Done: a writer commits 25 versions (each a different state, quorum 2 of 2 regions) while
    one thread loops restoring the latest and another loops verify, on local directories and on
    faulty:// (with a small delay on every PUT to widen the windows). Pass: every restore is bit
    for bit the state of the version it resolved, versions seen never go backwards, verify never
    reports a problem, and at least a few different versions were seen mid-flight."""
    a, b = _dirs(tmp_path, "region-a", "region-b")

    def regions():
        return _faulty(faults, a, b) if layer == "object" else _local(a, b)

    if layer == "object":
        faults.add(op="pipe_file", action="delay", delay=0.002)
    writer = _store(regions(), 2)
    writer.commit("lin", plans(state_for("c0")), metadata={"tag": "c0"})
    done = threading.Event()
    errors: list[BaseException] = []
    seen: list[int] = []
    verifies = [0]

    def write() -> None:
        try:
            for i in range(1, 25):
                writer.commit("lin", plans(state_for(f"c{i}")), metadata={"tag": f"c{i}"})
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    def read() -> None:
        store = _store(regions(), 2)
        try:
            while not done.is_set():
                manifest, loaded = _load(store)
                assert loaded == state_for(manifest.metadata["tag"])
                assert not seen or manifest.version >= seen[-1]
                seen.append(manifest.version)
        except BaseException as exc:
            errors.append(exc)

    def check() -> None:
        store = _store(regions(), 2)
        try:
            while not done.is_set():
                report = verify_store(store)
                assert report.problems == [], report.problems
                verifies[0] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=fn) for fn in (write, read, check)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert len(set(seen)) >= 3 and verifies[0] >= 1, (sorted(set(seen)), verifies)
    assert _load(writer)[0].version == 25
    assert verify_store(writer).problems == []


# -- 12. writer clock skewed by an hour -----------------------------------------------------------


def test_case12_skewed_writer_clock_does_not_reorder_versions(tmp_path):
    """Done: four saves in turn to local regions a, b: v1 with the true clock, v2 by a subprocess
    whose clock runs an hour ahead, v3 with the true clock, v4 by a subprocess an hour behind
    (``datetime.now`` shifted in that process; faketime is not installed). Each save also
    journals a ``checkpoint_committed`` event. Pass: the skew shows in the records (v2's
    created_at is after v3's, v4's before v1's), yet versions are 1..4 in save order, latest is
    v4 and restores v4's state, an explicit version restores its own state, and the journal
    replays to v4 as the last checkpoint (seq order, not time)."""
    a, b = _dirs(tmp_path, "a", "b")
    store = _store(_local(a, b), 2)
    journal = Journal(store, "lin")
    created: dict[int, str] = {}
    times: dict[int, str] = {}

    def local_save(tag: str) -> None:
        info = store.commit("lin", plans(state_for(tag)))
        event = journal.append("checkpoint_committed", run_id="true-clock", data={"version": info.version})
        created[info.version], times[event.seq] = info.created_at, event.time

    def skewed_save(tag: str, skew: int) -> None:
        config = tmp_path / f"{tag}.json"
        config.write_text(json.dumps({"regions": [str(a), str(b)], "quorum": 2, "lineage": "lin", "tag": tag}))
        (out,) = _helper("skewsave", str(skew), str(config))
        created[out["version"]], times[out["seq"]] = out["created_at"], out["time"]

    local_save("k1")
    skewed_save("k2", 3600)
    local_save("k3")
    skewed_save("k4", -3600)

    at = {v: datetime.fromisoformat(t) for v, t in created.items()}
    assert sorted(at) == [1, 2, 3, 4]
    assert (at[2] - at[3]).total_seconds() > 3000 and (at[1] - at[4]).total_seconds() > 3000
    assert datetime.fromisoformat(times[2]) > datetime.fromisoformat(times[3])  # the journal saw it too
    assert [info.version for info in store.list("lin")] == [1, 2, 3, 4]
    manifest, loaded = _load(store)
    assert manifest.version == 4 and loaded == state_for("k4")
    for version, tag in enumerate(["k1", "k2", "k3", "k4"], start=1):
        assert _load(store, version=version)[1] == state_for(tag)
    history = fold_journal(Journal(store, "lin").events())
    assert history.last_checkpoint["version"] == 4
    assert store.commit("lin", plans(state_for("k5"))).version == 5


# -- 13. duplicate PUT after a timeout whose first attempt landed ----------------------------------


def test_case13_duplicate_put_after_a_lost_answer(tmp_path, faults):
    """Done: v1 committed; then every object PUT of the v2 save, in both regions (faulty://),
    lands and then raises TimeoutError once (the answer was lost), so the client retries a PUT
    that already succeeded. Pass: each object was PUT twice (the retry meets FileExistsError)
    and then read back (the digest/content check); the save commits v2 to both regions with
    no lag; exactly one manifest exists for that save (no v3, no skipped or duplicated
    version); v2 restores bit for bit, verify is clean, and the next save is v3."""
    a, b = _dirs(tmp_path, "region-a", "region-b")
    store = _store(_faulty(faults, a, b), 2)
    store.commit("lin", plans(state_for("v1")))
    faults.reset_log()
    faults.add(op="pipe_file", action="after", error=timed_out, per_path=True, times=1)
    info = store.commit("lin", plans(state_for("v2")))
    assert info.version == 2 and info.regions == [faulty_url(a), faulty_url(b)] and info.lagging == {}
    puts = faults.calls("pipe_file")
    by_path = {}
    for call in puts:
        by_path.setdefault(call.path, []).append(call.outcome)
    assert len(by_path) == 8  # 3 new blobs and 1 manifest, in 2 regions
    assert all(outcomes == ["fault:after", "FileExistsError"] for outcomes in by_path.values()), by_path
    for path in by_path:  # the retried object was checked against what this save meant to write
        assert faults.calls("cat_file", path), f"{path} was not read back after the duplicate PUT"
    for root in (a, b):
        assert _manifests(root) == ["000000000001.json", "000000000002.json"]
    assert _load(store)[1] == state_for("v2")
    assert verify_store(store).problems == []
    faults.clear()
    assert store.commit("lin", plans(state_for("v3"))).version == 3


# -- 14. manifest paths that would escape the region ----------------------------------------------

ESCAPES = ["../x", "/etc/x", "..\\x", "a\x00b", "a/../../x"]


@pytest.mark.parametrize("name", ESCAPES)
def test_case14_escaping_names_are_rejected_and_nothing_is_written_outside(tmp_path, faults, name):
    """Done: on faulty:// regions a, b: (1) a save with entry name ``name`` (and one with lineage
    ``../x``); (2) a planted v2 manifest, correctly self-digested, whose entry is named ``name``
    and points at a planted blob; (3) one whose chunk digest is a path
    (``blake3:../../../x``); then restore and verify --repair run over them. Pass: (1) raises
    InvalidNameError before any PUT; (2, 3) v2 is rejected (CheckpointNotFoundError; verify
    reports an unreadable manifest naming the entry name/digest) and the planted blob is never
    read; every path the filesystem was asked for stays inside a region, and the tree outside
    the regions is byte-for-byte unchanged."""
    a, b = _dirs(tmp_path, "regions/a", "regions/b")
    (tmp_path / "x").write_bytes(b"outside")
    (tmp_path / "etc").mkdir()
    store = _store(_faulty(faults, a, b), 2)
    store.commit("lin", plans(state_for("v1")))
    before = file_snapshot(tmp_path, exclude=[a, b])

    faults.reset_log()
    with pytest.raises(InvalidNameError):
        store.commit("lin", _plan(**{name: b"payload"}))
    with pytest.raises(InvalidNameError):
        store.commit("../x", _plan(w=b"payload"))
    assert faults.calls(faulty_fs.WRITES) == []

    payload = b"planted payload"
    digest = hash_bytes(payload)
    raw = json.loads((a / manifest_key("lin", 1)).read_bytes())
    raw["version"] = 2
    entry = {**raw["entries"][0], "name": name, "size": len(payload)}
    raw["entries"] = [entry | {"chunks": [{"digest": digest, "size": len(payload)}]}]
    raw["tree"] = {"bytes": name}
    path_digest = {"name": "w", "size": 1, "chunks": [{"digest": "blake3:../../../x", "size": 1}]}
    bad_digest = dict(raw, version=3, entries=[entry | path_digest], tree={"bytes": "w"})
    for root in (a, b):
        (root / manifest_key("lin", 2)).write_bytes(reseal(raw))
        (root / manifest_key("lin", 3)).write_bytes(reseal(bad_digest))
        (root / blob_key(digest)).parent.mkdir(parents=True, exist_ok=True)
        (root / blob_key(digest)).write_bytes(payload)

    faults.reset_log()
    for version in (2, 3):
        with pytest.raises(CheckpointNotFoundError):
            store.resolve("lin", version)
    assert _load(store)[1] == state_for("v1")
    report = verify_store(store, repair=True)
    details = {(p.object, p.kind) for p in report.problems}
    assert details == {(manifest_key("lin", v), "unreadable manifest") for v in (2, 3)}
    assert any("entry name" in p.detail for p in report.problems if p.object.endswith("2.json"))
    assert any("malformed digest" in p.detail for p in report.problems if p.object.endswith("3.json"))
    assert faults.calls("*", f"*/{blob_key(digest)}") == []  # the planted blob was never touched
    roots = (str(a), str(b))
    assert all(any(c.path == r or c.path.startswith(r + "/") for r in roots) for c in faults.log)
    assert file_snapshot(tmp_path, exclude=[a, b]) == before
    assert (tmp_path / "x").read_bytes() == b"outside"


# -- 15. crafted pickles never execute -----------------------------------------------------------


class _Evil:
    """Unpickling this creates the file ``path`` (what an attacker's payload would do)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_case15_crafted_pickle_never_executes(tmp_path, faults):
    """Done: (1) a state whose ``bytes`` leaf is a pickle whose ``__reduce__`` creates a marker
    file is saved and restored with ``save_state``/``load_state`` (and a partial load of that
    key); (2) a state holding the live object itself is saved; (3) planted, correctly
    self-digested manifests point at the pickle blob as a ``uint8`` tensor, as an ``object``
    dtype tensor, and through an unknown ``{"pickle": ...}`` tree node. A control shows the
    payload does create its marker when unpickled. Pass: no marker ever appears; (1) the leaf
    comes back as the exact pickle bytes, type ``bytes``; (2) is refused (nothing to pickle
    with); (3) the uint8 tensor holds the raw bytes, the other two are rejected with an error."""
    import torch

    from prefect_recovery.training import UnsupportedValueError, load_state, save_state

    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(marker))
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Evil(control)))
    assert control.exists()  # the payload is live
    a, b = _dirs(tmp_path, "region-a", "region-b")
    store = _store(_faulty(faults, a, b), 2)

    info = save_state(store, {"note": "x", "blob": payload, "n": 3}, lineage="lin")
    state, _ = load_state(store, lineage="lin")
    assert type(state["blob"]) is bytes and state["blob"] == payload
    part, _ = load_state(store, lineage="lin", keys=["blob"])
    assert part == {"blob": payload}
    with pytest.raises(UnsupportedValueError):
        save_state(store, {"evil": _Evil(marker)}, lineage="lin")
    assert not marker.exists()

    raw = json.loads((a / manifest_key("lin", info.version)).read_bytes())
    blob_entry = next(e for e in raw["entries"] if e["kind"] == "bytes")
    as_tensor = blob_entry | {"name": "t", "kind": "tensor", "dtype": "uint8", "shape": [len(payload)]}
    planted = {
        2: dict(raw, version=2, entries=[as_tensor], tree={"dict": [["t", {"tensor": "t"}]]}),
        3: dict(raw, version=3, entries=[as_tensor | {"dtype": "object"}], tree={"dict": [["t", {"tensor": "t"}]]}),
        4: dict(raw, version=4, entries=[blob_entry], tree={"dict": [["t", {"pickle": blob_entry["name"]}]]}),
    }
    for version, body in planted.items():
        for root in (a, b):
            (root / manifest_key("lin", version)).write_bytes(reseal(body))
    state, _ = load_state(store, lineage="lin", version=2)
    assert state["t"].dtype == torch.uint8 and bytes(state["t"].numpy()) == payload
    with pytest.raises(CheckpointError, match="dtype 'object'"):  # a damaged copy: never loaded, nor "latest"
        load_state(store, lineage="lin", version=3)
    with pytest.raises(CheckpointError, match="unknown node type 'pickle'"):
        load_state(store, lineage="lin", version=4)
    assert not marker.exists()
