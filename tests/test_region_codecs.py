"""A codec per region (issue 17): a cloud region compressed, a local one raw.

Through the real core Store on real local regions (and moto's S3 server for the cloud case):
each region holds the chunks in its own codec, every form is verified against one content
digest, a load works from any one region alone, a corrupt form is passed over for another,
repair restores a lost region in its own codec, GC keeps every live form and sweeps the
others, deltas go to the compressed region only, older manifests still load, and signing
covers the forms (docs/FORMAT.md, "Region codecs").
"""

from __future__ import annotations

import json
import secrets
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydantic
import pytest
import torch
from test_codecs import _load, _plan, _raw

from prefect_recovery.blocks.checkpoint_store import CheckpointStore
from prefect_recovery.core import BlobUnavailableError, InvalidArgumentError, Store, open_region
from prefect_recovery.core.audit import audit_store
from prefect_recovery.core.digest import hash_bytes
from prefect_recovery.core.errors import ManifestError, ManifestSignatureError, RegionConfigError
from prefect_recovery.core.gc import collect_garbage
from prefect_recovery.core.layout import blob_key, manifest_key
from prefect_recovery.core.manifest import ChunkRef, Manifest, canonical_json, decode_manifest
from prefect_recovery.core.region_local import LocalRegionIO
from prefect_recovery.core.region_marker import init_region
from prefect_recovery.core.retention import RetentionPolicy, apply_retention, plan_retention
from prefect_recovery.core.signing import Keyring, hmac_key
from prefect_recovery.core.verify import verify_store
from prefect_recovery.training.export import export_checkpoint
from prefect_recovery.training.state_io import save_state

CHUNK = 64 * 1024
RAW, PACKED = "local", "cloud"


def _roots(tmp_path: Path) -> dict[str, Path]:
    roots = {name: tmp_path / name for name in (RAW, PACKED)}
    for root in roots.values():
        root.mkdir(exist_ok=True)
    return roots


def _store(tmp_path: Path, *, packed: str = "auto", only: str | None = None, **kw) -> Store:
    """Region ``local`` raw, region ``cloud`` compressed with ``packed``; ``only``: a store of
    that one region (the other one gone), with the same codec settings."""
    roots = _roots(tmp_path)
    names = [only] if only else [RAW, PACKED]
    regions = [LocalRegionIO(str(roots[name]), name=name) for name in names]
    codecs = {name: codec for name, codec in {RAW: "none", PACKED: packed}.items() if name in names}
    kw.setdefault("write_quorum", len(regions))
    return Store(regions, chunk_bytes=CHUNK, region_codecs=codecs, **kw)


def _weights(seed: int = 0, n: int = 120_000, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.02).to(dtype)


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    return {
        "w_bf16": _weights(seed),
        "w_fp32": _weights(seed + 1, 60_000, torch.float32),
        "steps": torch.arange(seed, seed + 5_000, dtype=torch.int64),
    }


def _blobs(root: Path) -> dict[str, bytes]:
    """Every blob a region holds, by digest."""
    found = {}
    for path in (root / "blobs").rglob("*"):
        if path.is_file():
            found[f"{path.parent.parent.name}:{path.name}"] = path.read_bytes()
    return found


def _chunks(store: Store, lineage: str, version: int | None = None) -> list[tuple[str, ChunkRef]]:
    manifest, _ = store.resolve(lineage, version)
    return [(entry.name, chunk) for entry in store.manifest_entries(manifest) for chunk in entry.chunks]


def _forms(chunk: ChunkRef) -> tuple[ChunkRef, ChunkRef]:
    """(raw form, compressed form) of a chunk stored both ways."""
    forms = chunk.stored_forms()
    raw = [f for f in forms if f.stored_raw]
    packed = [f for f in forms if not f.stored_raw]
    assert len(raw) == 1 and len(packed) == 1, chunk
    return raw[0], packed[0]


