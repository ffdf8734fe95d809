"""Codecs and delta chunks (issue 17) tried from outside: what a demanding user saves, and what a
hostile reviewer writes into a store.

Complements tests/test_codecs.py and tests/test_delta.py: every dtype and tensor layout a user
checkpoints under every codec with delta on and off, chunk sizes that cut elements, lineages
that switch codec and delta between saves and lose versions to retention and GC, parents
damaged in one or every region, hand-written manifests that lie, a bomb measured in a child
process, and the user's tools (the CLI's verify, audit and export, the block saved on a real
Prefect server) on compressed and delta stores. Everything goes through the real core Store on
real local regions and the same load path a restore takes.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import zstandard
from safetensors.torch import load_file

from prefect_recovery import CheckpointStore
from prefect_recovery.core import BlobUnavailableError, CheckpointError, Store, open_region
from prefect_recovery.core.codecs import CodecError, decode_into
from prefect_recovery.core.digest import hash_bytes
from prefect_recovery.core.layout import blob_key, manifest_key
from prefect_recovery.core.manifest import MAX_DELTA_CHAIN, ChunkRef, Entry, canonical_json
from prefect_recovery.core.retention import RetentionPolicy, apply_retention, plan_retention
from prefect_recovery.core.store import WrittenEntries
from prefect_recovery.core.verify import verify_store
from prefect_recovery.training.state_io import load_state, save_state

CHUNK = 64 * 1024
CODECS = ["none", "zstd", "bytegroup-zstd", "auto"]
CLI = [sys.executable, "-m", "prefect_recovery.cli"]


# -- helpers ---------------------------------------------------------------------------------------------


def _store(root: Path, codec: str = "auto", delta: bool = False, chunk_bytes: int = CHUNK, **kw: Any) -> Store:
    regions = []
    for name in ("r0", "r1"):
        (root / name).mkdir(parents=True, exist_ok=True)
        regions.append(open_region(str(root / name)))
    return Store(regions, chunk_bytes=chunk_bytes, codec=codec, delta=delta, **kw)


def _bits(t: torch.Tensor) -> bytes:
    """A tensor's exact bytes (any dtype, any layout): what bit-identical means."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and _bits(a) == _bits(b)


def _weights(n: int, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.02).to(dtype)


def _nudge(t: torch.Tensor, seed: int) -> torch.Tensor:
    """A fine-tune step: every value moves by about one unit of its last place."""
    noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(seed))
    scale = 1e-2 if t.dtype in (torch.bfloat16, torch.float16) else 1e-6
    return (t.double() * (1 + scale * noise)).to(t.dtype)


