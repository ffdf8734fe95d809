"""Compressed chunks are hashed as they are decoded (core/codecs.py ``decode_into(hasher=)``),
not in a second pass: the digest still covers exactly the bytes handed out, and a blob that
decodes to other bytes than the manifest's ``decoded_digest`` is still refused, into fresh
tensors and into existing ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.tamper import reseal

from prefect_recovery.core import BlobUnavailableError, Store, codecs, open_region
from prefect_recovery.core.codecs import decode_into, encode
from prefect_recovery.core.digest import hash_bytes, hasher_digest, new_hasher
from prefect_recovery.core.layout import manifest_key
from prefect_recovery.training.state_io import load_state, save_state


@pytest.mark.parametrize(
    ("dtype", "codec"), [("float32", "bytegroup-zstd"), ("bfloat16", "bytegroup-zstd"), ("float64", "zstd")]
)
@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
def test_the_hasher_is_fed_exactly_the_decoded_bytes(monkeypatch, dtype, codec, algorithm):
    # Several ungroup blocks and several hash pieces, the last of each partial.
    monkeypatch.setattr(codecs, "UNGROUP_BLOCK", 1000)
    values = torch.randn(300_001, generator=torch.Generator().manual_seed(3)).to(getattr(torch, dtype)) * 0.02
    data = memoryview(values.view(torch.uint8).numpy()).cast("B")
    encoded = encode(data, codec, dtype)
    assert encoded.codec == codec
    out = memoryview(bytearray(len(data)))
    hasher = new_hasher(algorithm)
    decode_into(encoded.data, encoded.codec, encoded.width, out, hasher)
    assert bytes(out) == bytes(data)
    assert hasher_digest(hasher, algorithm) == hash_bytes(data, algorithm)


def _forged_bytegroup(tmp_path: Path) -> tuple[Store, torch.Tensor]:
    """A committed checkpoint whose one chunk is an intact bytegroup-zstd blob (it hashes to its
    name) while the manifest's ``decoded_digest`` is that of other values (resealed: an unsigned
    store's manifest digest is recomputed, so only the decoded digest can tell)."""
    (tmp_path / "r").mkdir()
    store = Store([open_region(str(tmp_path / "r"), name="r")], codec="bytegroup-zstd")
    wanted = torch.randn(50_000, generator=torch.Generator().manual_seed(0)) * 0.02
    stored = wanted.clone()
    stored[12_345] += 1.0
    save_state(store, {"w": stored}, lineage="forged")
    path = tmp_path / "r" / manifest_key("forged", 1)
    raw = json.loads(path.read_bytes())
    [chunk] = raw["entries"][0]["chunks"]
    assert chunk["codec"] == "bytegroup-zstd"
    chunk["decoded_digest"] = hash_bytes(memoryview(wanted.view(torch.uint8).numpy()).cast("B"), "blake3")
    path.write_bytes(reseal(raw))
    return store, wanted


@pytest.mark.parametrize("into", [False, True])
def test_a_bytegroup_blob_decoding_to_other_values_is_refused(tmp_path, into):
    store, wanted = _forged_bytegroup(tmp_path)
    target = {"w": torch.zeros_like(wanted)} if into else None
    with pytest.raises(BlobUnavailableError, match="decoded bytes do not match decoded_digest"):
        load_state(store, lineage="forged", into=target)