def _assert_region_holds_its_codec(tmp_path: Path, store: Store, lineage: str, state: dict[str, torch.Tensor]) -> None:
    roots = _roots(tmp_path)
    local, cloud = _blobs(roots[RAW]), _blobs(roots[PACKED])
    # The raw region: every chunk's blob is the tensor's bytes at its offset, byte for byte.
    offsets: dict[str, int] = {}
    for name, chunk in _chunks(store, lineage):
        start = offsets.get(name, 0)
        offsets[name] = start + chunk.size
        expected = _raw(state[name])[start : start + chunk.size]
        raw, packed = _forms(chunk) if chunk.forms else (chunk, chunk)
        assert local[raw.digest] == expected
        assert packed.digest in cloud
        if chunk.forms:
            assert packed.digest not in local and raw.digest not in cloud
    assert sum(map(len, cloud.values())) < 0.9 * sum(map(len, local.values()))


# -- where the bytes are ----------------------------------------------------------------------------
@pytest.mark.parametrize("packed", ["auto", "zstd"])
def test_each_region_holds_chunks_in_its_own_codec(tmp_path, packed):
    store = _store(tmp_path, packed=packed)
    state = _state()
    store.commit("run", _plan(state))
    chunks = _chunks(store, "run")
    assert all(chunk.forms for name, chunk in chunks if name != "steps" or packed == "zstd")
    for _, chunk in chunks:
        assert {f.content_digest for f in chunk.stored_forms()} == {chunk.content_digest}
    _assert_region_holds_its_codec(tmp_path, store, "run", state)
    _, loaded = _load(store, "run")
    assert loaded == {name: _raw(t) for name, t in state.items()}


@pytest.mark.parametrize("gone", [RAW, PACKED])
def test_a_load_from_either_region_alone_is_identical(tmp_path, gone):
    state = _state()
    _store(tmp_path).commit("run", _plan(state))
    shutil.rmtree(_roots(tmp_path)[gone])  # the region is lost, its disk with it
    kept = PACKED if gone == RAW else RAW
    alone = _store(tmp_path, only=kept, write_quorum=1)
    _, loaded = _load(alone, "run")
    assert loaded == {name: _raw(t) for name, t in state.items()}


@pytest.mark.parametrize("damaged", [RAW, PACKED])
def test_a_corrupt_form_is_detected_and_the_other_region_serves(tmp_path, damaged):
    store = _store(tmp_path)
    state = _state()
    store.commit("run", _plan(state))
    _, chunk = _chunks(store, "run")[0]
    raw, packed = _forms(chunk)
    bad = raw if damaged == RAW else packed
    path = _roots(tmp_path)[damaged] / blob_key(bad.digest)
    body = bytearray(path.read_bytes())
    body[len(body) // 2] ^= 0x40
    path.write_bytes(bytes(body))

    _, loaded = _load(store, "run")
    assert loaded == {name: _raw(t) for name, t in state.items()}

    report = verify_store(store)
    assert [(p.region, p.object, p.kind) for p in report.problems] == [(damaged, blob_key(bad.digest), "corrupt")]
    repaired = verify_store(store, repair=True)
    assert all(p.repaired for p in repaired.problems)
    assert path.read_bytes() != bytes(body)  # rewritten in its codec (checked below)
    assert verify_store(store).healthy
    _assert_region_holds_its_codec(tmp_path, store, "run", state)


@pytest.mark.parametrize("lost", [RAW, PACKED])
def test_repair_restores_a_lost_region_in_its_own_codec(tmp_path, lost):
    store = _store(tmp_path)
    state = _state()
    store.commit("run", _plan(state))
    shutil.rmtree(_roots(tmp_path)[lost] / "blobs")  # every blob of that region gone

    report = verify_store(store)
    assert not report.healthy
    assert {p.region for p in report.problems} == {lost}
    assert {p.kind for p in report.problems} == {"missing"}

    # No region holds the lost region's forms: the audit rebuilds each from the other form.
    audit = audit_store(store, apply_retention_policy=False)
    assert all(p.repaired for p in audit.scrub.problems)
    assert all("rebuilt from another stored form" in p.detail for p in audit.scrub.problems)
    assert verify_store(store).healthy
    _assert_region_holds_its_codec(tmp_path, store, "run", state)
    # ... and that region alone serves the checkpoint again.
    shutil.rmtree(_roots(tmp_path)[PACKED if lost == RAW else RAW])
    _, loaded = _load(_store(tmp_path, only=lost, write_quorum=1), "run")
    assert loaded == {name: _raw(t) for name, t in state.items()}


def test_gc_keeps_every_live_form_and_sweeps_unreferenced_ones(tmp_path):
    store = _store(tmp_path)
    first, second = _state(0), _state(10)
    store.commit("run", _plan(first))
    store.commit("run", _plan(second))
    later = datetime.now(UTC) + timedelta(days=1)

    before = {name: set(_blobs(root)) for name, root in _roots(tmp_path).items()}
    report = collect_garbage(store, now=later)
    assert report.swept and not report.blobs_deleted
    assert {name: set(_blobs(root)) for name, root in _roots(tmp_path).items()} == before

    v1 = {f.digest for _, c in _chunks(store, "run", 1) for f in c.stored_forms()}
    v2 = {f.digest for _, c in _chunks(store, "run", 2) for f in c.stored_forms()}
    plan = plan_retention(store, RetentionPolicy(keep_last=1), lineage="run")
    apply_retention(store, plan)
    report = collect_garbage(store, now=later)
    assert report.swept and set(report.blobs_deleted) == {RAW, PACKED}
    for name, root in _roots(tmp_path).items():
        held = set(_blobs(root))
        assert not (v1 - v2) & held, name  # v1's forms are gone from both regions
        assert before[name] & v2 <= held  # v2's are all still there
    _assert_region_holds_its_codec(tmp_path, store, "run", second)
    for only in (RAW, PACKED):
        _, loaded = _load(_store(tmp_path, only=only, write_quorum=1), "run")
        assert loaded == {name: _raw(t) for name, t in second.items()}


def _nudge(t: torch.Tensor, seed: int) -> torch.Tensor:
    noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(seed))
    scale = 1e-2 if t.dtype == torch.bfloat16 else 1e-6
    return (t.double() * (1 + scale * noise)).to(t.dtype)


