"""Chunk codecs (issue 17): per-chunk compression that stays content-addressed and verified.

Each test writes through the real core Store to real local regions and reads back through the
load path a user's restore takes (``read_entries_into``), so a codec that loses a bit, a
corrupt blob handed out, or a bomb decoded past its declared size fails here.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard

from prefect_recovery.core import BlobUnavailableError, EntryPlan, InvalidArgumentError, Store, codecs, open_region
from prefect_recovery.core.codecs import CodecError, decode_into, encode
from prefect_recovery.core.digest import hash_bytes
from prefect_recovery.core.gc import collect_garbage
from prefect_recovery.core.layout import blob_key
from prefect_recovery.core.manifest import ChunkRef, Entry, Manifest, decode_manifest
from prefect_recovery.core.store import WrittenEntries
from prefect_recovery.core.verify import verify_store
from prefect_recovery.training.checkpointer import Checkpointer
from prefect_recovery.training.schedule import CheckpointSchedule

CHUNK = 64 * 1024
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


def _store(tmp_path: Path, codec: str, regions: int = 2, **kw) -> Store:
    paths = []
    for i in range(regions):
        (tmp_path / f"r{i}").mkdir(parents=True, exist_ok=True)
        paths.append(open_region(str(tmp_path / f"r{i}")))
    return Store(paths, chunk_bytes=CHUNK, codec=codec, **kw)


def _weights(dtype: str, n: int = 40_000, seed: int = 0) -> torch.Tensor:
    """Values shaped like trained weights (small, normal): what the codecs are for."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=generator) * 0.02).to(DTYPES[dtype])


def _plan(tensors: dict[str, torch.Tensor]) -> list[EntryPlan]:
    return [
        EntryPlan(
            name=name,
            kind="tensor",
            data=memoryview(t.reshape(-1).view(torch.uint8).numpy()),
            dtype=str(t.dtype).removeprefix("torch."),
            shape=list(t.shape),
        )
        for name, t in tensors.items()
    ]


def _load(store: Store, lineage: str, version: int | None = None) -> tuple[Manifest, dict[str, bytes]]:
    manifest, holders = store.resolve(lineage, version)
    entries = store.manifest_entries(manifest)
    buffers = {entry.name: bytearray(entry.size) for entry in entries}
    store.read_entries_into([(entry, memoryview(buffers[entry.name])) for entry in entries], prefer=holders)
    return manifest, {name: bytes(buf) for name, buf in buffers.items()}


def _raw(t: torch.Tensor) -> bytes:
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("codec", ["zstd", "bytegroup-zstd", "auto"])
def test_round_trip_per_codec_and_dtype(tmp_path, codec):
    store = _store(tmp_path, codec)
    tensors = {dtype: _weights(dtype) for dtype in DTYPES}
    tensors["int64"] = torch.arange(20_000, dtype=torch.int64)  # not floating point: plain zstd
    tensors["odd"] = _weights("float32", 7)  # smaller than an element group, one chunk
    info = store.commit("run", _plan(tensors))
    manifest, loaded = _load(store, "run")
    for name, tensor in tensors.items():
        assert loaded[name] == _raw(tensor), name
    chunks = {entry.name: entry.chunks for entry in manifest.entries}
    for name in DTYPES:
        assert all(c.codec == ("zstd" if codec == "zstd" else "bytegroup-zstd") for c in chunks[name]), name
        first = chunks[name][0]
        assert first.content_digest == hash_bytes(_raw(tensors[name])[: first.size], "blake3")
        assert first.blob_size < first.size
    assert all(c.codec == "zstd" for c in chunks["int64"])
    # What the regions hold is smaller than the state, and the state's digest is the raw one's.
    assert info.bytes_written < 2 * sum(t.numel() * t.element_size() for t in tensors.values())
    raw_store = _store(tmp_path / "raw", "none")
    raw_store.commit("run", _plan(tensors))
    assert store.state_digest(manifest) == raw_store.state_digest(raw_store.resolve("run")[0])


def test_auto_keeps_random_bytes_raw_and_an_explicit_codec_is_kept(tmp_path):
    noise = np.random.default_rng(0).bytes(3 * CHUNK)
    auto = _store(tmp_path / "a", "auto")
    auto.commit("run", [EntryPlan(name="noise", kind="bytes", data=memoryview(noise))])
    manifest, loaded = _load(auto, "run")
    assert loaded["noise"] == noise
    assert all(chunk.stored_raw for chunk in manifest.entries[0].chunks)  # nothing saved: stored raw
    # A raw chunk's JSON is what it was before codecs: {digest, size} and nothing else.
    assert set(manifest.entries[0].chunks[0].model_dump()) == {"digest", "size"}
    forced = _store(tmp_path / "z", "zstd")
    forced.commit("run", [EntryPlan(name="noise", kind="bytes", data=memoryview(noise))])
    assert all(chunk.codec == "zstd" for chunk in _load(forced, "run")[0].entries[0].chunks)
    with pytest.raises(InvalidArgumentError, match="unknown codec"):
        _store(tmp_path / "bad", "lz4")


