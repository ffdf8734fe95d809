"""Signed manifests (FORMAT.md, "Signatures"): who wrote a checkpoint, provably.

A manifest's ``manifest_digest`` catches bit rot, but anyone who can write to a region can
also recompute it. A signature made with a key the writer holds closes that gap: changing one
byte, swapping a blob digest or copying a manifest into another lineage or version all change
the signed body (which names its lineage and version), so the signature no longer verifies.

Two algorithms: ``hmac-sha256`` (a shared secret; every reader that verifies can also sign)
and ``ed25519`` (readers hold only the public key). Each signature names its ``key_id``; a
``Keyring`` holds the one key that signs new manifests plus any older keys that still verify,
so keys rotate without re-signing history.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Callable, Iterable
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import ManifestSignatureError, SigningKeyError

SignatureAlgorithm = Literal["hmac-sha256", "ed25519"]
ALGORITHMS: tuple[SignatureAlgorithm, ...] = ("hmac-sha256", "ed25519")
# Domain separation: a signature over a manifest can never be replayed as one over anything else
# (a journal event's body included), and the other way round.
SIGNATURE_CONTEXT = b"prefect-recovery/manifest-signature/v1\n"
JOURNAL_SIGNATURE_CONTEXT = b"prefect-recovery/journal-signature/v1\n"
KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
MIN_HMAC_SECRET_BYTES = 32


def check_key_id(key_id: str) -> str:
    if not isinstance(key_id, str) or not KEY_ID.fullmatch(key_id):
        raise SigningKeyError(
            f"invalid key id {key_id!r}: use 1-128 characters from A-Z a-z 0-9 . _ : / -, "
            "starting with a letter or digit"
        )
    return key_id


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class ManifestKey:
    """One key: signs (when it holds secret material) and verifies manifests."""

    def __init__(self, key_id: str, algorithm: SignatureAlgorithm, *, can_sign: bool):
        self.key_id = check_key_id(key_id)
        self.algorithm = algorithm
        self.can_sign = can_sign

    def sign(self, message: bytes) -> str:
        raise NotImplementedError

    def verify(self, message: bytes, value: str) -> bool:
        raise NotImplementedError

    def __repr__(self) -> str:  # never the secret
        return f"<{type(self).__name__} {self.algorithm} key_id={self.key_id!r}>"


class _HmacKey(ManifestKey):
    def __init__(self, key_id: str, secret: bytes):
        super().__init__(key_id, "hmac-sha256", can_sign=True)
        self._secret = secret

    def sign(self, message: bytes) -> str:
        return _b64(hmac.new(self._secret, message, hashlib.sha256).digest())

    def verify(self, message: bytes, value: str) -> bool:
        if not isinstance(value, str) or not value.isascii():  # compare_digest raises on non-ASCII str
            return False
        return hmac.compare_digest(self.sign(message), value)


class _Ed25519Key(ManifestKey):
    def __init__(self, key_id: str, private: Ed25519PrivateKey | None, public: Ed25519PublicKey):
        super().__init__(key_id, "ed25519", can_sign=private is not None)
        self._private = private
        self._public = public

    def sign(self, message: bytes) -> str:
        if self._private is None:
            raise SigningKeyError(f"key {self.key_id!r} is an Ed25519 public key: it verifies but cannot sign")
        return _b64(self._private.sign(message))

    def verify(self, message: bytes, value: str) -> bool:
        try:
            self._public.verify(base64.b64decode(value, validate=True), message)
        except (InvalidSignature, binascii.Error, ValueError, TypeError):
            return False
        return True


def _as_bytes(material: str | bytes) -> bytes:
    return material.encode("utf-8") if isinstance(material, str) else bytes(material)


def hmac_key(key_id: str, secret: str | bytes) -> ManifestKey:
    """An HMAC-SHA256 key; ``secret`` (at least 32 bytes, e.g. ``secrets.token_hex(32)``) is used as given."""
    raw = _as_bytes(secret)
    if len(raw) < MIN_HMAC_SECRET_BYTES:
        raise SigningKeyError(
            f"HMAC key {key_id!r} is {len(raw)} bytes; use at least {MIN_HMAC_SECRET_BYTES} random bytes "
            '(python -c "import secrets; print(secrets.token_hex(32))")'
        )
    return _HmacKey(key_id, raw)


def ed25519_key(key_id: str, material: str | bytes) -> ManifestKey:
    """An Ed25519 key from PEM (PKCS#8 private or SubjectPublicKeyInfo public) or 32 raw bytes in
    base64/hex (a private seed). A public key verifies only."""
    raw = _as_bytes(material).strip()
    try:
        if raw.startswith(b"-----BEGIN PUBLIC KEY"):
            public = serialization.load_pem_public_key(raw)
            if not isinstance(public, Ed25519PublicKey):
                raise SigningKeyError(f"key {key_id!r} is a PEM public key but not an Ed25519 one")
            return _Ed25519Key(key_id, None, public)
        if raw.startswith(b"-----BEGIN"):
            private = serialization.load_pem_private_key(raw, password=None)
        else:
            seed = bytes.fromhex(raw.decode()) if len(raw) == 64 else base64.b64decode(raw, validate=True)
            if len(seed) != 32:
                raise SigningKeyError(f"Ed25519 key {key_id!r}: a raw key is 32 bytes, got {len(seed)}")
            private = Ed25519PrivateKey.from_private_bytes(seed)
    except SigningKeyError:
        raise
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError) as exc:
        raise SigningKeyError(f"Ed25519 key {key_id!r} cannot be read: {exc}") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise SigningKeyError(f"key {key_id!r} is a PEM private key but not an Ed25519 one")
    return _Ed25519Key(key_id, private, private.public_key())


def load_key(key_id: str, algorithm: SignatureAlgorithm, material: str | bytes) -> ManifestKey:
    if algorithm == "hmac-sha256":
        return hmac_key(key_id, material)
    if algorithm == "ed25519":
        return ed25519_key(key_id, material)
    raise SigningKeyError(f"unknown signature algorithm {algorithm!r}; use one of {ALGORITHMS}")


def new_ed25519_key_pem() -> tuple[str, str]:
    """A fresh Ed25519 key pair as (private PKCS#8 PEM, public PEM)."""
    private = Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem.decode(), public_pem.decode()


class Keyring:
    """The key that signs new manifests and the keys whose signatures are accepted.

    Args:
        signing_key: Signs every manifest this store commits (and verifies them).
        verify_keys: Older or other writers' keys, accepted for verification only (rotation).
        accept_unsigned: Accept manifests without a signature (while migrating a store that
            was written before signing was turned on). Off by default: an attacker could
            otherwise strip a signature.
    """

    def __init__(
        self,
        signing_key: ManifestKey | None = None,
        verify_keys: Iterable[ManifestKey] = (),
        *,
        accept_unsigned: bool = False,
    ):
        if signing_key is not None and not signing_key.can_sign:
            raise SigningKeyError(f"{signing_key!r} cannot sign; give it as a verification key")
        self.signing_key = signing_key
        self.keys: dict[str, ManifestKey] = {}
        for key in [*([signing_key] if signing_key else []), *verify_keys]:
            if key.key_id in self.keys and self.keys[key.key_id] is not key:
                raise SigningKeyError(f"two keys share the key id {key.key_id!r}; key ids must be unique")
            self.keys[key.key_id] = key
        self.accept_unsigned = accept_unsigned

    def sign(self, message: bytes, *, context: bytes = SIGNATURE_CONTEXT) -> dict[str, Any] | None:
        """The signature fields for ``message`` (a manifest body, or with ``JOURNAL_SIGNATURE_CONTEXT``
        a journal event's body), or None without a signing key."""
        if self.signing_key is None:
            return None
        key = self.signing_key
        return {"algorithm": key.algorithm, "key_id": key.key_id, "value": key.sign(context + message)}

    def check(
        self,
        message: bytes,
        signature: Any,
        *,
        fail: Callable[[str], Exception] = ManifestSignatureError,
        context: bytes = SIGNATURE_CONTEXT,
        what: str = "manifest",
    ) -> str:
        """Raise ``fail(message)`` (``ManifestSignatureError`` by default) unless ``signature`` is a
        good one over ``message`` in ``context``; returns the key id that verified it ("" for an
        accepted unsigned record)."""
        if signature is None:
            if self.accept_unsigned:
                return ""
            raise fail(
                f"{what} is not signed, and this store requires signatures (signing is on); it may have "
                "been written before signing was turned on (set accept_unsigned while migrating), had its "
                "signature stripped, or been written by someone without the store's key"
            )
        key = self.keys.get(signature.key_id)
        if key is None:
            raise fail(
                f"{what} is signed with key {signature.key_id!r}, which this store does not know "
                f"(known: {sorted(self.keys)}); add it to the store's verification keys if it was rotated out"
            )
        # Either the record was changed, or this store holds another key under that name (a wrong secret
        # in its Secret block, another algorithm): the second fails every record alike, so say both.
        wrong_key = (
            f"or this store's key {key.key_id!r} is not the one that signed it (if every {what} fails like this, "
            f"check the secret and signing_algorithm of key {key.key_id!r} before repairing anything)"
        )
        if key.algorithm != signature.algorithm:
            raise fail(
                f"{what} signature (key {signature.key_id!r}, {signature.algorithm}) does not match its content: "
                f"this store's key {key.key_id!r} is {key.algorithm}, so either the {what} was changed after it "
                f"was signed (tampering?) or the store names another key {key.key_id!r} (check its "
                "signing_algorithm and Secret block)"
            )
        if not key.verify(context + message, signature.value):
            remedy = (
                "do not load it; `prefect-recovery audit` restores it from a region whose copy verifies"
                if context == SIGNATURE_CONTEXT
                else "it is not acted upon; a region whose copy verifies serves it"
            )
            raise fail(
                f"{what} signature (key {signature.key_id!r}) does not match its content: the {what} was "
                f"changed after it was signed (tampering?) — {remedy}; {wrong_key}"
            )
        return key.key_id

    def __repr__(self) -> str:
        signer = self.signing_key.key_id if self.signing_key else None
        return f"<Keyring signs with {signer!r}, verifies {sorted(self.keys)}, accept_unsigned={self.accept_unsigned}>"


__all__ = [
    "ALGORITHMS",
    "JOURNAL_SIGNATURE_CONTEXT",
    "Keyring",
    "ManifestKey",
    "SignatureAlgorithm",
    "check_key_id",
    "ed25519_key",
    "hmac_key",
    "load_key",
    "new_ed25519_key_pem",
]