def test_deltas_go_to_the_compressed_region_and_the_raw_one_holds_whole_chunks(tmp_path):
    store = _store(tmp_path, delta=True)
    base = _state()
    store.commit("ft", _plan(base))
    tuned = {name: _nudge(t, 1) if t.is_floating_point() else t for name, t in base.items()}
    cloud_before = sum(map(len, _blobs(_roots(tmp_path)[PACKED]).values()))
    info = store.commit("ft", _plan(tuned))

    chunks = _chunks(store, "ft", info.version)
    changed = [(n, c) for n, c in chunks if n != "steps"]
    assert changed and all(c.forms for _, c in changed)
    for _, chunk in changed:
        raw, packed = _forms(chunk)
        assert raw.parent is None  # the raw region holds every chunk whole
        assert packed.parent is not None and packed.parent.forms is None  # a delta, parent of one form
    unchanged = [c for n, c in chunks if n == "steps"]
    assert unchanged == [c for n, c in _chunks(store, "ft", 1) if n == "steps"]  # the base's refs, as they are
    _assert_region_holds_its_codec(tmp_path, store, "ft", tuned)
    # The delta costs the compressed region far less than a whole compressed save did.
    cloud_after = sum(map(len, _blobs(_roots(tmp_path)[PACKED]).values()))
    assert cloud_after - cloud_before < 0.6 * cloud_before

    for only in (RAW, PACKED):
        _, loaded = _load(_store(tmp_path, only=only, write_quorum=1), "ft")
        assert loaded == {name: _raw(t) for name, t in tuned.items()}
    # The compressed region alone resolves its chains, and verify decodes every form.
    assert verify_store(store, decode=True).healthy
    shutil.rmtree(_roots(tmp_path)[PACKED] / "blobs")
    audit = audit_store(store, apply_retention_policy=False)
    assert audit.scrub.problems and all(p.repaired for p in audit.scrub.problems)
    shutil.rmtree(_roots(tmp_path)[RAW])
    _, loaded = _load(_store(tmp_path, only=PACKED, write_quorum=1), "ft")
    assert loaded == {name: _raw(t) for name, t in tuned.items()}


