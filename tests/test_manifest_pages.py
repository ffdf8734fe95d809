"""The paged manifest (FORMAT.md, "Entry pages"; core/store_pages.py) on real local regions.

A store with a low ``page_entries`` commits its manifests in the paged form: what is proven
here is what a user of such a store notices. Saves load bit-identically; the manifest file is
small and lists pages; a rank restoring its shards reads only its pages (reads counted at the
region); a damaged page copy is read from another region and repaired by verify; a page
tampered in every region stops the load with a typed error before any tensor is written;
GC keeps pages and what they name and sweeps an uncommitted save's; signing covers pages;
manifests in the version-1 form keep loading; retention, audit and export work on a paged
lineage; a paged and a single-file manifest of one state have one state digest.
"""

from __future__ import annotations

import json
import secrets
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from prefect_recovery.core import EntryPlan, Keyring, LocalRegionIO, Store, hmac_key
from prefect_recovery.core.audit import audit_store
from prefect_recovery.core.digest import hash_bytes
from prefect_recovery.core.errors import InvalidNameError, ManifestError
from prefect_recovery.core.gc import collect_garbage
from prefect_recovery.core.layout import blob_key, manifest_key
from prefect_recovery.core.manifest import ShardInfo, canonical_json
from prefect_recovery.core.retention import RetentionPolicy, plan_retention
from prefect_recovery.core.store import PageUnavailableError
from prefect_recovery.core.verify import verify_store
from prefect_recovery.training.export import export_checkpoint
from prefect_recovery.training.state_io import load_state, save_state

PAGE = 4  # entries per page: a 12-tensor state makes several pages
HOUR = 3600.0


class CountingRegion(LocalRegionIO):
    """A local region that counts the objects read from it (a rank's restore reads, proven)."""

    def __init__(self, url: str):
        super().__init__(url)
        self.gets: Counter[str] = Counter()

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        self.gets[key] += 1
        return super().get(key, max_bytes)


def regions_at(tmp_path: Path, *names: str) -> list[CountingRegion]:
    for name in names:
        (tmp_path / name).mkdir(exist_ok=True)
    return [CountingRegion(str(tmp_path / name)) for name in names]


def make_store(regions, *, page_entries: int | None = PAGE, keyring: Keyring | None = None) -> Store:
    return Store(regions, write_quorum=len(regions), straggler_grace=None, page_entries=page_entries, keyring=keyring)


def state(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "model": {f"layer{i}.weight": torch.randn(4, i + 1, generator=gen) for i in range(12)},
        "step": seed,
    }


def assert_same(loaded: dict, expected: dict) -> None:
    assert loaded["step"] == expected["step"]
    assert loaded["model"].keys() == expected["model"].keys()
    for name, tensor in expected["model"].items():
        assert torch.equal(loaded["model"][name], tensor), name
        assert loaded["model"][name].numpy().tobytes() == tensor.numpy().tobytes()


def manifest_file(tmp_path: Path, region: str, lineage: str, version: int) -> Path:
    return tmp_path / region / manifest_key(lineage, version)


def page_paths(tmp_path: Path, region: str, manifest) -> list[Path]:
    return [tmp_path / region / blob_key(page.digest) for page in manifest.pages]


def rank_parts(store: Store, ranks: int, per_rank: int) -> list:
    """What ``ranks`` torch.distributed ranks would hand the coordinator: each rank's shards of
    one tensor, written with ``write_entries``, plus one coordinator part of no rank."""
    parts = []
    for rank in range(ranks):
        plans = [
            EntryPlan(
                name=f"model/w{i}@{rank}",
                kind="tensor",
                data=memoryview(torch.full((2,), float(rank * 100 + i)).numpy().tobytes()),
                dtype="float32",
                shape=[2],
                shard=ShardInfo(global_shape=[2 * ranks], offsets=[2 * rank], rank=rank),
            )
            for i in range(per_rank)
        ]
        parts.append(store.write_entries(plans))
    parts.append(store.write_entries([EntryPlan(name="meta", kind="bytes", data=memoryview(b"coordinator"))]))
    return parts


