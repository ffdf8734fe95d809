"""Issue 12, tried again from outside: cases the first suites (test_trust_records, test_trust_journal,
test_fuzz_store, test_cli_errors) did not list.

A hostile reviewer who can write into a region, and a careless operator, against real local regions,
through the Python API and the CLI as a subprocess. The rule for every case: bad input is the store's
own typed error (or one CLI line, exit 2) saying what happened and what to do, and every committed
checkpoint stays intact and loadable; GC and the audit never delete what a kept version needs, nor
a file the store did not write.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import zstandard
from conftest import CLI
from helpers.tamper import manifest_path, raw_manifest, read_entry, reseal

from prefect_recovery import CheckpointStore
from prefect_recovery.core import (
    BlobUnavailableError,
    CheckpointError,
    CheckpointNotFoundError,
    EntryPlan,
    Journal,
    JournalError,
    ManifestError,
    RegionError,
    Store,
    collect_garbage,
    hmac_key,
    open_region,
    verify_store,
)
from prefect_recovery.core.audit import audit_store
from prefect_recovery.core.digest import hash_bytes
from prefect_recovery.core.layout import blob_key, journal_key
from prefect_recovery.core.manifest import Component
from prefect_recovery.core.signing import Keyring
from prefect_recovery.training.encoding import decode_tree

SECRET = "k" * 40
HOUR = timedelta(hours=1)


# -- building blocks ------------------------------------------------------------------------------------------
def _regions(tmp_path: Path, count: int = 2) -> list[Path]:
    paths = []
    for index in range(count):
        path = tmp_path / f"region-{'abc'[index]}"
        path.mkdir()
        paths.append(path)
    return paths


def _store(paths: list[Path], quorum: int = 1, signed: bool = False, **options) -> Store:
    keyring = Keyring(hmac_key("k1", SECRET)) if signed else None
    return Store([open_region(str(p)) for p in paths], write_quorum=quorum, io_threads=2, keyring=keyring, **options)


def _data(seed: str, size: int = 3000) -> bytes:
    return random.Random(seed).randbytes(size)


def _save(store: Store, lineage: str, data: bytes, step: int | None = None):
    return store.commit(
        lineage, [EntryPlan(name="w", kind="bytes", data=memoryview(data))], step=step, components=[Component(name="w")]
    )


def _age(root: Path) -> None:
    """Every file and directory under ``root`` very old (older than any GC grace), links left alone."""
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            os.utime(path, (1, 1))


def _blob_files(regions: list[Path]) -> dict[str, bytes]:
    return {
        str(p): p.read_bytes()
        for region in regions
        for p in (region / "blobs").rglob("*")
        if p.is_file() and not p.is_symlink()
    }


def _two_versions(tmp_path: Path, count: int = 2, **options) -> tuple[list[Path], Store]:
    paths = _regions(tmp_path, count)
    store = _store(paths, **options)
    _save(store, "run", _data("v1"), step=1)
    _save(store, "run", _data("v2"), step=2)
    return paths, store


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, env=dict(os.environ), cwd=cwd)


def _region_args(paths: list[Path]) -> list[str]:
    return [arg for p in paths for arg in ("--region", str(p))]


def _one_line_error(result: subprocess.CompletedProcess[str], code: int = 2) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == code, f"rc={result.returncode}\n{output}"
    assert "Traceback" not in output, output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# -- crafted manifest fields: each one is a damaged copy, never a crash ---------------------------------------
def _text_edit(old: str, new: str):
    def edit(text: str) -> str:
        assert old in text
        return text.replace(old, new, 1)

    return edit


def _entry_edit(field: str, value):
    def edit(text: str) -> str:
        raw = json.loads(text)
        raw["entries"][0][field] = value
        return reseal(raw).decode()

    return edit


def _field_edit(field: str, value):
    def edit(text: str) -> str:
        raw = json.loads(text)
        raw[field] = value
        return reseal(raw).decode()

    return edit


def _delta_chain(length: int):
    def edit(text: str) -> str:
        raw = json.loads(text)
        reference = raw["entries"][0]["chunks"][0]
        node = reference
        for _ in range(length):  # each parent a copy of the plain reference: a chain of `length` parents
            node["parent"] = {**{k: v for k, v in reference.items() if k != "parent"}}
            node["parent"].update(codec="zstd", stored_size=reference["size"], decoded_digest=reference["digest"])
            node = node["parent"]
        reference.update(codec="zstd", stored_size=reference["size"], decoded_digest=reference["digest"])
        return reseal(raw).decode()

    return edit


CRAFTED_FIELDS = {
    "version-5000-digits": _text_edit('"version":2', '"version":' + "9" * 5000),  # over Python's int limit
    "step-5000-digits": _text_edit('"step":2', '"step":' + "9" * 5000),
    "step-1e400": _text_edit('"step":2', '"step":1e400'),  # parses as inf
    "metadata-nested-100000": _text_edit('"metadata":{}', '"metadata":' + "[" * 100_000 + "]" * 100_000),
    "metadata-nested-object-5000": _text_edit('"metadata":{}', '"metadata":' + '{"a":' * 5000 + "1" + "}" * 5000),
    "bom-prefix": lambda text: "\ufeff" + text,
    "utf16": lambda text: text,  # replaced below: the same JSON in UTF-16
    "trailing-garbage": lambda text: text + "{}",
    "two-documents": lambda text: text + "\n" + text,
    "not-an-object": lambda text: "[" + text + "]",
    "name-traversal": _entry_edit("name", "../../etc/passwd"),
    "name-absolute": _entry_edit("name", "/etc/passwd"),
    "name-drive": _entry_edit("name", "C:w"),
    "name-backslash": _entry_edit("name", "..\\..\\w"),
    "name-nul": _entry_edit("name", "w\x00x"),
    "name-dot-component": _entry_edit("name", "a/./w"),
    "name-5000-chars": _entry_edit("name", "w" * 5000),
    "kind-pickle": _entry_edit("kind", "pickle"),
    "size-negative": _entry_edit("size", -1),
    "size-bool": _entry_edit("size", True),
    "size-huge": _entry_edit("size", 2**70),
    "chunks-not-a-list": _entry_edit("chunks", {"digest": "x"}),
    "digest-path": _entry_edit("chunks", [{"digest": "blake3:../../../../etc/passwd", "size": 3000}]),
    "digest-upper": _entry_edit("chunks", [{"digest": "blake3:" + "AB" * 32, "size": 3000}]),
    "digest-md5": _entry_edit("chunks", [{"digest": "md5:" + "ab" * 16, "size": 3000}]),
    "delta-chain-9": _delta_chain(9),
    "delta-chain-300": _delta_chain(300),
    "format-version-string": _field_edit("format_version", "1"),
    "format-version-bool": _field_edit("format_version", True),
    "format-version-3": _field_edit("format_version", 3),
    "version-bool": _field_edit("version", True),
    "version-of-another": _field_edit("version", 1),  # v1's number under v2's name
    "lineage-of-another": _field_edit("lineage", "other"),
    "signature-a-string": _field_edit("signature", "trust me"),
    "placement-nowhere": _field_edit("placement", "nowhere"),
    "unknown-field": _field_edit("evil", {"x": 1}),
    "entries-null": _field_edit("entries", None),
    "tree-nested-400": _field_edit("tree", json.loads('{"list":[' * 400 + "]}" * 400)),
}


@pytest.mark.parametrize("case", sorted(CRAFTED_FIELDS))
def test_a_crafted_manifest_is_a_damaged_copy_served_by_the_other_region_and_repaired(tmp_path: Path, case: str):
    """One region's copy of the newest manifest is crafted; the other region serves it, verify names the
    crafted copy, repair replaces it, and the crafted copy in every region leaves v1 the latest."""
    (a, b), store = _two_versions(tmp_path)
    path = manifest_path(a, "run", 2)
    text = path.read_text()
    crafted = CRAFTED_FIELDS[case](text)
    path.write_bytes(crafted.encode("utf-16") if case == "utf16" else crafted.encode("utf-8", "surrogatepass"))
    assert path.read_bytes() != manifest_path(b, "run", 2).read_bytes()
    assert read_entry(store, "run") == (2, _data("v2"))
    report = verify_store(store)
    assert not report.healthy
    assert [(p.region, p.version) for p in report.problems] == [(str(a), 2)], report.problems
    assert all(len(p.detail) < 2000 for p in report.problems), "a problem's text is bounded, whatever the record"
    repaired = verify_store(store, repair=True)
    assert repaired.healthy, repaired.problems
    assert path.read_bytes() == manifest_path(b, "run", 2).read_bytes()

    # the same craft in every region: the version is damaged everywhere and latest is the version below
    path.write_bytes(crafted.encode("utf-16") if case == "utf16" else crafted.encode("utf-8", "surrogatepass"))
    shutil.copyfile(path, manifest_path(b, "run", 2))
    assert read_entry(store, "run") == (1, _data("v1"))
    assert [info.version for info in store.list("run")] == [1]
    with pytest.raises(CheckpointNotFoundError):
        read_entry(store, "run", 2)
    assert not verify_store(store).healthy


# -- state trees the loader cannot decode -------------------------------------------------------------------
TREE_DEFECTS = {
    "float-not-hex": lambda raw: raw.__setitem__("tree", {"dict": [["a", {"float": "garbage"}]]}),
    "nan-not-hex": lambda raw: raw.__setitem__("tree", {"dict": [["a", {"float": "nan:zz"}]]}),
    "names-a-missing-entry": lambda raw: raw.__setitem__("tree", {"dict": [["a", {"tensor": "nope"}]]}),
    "tensor-entry-as-bytes": lambda raw: raw.__setitem__("tree", {"dict": [["a", {"bytes": "w"}]]}),
    "dtype-object": lambda raw: raw["entries"][0].__setitem__("dtype", "object"),
    "shape-disagrees-with-size": lambda raw: raw["entries"][0].__setitem__("shape", [3]),
}


def _tensor_versions(tmp_path: Path) -> tuple[list[Path], CheckpointStore]:
    paths = _regions(tmp_path, 1)
    block = CheckpointStore(regions=[str(p) for p in paths])
    block.save_checkpoint({"w": torch.arange(6.0), "n": 1}, lineage="run", step=1)
    block.save_checkpoint({"w": torch.arange(6.0) + 1, "n": 2}, lineage="run", step=2)
    return paths, block


@pytest.mark.parametrize("defect", sorted(TREE_DEFECTS))
def test_a_version_whose_tree_cannot_be_decoded_is_not_reported_healthy(tmp_path: Path, defect: str):
    (a,), block = _tensor_versions(tmp_path)
    raw = raw_manifest(a, "run", 2)
    TREE_DEFECTS[defect](raw)
    manifest_path(a, "run", 2).write_bytes(reseal(raw))
    with pytest.raises(CheckpointError):
        block.load_checkpoint(lineage="run", version=2)
    assert not verify_store(block.core).healthy


def test_a_bytes_node_naming_a_tensor_entry_is_the_stores_error(tmp_path: Path):
    (a,), block = _tensor_versions(tmp_path)
    raw = raw_manifest(a, "run", 2)
    TREE_DEFECTS["tensor-entry-as-bytes"](raw)
    manifest_path(a, "run", 2).write_bytes(reseal(raw))
    # a damaged copy (core/state_tree.py): "latest" falls back to v1, and v2 by number is the store's error
    assert block.load_checkpoint(lineage="run")["n"] == 1
    with pytest.raises(CheckpointError, match="lists as tensor"):
        block.load_checkpoint(lineage="run", version=2)
    # and the loader itself, given such a tree (a tree from elsewhere, DCP's rank state), says so too
    with pytest.raises(ManifestError, match="as bytes"):
        decode_tree({"bytes": "w"}, {"w": torch.ones(2)})


def test_trees_a_writer_may_legitimately_make_load_exactly(tmp_path: Path):
    """Keys that look like path tricks, unicode look-alikes and normalisation twins, huge ints and
    aliases: every one is its own leaf, loaded exactly (entry names are percent-encoded, never paths)."""
    (a,) = _regions(tmp_path, 1)
    block = CheckpointStore(regions=[str(a)])
    state = {
        "a/b": torch.tensor([1.0]),
        "a": {"b": torch.tensor([2.0])},
        "..": torch.tensor([3.0]),
        ".": torch.tensor([4.0]),
        "": torch.tensor([5.0]),
        "%": torch.tensor([6.0]),
        "%2F": torch.tensor([7.0]),
        "é": torch.tensor([8.0]),
        "e\u0301": torch.tensor([9.0]),  # the same glyph, NFD
        "w\u2215x": torch.tensor([10.0]),  # DIVISION SLASH
        "\u202eevil": torch.tensor([11.0]),  # RIGHT-TO-LEFT OVERRIDE
        1: torch.tensor([12.0]),
        "1": torch.tensor([13.0]),
        "#1": torch.tensor([14.0]),
        "big": 2**200,
        "neg": -(2**100),
        "nan": float("nan"),
        "negzero": -0.0,
        "deep": [[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]],
    }
    block.save_checkpoint(state, lineage="run", step=1)
    loaded = block.load_checkpoint(lineage="run")
    assert list(loaded) == list(state)
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(loaded[key], value), key
    assert loaded["a"]["b"].item() == 2.0 and loaded["big"] == 2**200 and loaded["neg"] == -(2**100)
    assert loaded["nan"] != loaded["nan"] and str(loaded["negzero"]) == "-0.0"
    assert loaded["deep"] == state["deep"]
    assert verify_store(block.core).healthy


# -- blobs: swapped, truncated, extended, replaced ------------------------------------------------------------
def _blob_path(region: Path, store: Store, version: int) -> Path:
    digest = store.resolve("run", version)[0].entries[0].chunks[0].digest
    return region / blob_key(digest)


BLOB_DAMAGE = ["swapped-for-another-blob", "truncated", "extended", "emptied", "link-to-the-good-copy", "bit-flip"]


def _damage_blob(path: Path, other: Path, how: str) -> None:
    data = path.read_bytes()
    path.unlink()
    if how == "swapped-for-another-blob":
        path.write_bytes(other.read_bytes())  # same size, valid blob of another version: the name is the check
    elif how == "truncated":
        path.write_bytes(data[:-1])
    elif how == "extended":
        path.write_bytes(data + b"\x00")
    elif how == "emptied":
        path.write_bytes(b"")
    elif how == "link-to-the-good-copy":
        path.symlink_to(other)
    elif how == "bit-flip":
        path.write_bytes(bytes([data[0] ^ 1]) + data[1:])


@pytest.mark.parametrize("how", BLOB_DAMAGE)
def test_a_damaged_blob_under_a_signed_manifest_is_served_from_the_other_region_and_repaired(tmp_path: Path, how: str):
    (a, b), store = _two_versions(tmp_path, signed=True)
    target = _blob_path(a, store, 2)
    other = _blob_path(a, store, 1) if how != "link-to-the-good-copy" else _blob_path(b, store, 2)
    _damage_blob(target, other, how)

    assert read_entry(store, "run") == (2, _data("v2"))
    report = verify_store(store)
    assert not report.healthy
    assert {p.region for p in report.problems} == {str(a)}
    assert verify_store(store, repair=True).healthy
    assert target.is_file() and not target.is_symlink() and hash_bytes(target.read_bytes()).endswith(target.name)
    assert read_entry(store, "run", 1) == (1, _data("v1"))


@pytest.mark.parametrize("how", [h for h in BLOB_DAMAGE if h != "link-to-the-good-copy"])
def test_a_damaged_blob_in_every_region_is_never_wrong_bytes(tmp_path: Path, how: str):
    """A blob of the wrong size makes its version inconsistent (latest is the one below); one of the
    right size but wrong content is found by its digest (BlobUnavailableError); never v2 with other bytes."""
    (a,), store = _two_versions(tmp_path, count=1, signed=True)
    _damage_blob(_blob_path(a, store, 2), _blob_path(a, store, 1), how)
    if how in ("swapped-for-another-blob", "bit-flip"):
        with pytest.raises(BlobUnavailableError, match="no intact copy"):
            read_entry(store, "run")
    else:
        assert read_entry(store, "run") == (1, _data("v1"))
        with pytest.raises(CheckpointError):
            read_entry(store, "run", 2)
    assert read_entry(store, "run", 1) == (1, _data("v1"))
    report = verify_store(store)
    assert not report.healthy and {p.version for p in report.problems if p.version is not None} <= {2}


# -- signed manifests replayed, moved, or naming another lineage's blobs -------------------------------------
def test_a_replayed_older_signed_manifest_never_loads_as_a_newer_version(tmp_path: Path):
    (a, b), store = _two_versions(tmp_path, signed=True)
    _save(store, "other", _data("o1"))
    # v1's signed bytes as v3, and lineage other's v1 as run v4: valid signatures, wrong places
    for region in (a, b):
        shutil.copyfile(manifest_path(region, "run", 1), manifest_path(region, "run", 3))
        shutil.copyfile(manifest_path(region, "other", 1), manifest_path(region, "run", 4))
    for read in (lambda: store.resolve("run"), lambda: store.list("run")):
        with pytest.raises(ManifestError, match="version 4"):
            read()
    assert read_entry(store, "run", 2) == (2, _data("v2"))  # asked for by number, the real ones load
    assert read_entry(store, "other") == (1, _data("o1"))
    report = verify_store(store)
    assert not report.healthy and {p.version for p in report.problems} == {3, 4}


def test_a_replayed_signed_manifest_in_place_of_a_lost_copy_is_replaced_by_repair(tmp_path: Path):
    (a, b), store = _two_versions(tmp_path, signed=True)
    manifest_path(a, "run", 2).unlink()
    shutil.copyfile(manifest_path(a, "run", 1), manifest_path(a, "run", 2))  # an older signed manifest under v2's name
    assert read_entry(store, "run") == (2, _data("v2"))
    assert not verify_store(store).healthy
    assert verify_store(store, repair=True).healthy
    assert manifest_path(a, "run", 2).read_bytes() == manifest_path(b, "run", 2).read_bytes()


def test_an_unsigned_manifest_added_to_a_signing_store_is_refused(tmp_path: Path):
    """A region writer without the key writes a whole new, internally consistent v3 naming the other
    lineage's blob: on a signing store it is damage, and latest stops rather than serving it."""
    (a, b), store = _two_versions(tmp_path, signed=True)
    _save(store, "other", _data("o1"))
    raw = raw_manifest(a, "other", 1)
    raw.update(lineage="run", version=3, signature=None)
    for region in (a, b):
        manifest_path(region, "run", 3).write_bytes(reseal(raw))
    with pytest.raises(ManifestError):
        read_entry(store, "run")
    assert read_entry(store, "run", 2) == (2, _data("v2"))


