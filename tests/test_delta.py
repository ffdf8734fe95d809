"""Delta chunks (issue 17): a fine-tune's chunks stored as the XOR with the previous version's.

Through the real core Store on local regions: loads are bit-identical, chains stay bounded,
retention + GC never take a parent a kept version needs, verify/repair and export handle
delta chunks, and a region that lacks a parent gets it before the save counts there.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
from test_codecs import _load, _plan, _raw

from prefect_recovery.core import Store, open_region
from prefect_recovery.core.gc import collect_garbage
from prefect_recovery.core.layout import blob_key
from prefect_recovery.core.manifest import MAX_DELTA_CHAIN, ChunkRef
from prefect_recovery.core.retention import RetentionPolicy, apply_retention, plan_retention
from prefect_recovery.core.verify import verify_store
from prefect_recovery.training.export import export_checkpoint
from prefect_recovery.training.state_io import save_state

CHUNK = 64 * 1024


def _store(tmp_path: Path, codec: str = "auto", delta: bool = True) -> Store:
    regions = []
    for name in ("r0", "r1"):
        (tmp_path / name).mkdir(parents=True, exist_ok=True)
        regions.append(open_region(str(tmp_path / name)))
    return Store(regions, chunk_bytes=CHUNK, codec=codec, delta=delta)


def _base(dtype: torch.dtype = torch.bfloat16, n: int = 100_000) -> torch.Tensor:
    return (torch.randn(n, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)


def _nudge(t: torch.Tensor, seed: int) -> torch.Tensor:
    """A fine-tune's worth of change: every value moves by about one unit of its last place
    (bf16 keeps 8 significant bits, fp32 24), so the sign and exponent mostly stay."""
    noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(seed))
    scale = 1e-2 if t.dtype == torch.bfloat16 else 1e-6
    return (t.double() * (1 + scale * noise)).to(t.dtype)


def _chunks(store: Store, lineage: str, version: int | None = None) -> list[ChunkRef]:
    return [c for e in store.manifest_entries(store.resolve(lineage, version)[0]) for c in e.chunks]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fine_tune_saves_are_deltas_and_load_bit_identical(tmp_path, dtype):
    store = _store(tmp_path)
    weights = _base(dtype)
    first = store.commit("ft", _plan({"w": weights}))
    assert all(c.parent is None for c in _chunks(store, "ft"))  # nothing to delta against yet
    tuned = _nudge(weights, 1)
    second = store.commit("ft", _plan({"w": tuned}))
    chunks = _chunks(store, "ft")
    assert all(c.parent is not None and c.parent.content_digest != c.content_digest for c in chunks)
    assert second.bytes_written < 0.6 * first.bytes_written, (second.bytes_written, first.bytes_written)
    assert _load(store, "ft")[1]["w"] == _raw(tuned)
    assert _load(store, "ft", 1)[1]["w"] == _raw(weights)
    # The state digest is the state's: a delta save and a whole save of one state agree.
    whole = _store(tmp_path / "whole", delta=False)
    whole.commit("ft", _plan({"w": tuned}))
    assert store.state_digest(store.resolve("ft")[0]) == whole.state_digest(whole.resolve("ft")[0])


def test_chains_stay_bounded_and_an_unchanged_chunk_names_its_parent(tmp_path):
    store = _store(tmp_path)
    weights, frozen = _base(), _base(n=20_000) * 3
    for version in range(1, MAX_DELTA_CHAIN + 4):
        weights = _nudge(weights, version)
        info = store.commit("ft", _plan({"w": weights, "frozen": frozen}))
        manifest = store.resolve("ft")[0]
        lengths = [c.chain_length() for e in manifest.entries if e.name == "w" for c in e.chunks]
        assert max(lengths) <= MAX_DELTA_CHAIN
        frozen_chunks = next(e for e in manifest.entries if e.name == "frozen").chunks
        assert all(c.parent is None for c in frozen_chunks)  # unchanged: the first version's own blobs
        if version > 1:
            assert info.bytes_written < 2 * weights.numel() * 2  # never the frozen tensor again
    assert any(c.chain_length() == 1 for c in _chunks(store, "ft"))  # a chain reached 8 and restarted
    assert _load(store, "ft")[1] == {"w": _raw(weights), "frozen": _raw(frozen)}


def test_retention_and_gc_keep_the_parents_a_kept_version_needs(tmp_path):
    store = _store(tmp_path)
    weights = _base()
    saved = []
    for step in range(1, 4):
        weights = _nudge(weights, step)
        store.commit("ft", _plan({"w": weights}), step=step)
        saved.append(_raw(weights))
    plan = plan_retention(store, RetentionPolicy(keep_last=1))
    apply_retention(store, plan)
    assert sorted(store.versions("ft")) == [3]
    report = collect_garbage(store, now=datetime.now(UTC) + timedelta(days=1))
    assert _load(store, "ft")[1]["w"] == saved[-1]  # version 3's parents (versions 1 and 2's blobs) survived
    named = {d for c in _chunks(store, "ft") for d, _ in c.blobs()}
    assert all((tmp_path / "r0" / blob_key(d)).exists() for d in named)
    assert report is not None and verify_store(store, read_data=1.0).healthy


def test_verify_repairs_a_damaged_parent_and_export_reads_deltas(tmp_path):
    store = _store(tmp_path)
    weights = _base()
    save_state(store, {"w": weights}, lineage="ft")  # a state tree, as a Checkpointer saves it
    tuned = _nudge(weights, 7)
    save_state(store, {"w": tuned}, lineage="ft")
    parent = _chunks(store, "ft")[0].parent
    assert parent is not None
    damaged = tmp_path / "r1" / blob_key(parent.digest)
    data = bytearray(damaged.read_bytes())
    data[10] ^= 0xFF
    damaged.write_bytes(bytes(data))
    report = verify_store(store, read_data=1.0, repair=True)
    assert [(Path(p.region).name, p.kind, p.repaired) for p in report.problems] == [("r1", "corrupt", True)]
    shutil.rmtree(tmp_path / "r0")  # r1 alone must serve the delta and its (repaired) parent
    (tmp_path / "r0").mkdir()
    out = export_checkpoint(store, lineage="ft", version=None, to=tmp_path / "export")
    from safetensors.torch import load_file

    exported = next(iter(load_file(out["files"][0]).values()))
    assert _raw(exported) == _raw(tuned)


def test_a_region_missing_the_parent_gets_it_before_the_save_counts_there(tmp_path):
    store = _store(tmp_path)
    weights = _base()
    store.commit("ft", _plan({"w": weights}))
    shutil.rmtree(tmp_path / "r1" / "blobs")  # r1 lost the base's blobs (a new or wiped region)
    tuned = _nudge(weights, 3)
    info = store.commit("ft", _plan({"w": tuned}))
    assert len(info.regions) == 2
    shutil.rmtree(tmp_path / "r0")
    (tmp_path / "r0").mkdir()
    assert _load(store, "ft")[1]["w"] == _raw(tuned)  # from r1 alone: the parents were copied there