def test_a_manifest_written_before_region_codecs_still_loads(tmp_path):
    roots = _roots(tmp_path)
    old = Store([open_region(str(roots[RAW])), open_region(str(roots[PACKED]))], chunk_bytes=CHUNK, codec="auto")
    state = _state()
    old.commit("run", _plan(state))
    written = (roots[RAW] / manifest_key("run", 1)).read_bytes()
    assert b'"forms"' not in written

    store = Store(
        [open_region(str(roots[RAW])), open_region(str(roots[PACKED]))],
        chunk_bytes=CHUNK,
        region_codecs={str(roots[RAW]): "none", str(roots[PACKED]): "auto"},
    )
    _, loaded = _load(store, "run", 1)
    assert loaded == {name: _raw(t) for name, t in state.items()}
    assert verify_store(store).healthy  # one form per chunk: every region holds it, as before
    store.commit("run", _plan(_state(3)))
    assert any(c.forms for _, c in _chunks(store, "run", 2))
    assert (roots[RAW] / manifest_key("run", 1)).read_bytes() == written


def test_signing_covers_the_forms(tmp_path):
    keyring = Keyring(hmac_key("k1", secrets.token_hex(32)))
    store = _store(tmp_path, keyring=keyring)
    state = _state()
    store.commit("run", _plan(state))
    report = verify_store(store)
    assert report.healthy and all(row.signature.startswith("verified") for row in report.checkpoints)
    _, loaded = _load(store, "run")
    assert loaded == {name: _raw(t) for name, t in state.items()}

    # A forged manifest that points a form at other bytes (digest recomputed) fails its signature.
    path = _roots(tmp_path)[PACKED] / manifest_key("run", 1)
    doc = json.loads(path.read_bytes())
    form = doc["entries"][0]["chunks"][0]["forms"][0]
    form["digest"] = "blake3:" + "0" * 64
    body = {k: v for k, v in doc.items() if k not in ("manifest_digest", "signature")}
    doc["manifest_digest"] = hash_bytes(canonical_json(body), "blake3")
    Manifest.model_validate(doc)  # schema-valid: only the signature can tell
    path.write_bytes(canonical_json(doc))
    report = verify_store(store)
    assert [(p.region, p.kind) for p in report.problems] == [(PACKED, "bad signature")]
    with pytest.raises(ManifestSignatureError):
        _store(tmp_path, only=PACKED, write_quorum=1, keyring=keyring).resolve("run")


# -- configuration ----------------------------------------------------------------------------------
def test_bad_region_codecs_are_refused_before_anything_is_written(tmp_path):
    roots = _roots(tmp_path)
    regions = [LocalRegionIO(str(roots[RAW]), name=RAW), LocalRegionIO(str(roots[PACKED]), name=PACKED)]
    with pytest.raises(InvalidArgumentError, match=r"'elsewhere'.*no region"):
        Store(regions, region_codecs={"elsewhere": "auto"})
    with pytest.raises(InvalidArgumentError, match="unknown codec 'lz4'"):
        Store(regions, region_codecs={PACKED: "lz4"})  # type: ignore[dict-item]
    assert not any(any(root.iterdir()) for root in roots.values())  # nothing half-written

    with pytest.raises(RegionConfigError, match="region_codecs: key 'elsewhere' names no region"):
        CheckpointStore(regions=[str(roots[RAW]), str(roots[PACKED])], region_codecs={"elsewhere": "auto"})
    with pytest.raises(pydantic.ValidationError, match="region_codecs"):
        CheckpointStore(regions=[str(roots[RAW]), str(roots[PACKED])], region_codecs={str(roots[PACKED]): "lz4"})
    assert not any(any(root.iterdir()) for root in roots.values())

    block = CheckpointStore(
        regions=[{"url": str(roots[RAW]), "name": RAW}, str(roots[PACKED])],
        region_codecs={str(roots[PACKED]): "zstd"},
        write_quorum=2,
        chunk_bytes=CHUNK,
    )
    assert [block.core.codec_of(name) for name in block.core.region_names] == ["none", "zstd"]
    state = _state()
    block.core.commit("run", _plan(state))
    assert all(c.forms for _, c in _chunks(block.core, "run"))
    again = CheckpointStore.model_validate(block.model_dump())
    assert again.region_codecs == {str(roots[PACKED]): "zstd"}