# -- compressed and delta chunks -----------------------------------------------------------------------------
def _compressed_versions(tmp_path: Path, **options) -> tuple[Path, Store]:
    (a,) = _regions(tmp_path, 1)
    store = _store([a], codec="zstd", chunk_bytes=4096, **options)
    _save(store, "run", bytes(4096))
    _save(store, "run", b"ab" * 2048)
    return a, store


BOMBS = {
    # no decoded size in the header: a streaming decoder would inflate it without a bound
    "no-content-size": lambda: zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1 << 24)),
    # header says 4096 (right), a second frame follows with 16 MiB more
    "second-frame": lambda: (
        zstandard.ZstdCompressor().compress(b"a" * 4096) + zstandard.ZstdCompressor().compress(bytes(1 << 24))
    ),
    # header says 16 MiB, the manifest says 4096
    "header-bigger-than-size": lambda: zstandard.ZstdCompressor().compress(bytes(1 << 24)),
    "not-zstd": lambda: b"\x28\xb5\x2f\xfd" + bytes(60),
}


@pytest.mark.parametrize("bomb", sorted(BOMBS))
def test_a_zstd_bomb_in_a_compressed_chunk_is_refused_within_its_declared_size(tmp_path: Path, bomb: str):
    a, store = _compressed_versions(tmp_path)
    data = BOMBS[bomb]()
    digest = hash_bytes(data)
    (a / blob_key(digest)).parent.mkdir(parents=True, exist_ok=True)
    (a / blob_key(digest)).write_bytes(data)
    raw = raw_manifest(a, "run", 2)
    raw["entries"][0]["chunks"][0].update(digest=digest, stored_size=len(data))
    manifest_path(a, "run", 2).write_bytes(reseal(raw))

    with pytest.raises(BlobUnavailableError):
        read_entry(store, "run")
    assert read_entry(store, "run", 1) == (1, bytes(4096))
    report = verify_store(store, decode=True)
    assert not report.healthy and any(p.kind == "corrupt" for p in report.problems)


