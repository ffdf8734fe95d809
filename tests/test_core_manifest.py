"""The manifest format and name validation of ``prefect_recovery.core`` (no store, no disk)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from prefect_recovery.core import (
    Entry,
    EntryPlan,
    InvalidNameError,
    Manifest,
    ManifestError,
    Store,
    decode_manifest,
    open_region,
)
from prefect_recovery.core.digest import hash_bytes
from prefect_recovery.core.layout import check_lineage
from prefect_recovery.core.manifest import ChunkRef, Component, ManifestBody, canonical_json

REPO = Path(__file__).resolve().parents[1]

BAD_ENTRY_NAMES = [
    "../x",
    "/etc/x",
    "..\\x",
    "a/../b",
    "a\x00b",
    "C:x",
    "c:\\windows\\x",
    "",
    ".",
    "a//b",
    "./a",
    "a/..",
]


def _manifest(lineage: str = "lin", version: int = 3, step: int | None = 7) -> Manifest:
    first = hash_bytes(b"first chunk")
    second = hash_bytes(b"second")
    return Manifest.build(
        ManifestBody(
            lineage=lineage,
            version=version,
            step=step,
            created_at="2024-01-02T03:04:05.000006+00:00",
            entries=[
                Entry(
                    name="model/layer.0/weight",
                    kind="tensor",
                    size=1234 + 6,
                    chunks=[ChunkRef(digest=first, size=1234), ChunkRef(digest=second, size=6)],
                    dtype="float32",
                    shape=[10, 31],
                    component="model",
                ),
                Entry(name="empty", kind="bytes", size=0, chunks=[]),
                # a digest names bytes, so it has one size: a third blob (issue 12: two sizes are damage)
                Entry(
                    name="extra/meta", kind="bytes", size=777, chunks=[ChunkRef(digest=hash_bytes(b"meta"), size=777)]
                ),
            ],
            tree={
                "dict": [
                    ["model", {"tensor": "model/layer.0/weight"}],
                    ["n", {"list": [1, {"float": "0x1.4p+1"}, None]}],
                ]
            },
            components=[Component(name="model", durable=True, owner="trainer")],
            metadata={"loss": 0.25, "tags": ["a", "b"]},
            writer={"host": "h", "pid": 1},
        )
    )


def _raw(manifest: Manifest) -> dict:
    return json.loads(manifest.encode())


def _reseal(raw: dict) -> bytes:
    """Encode ``raw`` with a correct manifest_digest, so only the content itself can be at fault."""
    body = {k: v for k, v in raw.items() if k not in ("manifest_digest", "signature")}
    raw = {**raw, "manifest_digest": hash_bytes(canonical_json(body))}
    return canonical_json(raw)


_NO_TORCH_NO_PREFECT = (
    "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'prefect'))\n"
    "assert not bad, bad[:20]\n"
    "from prefect_recovery.core import Store, verify_store, decode_manifest\n"
)


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_core_modules_import_neither_torch_nor_prefect():
    # Load prefect_recovery.core without running prefect_recovery/__init__.py (which wires up the
    # Prefect block): what the core layer itself pulls in.
    code = (
        "import sys, types, pathlib\n"
        f"pkg = types.ModuleType('prefect_recovery'); pkg.__path__ = [{str(REPO / 'prefect_recovery')!r}]\n"
        "sys.modules['prefect_recovery'] = pkg\n"
        "import prefect_recovery.core\n"
        "assert prefect_recovery.core.__file__.startswith(pkg.__path__[0])\n" + _NO_TORCH_NO_PREFECT
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]


def test_importing_prefect_recovery_core_does_not_import_torch_or_prefect():
    result = _run_python("import sys, prefect_recovery.core\n" + _NO_TORCH_NO_PREFECT)
    assert result.returncode == 0, result.stderr[-3000:]


def test_manifest_round_trip_is_exact():
    manifest = _manifest()
    data = manifest.encode()
    decoded = decode_manifest(data, expect_lineage="lin", expect_version=3)
    assert decoded == manifest
    assert decoded.encode() == data  # canonical: re-encoding gives the same bytes
    assert decoded.entries[0].chunks[1].size == 6
    assert decoded.entries[1].chunks == []
    assert decoded.tree == {
        "dict": [["model", {"tensor": "model/layer.0/weight"}], ["n", {"list": [1, {"float": "0x1.4p+1"}, None]}]]
    }
    assert decoded.metadata == {"loss": 0.25, "tags": ["a", "b"]}
    assert decoded.total_bytes == 1240 + 0 + 777
    assert decoded.blob_digests() == [hash_bytes(b"first chunk"), hash_bytes(b"second"), hash_bytes(b"meta")]


def test_changed_step_that_still_parses_is_rejected_by_manifest_digest():
    data = _manifest(step=7).encode()
    assert data.count(b'"step":7') == 1
    tampered = data.replace(b'"step":7', b'"step":8')
    json.loads(tampered)  # still valid JSON
    with pytest.raises(ManifestError, match="manifest_digest"):
        decode_manifest(tampered)


def test_changed_sizes_that_pass_the_schema_are_rejected_by_manifest_digest():
    # Entry "extra/meta" has one chunk: change both its size and its chunk's size consistently,
    # so the schema (chunk sizes add up) is satisfied and only the self digest can tell.
    data = _manifest().encode()
    assert data.count(b'"size":777') == 2
    tampered = data.replace(b'"size":777', b'"size":778')
    raw = json.loads(tampered)
    Manifest.model_validate(raw)  # the schema alone accepts it
    with pytest.raises(ManifestError, match="manifest_digest"):
        decode_manifest(tampered)


@pytest.mark.parametrize("keep", [0, 1, 10, 0.5, -1])
def test_truncated_manifest_is_rejected(keep):
    data = _manifest().encode()
    cut = int(len(data) * keep) if isinstance(keep, float) else (keep if keep >= 0 else len(data) + keep)
    with pytest.raises(ManifestError, match="not valid JSON"):
        decode_manifest(data[:cut], region="r1", key="lineages/lin/manifests/000000000003.json")


def test_not_a_manifest_is_rejected():
    with pytest.raises(ManifestError, match="not a prefect-recovery manifest"):
        decode_manifest(b'{"hello": "world"}')
    with pytest.raises(ManifestError):
        decode_manifest(b"[1, 2, 3]")
    with pytest.raises(ManifestError):
        decode_manifest(b"\xff\xfe not utf-8")


@pytest.mark.parametrize("format_version", [3, 0, None])
def test_unknown_format_version_is_rejected_with_upgrade_hint(format_version):
    raw = _raw(_manifest())
    raw["format_version"] = format_version
    with pytest.raises(ManifestError, match=r"(?i)upgrade") as info:
        decode_manifest(_reseal(raw))
    assert "format_version" in str(info.value)


def test_a_single_file_manifest_claiming_the_paged_version_is_rejected():
    """Version 2 is the paged form (tests/test_manifest_pages.py): entries listed in the root
    with format_version 2, or pages with format_version 1, are neither form."""
    raw = _raw(_manifest())
    raw["format_version"] = 2
    with pytest.raises(ManifestError, match="lists pages and no entries"):
        decode_manifest(_reseal(raw))
    raw = _raw(_manifest())
    raw["pages"] = []
    with pytest.raises(ManifestError, match="only by paged manifests"):
        decode_manifest(_reseal(raw))


@pytest.mark.parametrize("name", BAD_ENTRY_NAMES)
def test_escaping_entry_names_are_rejected_by_decode(name):
    raw = _raw(_manifest())
    raw["entries"][2]["name"] = name
    with pytest.raises(ManifestError, match="entries"):
        decode_manifest(_reseal(raw))


@pytest.mark.parametrize("name", BAD_ENTRY_NAMES)
def test_escaping_entry_names_are_rejected_by_the_model(name):
    with pytest.raises(ValueError):
        Entry(name=name, kind="bytes", size=0, chunks=[])


def test_duplicate_entry_names_are_rejected():
    raw = _raw(_manifest())
    raw["entries"][1]["name"] = raw["entries"][2]["name"]
    with pytest.raises(ManifestError, match="duplicate"):
        decode_manifest(_reseal(raw))


@pytest.mark.parametrize(
    "digest",
    [
        "blake3:../../etc",
        "blake3:../../etc/passwd" + "0" * 48,
        "sha256:" + "A" * 64,
        "md5:" + "0" * 32,
        "blake3:" + "0" * 63,
        "blake3:" + "0" * 65,
        "blake3/" + "0" * 64,
        "0" * 64,
        "",
    ],
)
def test_malformed_chunk_digests_are_rejected(digest):
    raw = _raw(_manifest())
    raw["entries"][0]["chunks"][0]["digest"] = digest
    with pytest.raises(ManifestError, match="digest"):
        decode_manifest(_reseal(raw))


def test_digest_with_trailing_newline_is_rejected():
    raw = _raw(_manifest())
    raw["entries"][0]["chunks"][0]["digest"] += "\n"
    with pytest.raises(ManifestError):
        decode_manifest(_reseal(raw))


def test_manifest_found_under_another_lineage_or_version_is_rejected():
    data = _manifest(lineage="alpha", version=3).encode()
    decode_manifest(data, expect_lineage="alpha", expect_version=3)
    with pytest.raises(ManifestError, match="lineage 'alpha'"):
        decode_manifest(data, expect_lineage="beta", expect_version=3)
    with pytest.raises(ManifestError, match="version 3"):
        decode_manifest(data, expect_lineage="alpha", expect_version=4)


def test_manifest_error_names_where_it_was_found():
    with pytest.raises(ManifestError) as info:
        decode_manifest(b"{", region="gs://bucket", key="lineages/lin/manifests/000000000001.json")
    assert "gs://bucket" in str(info.value)
    assert "000000000001.json" in str(info.value)


GOOD_LINEAGES = ["lin", "run-2024.01_a", "A", "0abc", "x" * 128]
BAD_LINEAGES = ["", "..", "../x", "a/b", "a\\b", ".hidden", "-dash", "_under", "a..b", "x" * 129, "a b", "a\x00b", "é"]


@pytest.mark.parametrize("lineage", GOOD_LINEAGES)
def test_valid_lineage_names_are_accepted(lineage):
    assert check_lineage(lineage) == lineage


@pytest.mark.parametrize("lineage", BAD_LINEAGES)
def test_invalid_lineage_names_are_rejected(lineage):
    with pytest.raises(InvalidNameError, match="invalid lineage"):
        check_lineage(lineage)


@pytest.mark.parametrize("lineage", ["../escape", "a/b", "/abs"])
def test_store_refuses_invalid_lineage_without_writing(tmp_path, lineage):
    (tmp_path / "a").mkdir()
    store = Store([open_region(str(tmp_path / "a"))])
    with pytest.raises(InvalidNameError):
        store.commit(lineage, [EntryPlan(name="w", kind="bytes", data=memoryview(b"data"))])
    with pytest.raises(InvalidNameError):
        store.resolve(lineage)
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")] == ["a"]


def test_lineage_with_trailing_newline_is_rejected():
    with pytest.raises(InvalidNameError):
        check_lineage("lin\n")


def test_nan_or_infinity_in_a_manifest_is_rejected_as_a_manifest_error() -> None:
    text = _manifest().encode().decode().replace('"metadata":{', '"metadata":{"loss":NaN,', 1)
    assert "NaN" in text
    with pytest.raises(ManifestError, match="not valid JSON"):
        decode_manifest(text.encode())