def test_a_paged_save_loads_bit_identically_and_its_manifest_file_names_pages(tmp_path):
    store = make_store(regions_at(tmp_path, "a", "b"))
    saved = state(1)
    info = save_state(store, saved, lineage="run", step=1)

    raw = json.loads(manifest_file(tmp_path, "a", "run", info.version).read_bytes())
    assert raw["format_version"] == 2
    assert raw["entries"] == []
    assert len(raw["pages"]) == 3  # 12 entries, 4 per page
    assert [p["entries"] for p in raw["pages"]] == [4, 4, 4]
    assert raw["pages"][0]["first"] == "model/layer0.weight"
    assert sum(p["entry_bytes"] for p in raw["pages"]) == info.total_bytes
    for page in raw["pages"]:  # content-addressed blobs in every region, like data blobs
        for region in ("a", "b"):
            data = (tmp_path / region / blob_key(page["digest"])).read_bytes()
            assert len(data) == page["size"] and hash_bytes(data) == page["digest"]

    loaded, manifest = load_state(store, lineage="run")
    assert manifest.paged and manifest.version == info.version
    assert_same(loaded, saved)

    single = make_store(store.regions, page_entries=None)  # one file, the version-1 form
    one = save_state(single, saved, lineage="other", step=1)
    assert json.loads(manifest_file(tmp_path, "a", "other", one.version).read_bytes())["format_version"] == 1
    assert (
        manifest_file(tmp_path, "a", "run", 1).stat().st_size < manifest_file(tmp_path, "a", "other", 1).stat().st_size
    )
    # One state, one state digest: over the entries, not over how the manifest stores them.
    paged_digest = store.state_digest(manifest)
    assert paged_digest == single.state_digest(single.resolve("other")[0]) == single.resolve("other")[0].state_digest()
    with pytest.raises(ManifestError, match=r"Store\.manifest_entries"):
        manifest.state_digest()  # a paged root cannot answer alone: no silent digest of nothing


def test_a_rank_reads_only_the_pages_of_its_rank(tmp_path):
    regions = regions_at(tmp_path, "a")
    store = make_store(regions)
    parts = rank_parts(store, ranks=4, per_rank=6)  # 6 entries per rank: 2 pages each at 4 per page
    info = store.commit_entries("dist", parts, step=3)
    manifest, holders = store.resolve("dist")
    assert len(manifest.pages) == 4 * 2 + 1
    assert [page.ranks for page in manifest.pages[:2]] == [[0], [0]] and manifest.pages[-1].ranks == []

    regions[0].gets.clear()
    mine = store.manifest_entries(manifest, ranks=[2], prefer=holders)
    read = {key for key in regions[0].gets if key.startswith("blobs/")}
    expected = {blob_key(p.digest) for p in manifest.pages if p.ranks == [2] or not p.ranks}
    assert read == expected and len(read) == 3  # rank 2's two pages and the coordinator's
    assert [e.name for e in mine] == [f"model/w{i}@2" for i in range(6)] + ["meta"]

    everything = store.manifest_entries(manifest)
    assert len(everything) == 4 * 6 + 1 and info.total_bytes == sum(e.size for e in everything)
    buffers = {e.name: bytearray(e.size) for e in mine}
    store.read_entries_into([(e, memoryview(buffers[e.name])) for e in mine], prefer=holders)
    assert torch.frombuffer(buffers["model/w5@2"], dtype=torch.float32).tolist() == [205.0, 205.0]
    assert bytes(buffers["meta"]) == b"coordinator"


def test_ranks_may_write_their_own_pages_and_the_committer_only_lists_them(tmp_path):
    store = make_store(regions_at(tmp_path, "a", "b"))
    parts = [store.write_entry_pages(part) for part in rank_parts(store, ranks=3, per_rank=5)]
    store.commit_entries("dist", parts)
    manifest, _ = store.resolve("dist")
    assert [page.digest for page in manifest.pages] == [page.digest for part in parts for page in part.pages]
    assert [e.name for e in store.manifest_entries(manifest)] == [e.name for part in parts for e in part.entries]


def test_two_writers_naming_one_entry_are_refused_before_a_manifest_is_written(tmp_path):
    store = make_store(regions_at(tmp_path, "a"))
    parts = rank_parts(store, ranks=2, per_rank=5)
    parts[1].entries[0] = parts[0].entries[0]  # rank 1 claims rank 0's first entry name
    with pytest.raises(InvalidNameError, match="two writers wrote entries of one name"):
        store.commit_entries("dist", [store.write_entry_pages(part) for part in parts])
    assert store.versions("dist") == {}