def test_corrupt_compressed_blob_is_detected_failed_over_and_repaired(tmp_path):
    store = _store(tmp_path, "auto")
    tensor = _weights("bfloat16", 30_000)
    store.commit("run", _plan({"w": tensor}))
    manifest, _ = _load(store, "run")
    chunk = manifest.entries[0].chunks[0]
    assert chunk.codec == "bytegroup-zstd"
    damaged = tmp_path / "r0" / blob_key(chunk.digest)
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x40  # still a frame of the declared size, wrong content
    damaged.write_bytes(bytes(data))
    assert _load(store, "run")[1]["w"] == _raw(tensor)  # served from the intact region
    report = verify_store(store, read_data=1.0, repair=True)
    assert [(Path(p.region).name, p.kind, p.repaired) for p in report.problems] == [("r0", "corrupt", True)]
    assert damaged.read_bytes() != bytes(data)
    # Both copies damaged: nothing is handed out.
    for region in ("r0", "r1"):
        path = tmp_path / region / blob_key(chunk.digest)
        bad = bytearray(path.read_bytes())
        bad[-3] ^= 0x01
        path.write_bytes(bytes(bad))
    with pytest.raises(BlobUnavailableError, match="does not match its digest"):
        _load(store, "run")


def _commit_forged(store: Store, blob: bytes, size: int, content: bytes) -> None:
    """A manifest naming ``blob`` as a zstd chunk of ``size`` bytes: the blob is intact (it
    hashes to its name), only decoding can tell it lies."""
    digest = hash_bytes(blob, "blake3")
    for region in store.regions:
        region.put_if_absent(blob_key(digest), memoryview(blob))
    ref = ChunkRef(
        digest=digest,
        size=size,
        codec="zstd",
        stored_size=len(blob),
        decoded_digest=hash_bytes(content, "blake3"),
    )
    entry = Entry(name="x", kind="bytes", size=size, chunks=[ref])
    store.commit_entries("forged", WrittenEntries([entry], {}, len(blob)))


def test_decompression_bomb_is_refused_within_the_declared_size(tmp_path):
    store = _store(tmp_path, "zstd")
    huge = 256 * 2**20  # inflates to 256 MiB; the manifest declares 4 KiB
    bomb = zstandard.ZstdCompressor(level=1).compress(bytes(huge))
    assert len(bomb) < 64 * 1024
    _commit_forged(store, bomb, 4096, bytes(4096))
    with pytest.raises(BlobUnavailableError, match="declares 268435456 decoded bytes"):
        _load(store, "forged")
    # A frame that does not declare its size is refused too, before it is decoded.
    streamed = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(huge))
    with pytest.raises(CodecError, match="declares -1"):
        decode_into(streamed, "zstd", None, memoryview(bytearray(4096)))
    # A frame that declares the right size but holds other bytes fails the decoded digest.
    other = zstandard.ZstdCompressor().compress(b"\x01" * 4096)
    store2 = _store(tmp_path / "s2", "zstd")
    _commit_forged(store2, other, 4096, bytes(4096))
    with pytest.raises(BlobUnavailableError, match="decoded bytes do not match"):
        _load(store2, "forged")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
def test_codec_level_round_trip_every_width(dtype):
    raw = memoryview(_raw(_weights(dtype, 1001)))
    for codec in ("zstd", "bytegroup-zstd"):
        encoded = encode(raw, codec, dtype)
        out = bytearray(len(raw))
        decode_into(encoded.data, encoded.codec, encoded.width, memoryview(out))
        assert out == raw.tobytes()


def test_ungrouping_block_by_block_round_trips_every_width(monkeypatch):
    # Blocks far smaller than the chunk, and a chunk that is no multiple of the block: every
    # block boundary, and the short last block, must land each byte where it belongs.
    monkeypatch.setattr(codecs, "UNGROUP_BLOCK", 7)
    for dtype in DTYPES:
        raw = memoryview(_raw(_weights(dtype, 1003)))
        encoded = encode(raw, "bytegroup-zstd", dtype)
        out = bytearray(len(raw))
        decode_into(encoded.data, encoded.codec, encoded.width, memoryview(out))
        assert out == raw.tobytes(), dtype


