"""Property-based attacks on the store (issue 12): mutated manifests, journal events and state
trees, and random stray files, directories and symbolic links dropped into regions.

Properties, whatever the damage:
- a load returns exactly what was saved, or raises the store's own error (``CheckpointError``);
  no other exception type, and no exception lost in a worker thread;
- ``verify`` never reports healthy while a load of a version it checked would fail;
- nothing outside the regions is written, and no link out of a region is followed (links
  point at a FIFO outside: following one for a read would block the test).

Bounded for ``make test`` (well under two minutes together). A longer run:
``PREFECT_RECOVERY_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest tests/test_fuzz_store.py -q``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers.snapshot import snapshot
from helpers.tamper import reseal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefect_recovery.core import (
    CheckpointError,
    EntryPlan,
    Store,
    collect_garbage,
    hmac_key,
    open_region,
    verify_store,
)
from prefect_recovery.core.audit import audit_store
from prefect_recovery.core.journal import decode_event
from prefect_recovery.core.layout import blob_key, manifest_key
from prefect_recovery.core.manifest import canonical_json
from prefect_recovery.core.signing import Keyring

EXAMPLES = int(os.environ.get("PREFECT_RECOVERY_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=os.environ.get("PREFECT_RECOVERY_FUZZ_RANDOM") is None,  # reproducible in CI
)
SECRET = "fuzz-secret-" + "x" * 32
CHUNK = 512


# -- building blocks -----------------------------------------------------------------------------
def _json_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=12),
        st.sampled_from(["\ud800", "é" * 44, "blake3:" + "0" * 64, "../../etc", "2", "yes", "", "\x00"]),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
        max_leaves=8,
    )


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every location inside a JSON value (dict keys and list indexes)."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


def _set(root: Any, path: tuple, value: Any, delete: bool) -> Any:
    if not path:
        return value
    parent = root
    for part in path[:-1]:
        parent = parent[part]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return root


@st.composite
def _json_mutations(draw: st.DrawFn, document: dict) -> bytes:
    """``document`` changed the way an attacker with write access to a region might."""
    kind = draw(st.sampled_from(["set", "delete", "duplicate", "bytes"]))
    raw = json.loads(json.dumps(document))
    if kind == "bytes":
        data = bytearray(json.dumps(raw, separators=(",", ":"), sort_keys=True).encode())
        op = draw(st.sampled_from(["flip", "truncate", "append", "empty"]))
        if op == "flip":
            at = draw(st.integers(0, len(data) - 1))
            data[at] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            data = data[: draw(st.integers(0, len(data) - 1))]
        elif op == "append":
            data += draw(st.binary(min_size=1, max_size=8))
        else:
            data = bytearray()
        return bytes(data)
    if kind == "duplicate":
        key = draw(st.sampled_from(sorted(raw)))
        text = json.dumps(raw, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
        return ("{" + json.dumps(key) + ":" + json.dumps(draw(_json_values())) + "," + text[1:]).encode()
    paths = [p for p in _paths(raw) if p]
    path = draw(st.sampled_from(paths))
    raw = _set(raw, path, draw(_json_values()), delete=kind == "delete" and isinstance(path[-1], str))
    if draw(st.booleans()) and isinstance(raw, dict):  # a forger recomputes the self digest
        with contextlib.suppress(Exception):
            return reseal(raw)
    return json.dumps(raw, ensure_ascii=False).encode("utf-8", "surrogatepass")


@contextlib.contextmanager
def _sandbox() -> Iterator[tuple[Path, list[Path], Path]]:
    """A temp dir with two regions and, beside them, a FIFO that no read may ever open."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        regions = [root / "region-a", root / "region-b"]
        for path in regions:
            path.mkdir()
        outside = root / "outside"
        outside.mkdir()
        os.mkfifo(outside / "fifo")
        (outside / "file").write_bytes(b"outside the region")
        yield root, regions, outside


@contextlib.contextmanager
def _no_lost_thread_errors() -> Iterator[list[str]]:
    lost: list[str] = []
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        lost.append(f"{args.exc_type.__name__}: {args.exc_value}")

    threading.excepthook = hook
    try:
        yield lost
    finally:
        threading.excepthook = previous
    assert not lost, f"exceptions lost in worker threads: {lost}"


def _store(regions: list[Path], signed: bool) -> Store:
    keyring = Keyring(hmac_key("k1", SECRET)) if signed else None
    return Store(
        [open_region(str(p)) for p in regions],
        write_quorum=1,
        chunk_bytes=CHUNK,
        io_threads=2,
        keyring=keyring,
        read_deadline=None,
    )