def _every_dtype(seed: int, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """One tensor of every dtype a user checkpoints (float8 and friends where torch has them)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 50
    out = {
        "bool": x > 0,
        "uint8": x.abs().to(torch.uint8),
        "int8": x.to(torch.int8),
        "int16": (x * 100).to(torch.int16),
        "int32": (x * 1e6).to(torch.int32),
        "int64": (x * 1e12).to(torch.int64),
        "float16": x.to(torch.float16),
        "bfloat16": x.to(torch.bfloat16),
        "float32": x.to(torch.float32),
        "float64": x,
        "complex64": torch.complex(x, -x).to(torch.complex64),
        "complex128": torch.complex(x, x / 3),
    }
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
        if hasattr(torch, name):
            out[name] = (x / 10).to(getattr(torch, name))
    for name in ("uint16", "uint32", "uint64"):
        if hasattr(torch, name):
            out[name] = torch.randint(0, 200, shape, generator=g, dtype=torch.int64).to(getattr(torch, name))
    return out


def _user_state(seed: int) -> dict[str, Any]:
    """What a user hands the store: every dtype at several shapes (0-dim, empty, odd), views
    that are not contiguous, two names for one storage, a tensor of zeros, random bytes."""
    state: dict[str, Any] = {}
    for shape in [(), (0,), (3, 0), (5,), (17, 3)]:
        state["x".join(map(str, shape)) or "scalar"] = _every_dtype(seed * 10 + len(shape), shape)
    grid = torch.randn(48, 36, generator=torch.Generator().manual_seed(seed)).to(torch.float32)
    state["views"] = {
        "transposed": grid.t(),
        "sliced": grid[1:40:3, ::5],
        "shared_whole": grid,
        "shared_part": grid.view(-1)[100:900],
        "expanded": torch.arange(7.0).expand(5, 7),
    }
    state["zeros"] = torch.zeros(200_000, dtype=torch.bfloat16)  # a huge ratio
    state["noise"] = torch.randint(0, 256, (150_000,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    state["weights"] = _weights(90_000, seed)
    return state


def _flat(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    return {k: v for key, value in state.items() for k, v in _flat(value, f"{prefix}/{key}").items()}


def _assert_state_equal(got: Any, expected: Any) -> None:
    got_flat, want_flat = _flat(got), _flat(expected)
    assert set(got_flat) == set(want_flat)
    for name, tensor in want_flat.items():
        assert _same(got_flat[name], tensor), name


def _chunks(store: Store, lineage: str, version: int | None = None) -> list[ChunkRef]:
    manifest = store.resolve(lineage, version)[0]
    return [chunk for entry in store.manifest_entries(manifest) for chunk in entry.chunks]


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _flip(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0x20
    path.write_bytes(bytes(data))


def _craft(root: Path, lineage: str, source: int, target: int, mutate: Callable[[dict[str, Any]], None]) -> None:
    """Version ``target`` of ``lineage``: version ``source``'s manifest, edited by ``mutate`` and
    re-digested (unsigned), written into both regions as a hostile writer with write access would."""
    raw = json.loads((root / "r0" / manifest_key(lineage, source)).read_bytes())
    raw["version"] = target
    mutate(raw)
    body = {key: value for key, value in raw.items() if key not in ("manifest_digest", "signature")}
    raw["manifest_digest"] = hash_bytes(canonical_json(body), raw["hash_algorithm"])
    raw["signature"] = None
    for region in ("r0", "r1"):
        path = root / region / manifest_key(lineage, target)
        path.write_bytes(canonical_json(raw))


def _entry(raw: dict[str, Any], name: str) -> dict[str, Any]:
    return next(entry for entry in raw["entries"] if entry["name"] == name)


# -- round trips: every dtype and layout, every codec, delta on and off ------------------------------------


@pytest.mark.parametrize("delta", [False, True], ids=["whole", "delta"])
@pytest.mark.parametrize("codec", CODECS)
def test_every_dtype_and_layout_round_trips_bit_exact_and_the_state_digest_ignores_the_codec(tmp_path, codec, delta):
    store = _store(tmp_path / "s", codec, delta)
    reference = _store(tmp_path / "ref", "none", False)
    first, second = _user_state(1), _user_state(1)
    second["weights"] = _nudge(first["weights"], 2)  # a fine-tune step: a delta where delta is on
    second["views"]["shared_whole"].mul_(1.0000001)  # in place: both names of the storage change
    for version, state in enumerate((first, second), start=1):
        save_state(store, state, lineage="user")
        save_state(reference, state, lineage="user")
        loaded, manifest = load_state(store, lineage="user")
        assert manifest.version == version
        _assert_state_equal(loaded, state)
        # One state, one digest, however it is stored.
        assert store.state_digest(manifest) == reference.state_digest(reference.resolve("user")[0])
    # The first version still loads as it was (its blobs are the second's delta parents).
    _assert_state_equal(load_state(store, lineage="user", version=1)[0], first)
    by_name = {entry.name: entry for entry in store.manifest_entries(store.resolve("user")[0])}
    zeros = next(entry for name, entry in by_name.items() if name.endswith("zeros"))
    noise = next(entry for name, entry in by_name.items() if name.endswith("noise"))
    weights = next(entry for name, entry in by_name.items() if name.endswith("weights"))
    if codec == "none" and not delta:
        assert all(chunk.stored_raw for entry in by_name.values() for chunk in entry.chunks)
    if codec in ("auto", "zstd", "bytegroup-zstd"):
        assert all(chunk.blob_size * 100 < chunk.size for chunk in zeros.chunks)  # zeros shrink to almost nothing
    if codec == "auto":
        assert all(chunk.stored_raw for chunk in noise.chunks)  # random bytes: stored as they are
    if delta:
        assert all(chunk.parent is not None for chunk in weights.chunks)
        assert all(chunk.parent is None for chunk in noise.chunks)  # unchanged: the first save's own blobs
    assert verify_store(store, read_data=1.0).healthy


@pytest.mark.parametrize("chunk_bytes", [1, 3, 6, 7, 10, 4100])
def test_chunk_bytes_that_cut_elements_round_trip_and_never_group_a_partial_element(tmp_path, chunk_bytes):
    store = _store(tmp_path, "bytegroup-zstd", delta=True, chunk_bytes=chunk_bytes)
    state = {
        "f64": torch.randn(61, dtype=torch.float64),
        "f32": torch.randn(37),
        "bf16": _weights(55),
        "half": torch.randn(9).half(),
        "ints": torch.arange(11, dtype=torch.int32),
    }
    save_state(store, state, lineage="odd")
    state = {name: (_nudge(t, 5) if t.is_floating_point() else t + 1) for name, t in state.items()}
    save_state(store, state, lineage="odd")
    _assert_state_equal(load_state(store, lineage="odd")[0], state)
    entries = store.manifest_entries(store.resolve("odd")[0])
    for entry in entries:
        for chunk in entry.chunks:
            ref: ChunkRef | None = chunk
            while ref is not None:
                if ref.codec == "bytegroup-zstd":
                    assert ref.width is not None and ref.size % ref.width == 0, (entry.name, ref)
                ref = ref.parent
    floats = [c for e in entries if e.dtype != "int32" for c in e.chunks]
    if chunk_bytes in (1, 3, 7):  # no chunk but perhaps an entry's last is a whole number of elements
        assert any(c.codec == "zstd" for c in floats)
    assert verify_store(store, read_data=1.0).healthy


# -- lineages that change codec and delta, longer than a chain, pruned by retention and GC ---------------------


def test_a_lineage_switching_codec_and_delta_keeps_every_version_loadable_through_retention_and_gc(tmp_path):
    from datetime import UTC, datetime, timedelta

    from prefect_recovery.core.gc import collect_garbage

    # Eleven delta saves in a row (a chain reaches MAX_DELTA_CHAIN and restarts), then saves that
    # switch codec and delta on and off, each from a fresh Store as a new process would open it.
    plan = [("auto", True)] * (MAX_DELTA_CHAIN + 3) + [
        ("zstd", False),
        ("none", True),
        ("bytegroup-zstd", True),
        ("none", False),
        ("auto", True),
        ("zstd", True),
    ]
    weights, frozen = _weights(100_000), _weights(20_000, seed=9)
    saved: dict[int, bytes] = {}
    longest = 0
    for step, (codec, delta) in enumerate(plan, start=1):
        store = _store(tmp_path, codec, delta)
        weights = _nudge(weights, step)
        info = save_state(store, {"w": weights, "frozen": frozen}, lineage="ft", step=step)
        saved[info.version] = _bits(weights)
        lengths = [chunk.chain_length() for chunk in _chunks(store, "ft")]
        assert max(lengths) <= MAX_DELTA_CHAIN
        longest = max(longest, *lengths)
    assert longest == MAX_DELTA_CHAIN
    store = _store(tmp_path, "none", False)  # a reader with no codec configured reads them all
    for version, expected in saved.items():
        assert _bits(load_state(store, lineage="ft", version=version)[0]["w"]) == expected, version
    # Retention keeps every 5th step and the last 2: the chains of the kept versions run through
    # versions it deletes.
    retention = plan_retention(store, RetentionPolicy(keep_last=2, keep_every_steps=5))
    apply_retention(store, retention)
    kept = sorted(store.versions("ft"))
    assert kept == [5, 10, 15, 16, 17]
    report = collect_garbage(store, now=datetime.now(UTC) + timedelta(days=1))
    assert report.total_bytes_freed > 0  # the deleted versions' own chunks went
    for version in kept:
        assert _bits(load_state(store, lineage="ft", version=version)[0]["w"]) == saved[version], version
    assert verify_store(store, read_data=1.0).healthy


def test_paged_manifests_of_delta_chunks_keep_their_parents_through_retention_and_gc(tmp_path):
    from datetime import UTC, datetime, timedelta

    from prefect_recovery.core.gc import collect_garbage

    store = _store(tmp_path, "auto", delta=True, page_entries=2)
    tensors = {f"layer{i}": _weights(30_000, seed=i) for i in range(5)}
    saved = {}
    for step in range(1, 5):
        tensors = {name: _nudge(t, step * 10 + i) for i, (name, t) in enumerate(tensors.items())}
        saved[save_state(store, dict(tensors), lineage="big", step=step).version] = dict(tensors)
    manifest = store.resolve("big")[0]
    assert manifest.paged and all(c.chain_length() == 4 for c in _chunks(store, "big"))
    apply_retention(store, plan_retention(store, RetentionPolicy(keep_last=1)))
    assert sorted(store.versions("big")) == [4]
    collect_garbage(store, now=datetime.now(UTC) + timedelta(days=1))
    loaded = load_state(store, lineage="big")[0]
    assert all(_same(loaded[name], t) for name, t in saved[4].items())
    assert verify_store(store, read_data=1.0, decode=True).healthy


def test_one_delta_store_saving_three_lineages_from_three_threads_loads_every_version(tmp_path):
    import threading

    # The store keeps the last save's chunks to delta the next one against; saves of other
    # lineages on other threads interleave with it.
    store = _store(tmp_path, "auto", delta=True)
    saved: dict[tuple[str, int], torch.Tensor] = {}
    errors: list[BaseException] = []

    def train(lineage: str, seed: int) -> None:
        weights = _weights(60_000, seed)
        try:
            for step in range(8):
                weights = _nudge(weights, seed * 100 + step)
                state = {"w": weights, "shared": _weights(30_000, seed=7)}
                saved[(lineage, save_state(store, state, lineage=lineage).version)] = weights
        except BaseException as exc:  # reported below, on the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=train, args=(f"run{k}", k)) for k in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(saved) == 24
    assert any(c.parent is not None for c in _chunks(store, "run0"))
    for (lineage, version), weights in saved.items():
        assert _same(load_state(store, lineage=lineage, version=version)[0]["w"], weights), (lineage, version)
    assert verify_store(store, read_data=1.0, decode=True).healthy


# -- damaged parents ----------------------------------------------------------------------------------------------


def test_a_delta_parent_damaged_in_one_region_fails_over_and_in_every_region_is_a_typed_error(tmp_path):
    store = _store(tmp_path, "auto", delta=True)
    base = _weights(100_000)
    save_state(store, {"w": base}, lineage="ft")
    tuned = _nudge(base, 1)
    save_state(store, {"w": tuned}, lineage="ft")
    chunks = _chunks(store, "ft")
    assert all(chunk.parent is not None for chunk in chunks)
    parent = chunks[0].parent
    assert parent is not None
    _flip(tmp_path / "r0" / blob_key(parent.digest))
    assert _bits(load_state(store, lineage="ft")[0]["w"]) == _bits(tuned)  # the parent from r1
    # In every region: the load refuses (no tensor handed out), and names the blob.
    _flip(tmp_path / "r1" / blob_key(parent.digest))
    with pytest.raises(BlobUnavailableError, match=parent.digest.split(":")[1][:16]) as caught:
        load_state(store, lineage="ft")
    assert isinstance(caught.value, CheckpointError)
    with pytest.raises(BlobUnavailableError):
        CheckpointStore(regions=[str(tmp_path / "r0"), str(tmp_path / "r1")]).load_checkpoint(lineage="ft")
    # verify says which version is hurt and that nothing can repair it.
    report = verify_store(store, read_data=1.0, repair=True)
    damaged = [p for p in report.problems if p.object == blob_key(parent.digest)]
    assert {Path(p.region).name for p in damaged} == {"r0", "r1"}
    assert all(not p.repaired and "no intact copy" in p.detail for p in damaged)
    # A new save from a fresh process cannot read that parent: that chunk is stored whole (no
    # delta on a parent nobody can read) and the new version loads.
    again = _nudge(tuned, 2)
    save_state(_store(tmp_path, "auto", delta=True), {"w": again}, lineage="ft")
    first = _chunks(store, "ft")[0]
    assert first.parent is None or parent.digest not in {d for d, _ in first.blobs()}
    assert _bits(load_state(store, lineage="ft")[0]["w"]) == _bits(again)


# -- hand-written manifests that lie --------------------------------------------------------------------------------


def _chunk0(raw: dict[str, Any]) -> dict[str, Any]:
    return _entry(raw, "w")["chunks"][0]


def _set(key: str, value: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], None]:
    def mutate(raw: dict[str, Any]) -> None:
        chunk = _chunk0(raw)
        chunk[key] = value(chunk)

    return mutate


def _bytegroup_as_zstd(raw: dict[str, Any]) -> None:
    chunk = _chunk0(raw)
    chunk["codec"] = "zstd"
    del chunk["width"]


def _zstd_with_width(raw: dict[str, Any]) -> None:
    _bytegroup_as_zstd(raw)
    _chunk0(raw)["width"] = 2


def _self_parent(raw: dict[str, Any]) -> None:
    chunk = _chunk0(raw)
    chunk["parent"] = copy.deepcopy(chunk)


def _chain_of(length: int) -> Callable[[dict[str, Any]], None]:
    def mutate(raw: dict[str, Any]) -> None:
        chunk = _chunk0(raw)
        plain = copy.deepcopy(chunk)
        node = chunk
        for _ in range(length - 1):
            node["parent"] = copy.deepcopy(plain)
            node = node["parent"]

    return mutate


def _deep_chain(raw: dict[str, Any]) -> None:
    """Marker: a chain of 2000 parents, deeper than Python's recursion limit (_write_deep_chain)."""


def _write_deep_chain(root: Path) -> None:
    """Version 2 of lineage L: version 1 with its first chunk given a chain of 2000 parents,
    written as text (``json.dumps`` itself cannot nest that deep)."""
    raw = json.loads((root / "r0" / manifest_key("L", 1)).read_bytes())
    raw["version"] = 2
    plain = canonical_json(_chunk0(raw)).decode()
    nested = plain
    for _ in range(2000):
        nested = plain[:-1] + ',"parent":' + nested + "}"
    body = canonical_json({k: v for k, v in raw.items() if k not in ("manifest_digest", "signature")})
    body = body.replace(plain.encode(), nested.encode(), 1)
    digest = hash_bytes(body, "blake3").encode()
    for region in ("r0", "r1"):
        (root / region / manifest_key("L", 2)).write_bytes(
            body[:-1] + b',"manifest_digest":"' + digest + b'","signature":null}'
        )


# (mutation, what a load of that version by number raises, does "latest" fall back to version 1)
LIES: dict[str, tuple[Callable[[dict[str, Any]], None], str, bool]] = {
    "stored_size bigger": (_set("stored_size", lambda c: c["stored_size"] + 1), "no consistent version 2", True),
    "stored_size smaller": (_set("stored_size", lambda c: c["stored_size"] - 1), "no consistent version 2", True),
    "decoded_digest of another chunk": (
        _set("decoded_digest", lambda c: hash_bytes(b"another chunk", "blake3")),
        "decoded bytes do not match",
        False,
    ),
    "width 4 on bfloat16": (_set("width", lambda c: 4), "decoded bytes do not match", False),
    "width 3": (_set("width", lambda c: 3), "schema validation", True),
    "width on zstd": (
        _zstd_with_width,
        "schema validation",
        True,
    ),
    "bytegroup read as zstd": (_bytegroup_as_zstd, "decoded bytes do not match", False),
    "unknown codec": (_set("codec", lambda c: "lz4"), "schema validation", True),
    "huge size": (_set("size", lambda c: 2**40), "schema validation", True),
    "parent is itself": (_self_parent, "decoded bytes do not match", False),
    f"chain of {MAX_DELTA_CHAIN + 1}": (_chain_of(MAX_DELTA_CHAIN + 1), "delta chain longer", True),
    "chain of 2000": (_deep_chain, "nested too deeply|recursion depth", True),
    "parent of another size": (
        lambda raw: _chunk0(raw).update(parent=dict(_entry(raw, "w")["chunks"][-1])),
        "schema validation",
        True,
    ),
}


@pytest.mark.parametrize("lie", list(LIES))
def test_a_manifest_that_lies_about_a_compressed_chunk_is_refused_and_changes_nothing(tmp_path, lie):
    mutate, refusal, falls_back = LIES[lie]
    store = _store(tmp_path, "bytegroup-zstd")
    weights = _weights(100_000)
    save_state(store, {"w": weights}, lineage="L")
    if mutate is _deep_chain:
        _write_deep_chain(tmp_path)
    else:
        _craft(tmp_path, "L", 1, 2, mutate)
    before = {region: _tree_bytes(tmp_path / region) for region in ("r0", "r1")}
    with pytest.raises(CheckpointError, match=refusal):
        load_state(store, lineage="L", version=2)
    if falls_back:  # not a checkpoint: "latest" is the last consistent one
        state, manifest = load_state(store, lineage="L")
        assert manifest.version == 1 and _same(state["w"], weights)
    else:  # a consistent version whose bytes do not check: refused, never handed out
        with pytest.raises(BlobUnavailableError):
            load_state(store, lineage="L")
        assert _same(load_state(store, lineage="L", version=1)[0]["w"], weights)
    # The hash scrub sees every lie but those only decoding can tell; the deep verify sees them all.
    assert verify_store(store, read_data=1.0).healthy is not falls_back or refusal.startswith("no consistent")
    deep = verify_store(store, read_data=1.0, repair=True, decode=True)
    assert not deep.healthy and all(not problem.repaired for problem in deep.problems)
    assert {region: _tree_bytes(tmp_path / region) for region in ("r0", "r1")} == before  # nothing changed


def test_a_manifest_lying_about_a_blobs_size_does_not_make_verify_blame_the_honest_version(tmp_path):
    store = _store(tmp_path, "auto")
    save_state(store, {"w": _weights(100_000)}, lineage="L")
    _craft(tmp_path, "L", 1, 2, _set("stored_size", lambda c: c["stored_size"] + 1))
    before = _tree_bytes(tmp_path)
    report = verify_store(store, read_data=1.0, repair=True)
    rows = {row.version: row for row in report.checkpoints}
    assert set(rows[1].regions.values()) == {"ok"} and rows[1].copies == 2  # version 1 is intact
    assert set(rows[2].regions.values()) == {"corrupt"} and rows[2].copies == 0
    assert report.problems and all(p.version == 2 and not p.repaired for p in report.problems)
    assert _tree_bytes(tmp_path) == before  # nothing to repair from: nothing was touched


def test_deep_verify_decodes_every_coded_chunk_and_names_the_version_no_region_can_load(tmp_path):
    store = _store(tmp_path, "auto", delta=True)
    base = _weights(100_000)
    save_state(store, {"w": base}, lineage="ft")
    save_state(store, {"w": _nudge(base, 1)}, lineage="ft")
    assert verify_store(store, read_data=1.0, decode=True).healthy  # an honest store decodes clean
    # Version 3 names version 2's intact blobs but claims other decoded bytes for one delta chunk:
    # what a writer bug looks like. Every blob hashes right, so the plain scrub passes.
    _craft(tmp_path, "ft", 2, 3, _set("decoded_digest", lambda c: hash_bytes(b"not this chunk", "blake3")))
    lying = _chunk0(json.loads((tmp_path / "r0" / manifest_key("ft", 3)).read_bytes()))
    assert "parent" in lying
    assert verify_store(store, read_data=1.0).healthy
    with pytest.raises(BlobUnavailableError, match="decoded bytes do not match"):
        load_state(store, lineage="ft")
    before = _tree_bytes(tmp_path)
    report = verify_store(store, read_data=1.0, repair=True, decode=True)
    assert not report.healthy
    assert [(p.region, p.object, p.kind, p.version, p.repaired) for p in report.problems] == [
        ("*", blob_key(lying["digest"]), "corrupt", 3, False)
    ]
    assert "load an earlier version" in report.problems[0].detail
    rows = {row.version: row for row in report.checkpoints}
    assert rows[3].copies == 0 and set(rows[3].regions.values()) == {"corrupt"}
    assert rows[1].copies == rows[2].copies == 2  # the honest versions, which share those blobs
    assert _tree_bytes(tmp_path) == before  # nothing to repair from, nothing touched
    # A blob damaged in every region is the hash check's to report, once per region; a sampled
    # scrub that did not read it still hears of it from the decode.
    _flip(tmp_path / "r0" / blob_key(lying["digest"]))
    _flip(tmp_path / "r1" / blob_key(lying["digest"]))
    full = verify_store(store, read_data=1.0, decode=True)
    named = [(Path(p.region).name, p.kind) for p in full.problems if p.object == blob_key(lying["digest"])]
    assert sorted(named) == [("r0", "corrupt"), ("r1", "corrupt")]
    sampled = verify_store(store, read_data=0.0, decode=True)
    [found] = [p for p in sampled.problems if p.object == blob_key(lying["digest"])]
    assert "no intact copy" in found.detail and found.region.count(",") == 1


def test_verify_decode_from_the_cli_and_the_block_finds_what_only_decoding_can_tell(tmp_path):
    # The deep verify as users reach it: `prefect-recovery verify --decode` and
    # CheckpointStore.verify(decode=True). The plain scrub stays healthy (every blob hashes right).
    store = _store(tmp_path, "auto", delta=True)
    base = _weights(100_000)
    save_state(store, {"w": base}, lineage="ft")
    save_state(store, {"w": _nudge(base, 1)}, lineage="ft")
    _craft(tmp_path, "ft", 2, 3, _set("decoded_digest", lambda c: hash_bytes(b"not this chunk", "blake3")))
    lying = _chunk0(json.loads((tmp_path / "r0" / manifest_key("ft", 3)).read_bytes()))
    regions = ["--region", str(tmp_path / "r0"), "--region", str(tmp_path / "r1")]
    plain = _cli("verify", *regions, "--json")
    assert plain.returncode == 0, plain.stdout + plain.stderr
    deep = _cli("verify", *regions, "--decode", "--json")
    assert deep.returncode == 1, deep.stdout + deep.stderr
    found = [(p["region"], p["object"], p["version"]) for p in json.loads(deep.stdout)["problems"]]
    assert found == [("*", blob_key(lying["digest"]), 3)]
    human = _cli("verify", *regions, "--decode")
    assert human.returncode == 1 and "problems remain" in human.stdout, human.stdout + human.stderr
    block = CheckpointStore(regions=[str(tmp_path / "r0"), str(tmp_path / "r1")])
    assert block.verify().healthy
    report = block.verify(decode=True)
    assert not report.healthy and [p.version for p in report.problems] == [3]


def test_on_a_signing_store_a_forged_delta_manifest_stops_the_load_and_a_signed_lie_is_caught_by_decoding(tmp_path):
    from prefect_recovery.core.errors import ManifestSignatureError
    from prefect_recovery.core.signing import Keyring, hmac_key

    keyring = Keyring(hmac_key("ckpt-key", b"0123456789abcdef0123456789abcdef"))
    store = _store(tmp_path, "auto", delta=True, keyring=keyring)
    base = _weights(100_000)
    save_state(store, {"w": base}, lineage="ft")
    tuned = _nudge(base, 1)
    save_state(store, {"w": tuned}, lineage="ft")
    # Unsigned (a writer without the key): the load of "latest" stops, it never falls back to v2.
    _craft(tmp_path, "ft", 2, 3, _set("decoded_digest", lambda c: hash_bytes(b"other", "blake3")))
    with pytest.raises(ManifestSignatureError):
        load_state(store, lineage="ft")
    for region in ("r0", "r1"):
        (tmp_path / region / manifest_key("ft", 3)).unlink()
    # Signed with the store's own key (a writer bug, or an insider): the signature checks, the
    # blobs hash right, and only decoding tells: the load refuses and the deep verify names it.
    manifest = store.resolve("ft")[0]
    entries = store.manifest_entries(manifest)
    first = entries[0].chunks[0]
    assert first.parent is not None
    lie = first.model_copy(update={"decoded_digest": hash_bytes(b"other", "blake3")})
    forged = entries[0].model_copy(update={"chunks": [lie, *entries[0].chunks[1:]]})
    store.commit_entries("ft", WrittenEntries([forged], {}, 0), tree=manifest.tree)
    assert store.resolve("ft")[0].signature is not None
    with pytest.raises(BlobUnavailableError, match="decoded bytes do not match"):
        load_state(store, lineage="ft")
    assert verify_store(store, read_data=1.0).healthy
    report = verify_store(store, read_data=1.0, decode=True)
    assert [(p.region, p.version) for p in report.problems] == [("*", 3)]
    assert _same(load_state(store, lineage="ft", version=2)[0]["w"], tuned)


BOMB_CHILD = r"""
import resource, sys, zstandard
from pathlib import Path
from prefect_recovery.core import BlobUnavailableError, open_region, Store
from prefect_recovery.training.state_io import load_state
store = Store([open_region(p) for p in sys.argv[1:3]])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_state(store, lineage="bomb")
except BlobUnavailableError as exc:
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print("refused", grown, str(exc)[:300])
"""


def test_a_bomb_whose_header_lies_is_refused_within_the_declared_size_in_a_child_process(tmp_path):
    # A frame of 4 GiB of zeros (about 128 KiB on disk) whose header says 4 KiB, the size the
    # manifest declares: a reader that trusted the frame would need 4 GiB.
    inflated, declared = 4 * 2**30, 4096
    sink = _Sink()
    compressor = zstandard.ZstdCompressor(level=1, write_content_size=True)
    with compressor.stream_writer(sink, size=inflated, closefd=False) as writer:
        zeros = bytes(2**20)
        for _ in range(inflated // len(zeros)):
            writer.write(zeros)
    frame = bytes(sink.data)
    header = frame[4]
    assert header >> 6 == 3  # an 8-byte content size field
    at = 5 + (0 if header & 0x20 else 1) + (0, 1, 2, 4)[header & 3]
    forged = frame[:at] + declared.to_bytes(8, "little") + frame[at + 8 :]
    assert zstandard.frame_content_size(forged) == declared
    with pytest.raises(CodecError):
        decode_into(forged, "zstd", None, memoryview(bytearray(declared)))
    store = _store(tmp_path, "zstd")
    digest = hash_bytes(forged, "blake3")
    for region in store.regions:
        region.put_if_absent(blob_key(digest), memoryview(forged))
    ref = ChunkRef(
        digest=digest, size=declared, codec="zstd", stored_size=len(forged), decoded_digest=hash_bytes(bytes(declared))
    )
    entry = Entry(name="x", kind="bytes", size=declared, chunks=[ref])
    store.commit_entries("bomb", WrittenEntries([entry], {}, len(forged)), tree={"bytes": "x"})
    child = subprocess.run(
        [sys.executable, "-c", BOMB_CHILD, str(tmp_path / "r0"), str(tmp_path / "r1")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.startswith("refused"), child.stdout + child.stderr[-2000:]
    grown_kib = int(child.stdout.split()[1])
    assert grown_kib < 256 * 1024, child.stdout  # far below the 4 GiB the frame holds


class _Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> int:
        self.data += data
        return len(data)


# -- the user's tools on a compressed, delta store: CLI verify / audit / export ---------------------------------------


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1", **(env or {})}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, env=environment)


def test_cli_verify_repair_audit_and_export_on_a_compressed_delta_store(tmp_path):
    store = _store(tmp_path, "auto", delta=True)
    weights = _weights(150_000)
    noise = torch.randint(0, 256, (70_000,), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    states = []
    for step in range(1, 8):
        weights = _nudge(weights, step)
        state = {"model": {"w": weights, "noise": noise}, "step": torch.tensor(step)}
        save_state(store, state, lineage="ft", step=step)
        states.append(state)
    latest = _chunks(store, "ft")
    delta = next(chunk for chunk in latest if chunk.parent is not None and chunk.codec is not None)
    compressed = delta.parent
    assert compressed is not None and compressed.codec is not None
    _flip(tmp_path / "r0" / blob_key(delta.digest))
    _flip(tmp_path / "r1" / blob_key(compressed.digest))
    regions = ["--region", str(tmp_path / "r0"), "--region", str(tmp_path / "r1")]
    found = _cli("verify", *regions, "--json")
    assert found.returncode == 1, found.stdout + found.stderr
    problems = {(Path(p["region"]).name, p["object"], p["kind"]) for p in json.loads(found.stdout)["problems"]}
    assert problems == {("r0", blob_key(delta.digest), "corrupt"), ("r1", blob_key(compressed.digest), "corrupt")}
    repaired = _cli("verify", *regions, "--repair", "--json")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert all(p["repaired"] for p in json.loads(repaired.stdout)["problems"])
    assert _cli("verify", *regions, "--json").returncode == 0
    # Every copy serves alone now.
    for region in ("r0", "r1"):
        alone = Store([open_region(str(tmp_path / region))])
        assert _same(load_state(alone, lineage="ft")[0]["model"]["w"], weights)
    # The audit, once the older blobs are past the GC grace: the CLI's (no retention policy given:
    # every version kept, only unnamed blobs swept), then the block's with keep_last=3, whose
    # kept versions are deltas on parents only the pruned versions' manifests wrote.
    old = time.time() - 3 * 3600
    for path in tmp_path.rglob("blobs/*/*/*"):
        os.utime(path, (old, old))
    audited = _cli("audit", *regions, "--json")
    assert audited.returncode == 0, audited.stdout + audited.stderr
    assert sorted(store.versions("ft")) == [1, 2, 3, 4, 5, 6, 7]
    block = CheckpointStore(
        regions=[str(tmp_path / "r0"), str(tmp_path / "r1")], retention=RetentionPolicy(keep_last=3)
    )
    report = block.audit()
    assert report.healthy, report.markdown()
    assert sorted(store.versions("ft")) == [5, 6, 7]
    assert report.gc is not None and report.gc.total_blobs_deleted > 0
    for version in (5, 6, 7):
        loaded = load_state(store, lineage="ft", version=version)[0]
        assert _same(loaded["model"]["w"], states[version - 1]["model"]["w"]), version
    assert verify_store(store, read_data=1.0, decode=True).healthy
    # Export through the CLI: a safetensors file with the exact tensors.
    out = tmp_path / "export"
    exported = _cli("export", *regions, "--lineage", "ft", "--to", str(out), "--json")
    assert exported.returncode == 0, exported.stdout + exported.stderr
    tensors = load_file(str(out / "tensors.safetensors"))
    assert sorted(_bits(t) for t in tensors.values()) == sorted(_bits(t) for t in _flat(states[-1]).values())


# -- the block on a real Prefect server --------------------------------------------------------------------------------


def test_the_block_document_keeps_codec_and_delta_and_the_loaded_block_writes_deltas(prefect_server, tmp_path):
    regions = [tmp_path / "a", tmp_path / "b"]
    for region in regions:
        region.mkdir()
    name = f"codecs-{uuid.uuid4().hex[:10]}"
    CheckpointStore(regions=[str(r) for r in regions], codec="bytegroup-zstd", delta=True).save(name)
    loaded = CheckpointStore.load(name)
    assert (loaded.codec, loaded.delta) == ("bytegroup-zstd", True)
    assert (loaded.core.codec, loaded.core.delta) == ("bytegroup-zstd", True)
    base = _weights(120_000, dtype=torch.float32)
    loaded.save_checkpoint({"w": base}, lineage="blk")
    tuned = _nudge(base, 4)
    loaded.save_checkpoint({"w": tuned}, lineage="blk")
    chunks = _chunks(loaded.core, "blk")
    assert all(chunk.parent is not None and chunk.codec == "bytegroup-zstd" for chunk in chunks)
    # A plain block (codec none, delta off) on the same regions reads both versions back.
    plain = CheckpointStore(regions=[str(r) for r in regions])
    assert _same(plain.load_checkpoint(lineage="blk")["w"], tuned)
    assert _same(plain.load_checkpoint(lineage="blk", version=1)["w"], base)
    # The CLI opens the block from the server (--store) and verifies and exports its deltas.
    from prefect.settings import PREFECT_API_URL

    env = {"PREFECT_API_URL": str(PREFECT_API_URL.value())}
    verified = _cli("verify", "--store", name, "--json", env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert json.loads(verified.stdout)["healthy"] is True
    out = tmp_path / "export"
    exported = _cli("export", "--store", name, "--lineage", "blk", "--to", str(out), "--json", env=env)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert [_bits(t) for t in load_file(str(out / "tensors.safetensors")).values()] == [_bits(tuned)]
    # An invalid codec is refused by the block's schema, before anything is saved.
    with pytest.raises(ValueError, match="codec"):
        CheckpointStore(regions=[str(r) for r in regions], codec="lz4")
