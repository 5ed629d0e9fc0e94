"""Deployment keys the platform creates: the TLS certificate authority and the SuperLink's
certificate, and the key pairs SuperNodes authenticate with.

Flower's SuperLink serves TLS with `--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`; SuperNodes
and the Flower CLI trust it through the CA certificate (`--root-certificates`,
`root-certificates` in the connection config). SuperNode authentication
(`--enable-supernode-auth`) wants NIST elliptic-curve keys in OpenSSH format: the private key for
`flower-supernode --auth-supernode-private-key`, the public key for `flwr supernode register`.
Private keys are written owner-only from their creation, like ledger signing keys.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.atomic import write_with
from privacy.signing import write_owner_only

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
NODE_PUBLIC_SUFFIX = ".pub"


@dataclass(frozen=True)
class CertFiles:
    ca_cert: Path  # public: every SuperNode and `flwr` user gets it
    ca_key: Path  # secret, offline: signs new SuperLink certificates
    server_cert: Path  # public
    server_key: Path  # secret, on the SuperLink's machine only


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_certs(
    out: Path, hosts: list[str] | None = None, days: int = 365, *, start: datetime | None = None
) -> CertFiles:
    """A fresh CA and a SuperLink certificate it signs, valid for `hosts` (IP addresses or DNS
    names; a SuperNode checks the address it dials against them) for `days` days from `start`
    (default: now, less a few minutes for clock differences; later, to issue for a rotation)."""
    hosts = list(hosts or DEFAULT_HOSTS)
    files = CertFiles(out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY)
    existing = [p for p in (files.ca_key, files.server_key) if p.exists()]
    if existing:
        # A new CA silently replacing the one every SuperNode trusts would cut them all off.
        raise FileExistsError(f"{existing[0]}: keys already exist; refusing to replace them")
    start = start or datetime.now(UTC) - timedelta(minutes=5)
    end = start + timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedshop deployment CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    write_owner_only(files.ca_key, _pem_key(ca_key))
    write_owner_only(files.server_key, _pem_key(server_key))
    for path, cert in ((files.ca_cert, ca_cert), (files.server_cert, server_cert)):
        pem = cert.public_bytes(serialization.Encoding.PEM)
        write_with(path, lambda tmp, pem=pem: tmp.write_bytes(pem))
    return files


def make_node_key(private_path: Path) -> Path:
    """A SuperNode's authentication key pair (P-384, OpenSSH format, as Flower reads it):
    `private_path` (owner-only, stays on the SuperNode) and `<private_path>.pub`, which the
    platform registers. Returns the public key's path."""
    public_path = private_path.with_name(private_path.name + NODE_PUBLIC_SUFFIX)
    if private_path.exists() or public_path.exists():
        raise FileExistsError(f"{private_path}: a key already exists; refusing to replace it")
    key = ec.generate_private_key(ec.SECP384R1())
    write_owner_only(
        private_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    write_with(public_path, lambda tmp: tmp.write_bytes(public + b"\n"))
    return public_path