@pytest.mark.parametrize("width", [2, 4, 8])
def test_byte_planes_are_the_layout_format_md_documents(monkeypatch, width):
    # The stored bytes are a format: blobs written by any earlier version must ungroup, and the
    # same chunk must group to the same blob (dedup). Reference, written independently of the
    # codec: rotate each element left by one bit, then plane p = byte (width - 1 - p) of every
    # element. Small blocks put block boundaries everywhere, including a short last block.
    monkeypatch.setattr(codecs, "UNGROUP_BLOCK", 5)
    words = np.random.default_rng(width).integers(0, 2**63, size=37, dtype=np.uint64).astype(f"<u{width}")
    words[:3] = [0, 2 ** (8 * width - 1), 2 ** (8 * width) - 1]  # -0.0, all ones
    rotated = [(int(w) << 1 | int(w) >> (8 * width - 1)) & (2 ** (8 * width) - 1) for w in words]
    reference = bytes((r >> (8 * (width - 1 - p))) & 0xFF for p in range(width) for r in rotated)
    raw = memoryview(words.tobytes())
    assert bytes(codecs.group_bytes(raw, width)) == reference
    out = bytearray(len(raw))
    codecs.ungroup_bytes(reference, width, memoryview(out))
    assert bytes(out) == raw.tobytes()


def test_a_frame_that_ends_early_or_runs_past_its_declared_size_is_refused():
    content = bytes(range(256)) * 32  # 8 KiB
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(content)
    out = bytearray(len(content))
    with pytest.raises(CodecError, match=r"does not decode|decoded to"):
        decode_into(frame[:-3], "zstd", None, memoryview(out))  # truncated: fewer bytes than declared
    # The header claims 4 KiB (what the manifest says) while the frame holds 8 KiB: decoding
    # stops at the 4 KiB buffer and refuses the rest, whatever zstd makes of the lie.
    header = frame[4]
    assert header >> 6 == 1  # a 2-byte frame content size field (value - 256)
    at = 5 + (0 if header & 0x20 else 1) + (0, 1, 2, 4)[header & 3]
    forged = frame[:at] + (4096 - 256).to_bytes(2, "little") + frame[at + 2 :]
    assert zstandard.frame_content_size(forged) == 4096
    small = bytearray(4096)
    with pytest.raises(CodecError):
        decode_into(forged, "zstd", None, memoryview(small))


def test_auto_stores_an_incompressible_chunk_raw_after_compressing_only_a_sample(monkeypatch, tmp_path):
    compressed: list[int] = []
    for name in ("_compress_planes", "_compress"):
        real = getattr(codecs, name)

        def counting(data, *args, real=real):
            compressed.append(len(data))
            return real(data, *args)

        monkeypatch.setattr(codecs, name, counting)
    noise = np.random.default_rng(0).integers(0, 256, 2 * 2**20, dtype=np.uint8).tobytes()
    for dtype in ("float32", None):
        compressed.clear()
        assert encode(memoryview(noise), "auto", dtype).codec is None
        assert compressed == [codecs.SAMPLE_BYTES]  # the sample only, never the 2 MiB chunk
    # A compressible chunk of the same size is compressed whole, after its sample.
    compressed.clear()
    weights = memoryview(_raw(_weights("float32", 2**19)))
    assert encode(weights, "auto", "float32").codec == "bytegroup-zstd"
    assert compressed == [codecs.SAMPLE_BYTES, len(weights)]
    # Through the store: the chunk is stored raw and loads back.
    store = Store([open_region(str(tmp_path))], chunk_bytes=4 * 2**20, codec="auto")
    plan = [EntryPlan(name="noise", kind="bytes", data=memoryview(noise))]
    store.commit("noise", plan)
    manifest, loaded = _load(store, "noise")
    assert manifest.entries[0].chunks[0].codec is None and loaded["noise"] == noise


def test_only_the_stores_pool_threads_keep_buffers_and_only_up_to_the_limit(monkeypatch):
    monkeypatch.setattr(codecs, "SCRATCH_KEEP_BYTES", 1024)
    seen: dict[str, bool] = {}

    def in_pool() -> None:
        first = codecs.scratch("test-slot", 512)
        seen["reused"] = codecs.scratch("test-slot", 256).obj is first.obj
        big = codecs.scratch("test-slot", 4096)
        seen["big kept"] = codecs.scratch("test-slot", 4096).obj is big.obj

    with ThreadPoolExecutor(1, thread_name_prefix="ckpt-get") as pool:
        pool.submit(in_pool).result()
    assert seen == {"reused": True, "big kept": False}  # past the limit: never kept
    # A caller's own thread (here the main thread) keeps nothing between chunks.
    first = codecs.scratch("test-slot", 512)
    assert codecs.scratch("test-slot", 256).obj is not first.obj