def _payload(seed: str) -> bytes:
    return random.Random(seed).randbytes(1300)


def _save(store: Store, seed: str):
    data = _payload(seed)
    tree = {"dict": [["w", {"bytes": "w"}], ["seed", seed]]}
    return store.commit("run", [EntryPlan(name="w", kind="bytes", data=memoryview(data))], step=1, tree=tree)


SAVED = {1: "v1", 2: "v2"}


def _load(store: Store, version: int | None = None) -> tuple[int, bytes, Any]:
    manifest, holders = store.resolve("run", version)
    buffers = {entry.name: bytearray(entry.size) for entry in manifest.entries}
    store.read_entries_into([(e, memoryview(buffers[e.name])) for e in manifest.entries], prefer=holders)
    return manifest.version, bytes(buffers.get("w", b"")), manifest.tree


def _load_or_error(store: Store, version: int | None = None) -> tuple[int, bytes, Any] | CheckpointError:
    try:
        return _load(store, version)
    except CheckpointError as exc:  # the store's own error: allowed. Anything else fails the test.
        return exc


def _is_saved(loaded: tuple[int, bytes, Any]) -> bool:
    version, data, tree = loaded
    seed = SAVED.get(version)
    return seed is not None and data == _payload(seed) and tree == {"dict": [["w", {"bytes": "w"}], ["seed", seed]]}


def _check_verify_tells_the_truth(store: Store, repair: bool) -> None:
    report = verify_store(store, repair=repair)
    if report.healthy:
        for row in report.checkpoints:
            loaded = _load_or_error(store, row.version)
            assert not isinstance(loaded, CheckpointError), f"verify healthy, yet v{row.version}: {loaded}"


# -- manifests -----------------------------------------------------------------------------------
@FUZZ
@given(data=st.data(), signed=st.booleans(), both=st.booleans())
def test_mutated_manifests_load_exactly_or_fail_with_the_stores_error(data: st.DataObject, signed: bool, both: bool):
    with _sandbox() as (root, regions, _outside), _no_lost_thread_errors():
        store = _store(regions, signed)
        _save(store, "v1")
        _save(store, "v2")
        original = json.loads((regions[0] / manifest_key("run", 2)).read_bytes())
        mutated = data.draw(_json_mutations(original), label="manifest")
        targets = regions if both else regions[:1]
        for region in targets:
            (region / manifest_key("run", 2)).write_bytes(mutated)
        outside_before = snapshot(root, exclude=regions)

        # A forger without the key (signed store), or bit rot (not resealed), cannot change
        # what loads; on an unsigned store a resealed manifest is a new valid one (threat model).
        trusted = signed or not _resealed(mutated, original)
        loaded = _load_or_error(store)
        if not isinstance(loaded, CheckpointError) and trusted:
            assert _is_saved(loaded), "a load returned something that was never saved"
        if not both and trusted:  # one intact region: the latest version still loads, exactly
            assert not isinstance(loaded, CheckpointError), loaded
            assert loaded[0] == 2 and _is_saved(loaded)
        _check_verify_tells_the_truth(store, repair=False)
        _check_verify_tells_the_truth(store, repair=True)
        if not both and trusted:
            assert verify_store(store).healthy, "repair from the intact region did not heal the store"
        assert snapshot(root, exclude=regions) == outside_before


def _resealed(mutated: bytes, original: dict) -> bool:
    """Whether ``mutated`` carries a self digest that matches its own body (a forger's reseal)."""
    try:
        raw = json.loads(mutated)
        return isinstance(raw, dict) and raw != original and reseal(raw) == mutated
    except Exception:
        return False


# -- stray files, directories and links ------------------------------------------------------------
STRAY_PLACES = [
    "lineages/{name}",
    "lineages/run/{name}",
    "lineages/run/manifests/{name}",
    "lineages/run/manifests/999999999999.json",
    "lineages/run/manifests/000000000003.json",
    "lineages/run/manifests/000000000002.json",
    "lineages/run/journal/{name}",
    "blobs/{name}",
    "blobs/blake3/{name}",
    "{blob}",
    "preflight/{name}",
    "{name}",
    ".tmp-{name}",
    "blobs",
    "lineages/run",
    "lineages/run/manifests",
]
STRAY_KINDS = ["empty file", "garbage file", "directory", "link to fifo", "link to dir", "dangling link"]


@st.composite
def _strays(draw: st.DrawFn) -> list[tuple[int, str, str]]:
    names = st.sampled_from([".DS_Store", "lost+found", "old run", "x", "000000000001.json", "ab", "-", "é"])
    found = []
    for _ in range(draw(st.integers(1, 4))):
        place = draw(st.sampled_from(STRAY_PLACES))
        found.append(
            (draw(st.integers(0, 1)), place.replace("{name}", draw(names)), draw(st.sampled_from(STRAY_KINDS)))
        )
    return found