def test_a_chunk_claiming_more_than_the_zstd_ratio_bound_is_damage(tmp_path: Path):
    a, store = _compressed_versions(tmp_path)
    raw = raw_manifest(a, "run", 2)
    chunk = raw["entries"][0]["chunks"][0]
    chunk["size"] = raw["entries"][0]["size"] = chunk["stored_size"] * 2**15 + 1
    manifest_path(a, "run", 2).write_bytes(reseal(raw))
    assert read_entry(store, "run") == (1, bytes(4096))  # never allocated: the schema refuses the claim
    assert not verify_store(store).healthy


def test_a_delta_chunk_that_names_itself_as_parent_is_refused(tmp_path: Path):
    (a,) = _regions(tmp_path, 1)
    store = _store([a], codec="zstd", chunk_bytes=4096, delta=True)
    base = bytearray(_data("base", 4096))
    _save(store, "run", bytes(base))
    base[:3] = b"xyz"
    _save(store, "run", bytes(base))  # a delta of v1
    raw = raw_manifest(a, "run", 2)
    chunk = raw["entries"][0]["chunks"][0]
    assert "parent" in chunk, chunk
    chunk["parent"] = {k: v for k, v in chunk.items()}  # the chunk its own parent: a loop unrolled once
    manifest_path(a, "run", 2).write_bytes(reseal(raw))
    with pytest.raises(BlobUnavailableError):
        read_entry(store, "run")
    assert read_entry(store, "run", 1) == (1, _data("base", 4096))
    assert not verify_store(store, decode=True).healthy


