"""A compressed store encodes an unchanged chunk once (issue 17): saving the same tensors again (a frozen
layer, the next version of a fine-tune, a light checkpoint of unchanged weights) names the stored form the
last save wrote instead of compressing it again, so a second save of an unchanged state with ``auto``
costs a hash, as with ``none``. What a user would notice: every version still loads bit for bit, and a
form whose blobs vanished between the saves is written again, never named while missing.

The encoder is counted with a spy on ``codecs.encode`` (the real encoder still runs): the only way to
tell "not encoded" from "encoded to the same bytes" without a timing threshold.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from prefect_recovery.core import EntryPlan, Store, codecs, open_region
from prefect_recovery.core.layout import blob_key
from prefect_recovery.core.verify import verify_store

CHUNK = 64 * 1024


def _store(tmp_path: Path, codec: str = "auto", **kw) -> Store:
    regions = []
    for name in ("r0", "r1"):
        (tmp_path / name).mkdir(parents=True, exist_ok=True)
        regions.append(open_region(str(tmp_path / name)))
    return Store(regions, chunk_bytes=CHUNK, codec=codec, **kw)


def _state(seed: int, n: int = 60_000) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "frozen": torch.randn(n, generator=generator) * 0.02,
        "head": torch.randn(n // 2, generator=generator) * 0.02,
    }


def _plan(tensors: dict[str, torch.Tensor]) -> list[EntryPlan]:
    return [
        EntryPlan(
            name=name,
            kind="tensor",
            data=memoryview(t.reshape(-1).view(torch.uint8).numpy()),
            dtype="float32",
            shape=list(t.shape),
        )
        for name, t in tensors.items()
    ]


def _load(store: Store, lineage: str, version: int) -> dict[str, bytes]:
    manifest, holders = store.resolve(lineage, version)
    entries = store.manifest_entries(manifest, prefer=holders)
    buffers = {entry.name: bytearray(entry.size) for entry in entries}
    store.read_entries_into([(entry, memoryview(buffers[entry.name])) for entry in entries], prefer=holders)
    return {name: bytes(data) for name, data in buffers.items()}


def _raw(tensors: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {name: t.numpy().tobytes() for name, t in tensors.items()}


@pytest.fixture
def encodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = codecs.encode

    def counted(data, *args, **kwargs):
        calls.append(len(data))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(codecs, "encode", counted)
    return calls


@pytest.mark.parametrize("codec", ["auto", "zstd", "bytegroup-zstd"])
def test_an_unchanged_state_saved_again_is_not_encoded_again(tmp_path: Path, encodes: list[int], codec: str) -> None:
    store = _store(tmp_path, codec)
    state = _state(0)
    first = store.commit("run", _plan(state), step=1)
    assert encodes, "the first save encodes its chunks"
    encodes.clear()
    second = store.commit("run", _plan(state), step=2)
    assert encodes == [], f"{len(encodes)} unchanged chunks were encoded again"
    assert second.bytes_written == 0
    # Another lineage saving the same content (a light tier, a copy) names it too.
    third = store.commit("copy", _plan(state), step=2)
    assert encodes == [] and third.bytes_written == 0
    for lineage, info in (("run", first), ("run", second), ("copy", third)):
        assert _load(store, lineage, info.version) == _raw(state)
    assert verify_store(store).healthy


def test_only_the_changed_chunks_are_encoded(tmp_path: Path, encodes: list[int]) -> None:
    store = _store(tmp_path)
    state = _state(1)
    store.commit("run", _plan(state), step=1)
    encodes.clear()
    state["head"] = state["head"] + 1e-3  # the trained head moves; the frozen layer does not
    info = store.commit("run", _plan(state), step=2)
    head_chunks = -(-state["head"].numel() * 4 // CHUNK)
    assert len(encodes) == head_chunks, (len(encodes), head_chunks)
    assert _load(store, "run", info.version) == _raw(state)


def test_a_form_whose_blobs_vanished_is_written_again(tmp_path: Path, encodes: list[int]) -> None:
    store = _store(tmp_path)
    state = _state(2)
    first = store.commit("run", _plan(state), step=1)
    manifest, holders = store.resolve("run", first.version)
    entry = next(e for e in store.manifest_entries(manifest, prefer=holders) if e.name == "frozen")
    gone = entry.chunks[0]
    for region in ("r0", "r1"):  # deleted from every region (a hand-made cleanup) between two saves
        (tmp_path / region / blob_key(gone.digest)).unlink()
    encodes.clear()
    second = store.commit("run", _plan(state), step=2)
    assert len(encodes) == 1, "the vanished chunk is encoded and written again, the others named"
    for region in ("r0", "r1"):
        assert (tmp_path / region / blob_key(gone.digest)).exists()
    assert _load(store, "run", second.version) == _raw(state)
    assert _load(store, "run", first.version) == _raw(state)  # the older version is whole again too


def test_a_region_that_lost_the_form_gets_a_verified_copy(tmp_path: Path, encodes: list[int]) -> None:
    store = _store(tmp_path)
    state = _state(3)
    store.commit("run", _plan(state), step=1)
    shutil.rmtree(tmp_path / "r1" / "blobs")  # one region lost its blobs; the other still holds them
    encodes.clear()
    second = store.commit("run", _plan(state), step=2)
    assert encodes == [], "the other region's verified copy is named, not a new encoding"
    for region in ("r0", "r1"):  # the version loads from either region alone
        only = Store([open_region(str(tmp_path / region))], chunk_bytes=CHUNK, codec="auto")
        assert _load(only, "run", second.version) == _raw(state)


def test_regions_with_different_codecs_encode_an_unchanged_state_once(tmp_path: Path, encodes: list[int]) -> None:
    """A raw local region beside a compressed one (region codecs): the second save of the same state, or
    another lineage's copy of it, names both stored forms of each chunk instead of compressing it again."""
    for name in ("r0", "r1"):
        (tmp_path / name).mkdir()
    r0, r1 = open_region(str(tmp_path / "r0")), open_region(str(tmp_path / "r1"))
    store = Store([r0, r1], chunk_bytes=CHUNK, region_codecs={r0.name: "none", r1.name: "auto"})
    state = _state(4)
    first = store.commit("run", _plan(state), step=1)
    assert encodes, "the first save encodes the compressed region's form"
    encodes.clear()
    second = store.commit("run", _plan(state), step=2)
    third = store.commit("copy", _plan(state), step=2)
    assert encodes == [] and second.bytes_written == 0 and third.bytes_written == 0
    for region in ("r0", "r1"):  # each region still serves every version alone, in its own form
        only = Store([open_region(str(tmp_path / region))], chunk_bytes=CHUNK)
        for lineage, info in (("run", first), ("run", second), ("copy", third)):
            assert _load(only, lineage, info.version) == _raw(state)
    assert verify_store(store).healthy

    # The raw region lost its blobs: no region holds its forms any more, so the next save prepares the
    # chunks again (never names a form that is gone) and the raw region serves it alone.
    shutil.rmtree(tmp_path / "r0" / "blobs")
    fourth = store.commit("run", _plan(state), step=3)
    assert fourth.bytes_written >= sum(t.numel() * 4 for t in state.values())
    only = Store([open_region(str(tmp_path / "r0"))], chunk_bytes=CHUNK)
    assert _load(only, "run", fourth.version) == _raw(state)


