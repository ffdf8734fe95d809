"""Signed manifests, as a user meets them: real local regions, real torch tensors, real Secret blocks.

A signature closes the gap ``manifest_digest`` leaves open: whoever can write to a region can
recompute a digest (``helpers.tamper.reseal`` does exactly that), but not a signature. Every
tampering test here hides every blob of the store first, so the error it gets proves the
manifest was rejected before a single blob was read (a load that got as far as the blobs would
fail on the missing blobs instead; ``test_control_hidden_blobs_alone_are_not_a_signature_error``).
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.tamper import flip_byte, reseal
from typer.testing import CliRunner

from prefect_recovery import CheckpointStore, Region
from prefect_recovery.core.errors import (
    CheckpointError,
    ManifestError,
    ManifestSignatureError,
    SigningKeyError,
)
from prefect_recovery.core.layout import manifest_key
from prefect_recovery.core.manifest import Manifest, ManifestBody, decode_manifest
from prefect_recovery.core.region import LocalRegionIO
from prefect_recovery.core.signing import Keyring, ManifestKey, ed25519_key, hmac_key, new_ed25519_key_pem
from prefect_recovery.core.store import Store
from prefect_recovery.core.verify import verify_store
from prefect_recovery.training.state_io import load_state, save_state

REGIONS = ("eu", "us")
LINEAGE = "resnet"


# -- helpers ----------------------------------------------------------------------------------------------
def hmac(key_id: str) -> ManifestKey:
    return hmac_key(key_id, secrets.token_hex(32))


def ed25519(key_id: str) -> ManifestKey:
    private_pem, _public_pem = new_ed25519_key_pem()
    return ed25519_key(key_id, private_pem)


def region_roots(tmp_path: Path) -> list[Path]:
    roots = [tmp_path / name for name in REGIONS]
    for root in roots:
        root.mkdir(exist_ok=True)
    return roots


def make_store(tmp_path: Path, keyring: Keyring | None, *, quorum: int = 2) -> Store:
    regions = [LocalRegionIO(str(root), name=root.name) for root in region_roots(tmp_path)]
    return Store(regions, write_quorum=quorum, keyring=keyring, chunk_bytes=4096)


def training_state(seed: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "model": {
            "weight": torch.randn(48, 48, generator=generator),  # 9 KiB: three chunks of 4096 bytes
            "bias": torch.randn(48, generator=generator).to(torch.bfloat16),
            "steps": torch.arange(seed, seed + 7, dtype=torch.int64),
        },
        "optimizer": {"lr": 0.1 * seed, "betas": (0.9, 0.999)},
        "note": f"state {seed}",
    }


def assert_identical(loaded: Any, expected: Any) -> None:
    """Same structure, same values; tensors bit-identical (dtype, shape and bytes)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(loaded, torch.Tensor)
        assert loaded.dtype == expected.dtype and loaded.shape == expected.shape
        assert torch.equal(loaded.view(torch.uint8), expected.view(torch.uint8))
    elif isinstance(expected, dict):
        assert isinstance(loaded, dict) and loaded.keys() == expected.keys()
        for key in expected:
            assert_identical(loaded[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert type(loaded) is type(expected) and len(loaded) == len(expected)
        for a, b in zip(loaded, expected, strict=True):
            assert_identical(a, b)
    else:
        assert loaded == expected


def manifest_files(tmp_path: Path, version: int, lineage: str = LINEAGE) -> list[Path]:
    return [root / manifest_key(lineage, version) for root in region_roots(tmp_path)]


def rewrite(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edit a manifest the way an attacker with write access would: change it, recompute its digest."""
    raw = json.loads(path.read_bytes())
    edit(raw)
    path.write_bytes(reseal(raw))


def blob_files(tmp_path: Path) -> list[Path]:
    blob_dirs = [root / "blobs" for root in region_roots(tmp_path)]
    return [p for folder in blob_dirs if folder.exists() for p in folder.rglob("*") if p.is_file()]


@contextmanager
def blobs_hidden(tmp_path: Path) -> Iterator[None]:
    """Every blob of every region out of reach: whatever the store reads now is a manifest."""
    assert blob_files(tmp_path), "the store should hold blobs before they are hidden"
    for root in region_roots(tmp_path):
        (root / "blobs").rename(root / "blobs-hidden")
    assert not blob_files(tmp_path)
    try:
        yield
    finally:
        for root in region_roots(tmp_path):
            (root / "blobs-hidden").rename(root / "blobs")


def signed_history(tmp_path: Path, keyring: Keyring, versions: int = 2, *, quorum: int = 2) -> tuple[Store, list]:
    store = make_store(tmp_path, keyring, quorum=quorum)
    states = [training_state(seed) for seed in range(1, versions + 1)]
    for step, state in enumerate(states, start=1):
        assert save_state(store, state, lineage=LINEAGE, step=step * 100).version == step
    return store, states


def says_what_to_do(message: str) -> bool:
    return any(hint in message for hint in ("repair", "verification keys", "accept_unsigned", "earlier version"))


# -- 1. signed saves load bit-identical and carry their signature on disk -------------------------------------
@pytest.mark.parametrize("algorithm", ["hmac-sha256", "ed25519"])
def test_signed_store_round_trips_bit_identical_and_signs_the_manifest_on_disk(tmp_path: Path, algorithm: str) -> None:
    key = hmac("team-key-1") if algorithm == "hmac-sha256" else ed25519("team-key-1")
    store, states = signed_history(tmp_path, Keyring(key))

    for version, state in enumerate(states, start=1):
        loaded, manifest = load_state(store, lineage=LINEAGE, version=version)
        assert_identical(loaded, state)
        assert manifest.signature is not None and manifest.signature.key_id == "team-key-1"
    latest, manifest = load_state(store, lineage=LINEAGE)
    assert manifest.version == 2
    assert_identical(latest, states[1])

    for version in (1, 2):
        on_disk = [json.loads(path.read_bytes()) for path in manifest_files(tmp_path, version)]
        assert on_disk[0] == on_disk[1], "every region holds the same signed manifest"
        signature = on_disk[0]["signature"]
        assert signature["algorithm"] == algorithm
        assert signature["key_id"] == "team-key-1"
        assert len(signature["value"]) >= 40  # base64 of a 32-byte MAC or a 64-byte Ed25519 signature

    # The same bytes decode under the key, and under no other key of the same id.
    raw = manifest_files(tmp_path, 2)[0].read_bytes()
    assert decode_manifest(raw, keyring=Keyring(key)).version == 2
    impostor = hmac("team-key-1") if algorithm == "hmac-sha256" else ed25519("team-key-1")
    with pytest.raises(ManifestSignatureError, match="does not match its content"):
        decode_manifest(raw, keyring=Keyring(impostor))


# -- 2. tampering is rejected before any blob is read --------------------------------------------------------
def test_control_hidden_blobs_alone_are_not_a_signature_error(tmp_path: Path) -> None:
    """Without tampering, hidden blobs make a load fail for the blobs: so a signature error in the
    tests below really means the manifest was rejected first."""
    store, _states = signed_history(tmp_path, Keyring(hmac("k1")))
    with blobs_hidden(tmp_path), pytest.raises(CheckpointError) as caught:
        load_state(store, lineage=LINEAGE, version=2)
    assert not isinstance(caught.value, ManifestError)


def test_flipped_byte_in_every_region_is_rejected_at_decode_and_reported_by_verify(tmp_path: Path) -> None:
    store, _states = signed_history(tmp_path, Keyring(hmac("k1")))
    for path in manifest_files(tmp_path, 2):
        offset = path.read_bytes().index(b'"note"')  # inside the JSON, still valid JSON after the flip
        flip_byte(path, offset + 2, 0x01)  # "note" -> "nnte"... a single changed bit

    copies = store.manifest_copies(LINEAGE, 2)
    assert not copies.valid
    assert set(copies.invalid) == set(REGIONS)
    for region, cause in copies.invalid.items():
        assert region in cause
        assert "manifest" in cause

    with blobs_hidden(tmp_path), pytest.raises(CheckpointError):
        load_state(store, lineage=LINEAGE, version=2)  # never the tampered content

    report = verify_store(store)
    assert not report.healthy
    damaged = [p for p in report.problems if p.object == manifest_key(LINEAGE, 2)]
    assert {p.region for p in damaged} == set(REGIONS)
    assert all(p.kind in ("unreadable manifest", "bad signature") for p in damaged)


def _flip_a_bit(tmp_path: Path, store: Store) -> str:
    for path in manifest_files(tmp_path, 2):
        data = path.read_bytes()
        # a digit of created_at: still valid JSON and schema, but not the bytes that were digested
        offset = data.index(b'"created_at":"') + len('"created_at":"') + 3
        flip_byte(path, offset, 0x01)
    return "manifest_digest"


def _copy_verbatim_from_other_lineage(tmp_path: Path, store: Store) -> str:
    save_state(store, training_state(9), lineage="other-run", step=5)
    for source, target in zip(manifest_files(tmp_path, 1, "other-run"), manifest_files(tmp_path, 2), strict=True):
        shutil.copyfile(source, target)
    return "other-run"


def _copy_verbatim_from_older_version(tmp_path: Path, store: Store) -> str:
    for source, target in zip(manifest_files(tmp_path, 1), manifest_files(tmp_path, 2), strict=True):
        shutil.copyfile(source, target)
    return "version 1"


NOT_RESEALED = pytest.mark.parametrize(
    "tamper",
    [_flip_a_bit, _copy_verbatim_from_other_lineage, _copy_verbatim_from_older_version],
    ids=["flipped-bit", "copied-from-other-lineage", "copied-from-older-version"],
)


@NOT_RESEALED
def test_manifest_damaged_without_reseal_in_every_region_names_the_damage(
    tmp_path: Path, tamper: Callable[[Path, Store], str]
) -> None:
    store, _states = signed_history(tmp_path, Keyring(hmac("k1")))
    what = tamper(tmp_path, store)
    # The decoder sees it for what it is ...
    for cause in store.manifest_copies(LINEAGE, 2).invalid.values():
        assert what in cause
    # ... and so should the user who loads it.
    with blobs_hidden(tmp_path), pytest.raises(ManifestError) as caught:
        load_state(store, lineage=LINEAGE, version=2)
    message = str(caught.value)
    assert "version 2" in message and what in message
    assert says_what_to_do(message)


@NOT_RESEALED
def test_manifest_damaged_without_reseal_in_every_region_stops_a_latest_load(
    tmp_path: Path, tamper: Callable[[Path, Store], str]
) -> None:
    store, _states = signed_history(tmp_path, Keyring(hmac("k1")))
    tamper(tmp_path, store)
    with pytest.raises(ManifestError, match="version 2"):  # today: silently returns version 1
        load_state(store, lineage=LINEAGE)


def test_swapped_blob_digest_with_recomputed_digest_is_rejected_before_any_blob_is_read(tmp_path: Path) -> None:
    store, states = signed_history(tmp_path, Keyring(hmac("k1")))
    old = json.loads(manifest_files(tmp_path, 1)[0].read_bytes())

    def swap_weights(raw: dict[str, Any]) -> None:  # version 2 now points at version 1's weights
        for entry, old_entry in zip(raw["entries"], old["entries"], strict=True):
            if entry["name"].endswith("weight"):
                assert entry["chunks"] != old_entry["chunks"]
                entry["chunks"] = old_entry["chunks"]

    for path in manifest_files(tmp_path, 2):
        rewrite(path, swap_weights)
        decode_manifest(path.read_bytes())  # without a key it passes every check: only the signature can tell

    with blobs_hidden(tmp_path):
        for version in (2, None):
            with pytest.raises(ManifestSignatureError) as caught:
                load_state(store, lineage=LINEAGE, version=version)
            message = str(caught.value)
            assert "version 2" in message
            assert "does not match its content" in message and "tampering" in message
            assert "do not load it" in message and says_what_to_do(message)

    loaded, _manifest = load_state(store, lineage=LINEAGE, version=1)  # the history before it is intact
    assert_identical(loaded, states[0])


@pytest.mark.parametrize("source", ["other-lineage", "older-version"])
def test_manifest_copied_in_and_relabelled_is_rejected_before_any_blob_is_read(tmp_path: Path, source: str) -> None:
    """The signed body names its lineage and version: a copy relabelled to fit its new place no longer verifies."""
    store, states = signed_history(tmp_path, Keyring(hmac("k1")))
    if source == "other-lineage":
        save_state(store, training_state(9), lineage="other-run", step=5)
        sources = manifest_files(tmp_path, 1, "other-run")
    else:
        sources = manifest_files(tmp_path, 1)

    def relabel(raw: dict[str, Any]) -> None:
        raw["lineage"], raw["version"] = LINEAGE, 2

    for src, target in zip(sources, manifest_files(tmp_path, 2), strict=True):
        shutil.copyfile(src, target)
        rewrite(target, relabel)

    with blobs_hidden(tmp_path), pytest.raises(ManifestSignatureError) as caught:
        load_state(store, lineage=LINEAGE, version=2)
    assert "version 2" in str(caught.value) and "does not match its content" in str(caught.value)
    assert_identical(load_state(store, lineage=LINEAGE, version=1)[0], states[0])


def test_stripped_signature_is_rejected_unless_the_store_accepts_unsigned(tmp_path: Path) -> None:
    key = hmac("k1")
    store, states = signed_history(tmp_path, Keyring(key))
    for path in manifest_files(tmp_path, 2):
        rewrite(path, lambda raw: raw.pop("signature"))

    with blobs_hidden(tmp_path):
        for version in (2, None):
            with pytest.raises(ManifestSignatureError) as caught:
                load_state(store, lineage=LINEAGE, version=version)
            message = str(caught.value)
            assert "version 2" in message and "not signed" in message
            assert "stripped" in message and "accept_unsigned" in message

    migrating = make_store(tmp_path, Keyring(key, accept_unsigned=True))
    loaded, manifest = load_state(migrating, lineage=LINEAGE)
    assert manifest.version == 2 and manifest.signature is None
    assert_identical(loaded, states[1])


def test_manifest_signed_with_an_unknown_key_is_rejected_naming_that_key(tmp_path: Path) -> None:
    store, states = signed_history(tmp_path, Keyring(hmac("k1")))
    stranger = Keyring(hmac("intruder-key"))
    for path in manifest_files(tmp_path, 2):
        body = ManifestBody(**decode_manifest(path.read_bytes()).body_payload())
        path.write_bytes(Manifest.build(body, stranger).encode())

    with blobs_hidden(tmp_path), pytest.raises(ManifestSignatureError) as caught:
        load_state(store, lineage=LINEAGE, version=2)
    message = str(caught.value)
    assert "'intruder-key'" in message and "does not know" in message
    assert "verification keys" in message and "'k1'" in message  # what it knows and how to add a key
    assert_identical(load_state(store, lineage=LINEAGE, version=1)[0], states[0])


# -- 3. latest does not silently fall back past a forged version --------------------------------------------
def test_latest_does_not_fall_back_past_a_forged_newest_version(tmp_path: Path) -> None:
    store, states = signed_history(tmp_path, Keyring(hmac("k1")), versions=3)
    for path in manifest_files(tmp_path, 3):
        rewrite(path, lambda raw: raw.update(step=1))  # an attacker rewinds the recorded step

    with pytest.raises(ManifestSignatureError) as caught:
        load_state(store, lineage=LINEAGE)
    message = str(caught.value)
    assert f"lineage '{LINEAGE}' version 3 cannot be trusted in any region" in message
    assert "earlier version" in message

    loaded, manifest = load_state(store, lineage=LINEAGE, version=2)
    assert manifest.version == 2
    assert_identical(loaded, states[1])
    # one meaning of "latest" (issue 12 class 10): listing stops at the forged newest version too
    with pytest.raises(ManifestSignatureError, match="version 3 cannot be trusted"):
        store.list(LINEAGE)


# -- 4. one region tampered: served from the verified copy, reported and repaired ---------------------------
@pytest.mark.parametrize(
    "quorum",
    [
        1,
        2,
    ],
)
def test_one_tampered_region_is_served_from_the_verified_copy_and_repaired(tmp_path: Path, quorum: int) -> None:
    store, states = signed_history(tmp_path, Keyring(hmac("k1")), quorum=quorum)
    eu, us = manifest_files(tmp_path, 2)
    good = us.read_bytes()
    rewrite(eu, lambda raw: raw["metadata"].update(approved_by="mallory"))  # eu is read first

    loaded, manifest = load_state(store, lineage=LINEAGE)
    assert manifest.version == 2 and "approved_by" not in manifest.metadata
    assert_identical(loaded, states[1])

    report = verify_store(store)
    assert not report.healthy
    [problem] = report.problems
    assert (problem.region, problem.object, problem.kind) == ("eu", manifest_key(LINEAGE, 2), "bad signature")
    assert "does not match its content" in problem.detail and not problem.repaired
    row = {row.version: row for row in report.checkpoints}[2]
    assert row.regions == {"eu": "bad signature", "us": "ok"}
    assert row.signature == "verified (key k1)"
    assert eu.read_bytes() != good, "verify without repair changes nothing"

    repaired = verify_store(store, repair=True)
    assert repaired.healthy
    [problem] = repaired.problems
    assert problem.kind == "bad signature" and problem.region == "eu" and problem.repaired
    assert {row.version: row for row in repaired.checkpoints}[2].regions == {"eu": "repaired", "us": "ok"}
    assert eu.read_bytes() == good

    again = verify_store(store, repair=True)
    assert again.healthy and again.problems == []
    assert all(row.regions == {"eu": "ok", "us": "ok"} for row in again.checkpoints)
    assert eu.read_bytes() == good


# -- 5. rotation and key hygiene ------------------------------------------------------------------------------
def test_rotation_keeps_history_loadable_and_new_saves_name_the_new_key(tmp_path: Path) -> None:
    k1, k2 = hmac("k1"), ed25519("k2")  # rotation may change the algorithm too
    store_k1 = make_store(tmp_path, Keyring(k1))
    v1 = training_state(1)
    save_state(store_k1, v1, lineage=LINEAGE, step=1)

    rotated = make_store(tmp_path, Keyring(k2, [k1]))
    v2 = training_state(2)
    assert save_state(rotated, v2, lineage=LINEAGE, step=2).version == 2
    for version, state, key_id in ((1, v1, "k1"), (2, v2, "k2")):
        loaded, manifest = load_state(rotated, lineage=LINEAGE, version=version)
        assert_identical(loaded, state)
        assert manifest.signature is not None and manifest.signature.key_id == key_id
    on_disk = json.loads(manifest_files(tmp_path, 2)[1].read_bytes())["signature"]
    assert (on_disk["key_id"], on_disk["algorithm"]) == ("k2", "ed25519")
    rows = verify_store(rotated).checkpoints
    assert [row.signature for row in rows] == ["verified (key k1)", "verified (key k2)"]

    only_k2 = make_store(tmp_path, Keyring(k2))
    assert_identical(load_state(only_k2, lineage=LINEAGE)[0], v2)
    with pytest.raises(ManifestSignatureError) as caught:
        load_state(only_k2, lineage=LINEAGE, version=1)
    message = str(caught.value)
    assert "key 'k1'" in message and "does not know" in message and "verification keys" in message


def test_key_ids_must_be_unique_and_hmac_keys_long_enough() -> None:
    with pytest.raises(SigningKeyError, match=r"two keys share the key id 'k1'"):
        Keyring(hmac("k1"), [hmac("k1")])
    with pytest.raises(SigningKeyError, match=r"two keys share the key id 'k1'"):
        Keyring(None, [hmac("k1"), ed25519("k1")])
    with pytest.raises(SigningKeyError) as short:
        hmac_key("k1", "too-short-secret")
    assert "16 bytes" in str(short.value) and "at least 32" in str(short.value)
    assert "token_hex(32)" in str(short.value)  # and how to make a good one
    with pytest.raises(SigningKeyError, match="invalid key id"):
        hmac_key("../etc", secrets.token_hex(32))
    _private, public_pem = new_ed25519_key_pem()
    with pytest.raises(SigningKeyError, match="cannot sign; give it as a verification key"):
        Keyring(ed25519_key("pub", public_pem))
    same = hmac("k1")
    assert Keyring(same, [same]).keys == {"k1": same}  # the signer listed again is not a clash


def test_verify_only_store_refuses_to_save(tmp_path: Path) -> None:
    private_pem, public_pem = new_ed25519_key_pem()
    writer = make_store(tmp_path, Keyring(ed25519_key("w", private_pem)))
    save_state(writer, training_state(1), lineage=LINEAGE)
    reader = make_store(tmp_path, Keyring(None, [ed25519_key("w", public_pem)]))
    try:
        with pytest.raises(SigningKeyError):
            save_state(reader, training_state(2), lineage=LINEAGE)
    finally:
        assert_identical(load_state(reader, lineage=LINEAGE)[0], training_state(1))


# -- 6. the report says whether signing is on -----------------------------------------------------------------
def test_unsigned_store_keeps_working_and_says_signing_is_off(tmp_path: Path) -> None:
    store, states = signed_history(tmp_path, None)
    assert_identical(load_state(store, lineage=LINEAGE)[0], states[1])
    assert all(json.loads(p.read_bytes())["signature"] is None for p in manifest_files(tmp_path, 2))

    report = verify_store(store)
    assert report.healthy
    assert report.signing.startswith("off")
    assert [row.signature for row in report.checkpoints] == ["unsigned", "unsigned"]


def test_signed_store_report_names_the_keys_and_each_rows_verifying_key(tmp_path: Path) -> None:
    store, _states = signed_history(tmp_path, Keyring(hmac("k1")))
    report = verify_store(store)
    assert report.healthy
    assert report.signing.startswith("on")
    assert "'k1'" in report.signing and "rejects unsigned" in report.signing
    assert [row.signature for row in report.checkpoints] == ["verified (key k1)", "verified (key k1)"]

    keyless = make_store(tmp_path, None)  # a reader without keys still loads, and says it did not check
    assert [row.signature for row in verify_store(keyless).checkpoints] == [
        "signed, not checked (no key configured)"
    ] * 2


def test_migration_from_unsigned_history(tmp_path: Path) -> None:
    old, states = signed_history(tmp_path, None)  # written before signing was turned on
    key = hmac("k1")
    migrating = make_store(tmp_path, Keyring(key, accept_unsigned=True))
    new_state = training_state(3)
    save_state(migrating, new_state, lineage=LINEAGE, step=300)
    report = verify_store(migrating)
    assert report.healthy and "accepts unsigned" in report.signing
    assert [row.signature for row in report.checkpoints] == [
        "unsigned (accepted)",
        "unsigned (accepted)",
        "verified (key k1)",
    ]
    strict = make_store(tmp_path, Keyring(key))
    assert_identical(load_state(strict, lineage=LINEAGE)[0], new_state)
    with pytest.raises(ManifestSignatureError, match="accept_unsigned"):
        load_state(strict, lineage=LINEAGE, version=2)
    assert_identical(load_state(old, lineage=LINEAGE, version=2)[0], states[1])


def test_signature_errors_recommend_only_existing_commands(tmp_path: Path) -> None:
    """Every `prefect-recovery <command>` a signature error or the block's fields recommend is a real command."""
    from prefect_recovery.cli import app

    commands = {command.name for command in app.registered_commands}
    store, _states = signed_history(tmp_path, Keyring(hmac("k1")))
    for path in manifest_files(tmp_path, 2):
        rewrite(path, lambda raw: raw.update(step=1))
    with pytest.raises(ManifestSignatureError) as caught:
        load_state(store, lineage=LINEAGE)
    texts = [str(caught.value), CheckpointStore.model_fields["signing_algorithm"].description or ""]
    named = {name for text in texts for name in re.findall(r"`prefect-recovery ([a-z][a-z-]*)", text)}
    assert {"audit", "keygen"} <= named
    assert named <= commands, f"recommended but not commands: {sorted(named - commands)}"


# -- 7. the CheckpointStore block with Secret blocks on the Prefect server -----------------------------------
def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def block_regions(tmp_path: Path) -> list[Region]:
    return [Region(url=str(root), name=root.name) for root in region_roots(tmp_path)]


def test_block_signs_with_a_secret_block_and_rotates(prefect_server, tmp_path: Path) -> None:
    from prefect.blocks.system import Secret

    Secret(value=secrets.token_hex(32)).save("ckpt-key-1", overwrite=True)
    first = CheckpointStore(regions=block_regions(tmp_path), write_quorum=2, signing_key="ckpt-key-1")
    v1 = training_state(1)
    assert first.save(v1, lineage=LINEAGE, step=1).version == 1
    for path in manifest_files(tmp_path, 1):
        signature = json.loads(path.read_bytes())["signature"]
        assert (signature["algorithm"], signature["key_id"]) == ("hmac-sha256", "ckpt-key-1")
    assert_identical(first.load(lineage=LINEAGE), v1)

    Secret(value=secrets.token_hex(32)).save("ckpt-key-2", overwrite=True)
    block_name = unique("signed-store")
    CheckpointStore(
        regions=block_regions(tmp_path), write_quorum=2, signing_key="ckpt-key-2", verification_keys=["ckpt-key-1"]
    ).save(block_name)
    rotated = CheckpointStore.load(block_name)  # the signing settings survive the server round trip
    assert (rotated.signing_key, rotated.verification_keys) == ("ckpt-key-2", ["ckpt-key-1"])
    v2 = training_state(2)
    assert rotated.save(v2, lineage=LINEAGE, step=2).version == 2
    assert_identical(rotated.load(lineage=LINEAGE, version=1), v1)
    assert_identical(rotated.load(lineage=LINEAGE), v2)
    assert json.loads(manifest_files(tmp_path, 2)[0].read_bytes())["signature"]["key_id"] == "ckpt-key-2"
    assert rotated.verify().signing.startswith("on: signs with 'ckpt-key-2'")

    only_new = CheckpointStore(regions=block_regions(tmp_path), write_quorum=2, signing_key="ckpt-key-2")
    assert_identical(only_new.load(lineage=LINEAGE), v2)
    with pytest.raises(ManifestSignatureError, match="key 'ckpt-key-1'"):
        only_new.load(lineage=LINEAGE, version=1)


def test_block_ed25519_reader_holds_only_the_public_key(prefect_server, tmp_path: Path) -> None:
    from prefect.blocks.system import Secret

    key_id = unique("ckpt-ed")
    private_pem, public_pem = new_ed25519_key_pem()
    Secret(value=private_pem).save(key_id)
    writer = CheckpointStore(regions=block_regions(tmp_path), signing_key=key_id, signing_algorithm="ed25519")
    state = training_state(1)
    writer.save(state, lineage=LINEAGE, step=1)
    signature = json.loads(manifest_files(tmp_path, 1)[0].read_bytes())["signature"]
    assert (signature["algorithm"], signature["key_id"]) == ("ed25519", key_id)

    # The reader's workspace: the Secret of that name holds only the public key.
    Secret(value=public_pem).save(key_id, overwrite=True)
    reader = CheckpointStore(regions=block_regions(tmp_path), signing_algorithm="ed25519", verification_keys=[key_id])
    keyring = reader.keyring()
    assert keyring is not None and keyring.signing_key is None and not keyring.keys[key_id].can_sign
    assert_identical(reader.load(lineage=LINEAGE), state)
    assert [row.signature for row in reader.verify().checkpoints] == [f"verified (key {key_id})"]
    with pytest.raises(SigningKeyError, match="cannot sign"):
        CheckpointStore(regions=block_regions(tmp_path), signing_key=key_id, signing_algorithm="ed25519").keyring()


def test_block_with_a_missing_or_weak_secret_fails_clearly(prefect_server, tmp_path: Path) -> None:
    from prefect.blocks.system import Secret

    missing = unique("no-such-key")
    for store in (
        CheckpointStore(regions=block_regions(tmp_path), signing_key=missing),
        CheckpointStore(regions=block_regions(tmp_path), verification_keys=[missing]),
    ):
        with pytest.raises(SigningKeyError) as caught:
            store.save(training_state(1), lineage=LINEAGE)
        message = str(caught.value)
        assert f"Secret block {missing!r} cannot be loaded" in message
        assert f"Secret(value=...).save({missing!r})" in message
    assert not blob_files(tmp_path), "nothing was written without a key"

    weak = unique("weak-key")
    Secret(value="short").save(weak)
    with pytest.raises(SigningKeyError, match="at least 32"):
        CheckpointStore(regions=block_regions(tmp_path), signing_key=weak).save(training_state(1), lineage=LINEAGE)


def saved_signed_block_with_a_forged_region(tmp_path: Path, prefix: str) -> tuple[str, str, list[Path]]:
    """An HMAC-signing CheckpointStore block saved on the server (key in a Secret block), one checkpoint,
    and its manifest in region eu forged (step rewritten, signature left): (key id, block name, manifests)."""
    from prefect.blocks.system import Secret

    key_id = unique(f"{prefix}-key")
    Secret(value=secrets.token_hex(32)).save(key_id)
    block_name = unique(f"{prefix}-signed")
    store = CheckpointStore(regions=block_regions(tmp_path), write_quorum=1, signing_key=key_id)
    store.save(block_name)
    store.save(training_state(1), lineage=LINEAGE, step=1)
    manifests = manifest_files(tmp_path, 1)
    rewrite(manifests[0], lambda raw: raw.update(step=99))
    return key_id, block_name, manifests


def test_cli_verify_of_a_signed_store_with_a_tampered_region(prefect_server, tmp_path: Path) -> None:
    from prefect_recovery import cli

    key_id, block_name, (eu, us) = saved_signed_block_with_a_forged_region(tmp_path, "cli")

    runner = CliRunner()
    as_json = runner.invoke(cli.app, ["verify", "--store", block_name, "--json"])
    assert as_json.exit_code == 1, as_json.output
    report = json.loads(as_json.stdout)
    assert report["healthy"] is False
    assert report["signing"].startswith(f"on: signs with '{key_id}'")
    [problem] = report["problems"]
    assert (problem["region"], problem["kind"], problem["repaired"]) == ("eu", "bad signature", False)
    assert "does not match its content" in problem["detail"]
    [row] = report["checkpoints"]
    assert row["signature"] == f"verified (key {key_id})"
    assert row["regions"] == {"eu": "bad signature", "us": "ok"}

    original_width = cli.console.width
    cli.console.width = 250  # one line per table row, whatever the terminal
    try:
        human = runner.invoke(cli.app, ["verify", "--store", block_name])
        assert human.exit_code == 1
        assert "problems remain" in human.stdout
        assert "bad signature" in human.stdout and "eu" in human.stdout
        assert "does not match its content" in human.stdout and "tampering" in human.stdout
        assert "Traceback" not in human.output

        healed = runner.invoke(cli.app, ["verify", "--store", block_name, "--repair"])
        assert healed.exit_code == 0, healed.output
        assert "healthy" in healed.stdout and "bad signature" in healed.stdout
        assert eu.read_bytes() == us.read_bytes()

        clean = runner.invoke(cli.app, ["verify", "--store", block_name])
        assert clean.exit_code == 0 and "healthy" in clean.stdout and "problems" not in clean.stdout.lower()
    finally:
        cli.console.width = original_width


def test_cli_keygen_keys_sign_a_block_store(prefect_server, tmp_path: Path) -> None:
    from prefect.blocks.system import Secret

    from prefect_recovery import cli

    name = unique("keygen-hmac")
    made = CliRunner().invoke(cli.app, ["keygen", name, "--algorithm", "hmac-sha256"])
    assert made.exit_code == 0, made.output
    assert name in made.stdout and "signing_key" in made.stdout
    assert len(str(Secret.load(name).get())) >= 32
    store = CheckpointStore(regions=block_regions(tmp_path), write_quorum=2, signing_key=name)
    state = training_state(1)
    store.save(state, lineage=LINEAGE)
    assert_identical(store.load(lineage=LINEAGE), state)
    assert json.loads(manifest_files(tmp_path, 1)[0].read_bytes())["signature"]["key_id"] == name

    again = CliRunner().invoke(cli.app, ["keygen", name, "--algorithm", "hmac-sha256"])
    assert again.exit_code != 0, "an existing key is never replaced without --overwrite"
    assert_identical(store.load(lineage=LINEAGE), state)


def test_cli_keygen_public_key_lets_a_reader_verify(prefect_server, tmp_path: Path) -> None:
    from prefect_recovery import cli

    name, public = unique("keygen-ed"), unique("keygen-ed-pub")
    made = CliRunner().invoke(cli.app, ["keygen", name, "--public", public])
    assert made.exit_code == 0, made.output
    writer = CheckpointStore(regions=block_regions(tmp_path), signing_key=name, signing_algorithm="ed25519")
    state = training_state(1)
    writer.save(state, lineage=LINEAGE)
    reader = CheckpointStore(regions=block_regions(tmp_path), signing_algorithm="ed25519", verification_keys=[public])
    assert_identical(reader.load(lineage=LINEAGE), state)


def test_cli_audit_of_a_signed_store_prints_signing_and_each_checkpoints_signature(
    prefect_server, tmp_path: Path
) -> None:
    from prefect_recovery import cli

    key_id, block_name, (eu, us) = saved_signed_block_with_a_forged_region(tmp_path, "audit")

    original_width = cli.console.width
    cli.console.width = 250
    try:
        result = CliRunner().invoke(cli.app, ["audit", "--store", block_name, "--no-repair", "--no-retention"])
    finally:
        cli.console.width = original_width
    assert result.exit_code == 1, result.output
    assert f"signing: on: signs with '{key_id}'" in result.stdout
    assert f"verified (key {key_id})" in result.stdout
    assert "bad signature" in result.stdout
    assert "PROBLEMS REMAIN" in result.stdout
    assert eu.read_bytes() != us.read_bytes(), "--no-repair changes nothing"