# -- stray files in every directory of the layout -------------------------------------------------------------
STRAYS = {
    # path (BLOB: the path of the saved blob), what it is
    "manifests/000000000000.json": ("lineages/run/manifests/000000000000.json", "empty"),
    "manifests/editor backup~": ("lineages/run/manifests/000000000001.json~", "copy"),
    "manifests/vim swap": ("lineages/run/manifests/.000000000001.json.swp", "text"),
    "manifests/.bak": ("lineages/run/manifests/000000000001.json.bak", "copy"),
    "manifests/11 digits": ("lineages/run/manifests/00000000001.json", "copy"),
    "manifests/13 digits": ("lineages/run/manifests/0000000000001.json", "copy"),
    "manifests/arabic-indic digits": ("lineages/run/manifests/" + "\u0660" * 11 + "\u0663.json", "empty"),
    "manifests/fullwidth digits": ("lineages/run/manifests/" + "\uff10" * 11 + "\uff13.json", "empty"),
    "manifests/notes dir": ("lineages/run/manifests/notes", "dir"),
    "lineage/notes": ("lineages/run/notes.txt", "text"),
    "lineage/README dir": ("lineages/run/old", "dir"),
    "lineages/fullwidth name": ("lineages/\uff52\uff55\uff4e", "dir"),
    "lineages/steps file": ("lineages/run.steps", "text"),
    "lineages/empty lineage dir": ("lineages/run2", "dir"),
    "lineages/lineage with only a stray": ("lineages/run3/manifests/notes", "text"),
    "blobs/README": ("blobs/README", "text"),
    "blobs/algo README": ("blobs/blake3/README", "text"),
    "blobs/sha256 is a file": ("blobs/sha256", "text"),
    "blobs/md5 tree": ("blobs/md5/aa/" + "aa" * 16, "text"),
    "blobs/backup of a blob": ("BLOB~", "copy-blob"),
    "blobs/partial download": ("BLOB.part", "copy-blob"),
    "blobs/uppercase digest": ("BLOB-UPPER", "copy-blob"),
    "blobs/bad fanout": ("blobs/blake3/zz/" + "ab" * 32, "text"),
    "blobs/user temp": ("blobs/blake3/ab/.tmp-notes", "text"),
    "root/README": ("README.txt", "text"),
    "root/marker is a directory": ("prefect-recovery-region.json", "dir"),
    "root/.DS_Store": (".DS_Store", "empty"),
    "preflight/notes": ("preflight/notes", "text"),
    "preflight/user temp": ("preflight/.tmp-notes.txt", "text"),
}


def _put_stray(region: Path, store: Store, relpath: str, what: str) -> Path:
    blob = _blob_path(region, store, 1)
    if relpath.startswith("BLOB"):
        suffix = relpath[4:]
        path = blob.parent / (blob.name.upper() if suffix == "-UPPER" else blob.name + suffix)
    else:
        path = region / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    if what == "empty":
        path.write_bytes(b"")
    elif what == "text":
        path.write_text("user notes\n")
    elif what == "dir":
        path.mkdir()
        (path / "keep.txt").write_text("user data")
    elif what == "copy":
        path.write_bytes(manifest_path(region, "run", 1).read_bytes())
    elif what == "copy-blob":
        path.write_bytes(blob.read_bytes())
    return path


def _tree_state(root: Path) -> dict[str, bytes | None]:
    return {str(p): (None if p.is_dir() else p.read_bytes()) for p in [root, *root.rglob("*")] if not p.is_symlink()}


@pytest.mark.parametrize("stray", sorted(STRAYS))
def test_a_stray_entry_anywhere_in_the_layout_is_skipped_and_never_touched(tmp_path: Path, stray: str):
    (a, _b), store = _two_versions(tmp_path)
    path = _put_stray(a, store, *STRAYS[stray])
    before = _tree_state(path)
    _age(a)

    assert [(info.lineage, info.version) for info in store.list()] == [("run", 1), ("run", 2)]
    assert _save(store, "run", _data("v3")).version == 3
    assert read_entry(store, "run") == (3, _data("v3"))
    assert read_entry(store, "run", 1) == (1, _data("v1"))
    report = verify_store(store, repair=True)
    assert report.healthy, report.problems
    audit = audit_store(store, gc_grace=HOUR)
    assert audit.healthy, audit.markdown()
    assert all(read_entry(store, "run", info.version)[0] == info.version for info in store.list("run"))
    gc = collect_garbage(store, grace=HOUR)
    assert gc.swept, gc
    assert _tree_state(path) == before, "a stray entry was changed or deleted"
    assert all(read_entry(store, "run", info.version)[0] == info.version for info in store.list("run"))