def test_a_page_corrupted_in_one_region_is_read_from_the_other_and_repaired(tmp_path):
    store = make_store(regions_at(tmp_path, "a", "b"))
    saved = state(2)
    save_state(store, saved, lineage="run", step=2)
    manifest, _ = store.resolve("run")
    damaged = page_paths(tmp_path, "a", manifest)[1]
    good = damaged.read_bytes()
    damaged.write_bytes(good.replace(b'"entries":[', b'"entries": ['))  # still JSON, not the page

    loaded, _ = load_state(store, lineage="run")
    assert_same(loaded, saved)

    report = verify_store(store, read_data=0.0)  # pages are read in full whatever read_data says
    assert not report.healthy
    assert [(p.region, p.object, p.kind) for p in report.problems] == [
        (str(tmp_path / "a"), blob_key(manifest.pages[1].digest), "corrupt")
    ]
    repaired = verify_store(store, repair=True, read_data=0.0)
    assert all(p.repaired for p in repaired.problems) and repaired.problems
    assert damaged.read_bytes() == good
    assert verify_store(store).healthy


def test_a_page_tampered_in_every_region_stops_the_load_before_any_tensor_is_written(tmp_path):
    store = make_store(regions_at(tmp_path, "a", "b"))
    save_state(store, state(3), lineage="run", step=3)
    manifest, _ = store.resolve("run")
    # A forged page: a valid page of other entries (another state's), in place of the real one.
    other = make_store(store.regions)
    save_state(other, state(99), lineage="forger", step=3)
    forged = page_paths(tmp_path, "a", other.resolve("forger")[0])[0].read_bytes()
    for region in ("a", "b"):
        page_paths(tmp_path, region, manifest)[0].write_bytes(forged)

    into = {"model": {name: torch.zeros_like(t) for name, t in state(3)["model"].items()}, "step": 0}
    with pytest.raises(PageUnavailableError, match="no intact copy of entry page") as caught:
        load_state(store, lineage="run", into=into)
    assert isinstance(caught.value, ManifestError)
    assert all(not tensor.any() for tensor in into["model"].values())  # nothing handed out

    report = verify_store(store, repair=True)
    assert not report.healthy
    assert {p.kind for p in report.problems} == {"corrupt", "unreadable manifest"}
    assert any("no intact copy in any region to repair from" in p.detail for p in report.problems)


def test_gc_keeps_pages_and_their_blobs_and_sweeps_an_uncommitted_saves(tmp_path):
    store = make_store(regions_at(tmp_path, "a", "b"))
    saved = state(4)
    save_state(store, saved, lineage="run", step=4)
    manifest, _ = store.resolve("run")
    kept = {blob_key(d) for d in store.manifest_blobs(manifest)}
    assert {blob_key(p.digest) for p in manifest.pages} <= kept

    # A save whose ranks wrote their blobs and pages, but whose commit never happened.
    lost = [store.write_entry_pages(part) for part in rank_parts(store, ranks=2, per_rank=5)]
    orphans = {blob_key(c.digest) for part in lost for e in part.entries for c in e.chunks}
    orphans |= {blob_key(p.digest) for part in lost for p in part.pages}
    assert not orphans & kept

    young = collect_garbage(store, grace=timedelta(minutes=10))
    assert young.swept and not young.deleted.get(str(tmp_path / "a"))

    later = collect_garbage(store, grace=timedelta(minutes=10), now=_hours_later(2))
    deleted = set(later.deleted[str(tmp_path / "a")])
    assert deleted == orphans
    for region in ("a", "b"):
        assert all((tmp_path / region / key).exists() for key in kept)
    loaded, _ = load_state(store, lineage="run")
    assert_same(loaded, saved)


def test_gc_refuses_when_a_page_cannot_be_read(tmp_path):
    store = make_store(regions_at(tmp_path, "a", "b"))
    save_state(store, state(5), lineage="run", step=5)
    manifest, _ = store.resolve("run")
    orphan = store.write_entries([EntryPlan(name="x", kind="bytes", data=memoryview(b"nobody names me"))])
    for region in ("a", "b"):
        page_paths(tmp_path, region, manifest)[2].unlink()
    report = collect_garbage(store, grace=timedelta(minutes=10), now=_hours_later(2))
    assert not report.swept
    assert any("entry page" in refusal for refusal in report.refusals)
    assert (tmp_path / "a" / blob_key(orphan.entries[0].chunks[0].digest)).exists()


