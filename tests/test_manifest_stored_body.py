"""A manifest's self digest and signature are checked against the stored values themselves
(core/manifest.py ``_stored_body``), with the parsed model's canonical form as the fallback:
every manifest that loaded before still loads, and every change to a stored value is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.tamper import reseal

from prefect_recovery.core import open_region
from prefect_recovery.core.errors import ManifestError, ManifestSignatureError
from prefect_recovery.core.layout import manifest_key
from prefect_recovery.core.manifest import canonical_json, decode_manifest
from prefect_recovery.core.signing import Keyring, hmac_key
from prefect_recovery.core.store import Store
from prefect_recovery.training.state_io import load_state, save_state


def _saved(tmp_path: Path, keyring: Keyring | None = None) -> tuple[Store, Path, dict[str, torch.Tensor]]:
    """A store with one compressed checkpoint (codec fields in its chunks) and the manifest's path."""
    generator = torch.Generator().manual_seed(0)
    state = {
        "w": (torch.randn(64, 256, generator=generator) * 0.02).to(torch.bfloat16),
        "m": torch.randn(20_000, generator=generator) * 1e-3,
    }
    (tmp_path / "r").mkdir()
    store = Store([open_region(str(tmp_path / "r"), name="r")], codec="zstd", keyring=keyring, chunk_bytes=8192)
    save_state(store, state, lineage="lin")
    return store, tmp_path / "r" / manifest_key("lin", 1), state


def test_the_same_values_in_another_layout_still_load(tmp_path):
    store, path, state = _saved(tmp_path)
    raw = json.loads(path.read_bytes())
    assert any("codec" in chunk for entry in raw["entries"] for chunk in entry["chunks"])
    # Indented, keys in reverse order, and an explicit "pages": null that the writer omits: not
    # the bytes the digest was computed over, but the same values; the model's canonical form
    # (the check before stored bodies were hashed) accepts them, as it did.
    relaid = json.dumps({"pages": None, **dict(reversed(list(raw.items())))}, indent=2).encode()
    assert canonical_json(json.loads(relaid)) != canonical_json(raw)
    assert decode_manifest(relaid, expect_lineage="lin", expect_version=1).manifest_digest == raw["manifest_digest"]
    path.write_bytes(relaid)
    loaded, _ = load_state(store, lineage="lin")
    assert all(torch.equal(loaded[name], tensor) for name, tensor in state.items())


@pytest.mark.parametrize("field", ["decoded_digest", "stored_size", "step"])
def test_a_changed_value_is_refused_by_the_digest(tmp_path, field):
    _store, path, _state = _saved(tmp_path)
    raw = json.loads(path.read_bytes())
    if field == "step":
        raw["step"] = (raw["step"] or 0) + 1
    else:
        chunk = next(c for e in raw["entries"] for c in e["chunks"] if "codec" in c)
        chunk[field] = ("blake3:" + "0" * 64) if field == "decoded_digest" else chunk[field] + 1
    with pytest.raises(ManifestError, match="manifest_digest"):
        decode_manifest(canonical_json(raw))


def test_a_resealed_signed_manifest_is_refused_by_its_signature(tmp_path):
    keyring = Keyring(hmac_key("k1", b"s" * 32))
    _store, path, _state = _saved(tmp_path, keyring)
    stored = path.read_bytes()
    assert decode_manifest(stored, keyring=keyring).signature is not None
    raw = json.loads(stored)
    chunk = next(c for e in raw["entries"] for c in e["chunks"] if "codec" in c)
    chunk["decoded_digest"] = "blake3:" + "0" * 64
    # The digest recomputed over the changed stored values (what the check now hashes first):
    # it matches, and the signature over those values still fails.
    with pytest.raises(ManifestSignatureError):
        decode_manifest(reseal(raw), keyring=keyring)