def test_a_directory_in_a_manifests_place_is_reported_kept_and_never_blocks_saves(tmp_path: Path):
    (a, b), store = _two_versions(tmp_path)
    for version in (5, 999999999999):
        (manifest_path(a, "run", version)).mkdir()
        (manifest_path(a, "run", version) / "keep.txt").write_text("mine")
    blobs = _blob_files([a, b])
    _age(a)
    _age(b)

    info = _save(store, "run", _data("v3"))
    assert 2 < info.version < 999999999999
    assert read_entry(store, "run") == (info.version, _data("v3"))
    report = verify_store(store, repair=True)
    assert any("repair failed" in p.detail or not p.repaired for p in report.problems)
    gc = collect_garbage(store, grace=HOUR)
    assert not gc.swept  # what a manifest path that cannot be read names is unknown: nothing is swept
    assert all(_blob_files([a, b]).get(k) == v for k, v in blobs.items())
    assert (manifest_path(a, "run", 5) / "keep.txt").read_text() == "mine"


# -- stray files in the journal -----------------------------------------------------------------------------
JOURNAL_STRAYS = {
    "empty highest seq": ("999999999999.json", "empty"),
    "empty seq in the middle": ("000000000002.json", "empty"),
    "directory at a seq": ("000000000002.json", "dir"),
    "dangling link at a seq": ("000000000002.json", "link"),
    "seq 0": ("000000000000.json", "empty"),
    "arabic-indic digits": ("\u0660" * 11 + "\u0662.json", "text"),
    "editor backup": ("000000000001.json~", "text"),
    "notes": ("notes.txt", "text"),
}


@pytest.mark.parametrize("stray", sorted(JOURNAL_STRAYS))
def test_a_stray_file_in_the_journal_never_stops_reads_or_appends(tmp_path: Path, stray: str):
    a, b = _regions(tmp_path)
    store = _store([a, b])
    journal = Journal(store, "run")
    journal.append("run_started", run_id="r1", data={})
    name, what = JOURNAL_STRAYS[stray]
    path = a / "lineages" / "run" / "journal" / name
    if what == "empty":
        path.write_bytes(b"")
    elif what == "text":
        path.write_text("user notes\n")
    elif what == "dir":
        path.mkdir()
    else:
        path.symlink_to(tmp_path / "nowhere")

    assert [event.kind for event in journal.events()] == ["run_started"]
    appended = journal.append("run_finished", run_id="r1", data={"final_version": None, "final_digest": None})
    assert appended.seq < 999999999999
    assert [event.kind for event in journal.events()] == ["run_started", "run_finished"]
    assert journal.history().status == "finished"
    assert path.is_symlink() or path.exists()  # never deleted


def test_a_damaged_event_stops_history_with_a_message_that_names_the_file_and_the_fix(tmp_path: Path):
    a, b = _regions(tmp_path)
    store = _store([a, b])
    journal = Journal(store, "run")
    journal.append("run_started", run_id="r1", data={})
    _save(store, "run", _data("v1"))
    bad = a / journal_key("run", 2)
    bad.write_text("user notes, not JSON")  # not an empty file: it may be a rotten event, so it is a hole

    with pytest.raises(JournalError) as raised:
        journal.events()
    message = str(raised.value)
    assert "000000000002.json" in message and "move it out" in message and "intact copy" in message
    line = _one_line_error(run_cli("history", "--lineage", "run", *_region_args([a, b])))
    assert "000000000002.json" in line
    assert read_entry(store, "run") == (1, _data("v1"))  # checkpoints do not depend on the journal


def test_recover_without_a_lineage_names_the_journal_it_cannot_read_and_the_way_out(tmp_path: Path):
    """``recover`` picks the latest unfinished lineage from every journal: one it cannot read may be the
    crashed run's, so it refuses (before any flow run) naming that lineage and --lineage."""
    a, b = _regions(tmp_path)
    store = _store([a, b])
    Journal(store, "good").append("run_started", run_id="r1", data={})
    Journal(store, "bad").append("run_started", run_id="r2", data={})
    for region in (a, b):
        (region / journal_key("bad", 1)).write_text("rotten")
    result = run_cli("recover", *_region_args([a, b]))
    line = _one_line_error(result)
    assert "'bad'" in line and "--lineage" in line and "000000000001.json" in line
    assert "temporary server" not in result.stdout + result.stderr  # refused before any flow run


def _event_dup_key(text: str) -> str:
    return '{"seq":1,' + text[1:]


def _event_field(field: str, value):
    def edit(text: str) -> str:
        raw = json.loads(text)
        raw[field] = value
        return json.dumps(raw, separators=(",", ":"), sort_keys=True)

    return edit


CRAFTED_EVENTS = {
    "duplicate-key": _event_dup_key,
    "lone-surrogate": lambda text: text.replace('"data":{}', '"data":{"x":"\\ud800"}', 1),  # the escape, as text
    "int-5000-digits": lambda text: text.replace('"data":{}', '"data":{"x":' + "9" * 5000 + "}", 1),
    "nested-100000": lambda text: text.replace('"data":{}', '"data":{"x":' + "[" * 100_000 + "]" * 100_000 + "}", 1),
    "over-1-MiB": lambda text: text.replace('"data":{}', '"data":{"x":"' + "a" * (1 << 20) + '"}', 1),
    "seq-string": _event_field("seq", "2"),
    "seq-of-another": _event_field("seq", 1),
    "lineage-of-another": _event_field("lineage", "other"),
    "kind-unknown": _event_field("kind", "run_deleted"),
    "run-id-empty": _event_field("run_id", ""),
    "extra-field": _event_field("evil", True),
    "data-a-list": _event_field("data", []),
    "nan": lambda text: text.replace('"data":{}', '"data":{"x":NaN}', 1),
    "not-utf8": lambda text: (
        text.replace('"data":{}', '"data":{"x":"\udcff"}', 1).encode("utf-8", "surrogateescape").decode("latin-1")
    ),
}


@pytest.mark.parametrize("case", sorted(CRAFTED_EVENTS))
def test_a_crafted_event_copy_is_skipped_for_the_good_copy_and_a_hole_when_it_is_every_copy(tmp_path: Path, case: str):
    a, b = _regions(tmp_path)
    store = _store([a, b])
    journal = Journal(store, "run")
    journal.append("run_started", run_id="r1", data={})
    journal.append("run_finished", run_id="r1", data={})
    path = a / journal_key("run", 2)
    crafted = CRAFTED_EVENTS[case](path.read_text())
    path.write_bytes(crafted.encode("latin-1") if case == "not-utf8" else crafted.encode())
    assert path.read_bytes() != (b / journal_key("run", 2)).read_bytes()

    assert [event.kind for event in journal.events()] == ["run_started", "run_finished"]
    found = journal.read()
    assert list(found.skipped_copies) == [2] and str(a) in found.skipped_copies[2]
    assert len(found.skipped_copies[2][str(a)]) < 2000

    shutil.copyfile(path, b / journal_key("run", 2))
    with pytest.raises(JournalError, match="event 2"):
        journal.events()


