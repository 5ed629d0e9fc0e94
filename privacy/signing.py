"""Ed25519 key pairs that sign privacy ledgers: one per client, one for the server."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.atomic import write_with

PUBLIC_SUFFIX = ".pub"


class KeyFileError(ValueError):
    """A key file is missing, unreadable or of the wrong kind."""


def fingerprint(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def create_pair(private_path: Path, overwrite: bool = False) -> Ed25519PrivateKey:
    """Write `<name>.key` (owner-only) and `<name>.pub`; never replaces a key unless told to."""
    public_path = private_path.with_suffix(PUBLIC_SUFFIX)
    if not overwrite and (private_path.exists() or public_path.exists()):
        raise KeyFileError(f"{private_path}: a key already exists; refusing to replace it")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )

    def write_private(tmp: Path) -> None:
        tmp.write_bytes(pem)
        os.chmod(tmp, 0o600)

    write_with(private_path, write_private)
    write_with(public_path, lambda tmp: tmp.write_bytes(public_pem(key.public_key())))
    return key


def load_private(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not a readable private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 private key")
    return key


def load_or_create(path: Path) -> Ed25519PrivateKey:
    """The key at `path`, created on first use (a client with no key given gets its own)."""
    return load_private(path) if path.exists() else create_pair(path)


def load_public(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not a readable public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: not an Ed25519 public key")
    return key


def load_keyring(folder: Path) -> dict[str, Ed25519PublicKey]:
    """Trusted public keys by name: `<folder>/<name>.pub` vouches for ledgers signed as `name`."""
    if not folder.is_dir():
        raise KeyFileError(f"{folder}: no such key folder")
    return {p.name.removesuffix(PUBLIC_SUFFIX): load_public(p) for p in folder.glob("*.pub")}


def verifies(public: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    try:
        public.verify(signature, data)
    except InvalidSignature:
        return False
    return True