def test_a_signed_stores_paged_manifest_verifies_and_covers_its_pages(tmp_path):
    keyring = Keyring(hmac_key("k1", secrets.token_hex(32)))
    store = make_store(regions_at(tmp_path, "a", "b"), keyring=keyring)
    saved = state(6)
    save_state(store, saved, lineage="run", step=6)
    loaded, manifest = load_state(store, lineage="run")
    assert_same(loaded, saved)
    assert manifest.signature is not None and manifest.pages
    report = verify_store(store)
    assert report.healthy
    assert report.checkpoints[0].signature.startswith("verified")
    # The page list is in the signed body: a root listing another page does not verify.
    path = manifest_file(tmp_path, "a", "run", 1)
    raw = json.loads(path.read_bytes())
    raw["pages"] = raw["pages"][:-1]
    body = {k: v for k, v in raw.items() if k not in ("manifest_digest", "signature")}
    path.write_bytes(canonical_json({**raw, "manifest_digest": hash_bytes(canonical_json(body))}))
    assert verify_store(store).problems[0].kind == "bad signature"


def test_version_1_manifests_in_todays_form_still_load(tmp_path):
    """A manifest in the version-1 form, built here by hand from its documented fields (no
    ``pages`` key), loads through a store that pages its own saves."""
    regions = regions_at(tmp_path, "a")
    store = make_store(regions)
    tensor = torch.arange(6, dtype=torch.float32)
    data = tensor.numpy().tobytes()
    digest = hash_bytes(data)
    regions[0].put_if_absent(blob_key(digest), data)
    body = {
        "format": "prefect-recovery/manifest",
        "format_version": 1,
        "lineage": "old",
        "version": 1,
        "step": 7,
        "created_at": "2026-01-01T00:00:00+00:00",
        "hash_algorithm": "blake3",
        "byte_order": "little",
        "placement": "all",
        "entries": [
            {
                "name": "w",
                "kind": "tensor",
                "size": len(data),
                "chunks": [{"digest": digest, "size": len(data)}],
                "dtype": "float32",
                "shape": [6],
                "component": None,
                "shard": None,
            }
        ],
        "tree": {"dict": [["w", {"tensor": "w"}]]},
        "components": [],
        "metadata": {},
        "writer": {},
    }
    raw = canonical_json({**body, "manifest_digest": hash_bytes(canonical_json(body)), "signature": None})
    regions[0].put_if_absent(manifest_key("old", 1), raw)

    loaded, manifest = load_state(store, lineage="old")
    assert torch.equal(loaded["w"], tensor)
    assert manifest.format_version == 1 and not manifest.paged
    assert manifest.encode() == raw  # read and written back byte for byte: no "pages" key appears
    assert store.state_digest(manifest) == manifest.state_digest()


def test_retention_audit_and_export_work_on_a_paged_lineage(tmp_path):
    store = make_store(regions_at(tmp_path, "a", "b"))
    states = {i: state(10 + i) for i in range(1, 4)}
    for i, saved in states.items():
        save_state(store, saved, lineage="run", step=i)
    first, _ = store.resolve("run", 1)
    only_v1 = set(store.manifest_blobs(first)) - set(store.manifest_blobs(store.resolve("run", 3)[0]))
    only_v1 -= set(store.manifest_blobs(store.resolve("run", 2)[0]))
    assert only_v1

    policy = RetentionPolicy(keep_last=2, keep_within=None)
    assert [d.version for d in plan_retention(store, policy).decisions if d.action == "delete"] == [1]
    report = audit_store(store, policy=policy, gc_grace=timedelta(minutes=10))  # scrub, retention, GC
    assert report.healthy and len(report.scrub.checkpoints) == 3
    assert [d.version for d in report.deletions if d.deleted] == [1]
    assert report.gc is not None and report.gc.swept  # the pages were read: GC did not refuse
    swept = collect_garbage(store, grace=timedelta(minutes=10), now=_hours_later(2))
    assert {key for keys in swept.deleted.values() for key in keys} == {blob_key(d) for d in only_v1}
    for version in (2, 3):
        assert_same(load_state(store, lineage="run", version=version)[0], states[version])

    summary = export_checkpoint(store, lineage="run", version=3, to=tmp_path / "export")
    assert summary["version"] == 3
    assert (tmp_path / "export" / "tensors.safetensors").exists()