# -- a cloud region compressed, a local one raw (S3 on moto) ----------------------------------------
@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from helpers.emulators import s3_emulator

    with s3_emulator(bucket="rcodecs", log_dir=tmp_path_factory.mktemp("moto")) as running:
        yield running


def test_s3_region_compressed_while_the_local_one_stays_raw(tmp_path, s3):
    import s3fs

    local = tmp_path / "disk"
    local.mkdir()
    prefix = f"rcodecs/{tmp_path.name}"
    cloud = {"url": f"s3://{prefix}", "name": "cloud", "storage_options": s3.storage_options}

    def block(*regions, quorum: int | None = None) -> CheckpointStore:
        return CheckpointStore(
            regions=list(regions),
            region_codecs={"cloud": "auto"},
            write_quorum=quorum or len(regions),
            chunk_bytes=CHUNK,
        )

    store = block({"url": str(local), "name": "disk"}, cloud).core
    state = _state()
    store.commit("run", _plan(state))

    fs = s3fs.S3FileSystem(**s3.storage_options)
    in_cloud = {
        f"{p.split('/')[-3]}:{p.split('/')[-1]}": size
        for p, size in fs.find(f"{prefix}/blobs", detail=True).items()
        for size in [size["size"]]
    }
    on_disk = {digest: len(data) for digest, data in _blobs(local).items()}
    for name, chunk in _chunks(store, "run"):
        raw, packed = _forms(chunk) if chunk.forms else (chunk, chunk)
        assert raw.digest in on_disk and packed.digest in in_cloud, name
    assert sum(in_cloud.values()) < 0.9 * sum(on_disk.values())

    # The cloud region alone (the disk is gone) loads the same tensors ...
    shutil.rmtree(local)
    _, loaded = _load(block(cloud).core, "run")
    assert loaded == {name: _raw(t) for name, t in state.items()}
    # ... and the cloud region, its blobs lost, is rebuilt compressed from a new disk's raw forms
    # (themselves rebuilt raw from the cloud's first: each region in its own codec).
    init_region(open_region(str(local)))
    restored = block({"url": str(local), "name": "disk"}, cloud, quorum=1).core
    first = verify_store(restored, repair=True)
    assert first.problems and all(p.repaired and p.region == "disk" for p in first.problems)
    fs.rm(f"{prefix}/blobs", recursive=True)
    repaired = verify_store(restored, repair=True)
    assert repaired.problems and all(p.repaired and p.region == "cloud" for p in repaired.problems)
    after = fs.find(f"{prefix}/blobs", detail=True)
    assert {f"{p.split('/')[-3]}:{p.split('/')[-1]}": d["size"] for p, d in after.items()} == in_cloud
    assert verify_store(restored).healthy


def test_delta_saves_go_on_when_the_regions_codecs_change(tmp_path):
    """A base saved with per-region codecs, the next save with one codec everywhere, then back:
    each delta names one form of its parent, and every version loads from each region."""
    base = _state()
    _store(tmp_path, delta=True).commit("ft", _plan(base))
    roots = _roots(tmp_path)
    regions = [LocalRegionIO(str(roots[name]), name=name) for name in (RAW, PACKED)]
    uniform = Store(regions, write_quorum=2, chunk_bytes=CHUNK, codec="auto", delta=True)
    second = {name: _nudge(t, 2) if t.is_floating_point() else t for name, t in base.items()}
    uniform.commit("ft", _plan(second))
    assert any(c.parent is not None for _, c in _chunks(uniform, "ft", 2))
    third = {name: _nudge(t, 3) if t.is_floating_point() else t for name, t in second.items()}
    _store(tmp_path, delta=True).commit("ft", _plan(third))
    assert verify_store(_store(tmp_path), decode=True).healthy
    for version, state in ((1, base), (2, second), (3, third)):
        for only in (RAW, PACKED):
            _, loaded = _load(_store(tmp_path, only=only, write_quorum=1), "ft", version)
            assert loaded == {name: _raw(t) for name, t in state.items()}, (version, only)


