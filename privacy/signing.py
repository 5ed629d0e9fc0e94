"""Ed25519 key pairs that sign privacy ledgers: one per client, one for the server.

Private keys are created owner-only (never readable by anyone else, not even for an instant) and,
by default, kept beside a run folder rather than in it: the run folder is what a compliance team
receives, so it holds only public keys (`keys/server.pub`, each client's `signing.pub`).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.atomic import write_with

PUBLIC_SUFFIX = ".pub"
PRIVATE_KEYS_SUFFIX = ".keys"  # `<run>.keys/` beside the run folder `<run>` holds its private keys
# Where a verifier without pinned keys finds the public key of a ledger, relative to its folder
CLIENT_PUBLIC_KEY = "signing.pub"
SERVER_PUBLIC_KEY = "keys/server.pub"


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
    write_owner_only(private_path, pem)
    write_with(public_path, lambda tmp: tmp.write_bytes(public_pem(key.public_key())))
    return key


def write_owner_only(target: Path, data: bytes) -> None:
    """Write `target` through a temporary file and a rename, mode 0600 from its creation.

    `common.atomic` gives a new file the umask's mode first (shared outputs must stay readable),
    so a private key written through it and then chmod-ed would be world-readable meanwhile.
    """
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def load_private(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not a readable private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 private key")
    return key


def load_or_create(path: Path, publish: Path | None = None) -> Ed25519PrivateKey:
    """The key at `path`, created on first use (a client with no key given gets its own).

    `publish`: also place the public key there, where a verifier looks for it beside the
    ledger it signs; a different key already published there is an error, since the ledger's
    earlier entries were signed with that one.
    """
    key = load_private(path) if path.exists() else create_pair(path)
    if publish is not None:
        if not publish.exists():
            write_with(publish, lambda tmp: tmp.write_bytes(public_pem(key.public_key())))
        elif fingerprint(load_public(publish)) != fingerprint(key.public_key()):
            raise KeyFileError(
                f"{publish} holds another public key than {path}: the ledger beside it was "
                "signed with a different private key (restore that key to this path)"
            )
    return key


def private_keys(run_dir: Path) -> Path:
    """The folder of a run's default private keys: `<run>.keys/`, beside the run folder and
    never inside it, since the run folder is handed to compliance."""
    run_dir = run_dir.resolve()  # "." or "runs/x/.." name no folder of their own
    return run_dir.with_name(run_dir.name + PRIVATE_KEYS_SUFFIX)


def client_key(state_dir: Path, run_dir: Path, name: str) -> Path:
    """Default private key of a client whose node config names none.

    A simulated client's state folder lies inside the run folder, so its key goes to the run's
    private key folder; a deployed client's state folder is its own and keeps `signing.key`.
    """
    if state_dir.resolve().is_relative_to(run_dir.resolve()):
        return private_keys(run_dir) / f"{name}.key"
    return state_dir / "signing.key"


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