def test_verify_reports_a_journal_hole(tmp_path: Path):
    (a,) = _regions(tmp_path, 1)
    store = _store([a])
    Journal(store, "run").append("run_started", run_id="r1", data={})
    (a / journal_key("run", 1)).write_text("rotten")
    with pytest.raises(JournalError):
        Journal(store, "run").events()
    assert not verify_store(store).healthy


def test_a_replayed_signed_event_at_a_new_seq_is_never_history(tmp_path: Path):
    a, b = _regions(tmp_path)
    store = _store([a, b], signed=True)
    journal = Journal(store, "run")
    journal.append("run_started", run_id="r1", data={})
    journal.append("failure", run_id="r1", data={"step": "train", "error": "boom", "final": True, "attempt": 1})
    for region in (a, b):  # the signed run_started again as seq 3: the run would look restarted
        shutil.copyfile(region / journal_key("run", 1), region / journal_key("run", 3))
    with pytest.raises(JournalError):
        journal.events()
    for region in (a, b):
        (region / journal_key("run", 3)).unlink()
    (a / journal_key("run", 2)).unlink()
    shutil.copyfile(a / journal_key("run", 1), a / journal_key("run", 2))  # one region's copy replayed
    assert [event.kind for event in journal.events()] == ["run_started", "failure"]


# -- GC and the audit against crafted files -------------------------------------------------------------------
def _move_out_and_link(path: Path, outside: Path) -> None:
    path.rename(outside)
    path.symlink_to(outside, target_is_directory=outside.is_dir())


@pytest.mark.parametrize("what", ["lineage directory", "manifests directory", "manifest file", "fifo manifest"])
def test_gc_never_sweeps_blobs_named_by_manifests_it_cannot_read(tmp_path: Path, what: str):
    """An operator moved a lineage to another disk and linked it back, or an attacker put a FIFO where a
    manifest goes: the manifests there cannot be read, so GC cannot know what they name and sweeps nothing."""
    (a,), store = _two_versions(tmp_path, count=1)
    blobs = _blob_files([a])
    lineage_dir = a / "lineages" / "run"
    moved = tmp_path / "moved"
    if what == "lineage directory":
        _move_out_and_link(lineage_dir, moved)
    elif what == "manifests directory":
        _move_out_and_link(lineage_dir / "manifests", moved)
    elif what == "manifest file":
        _move_out_and_link(manifest_path(a, "run", 1), moved)
    else:
        os.mkfifo(manifest_path(a, "run", 3))
    _age(a)

    report = collect_garbage(store, grace=HOUR)
    assert not report.swept and report.refusals, report
    audit_store(store, gc_grace=HOUR)
    assert _blob_files([a]) == blobs
    if what != "fifo manifest":  # the operator puts the directory back: everything is there
        link = (
            lineage_dir
            if what == "lineage directory"
            else (lineage_dir / "manifests" if what == "manifests directory" else manifest_path(a, "run", 1))
        )
        link.unlink()
        moved.rename(link)
    else:
        manifest_path(a, "run", 3).unlink()
    assert read_entry(store, "run", 1) == (1, _data("v1")) and read_entry(store, "run") == (2, _data("v2"))


@pytest.mark.parametrize("what", ["lineage directory", "manifests directory"])
def test_verify_reports_a_linked_lineage_directory(tmp_path: Path, what: str):
    (a,), store = _two_versions(tmp_path, count=1)
    lineage_dir = a / "lineages" / "run"
    _move_out_and_link(lineage_dir if what == "lineage directory" else lineage_dir / "manifests", tmp_path / "moved")
    report = verify_store(store)
    assert not report.healthy
    assert any("symbolic link" in p.detail for p in report.problems)


def test_gc_keeps_user_temp_names_with_non_ascii_digits(tmp_path: Path):
    """Only the store's own temp names are swept: ``\\d`` would also match other scripts' digits."""
    (a,), store = _two_versions(tmp_path, count=1)
    user = a / "lineages" / "run" / "manifests" / (".tmp-" + "\u0661" * 12 + ".json-" + "0" * 32)
    user.write_text("user data")
    ours = a / "lineages" / "run" / "manifests" / (".tmp-" + "1" * 12 + ".json-" + "0" * 32)
    ours.write_text("half a manifest")
    _age(a)
    report = collect_garbage(store, grace=HOUR)
    assert user.read_text() == "user data"
    assert not ours.exists()
    assert report.temp_files_deleted == {str(a): 1}


def test_a_crafted_uncommitted_manifest_does_not_make_gc_delete_a_kept_versions_blobs(tmp_path: Path):
    """A forged v3 in one region of a quorum-2 store (below quorum, old, naming v2's blob under another
    size): GC may remove the stale v3, never the blob v2 needs."""
    (a, b), store = _two_versions(tmp_path, quorum=2)
    raw = raw_manifest(a, "run", 2)
    raw["version"] = 3
    raw["entries"][0]["chunks"][0]["size"] += 1
    raw["entries"][0]["size"] += 1
    manifest_path(a, "run", 3).write_bytes(reseal(raw))
    _save(store, "run", _data("v4"))
    _age(a)
    _age(b)
    collect_garbage(store, grace=HOUR)
    audit_store(store, gc_grace=HOUR)
    for version, seed in ((2, "v2"), (4, "v4")):
        assert read_entry(store, "run", version) == (version, _data(seed))


@pytest.mark.parametrize("delta", [1, -1])
def test_a_manifest_of_another_lineage_claiming_a_blob_with_another_size_never_costs_the_blob(
    tmp_path: Path, delta: int
):
    """A crafted lineage ``evil`` in every region names run's blob with a wrong size: verify blames evil,
    repair and the audit (with GC) never delete or rewrite the blob run's kept version needs."""
    (a, b), store = _two_versions(tmp_path)
    raw = raw_manifest(a, "run", 2)
    raw["lineage"], raw["version"] = "evil", 1
    raw["entries"][0]["size"] += delta
    raw["entries"][0]["chunks"][0]["size"] += delta
    for region in (a, b):
        manifest_path(region, "evil", 1).parent.mkdir(parents=True)
        manifest_path(region, "evil", 1).write_bytes(reseal(raw))
    blobs = _blob_files([a, b])
    _age(a)
    _age(b)

    report = verify_store(store, repair=True)
    assert not report.healthy and {p.object for p in report.problems} and all(p.version == 1 for p in report.problems)
    audit_store(store, gc_grace=HOUR)
    collect_garbage(store, grace=HOUR)
    assert _blob_files([a, b]) == blobs
    assert read_entry(store, "run") == (2, _data("v2")) and read_entry(store, "run", 1) == (1, _data("v1"))