def _hours_later(hours: float):
    from datetime import UTC, datetime

    return datetime.now(UTC) + timedelta(hours=hours)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_dcp_checkpoint_in_the_paged_form_loads_through_the_dcp_reader(tmp_path):
    """dcp.save through the store's writer (single process) on a store that pages: the DCP
    reader reads the entries through Store.manifest_entries and loads the same tensors."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from prefect_recovery.distributed import dcp_reader, dcp_writer

    store = make_store(regions_at(tmp_path, "a", "b"))
    saved = {"model": state(7)["model"], "extra": {"step": torch.tensor(7)}}
    dcp.save(saved, storage_writer=dcp_writer(store, "dcp", step=7))
    manifest, _ = store.resolve("dcp")
    assert manifest.paged and len(manifest.pages) > 1
    target = {
        "model": {name: torch.zeros_like(t) for name, t in saved["model"].items()},
        "extra": {"step": torch.tensor(0)},
    }
    dcp.load(target, storage_reader=dcp_reader(store, "dcp"))
    for name, tensor in saved["model"].items():
        assert torch.equal(target["model"][name], tensor), name
    assert int(target["extra"]["step"]) == 7


def test_replay_comparison_reads_a_paged_manifests_entries(tmp_path):
    from prefect_recovery.training.replay import compare_state

    store = make_store(regions_at(tmp_path, "a"))
    saved = state(8)
    save_state(store, saved, lineage="run", step=8)
    manifest, _ = store.resolve("run")
    assert manifest.paged
    same = compare_state(store, manifest, saved)
    assert same.identical and same.entries_compared == 12
    changed = state(8)
    changed["model"]["layer5.weight"][0, 0] += 1
    differs = compare_state(store, manifest, changed)
    assert differs.entries_differing == 1 and "layer5.weight" in differs.differing[0]


def _spy_page_writes(store: Store) -> list[list[str]]:
    """The entry names of each ``write_entry_pages`` call on ``store`` (who paged what)."""
    calls: list[list[str]] = []
    real = store.write_entry_pages

    def spy(written):
        calls.append([e.name for e in written.entries])
        return real(written)

    store.write_entry_pages = spy  # type: ignore[method-assign]
    return calls


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_dcp_rank_pages_its_own_part_and_the_coordinator_pages_only_the_metadata(tmp_path):
    """A DCP save that will be paged: the rank writes its part's pages in write_data, the
    coordinator's commit only lists them and pages its own metadata entry; it loads bit-identically."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from prefect_recovery.distributed import dcp_reader, dcp_writer
    from prefect_recovery.distributed.dcp import METADATA_ENTRY

    store = make_store(regions_at(tmp_path, "a", "b"))
    calls = _spy_page_writes(store)
    saved = {"model": state(9)["model"], "extra": {"step": torch.tensor(9)}}
    dcp.save(saved, storage_writer=dcp_writer(store, "dcp", step=9))

    manifest, holders = store.resolve("dcp")
    assert manifest.paged
    assert len(calls) == 2  # the rank's part, then (at commit) the metadata's part alone
    assert len(calls[0]) == 13 and METADATA_ENTRY not in calls[0]
    assert calls[1] == [METADATA_ENTRY]
    rank_pages = [p for p in manifest.pages if p.ranks == [0]]
    assert len(rank_pages) == 4  # 13 entries at 4 per page, written by the rank
    coordinator_pages = [p for p in manifest.pages if not p.ranks]
    assert [(p.first, p.last, p.entries) for p in coordinator_pages] == [(METADATA_ENTRY, METADATA_ENTRY, 1)]
    listed = store.manifest_entries(manifest, prefer=holders)
    assert len(listed) == 14 and manifest.total_bytes == sum(e.size for e in listed)

    target = {
        "model": {name: torch.zeros_like(t) for name, t in saved["model"].items()},
        "extra": {"step": torch.tensor(0)},
    }
    dcp.load(target, storage_reader=dcp_reader(store, "dcp"))
    for name, tensor in saved["model"].items():
        assert target["model"][name].numpy().tobytes() == tensor.numpy().tobytes(), name
    assert int(target["extra"]["step"]) == 9


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_small_dcp_checkpoint_stays_one_manifest_file_and_no_rank_pages(tmp_path):
    """Below page_entries the ranks page nothing: the manifest is the single-file form it always was."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from prefect_recovery.distributed import dcp_writer

    store = make_store(regions_at(tmp_path, "a"), page_entries=14)  # 12 tensors + 1 bytes item + metadata
    calls = _spy_page_writes(store)
    saved = {"model": state(10)["model"], "extra": {"step": torch.tensor(10)}}
    dcp.save(saved, storage_writer=dcp_writer(store, "dcp", step=10))
    manifest, _ = store.resolve("dcp")
    assert not manifest.paged and len(manifest.entries) == 14 and calls == []
    # One more entry and the whole checkpoint is paged, the rank's part by the rank.
    saved["model"]["one.more"] = torch.ones(3)
    dcp.save(saved, storage_writer=dcp_writer(store, "dcp", step=11))
    manifest, _ = store.resolve("dcp")
    assert manifest.paged and len(calls) == 2 and len(calls[0]) == 14


def test_a_paged_manifests_tree_naming_no_entry_of_its_pages_is_refused_and_reported(tmp_path):
    """The single-file form's schema checks that each tree leaf names an entry of its kind; a paged
    root's entries are in its pages, so the check runs when every page has been read."""
    from helpers.tamper import reseal

    store = make_store(regions_at(tmp_path, "a", "b"))
    info = save_state(store, state(1), lineage="run", step=1)
    raw = json.loads(manifest_file(tmp_path, "a", "run", info.version).read_bytes())
    raw["tree"] = {"dict": [["model", {"tensor": "model/not-saved"}]]}
    for region in ("a", "b"):
        manifest_file(tmp_path, region, "run", info.version).write_bytes(reseal(raw))
    with pytest.raises(ManifestError, match="lacks"):
        load_state(store, lineage="run")
    report = verify_store(store)
    assert not report.healthy
    assert any(p.kind == "unreadable manifest" and "lacks" in p.detail for p in report.problems)