def test_a_saved_block_keeps_its_region_codecs(prefect_server, tmp_path):
    roots = _roots(tmp_path)
    name = f"rcodecs-{tmp_path.name[-20:]}".lower().replace("_", "-")
    CheckpointStore(
        regions=[{"url": str(roots[RAW]), "name": RAW}, {"url": str(roots[PACKED]), "name": PACKED}],
        region_codecs={PACKED: "bytegroup-zstd"},
        chunk_bytes=CHUNK,
    ).save(name)
    loaded = CheckpointStore.load(name)
    assert loaded.region_codecs == {PACKED: "bytegroup-zstd"}
    assert [loaded.core.codec_of(region) for region in (RAW, PACKED)] == ["none", "bytegroup-zstd"]
    state = _state()
    loaded.core.commit("run", _plan(state))
    _assert_region_holds_its_codec(tmp_path, loaded.core, "run", state)


@pytest.mark.parametrize("only", [RAW, PACKED])
def test_export_reads_the_region_that_is_left(tmp_path, only):
    from safetensors.torch import load_file

    state = _state()
    save_state(_store(tmp_path), dict(state), lineage="run")  # a state tree, as a Checkpointer saves it
    shutil.rmtree(_roots(tmp_path)[PACKED if only == RAW else RAW])
    out = export_checkpoint(_store(tmp_path, only=only, write_quorum=1), lineage="run", version=None, to=tmp_path / "x")
    exported = {}
    for file in out["files"]:
        if str(file).endswith(".safetensors"):
            exported.update(load_file(file))
    assert {_raw(t) for t in exported.values()} == {_raw(t) for t in state.values()}


def test_both_forms_corrupt_is_an_error_never_wrong_bytes(tmp_path):
    store = _store(tmp_path)
    store.commit("run", _plan(_state()))
    _, chunk = _chunks(store, "run")[0]
    for form, region in zip(_forms(chunk), (RAW, PACKED), strict=True):
        path = _roots(tmp_path)[region] / blob_key(form.digest)
        body = bytearray(path.read_bytes())
        body[7] ^= 0x01
        path.write_bytes(bytes(body))
    with pytest.raises(BlobUnavailableError) as caught:
        _load(store, "run")
    # each region is named with what was wrong with the copy it was asked for (its own form)
    assert set(caught.value.causes) == {RAW, PACKED}
    assert all("corrupt" in cause for cause in caught.value.causes.values()), caught.value.causes
    report = verify_store(store, repair=True)
    assert {(p.region, p.kind) for p in report.problems} == {(RAW, "corrupt"), (PACKED, "corrupt")}
    assert not any(p.repaired for p in report.problems)  # no verified copy of the content anywhere


def _forge(path: Path, edit) -> None:
    doc = json.loads(path.read_bytes())
    edit(doc["entries"][0]["chunks"][0])
    body = {k: v for k, v in doc.items() if k not in ("manifest_digest", "signature")}
    doc["manifest_digest"] = hash_bytes(canonical_json(body), "blake3")
    path.write_bytes(canonical_json(doc))


@pytest.mark.parametrize(
    "edit",
    [
        lambda c: c["forms"][0].update(decoded_digest="blake3:" + "1" * 64),  # another content
        lambda c: c["forms"].append(dict(c["forms"][0])),  # one blob named twice
        lambda c: c["forms"][0].update(forms=[{"digest": c["digest"], "size": c["size"]}]),  # nested
        lambda c: c["forms"][0].update(size=c["size"] + 1),
        lambda c: c.update(forms=[]),
    ],
    ids=["content", "duplicate", "nested", "size", "empty"],
)
def test_a_manifest_with_inconsistent_forms_is_a_damaged_copy(tmp_path, edit):
    store = _store(tmp_path)
    state = _state()
    store.commit("run", _plan(state))
    path = _roots(tmp_path)[PACKED] / manifest_key("run", 1)
    _forge(path, edit)
    with pytest.raises(ManifestError):
        decode_manifest(path.read_bytes())
    _, loaded = _load(store, "run")  # the other region's copy serves
    assert loaded == {name: _raw(t) for name, t in state.items()}
    report = verify_store(store, repair=True)
    assert [(p.region, p.kind, p.repaired) for p in report.problems] == [(PACKED, "unreadable manifest", True)]