def _drop(region: Path, relative: str, kind: str, outside: Path) -> Path | None:
    path = region / relative
    for parent in path.relative_to(region).parents:
        if (region / parent).is_symlink() or (region / parent).is_file():
            return None  # an earlier stray took a parent's place
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        if kind == "directory":
            return None
        path.rename(outside / f"moved-{random.random()}")  # the attacker keeps it elsewhere
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "empty file":
        path.write_bytes(b"")
    elif kind == "garbage file":
        path.write_bytes(b"\x00garbage\xff")
    elif kind == "directory":
        path.mkdir()
        (path / "user-file").write_text("keep me")
    elif kind == "link to fifo":
        path.symlink_to(outside / "fifo")
    elif kind == "link to dir":
        path.symlink_to(outside, target_is_directory=True)
    else:
        path.symlink_to(outside / "nowhere")
    return path


@FUZZ
@given(strays=_strays(), signed=st.booleans())
def test_stray_entries_never_break_the_store_or_leave_it(strays: list[tuple[int, str, str]], signed: bool):
    with _sandbox() as (_root, regions, outside), _no_lost_thread_errors():
        store = _store(regions, signed)
        _save(store, "v1")
        _save(store, "v2")
        digest = store.resolve("run")[0].entries[0].chunks[0].digest
        dropped = []
        for index, relative, kind in strays:
            relative = relative.replace("{blob}", blob_key(digest))
            if any(
                path == regions[index] / relative or regions[index] / relative in path.parents for path, _ in dropped
            ):
                continue  # one stray per place (and none inside another)
            path = _drop(regions[index], relative, kind, outside)
            if path is not None:
                dropped.append((path, kind))
        outside_before = snapshot(outside)

        # Reads and scrubs run whatever the strays; only the store's own errors may come out.
        store.lineages()
        with contextlib.suppress(CheckpointError):
            store.list()
        loaded = _load_or_error(store)
        if not isinstance(loaded, CheckpointError):
            assert _is_saved(loaded)
        _check_verify_tells_the_truth(store, repair=False)
        with contextlib.suppress(CheckpointError):
            saved = _save(store, "v3")
            SAVED[saved.version] = "v3"
            try:
                loaded = _load(store, saved.version)
                assert _is_saved(loaded)
            finally:
                del SAVED[saved.version]
        _check_verify_tells_the_truth(store, repair=True)
        audit_store(store, apply_retention_policy=False, gc_grace=timedelta(minutes=1))
        collect_garbage(store, grace=timedelta(minutes=1))
        assert snapshot(outside) == outside_before, "something outside the regions changed"
        for path, kind in dropped:  # a user's directory is never deleted
            if kind == "directory":
                assert (path / "user-file").read_text() == "keep me"


# -- journal events and state trees ------------------------------------------------------------------
@FUZZ
@given(data=st.data())
def test_mutated_journal_events_decode_or_raise_journal_error(data: st.DataObject):
    from prefect_recovery.core.journal import JournalError

    with _sandbox() as (_root, regions, _outside), _no_lost_thread_errors():
        store = _store(regions, signed=False)
        from prefect_recovery.core import Journal

        journal = Journal(store, "run")
        journal.append("run_started", run_id="r1", data={"pipeline": "p", "parameters": {"steps": 400}})
        path = regions[0] / "lineages/run/journal/000000000001.json"
        mutated = data.draw(_json_mutations(json.loads(path.read_bytes())), label="event")
        try:
            event = decode_event(mutated, "run", 1)
        except JournalError:
            return
        # decoded: then it is a well-formed event whose canonical form hashes to its digest
        assert canonical_json(event.model_dump(mode="json"))


@FUZZ
@given(tree=_json_values(), keys=st.none() | st.lists(st.text(max_size=3), max_size=2))
def test_state_trees_decode_or_raise_manifest_error(tree: Any, keys: list[str] | None):
    from prefect_recovery.core import ManifestError
    from prefect_recovery.training.encoding import decode_tree

    try:
        decode_tree(tree, {"w": b"x"}, keys=keys)
    except (ManifestError, CheckpointError):
        pass


def test_the_fuzz_runs_are_bounded_by_default():
    """The default budget keeps ``make test`` fast; the env var raises it for a longer hunt."""
    assert EXAMPLES >= 1
    if "PREFECT_RECOVERY_FUZZ_EXAMPLES" not in os.environ:
        assert EXAMPLES <= 100
    pytest.importorskip("hypothesis")