@pytest.mark.parametrize("mixed", [False, True])
def test_a_region_is_asked_once_per_reused_blob(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mixed: bool) -> None:
    """Naming an unchanged chunk checks that its blobs are still there; the copy step that follows does
    not ask the same region again (on an object store each question is a request per chunk)."""
    for name in ("r0", "r1"):
        (tmp_path / name).mkdir()
    r0, r1 = open_region(str(tmp_path / "r0")), open_region(str(tmp_path / "r1"))
    codecs_of = {r0.name: "none", r1.name: "auto"} if mixed else {r0.name: "auto", r1.name: "auto"}
    store = Store([r0, r1], chunk_bytes=CHUNK, region_codecs=codecs_of)
    state = _state(5)
    store.commit("run", _plan(state), step=1)
    asked: dict[tuple[str, str], int] = {}
    for region in (r0, r1):
        real = region.size

        def counted(key: str, *args, _real=real, _name=region.name, **kwargs):
            if key.startswith("blobs/"):
                asked[(_name, key)] = asked.get((_name, key), 0) + 1
            return _real(key, *args, **kwargs)

        monkeypatch.setattr(region, "size", counted)
    second = store.commit("run", _plan(state), step=2)
    assert second.bytes_written == 0 and asked
    assert max(asked.values()) == 1, {key: n for key, n in asked.items() if n > 1}
    assert _load(store, "run", second.version) == _raw(state)