def test_after_a_region_codec_change_repair_writes_the_new_codec_there(tmp_path):
    state = _state()
    _store(tmp_path).commit("run", _plan(state))  # local raw, cloud auto
    roots = _roots(tmp_path)
    regions = [LocalRegionIO(str(roots[name]), name=name) for name in (RAW, PACKED)]
    changed = Store(regions, write_quorum=2, chunk_bytes=CHUNK, codec="auto")  # local compressed from now on
    report = verify_store(changed)
    assert report.problems and {(p.region, p.kind) for p in report.problems} == {(RAW, "missing")}
    assert all(p.repaired for p in verify_store(changed, repair=True).problems)
    assert verify_store(changed).healthy
    local = _blobs(roots[RAW])
    for _, chunk in _chunks(changed, "run"):
        assert _forms(chunk)[1].digest in local  # the compressed form, copied from the cloud
    _, loaded = _load(Store(regions[:1], chunk_bytes=CHUNK, codec="auto"), "run")
    assert loaded == {name: _raw(t) for name, t in state.items()}


def _count_reads(monkeypatch, region, method: str) -> list[str]:
    """The blobs ``region`` (a real region) is asked to read, in order: the real read still runs."""
    asked: list[str] = []
    real = getattr(region, method)

    def counted(key, *args, **kwargs):
        if key.startswith("blobs/"):
            asked.append(key)
        return real(key, *args, **kwargs)

    monkeypatch.setattr(region, method, counted)
    return asked


def test_a_load_reads_the_raw_local_form_even_when_the_compressed_region_is_listed_first(tmp_path, monkeypatch):
    """A store that lists its compressed region first (placement and writes follow that order) still loads
    each chunk from the raw one: nothing to decode. The compressed form serves only what the raw region
    cannot."""
    roots = _roots(tmp_path)
    regions = [LocalRegionIO(str(roots[PACKED]), name=PACKED), LocalRegionIO(str(roots[RAW]), name=RAW)]
    store = Store(regions, write_quorum=2, chunk_bytes=CHUNK, region_codecs={PACKED: "auto", RAW: "none"})
    state = _state()
    store.commit("run", _plan(state))
    chunks = _chunks(store, "run")
    assert any(chunk.forms for _, chunk in chunks)  # the bf16 weights compress: two forms

    packed_reads = _count_reads(monkeypatch, regions[0], "read_into")
    raw_reads = _count_reads(monkeypatch, regions[1], "read_into")
    _, loaded = _load(store, "run")
    assert loaded == {name: _raw(t) for name, t in state.items()}
    assert packed_reads == [] and len(raw_reads) == len(chunks)

    # one raw blob damaged: that chunk alone comes from the compressed region, decoded and verified
    damaged = next(chunk for _, chunk in chunks if chunk.forms)
    raw, packed = _forms(damaged)
    path = roots[RAW] / blob_key(raw.digest)
    path.write_bytes(b"\0" * path.stat().st_size)
    _, loaded = _load(store, "run")
    assert loaded == {name: _raw(t) for name, t in state.items()}
    assert packed_reads == [blob_key(packed.digest)]


def test_a_load_reads_nothing_from_the_object_store_while_the_local_raw_region_serves(tmp_path, s3, monkeypatch):
    """A compressed S3 region listed first, a local raw disk second: a load costs no request to S3."""
    local = tmp_path / "disk"
    local.mkdir()
    cloud = {"url": f"s3://rcodecs/{tmp_path.name}", "name": "cloud", "storage_options": s3.storage_options}
    block = CheckpointStore(
        regions=[cloud, {"url": str(local), "name": "disk"}], region_codecs={"cloud": "auto"}, chunk_bytes=CHUNK
    )
    store = block.core
    state = _state()
    store.commit("run", _plan(state))
    s3_reads = _count_reads(monkeypatch, store.regions[0], "get")
    _, loaded = _load(store, "run")
    assert loaded == {name: _raw(t) for name, t in state.items()}
    assert s3_reads == []
    shutil.rmtree(local / "blobs")  # the disk's blobs gone: every chunk from S3, in its compressed form
    _, loaded = _load(store, "run")
    assert loaded == {name: _raw(t) for name, t in state.items()}
    assert len(s3_reads) == len(_chunks(store, "run"))