def test_forged_newer_versions_on_a_signing_store_never_push_real_versions_out_of_retention(tmp_path: Path):
    """keep_last=3 and three forged unsigned versions above three real ones: retention must not count the
    forged ones as the newest three and delete the real v1..v3."""
    from prefect_recovery.core import RetentionPolicy, apply_retention, plan_retention

    a, b = _regions(tmp_path)
    store = _store([a, b], signed=True)
    for version in (1, 2, 3):
        _save(store, "run", _data(f"v{version}"), step=version)
    for version in (4, 5, 6):
        raw = raw_manifest(a, "run", 3)
        raw.update(version=version, step=version, signature=None)
        for region in (a, b):
            manifest_path(region, "run", version).write_bytes(reseal(raw))
    _age(a)
    _age(b)

    policy = RetentionPolicy(keep_last=3)
    audit_store(store, policy=policy, gc_grace=HOUR)
    try:
        apply_retention(store, plan_retention(store, policy))
    except CheckpointError:
        pass  # refusing is fine; deleting is not
    collect_garbage(store, grace=HOUR)
    for version in (1, 2, 3):
        assert read_entry(store, "run", version) == (version, _data(f"v{version}"))


# -- wrong credentials and unreachable regions --------------------------------------------------------------
@pytest.mark.parametrize("wrong", ["same key id, another secret", "same key id, another algorithm"])
def test_a_store_opened_with_the_wrong_signing_key_says_so_and_never_prints_a_key(tmp_path: Path, wrong: str):
    """Every manifest fails alike: the error must say the key may be wrong (not only 'tampering'),
    carry no key material, and nothing is repaired or deleted on its word."""
    from prefect_recovery.core import ManifestSignatureError, ed25519_key
    from prefect_recovery.core.signing import new_ed25519_key_pem

    (a, b), store = _two_versions(tmp_path, signed=True)
    blobs = _blob_files([a, b])
    manifests = {p: p.read_bytes() for region in (a, b) for p in (region / "lineages").rglob("*.json")}
    other_secret = "w" * 40
    if wrong.endswith("secret"):
        keyring = Keyring(hmac_key("k1", other_secret))
    else:
        private_pem, _public = new_ed25519_key_pem()
        keyring = Keyring(ed25519_key("k1", private_pem))
    wrong_store = _store([a, b], signed=False)
    wrong_store.keyring = keyring
    with pytest.raises(ManifestSignatureError) as raised:
        read_entry(wrong_store, "run")
    message = str(raised.value)
    assert "check the secret" in message or "signing_algorithm" in message
    assert SECRET[:10] not in message and other_secret[:10] not in message and "PRIVATE" not in message
    verify_store(wrong_store, repair=True)
    audit_store(wrong_store, gc_grace=HOUR)
    assert _blob_files([a, b]) == blobs
    assert {p: p.read_bytes() for p in manifests} == manifests
    assert read_entry(store, "run") == (2, _data("v2"))  # the right key still loads everything


def test_a_store_none_of_whose_regions_answers_says_so_instead_of_empty(tmp_path: Path):
    (a,) = _regions(tmp_path, 1)
    block = CheckpointStore(regions=[str(a)])
    block.save_checkpoint({"w": torch.ones(2)}, lineage="run", step=1)
    a.rename(tmp_path / "unmounted")  # the disk is gone
    with pytest.raises(RegionError):
        block.load_checkpoint(lineage="run")
    with pytest.raises(RegionError):
        block.latest("run")


# -- the CLI against a store full of strays and crafted records ------------------------------------------------
def test_the_cli_on_a_store_with_strays_everywhere_lists_verifies_audits_and_exports(tmp_path: Path):
    paths = _regions(tmp_path)
    block = CheckpointStore(regions=[str(p) for p in paths])
    block.save_checkpoint({"w": torch.arange(4.0)}, lineage="run", step=1)
    block.save_checkpoint({"w": torch.arange(4.0) + 1}, lineage="run", step=2)
    Journal(block.core, "run").append("run_started", run_id="r1", data={})
    a = paths[0]
    for relpath, what in [
        ("lineages/run/manifests/000000000000.json", "empty"),
        ("lineages/run/manifests/" + "\u0660" * 11 + "\u0663.json", "empty"),
        ("lineages/run/journal/999999999999.json", "empty"),
        ("lineages/run/journal/000000000005.json", "dir"),
        ("lineages/.DS_Store", "empty"),
        ("lineages/old run", "dir"),
        ("blobs/blake3/README", "text"),
        ("preflight/notes", "text"),
    ]:
        _put_stray(a, block.core, relpath, what)
    args = _region_args(paths)

    listed = run_cli("ls", "--json", *args)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert [(row["lineage"], row["version"]) for row in json.loads(listed.stdout)] == [("run", 1), ("run", 2)]
    verified = run_cli("verify", "--json", *args)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert any("old run" in note for note in json.loads(verified.stdout)["notes"])
    history = run_cli("history", "--lineage", "run", "--json", *args)
    assert history.returncode == 0, history.stdout + history.stderr
    assert [e["kind"] for e in json.loads(history.stdout)["events"]] == ["run_started"]
    audited = run_cli("audit", "--json", *args)
    assert audited.returncode == 0, audited.stdout + audited.stderr
    exported = run_cli("export", "--lineage", "run", "--to", str(tmp_path / "out"), "--json", *args)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert json.loads(exported.stdout)["version"] == 2
    assert (a / "lineages" / "run" / "manifests" / "000000000000.json").exists()


def test_the_cli_prints_crafted_record_text_as_text_never_as_terminal_codes_or_markup(tmp_path: Path):
    """A journal writer (any writer, on an unsigned store) controls step names, errors and run ids; a region
    writer names stray entries. `history`, `verify`, `audit` show them escaped: no escape sequence reaches the
    operator's terminal (clear screen, window title, hyperlink, a faked line), no bidi override reorders the
    text, and rich markup in them is text (``[/bold]`` made `history` fail with MarkupError)."""
    a, b = _regions(tmp_path)
    store = _store([a, b])
    journal = Journal(store, "run")
    journal.append("run_started", run_id="r1\x1b]0;PWNED\x07", data={})
    journal.append(
        "failure",
        run_id="r1",
        data={
            "step": "tr[/bold]ain\x1b[2J",
            "error": "boom \x1b]8;;http://evil\x07click\x1b]8;;\x07 \r\x1b[Kfake line "
            "[link=http://evil]x[/link] \u202egnp.exe",
            "final": True,
            "attempt": 1,
        },
    )
    _save(store, "run", _data("v1"))
    (a / "lineages" / "[bold]x\x1b[2J\u202e").mkdir()
    args = _region_args([a, b])

    outputs = []
    for command, code in ((["history", "--lineage", "run"], 0), (["verify"], 0), (["audit"], 0), (["ls"], 0)):
        result = run_cli(*command, *args)
        outputs.append(result.stdout + result.stderr)
        assert result.returncode == code, outputs[-1]
    text = "".join(outputs)
    assert "Traceback" not in text and "MarkupError" not in text
    assert not [c for c in text if c in "\x1b\x07\r\u202e"], "a control character or bidi override was printed"
    assert "tr[/bold]ain" in outputs[0] and "\\x1b" in outputs[0] and "[bold]x" in outputs[1]