def _fine_tune_parts(store: Store, ranks: int, nudge: float, base: dict[int, list] | None = None) -> list:
    """Each rank's shards of three 16 KiB weights (a fine-tune nudges them by ``nudge``), written against
    ``base[rank]`` when given (what ``delta_base`` gave that rank), plus a coordinator part of no rank."""
    parts = []
    for rank in range(ranks):
        plans = []
        for i in range(3):
            weights = torch.linspace(-1, 1, 4096, dtype=torch.float32) * (rank + i + 1) + nudge
            shard = ShardInfo(global_shape=[4096 * ranks], offsets=[4096 * rank], rank=rank)
            data = memoryview(weights.numpy().tobytes())
            plans.append(EntryPlan(f"model/w{i}@{rank}", "tensor", data, dtype="float32", shape=[4096], shard=shard))
        parts.append(store.write_entries(plans, base=None if base is None else base[rank]))
    parts.append(store.write_entries([EntryPlan(name="meta", kind="bytes", data=memoryview(b"coordinator"))]))
    return parts


def test_a_delta_stores_rank_reads_only_its_own_pages_of_the_base(tmp_path):
    """Issue 17: with ``delta`` on, each DCP rank asks for the base of its next save (``delta_base(lineage,
    ranks=[rank])``); of a paged base it reads its own pages and the coordinator's, not every rank's, and
    still finds the parent of each of its chunks."""
    regions = regions_at(tmp_path, "a")
    store = Store(regions, write_quorum=1, straggler_grace=None, page_entries=2, codec="zstd", delta=True,
                  chunk_bytes=4096)  # fmt: skip
    store.commit_entries("ft", _fine_tune_parts(store, ranks=4, nudge=0.0), step=1)
    manifest, _ = store.resolve("ft")
    assert len(manifest.pages) == 4 * 2 + 1  # 3 entries per rank at 2 per page, and the coordinator's

    regions[0].gets.clear()
    bases = {rank: store.delta_base("ft", ranks=[rank]) for rank in range(4)}
    pages_read = [key for key in regions[0].gets.elements() if key.startswith("blobs/")]
    assert len(pages_read) == 4 * (2 + 1)  # each rank: its two pages and the coordinator's, nothing else
    assert [e.name for e in bases[2]] == [f"model/w{i}@2" for i in range(3)] + ["meta"]

    store.commit_entries("ft", _fine_tune_parts(store, ranks=4, nudge=1e-6, base=bases), step=2)
    entries = store.manifest_entries(store.resolve("ft", 2)[0])
    tensors = [e for e in entries if e.kind == "tensor"]
    assert all(chunk.parent for e in tensors for chunk in e.chunks)  # every rank found every parent
    expected = torch.linspace(-1, 1, 4096, dtype=torch.float32) * 3 + 1e-6  # rank 2, w0
    buffer = bytearray(4096 * 4)
    store.read_entries_into([(next(e for e in tensors if e.name == "model/w0@2"), memoryview(buffer))])
    assert torch.frombuffer(buffer, dtype=torch.float32).numpy().tobytes() == expected.numpy().tobytes()
    assert store.delta_base("ft", ranks=None) is not None and len(store.delta_base("ft")) == 4 * 3 + 1
    assert Store(regions, write_quorum=1).delta_base("ft", ranks=[0]) is None  # delta off: no base read