def test_old_format_checkpoints_load_in_a_store_with_a_codec(tmp_path):
    tensors = {"w": _weights("float32"), "b": _weights("bfloat16", 999)}
    old = _store(tmp_path, "none")
    info = old.commit("run", _plan(tensors))
    manifest = old.resolve("run")[0]
    encoded = manifest.encode()
    assert b"codec" not in encoded and b"decoded_digest" not in encoded  # version-1 bytes as before
    assert manifest.format_version == 1
    assert decode_manifest(encoded).manifest_digest == info.manifest_digest
    reader = _store(tmp_path, "auto")  # the same regions, now with a codec
    assert _load(reader, "run")[1] == {name: _raw(t) for name, t in tensors.items()}
    reader.commit("run", _plan(tensors))  # the next save encodes; both versions load
    assert _load(reader, "run", 1)[1] == _load(reader, "run", 2)[1]
    assert all(c.codec for e in reader.resolve("run", 2)[0].entries for c in e.chunks)


def test_paged_manifest_with_codec_chunks_loads(tmp_path):
    store = _store(tmp_path, "auto", page_entries=2)
    tensors = {f"t{i}": _weights("bfloat16", 5000, seed=i) for i in range(5)}
    store.commit("run", _plan(tensors))
    manifest, loaded = _load(store, "run")
    assert manifest.paged
    assert loaded == {name: _raw(t) for name, t in tensors.items()}
    assert verify_store(store, read_data=1.0).healthy


def test_checkpointer_save_restore_with_codec_auto_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(5):
        optimizer.zero_grad()
        model(torch.randn(16, 64)).square().mean().backward()
        optimizer.step()
    store = _store(tmp_path, "auto")
    manual = CheckpointSchedule(triggers=[], asynchronous=False)  # saves only when asked
    with Checkpointer(store, "train", model=model, optimizer=optimizer, schedule=manual) as ckpt:
        ckpt.step(5)
        ckpt.save()
    manifest = store.resolve("train")[0]
    assert any(c.codec == "bytegroup-zstd" for e in manifest.entries for c in e.chunks)
    torch.manual_seed(1)
    fresh = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 8))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    with Checkpointer(_store(tmp_path, "none"), "train", model=fresh, optimizer=fresh_opt, schedule=manual) as again:
        assert again.step_count == 5
    for key, value in model.state_dict().items():
        assert torch.equal(value.view(torch.uint8), fresh.state_dict()[key].view(torch.uint8)), key
    state, fresh_state = optimizer.state_dict()["state"], fresh_opt.state_dict()["state"]
    for index in state:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[index][name].view(torch.uint8), fresh_state[index][name].view(torch.uint8))


def test_gc_sweeps_unnamed_compressed_blobs_only(tmp_path):
    store = _store(tmp_path, "auto")
    store.commit("run", _plan({"w": _weights("bfloat16", 20_000, seed=1)}))
    store.commit("run", _plan({"w": _weights("bfloat16", 20_000, seed=2)}))
    first = store.resolve("run", 1)[0]
    for region in ("r0", "r1"):
        (tmp_path / region / "lineages" / "run" / "manifests").joinpath("000000000001.json").unlink()
    report = collect_garbage(store, now=datetime.now(UTC) + timedelta(days=1))
    gone = {digest for digest, _ in first.entries[0].chunks[0].blobs()}
    assert gone and all(not (tmp_path / "r0" / blob_key(d)).exists() for d in gone), report
    assert _load(store, "run")[1]["w"] == _raw(_weights("bfloat16", 20_000, seed=2))


def test_the_block_codec_and_delta_fields_reach_the_store(tmp_path):
    from prefect_recovery import CheckpointStore

    regions = [str(tmp_path / "a"), str(tmp_path / "b")]
    for region in regions:
        Path(region).mkdir()
    block = CheckpointStore(regions=regions, write_quorum=1, codec="auto", delta=True)
    assert (block.core.codec, block.core.delta) == ("auto", True)
    state = {"w": _weights("bfloat16", 30_000)}
    block.save_checkpoint(state, lineage="blk")
    state["w"] = state["w"] * 2  # every exponent moves: stored whole, compressed
    block.save_checkpoint(state, lineage="blk")
    loaded = CheckpointStore(regions=regions, write_quorum=1).load_checkpoint(lineage="blk")
    assert torch.equal(loaded["w"].view(torch.int16), state["w"].view(torch.int16))
    assert all(c.codec == "bytegroup-zstd" for e in block.core.resolve("blk")[0].entries for c in e.chunks)


def test_a_chunk_claiming_more_than_zstd_can_expand_is_refused_by_the_schema():
    digest = hash_bytes(b"x", "blake3")
    with pytest.raises(ValueError, match="cannot decode from 64 stored bytes"):
        ChunkRef(digest=digest, size=2**40, codec="zstd", stored_size=64, decoded_digest=digest)
    assert ChunkRef(digest=digest, size=2**21, codec="zstd", stored_size=64, decoded_digest=digest).blob_size == 64