@pytest.mark.parametrize("name", ["state.json", "tensors.safetensors"])
def test_export_force_never_writes_through_a_link_in_the_target_directory(tmp_path: Path, name: str):
    """Someone who can write into the export directory links state.json to a file of the operator's:
    `export --force` must not replace that file."""
    (a,) = _regions(tmp_path, 1)
    CheckpointStore(regions=[str(a)]).save_checkpoint({"w": torch.ones(2)}, lineage="run", step=1)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / name).symlink_to(victim)
    line = _one_line_error(run_cli("export", "--lineage", "run", "--to", str(out), "--force", "--region", str(a)))
    assert name in line and "link" in line
    assert victim.read_text() == "precious" and (out / name).is_symlink()


def test_the_audit_markdown_shows_stray_names_as_text(tmp_path: Path):
    (a,), store = _two_versions(tmp_path, count=1)
    (a / "lineages" / "[click here](https:evil.example)").mkdir()
    (a / "lineages" / "<img src=x onerror=alert(1)>").mkdir()
    markdown = audit_store(store).markdown()
    assert "click here" in markdown  # reported...
    assert "[click here](https:evil.example)" not in markdown and "<img" not in markdown  # ...as text


def test_export_of_a_crafted_tree_is_a_one_line_error(tmp_path: Path):
    (a,), _block = _tensor_versions(tmp_path)
    raw = raw_manifest(a, "run", 2)
    TREE_DEFECTS["tensor-entry-as-bytes"](raw)
    manifest_path(a, "run", 2).write_bytes(reseal(raw))
    # the crafted copy is a damaged manifest (core/state_tree.py): "latest" is v1, and v2 by number is one line
    latest = run_cli("export", "--lineage", "run", "--to", str(tmp_path / "v1"), "--json", "--region", str(a))
    assert latest.returncode == 0 and json.loads(latest.stdout)["version"] == 1, latest.stdout + latest.stderr
    args = ("export", "--lineage", "run", "--version", "2", "--to", str(tmp_path / "out"), "--json", "--region", str(a))
    result = run_cli(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "version 2" in json.loads(result.stdout)["error"] or "v2" in json.loads(result.stdout)["error"]


# -- stray objects in object-store regions (real emulators) ---------------------------------------------------
@pytest.fixture(scope="module")
def object_stores(tmp_path_factory: pytest.TempPathFactory):
    from helpers.emulators import running_emulators

    with running_emulators(("s3", "gcs", "azure"), log_dir=tmp_path_factory.mktemp("emulator-logs")) as running:
        yield running


@pytest.mark.parametrize("kind", ["s3", "gcs", "azure"])
def test_empty_and_prefix_strays_in_an_object_store_never_block_saves_or_appends(object_stores, kind: str):
    """S3 and Azure refuse a ranged read of an empty object (416): an empty stray ``999999999999.json``
    must read as an empty record there too, not as a copy that 'cannot be read right now' (which takes
    the number: every later save would need version 10**12)."""
    from helpers.emulators import unique

    emulator = object_stores[kind]
    prefix = unique(kind)
    store = Store([open_region(emulator.url_for(prefix), emulator.storage_options)])
    journal = Journal(store, "run")
    journal.append("run_started", run_id="r1", data={})
    _save(store, "run", _data("v1"))
    fs = emulator.fs()
    base = f"{emulator.bucket}/{prefix}/lineages/run"
    for where in ("manifests", "journal"):
        fs.pipe(f"{base}/{where}/999999999999.json", b"")
        fs.pipe(f"{base}/{where}/000000000005.json/notes.txt", b"a prefix where an object goes")

    assert [event.kind for event in journal.events()] == ["run_started"]
    assert journal.append("run_finished", run_id="r1", data={}).seq < 999999999999
    info = _save(store, "run", _data("v2"))
    assert 1 < info.version < 999999999999
    assert read_entry(store, "run") == (info.version, _data("v2"))
    assert [i.version for i in store.list("run")] == [1, info.version]
    assert fs.cat_file(f"{base}/manifests/999999999999.json") == b""


# -- secrets through whole tracebacks (what Prefect logs for a failed task: causes and contexts included) --------
def _secret(prefix: str = "") -> str:
    return f"{prefix}{random.Random().getrandbits(128):032x}Zq/+="


def _down_regions(endpoint: str) -> dict[str, tuple[dict, list[str]]]:
    from helpers.emulators import FAST_FAIL_OPTIONS

    token, key, secret, account_key = _secret("ya29."), "AKIA" + _secret()[:16].upper(), _secret(), _secret()
    connection = (
        f"DefaultEndpointsProtocol=http;AccountName=acct;AccountKey={account_key};BlobEndpoint={endpoint}/acct;"
    )
    return {
        "gs": ({"url": "gs://ckpt/prod", "storage_options": {"endpoint_url": endpoint, "token": token}}, [token]),
        "s3": (
            {
                "url": "s3://ckpt/prod",
                "storage_options": {"endpoint_url": endpoint, "key": key, "secret": secret, **FAST_FAIL_OPTIONS["s3"]},
            },
            [key, secret],
        ),
        "az": ({"url": "az://ckpt/prod", "storage_options": {"connection_string": connection}}, [account_key]),
    }


@pytest.mark.parametrize("kind", ["gs", "s3", "az"])
def test_no_secret_in_the_whole_traceback_of_any_failed_operation(kind: str, tmp_path: Path):
    import traceback

    from helpers.emulators import refused_endpoint

    with refused_endpoint() as endpoint:
        region, secrets = _down_regions(endpoint)[kind]
        block = CheckpointStore(regions=[region])
        for io in block.core.regions:
            io.retry_attempts, io.call_deadline = 1, 10.0
        journal = Journal(block.core, "leak")
        texts = []
        for operation in (
            lambda: block.save_checkpoint({"w": torch.ones(4)}, lineage="leak", step=1),
            lambda: block.load_checkpoint(lineage="leak"),
            lambda: journal.append("run_started", run_id="r1", data={}),
            lambda: journal.events(),
            lambda: block.core.resolve("leak", 1),
        ):
            with pytest.raises(CheckpointError) as failed:
                operation()
            texts.append("".join(traceback.format_exception(failed.value)))
        texts.append(block.verify().model_dump_json())
        texts.append(audit_store(block.core).model_dump_json())
    for text in texts:
        for secret in secrets:
            windows = {secret[i : i + 10] for i in range(len(secret) - 9)}
            assert not [w for w in windows if w in text], f"a piece of a secret in:\n{text[:3000]}"
