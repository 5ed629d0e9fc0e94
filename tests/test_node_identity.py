"""Deployment identity without servers: the TLS certificates `fedshop certs` writes, SuperNode
keys Flower can load, the node registry and the check that binds a reply's name to its node."""

import base64
import hashlib
import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from typer.testing import CliRunner

from common.messages import (
    CLIENT,
    DECLINED,
    LEDGER_ENTRY,
    LEDGER_HASH,
    LEDGER_SEQ,
    LEDGER_SIGNATURE,
    NAME,
)
from privacy.ledger import canonical
from privacy.signing import public_pem
from server.certs import make_certs, make_node_key
from server.node_registry import Binding, NodeBinder, Registry, RegistryError
from server.rounds import client_rows, triage
from simulations.cli import app


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_certs_name_the_hosts_asked_for_and_keep_private_keys_owner_only(tmp_path):
    files = make_certs(tmp_path / "certs", ["link.example.org", "10.0.0.5"], days=30)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["link.example.org"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    cert.verify_directly_issued_by(ca)  # raises unless the CA signed it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 30
    assert _mode(files.ca_key) == _mode(files.server_key) == 0o600
    assert not list(files.ca_key.parent.glob(".*.tmp"))  # written through a rename
    with pytest.raises(FileExistsError):  # a second run never replaces the CA nodes trust
        make_certs(tmp_path / "certs")


def test_default_sans_are_the_loopback_names(tmp_path):
    files = make_certs(tmp_path)
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_node_keys_are_what_flower_loads(tmp_path):
    public = make_node_key(tmp_path / "north.node")
    key = load_ssh_private_key((tmp_path / "north.node").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert _mode(tmp_path / "north.node") == 0o600


LEDGER_KEYS = {node: Ed25519PrivateKey.generate() for node in (11, 12)}


def _binding(node: int) -> Binding:
    pem = public_pem(LEDGER_KEYS[node].public_key()).decode()
    return Binding(node, f"ecdsa-sha2-nistp384 KEY{node}", pem)


def test_registry_gives_a_name_and_a_node_one_owner_and_survives_a_round_trip(tmp_path):
    reg = Registry()
    reg.add("north", _binding(11))
    with pytest.raises(RegistryError, match="already bound to node 11"):
        reg.add("north", _binding(12))
    with pytest.raises(RegistryError, match="already bound to 'north'"):
        reg.add("south", _binding(11))
    reg.add("south", _binding(12))
    reg.save(tmp_path / "registry.json")
    assert Registry.load(tmp_path / "registry.json").clients == reg.clients
    (tmp_path / "bad.json").write_text('{"clients": {"a": {"node-id": "x"}}}')
    with pytest.raises(RegistryError, match=r"bad\.json"):
        Registry.load(tmp_path / "bad.json")


def _reply(node: int, name: str, entry: dict | None = None, signer: int | None = None) -> Message:
    """A training reply from `node` reporting `name`, citing `entry` signed by `signer`'s key."""
    client = {NAME: name}
    if entry is not None:
        body = canonical(entry)
        client |= {
            LEDGER_SEQ: 0,
            LEDGER_HASH: hashlib.sha256(body).hexdigest(),
            LEDGER_ENTRY: body.decode(),
            LEDGER_SIGNATURE: base64.b64encode(LEDGER_KEYS[signer or node].sign(body)).decode(),
        }
    instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
    content = RecordDict({CLIENT: ConfigRecord(client), "metrics": MetricRecord({DECLINED: 0.0})})
    return Message(content, reply_to=instruction)


@pytest.fixture
def task(monkeypatch):
    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def test_a_registered_node_claiming_another_clients_name_is_rejected(tmp_path, task):
    reg = Registry()
    reg.add("north", _binding(11))
    reg.add("south", _binding(12))
    reg.save(tmp_path / "registry.json")
    binder = NodeBinder.for_run(str(tmp_path / "registry.json"))
    t = triage([_reply(11, "north"), _reply(12, "north"), _reply(13, "east")], binder)
    assert [m.metadata.src_node_id for m in t.trained] == [11]
    assert [why for _, why in t.rejected] == [
        "node 12 reports name 'north', which belongs to node 11",
        "node 13 reports name 'east', which is not in the node registry",
    ]
    rows = client_rows(1, t)
    assert [(r["client"], r["node"], r["status"]) for r in rows] == [
        ("north", 11, "trained"),
        ("north", 12, "rejected"),
        ("east", 13, "rejected"),
    ]


def test_a_cited_ledger_entry_must_be_signed_with_the_registered_key(tmp_path, task):
    reg = Registry()
    reg.add("north", _binding(11))
    reg.add("south", _binding(12))
    reg.save(tmp_path / "registry.json")
    binder = NodeBinder.for_run(str(tmp_path / "registry.json"))
    own = {"client": "north", "seq": 0}
    forged = _reply(11, "north", own, signer=12)
    tampered = _reply(11, "north", own)
    tampered.content[CLIENT][LEDGER_ENTRY] = canonical({"client": "north", "seq": 1}).decode()
    stolen = _reply(12, "south", {"client": "north"})
    t = triage([_reply(11, "north", own), forged, tampered, stolen], binder)
    assert [m.metadata.src_node_id for m in t.trained] == [11]
    assert [why for _, why in t.rejected] == [
        "'north': the cited ledger entry is not signed with 'north''s registered key",
        "'north': the cited ledger entry does not match its hash",
        "'south': the cited ledger entry belongs to another client",
    ]


def test_without_a_registry_the_first_node_to_report_a_name_keeps_it(task):
    binder = NodeBinder.for_run("")
    assert not triage([_reply(11, "north")], binder).rejected
    t = triage([_reply(12, "north"), _reply(11, "north")], binder)
    assert [m.metadata.src_node_id for m in t.trained] == [11]
    assert [why for _, why in t.rejected] == [
        "node 12 reports name 'north', which belongs to node 11"
    ]
    nameless = _reply(13, "north")
    nameless.content[CLIENT] = ConfigRecord({})
    assert [why for _, why in triage([nameless], binder).rejected] == [
        "node 13: its client record names no client"
    ]


def test_cli_refuses_to_replace_keys_or_rebind_a_name_before_asking_flower(tmp_path):
    runner = CliRunner()
    assert runner.invoke(app, ["certs", "--out", str(tmp_path / "c")]).exit_code == 0
    again = runner.invoke(app, ["certs", "--out", str(tmp_path / "c")])
    assert again.exit_code == 2 and "refusing to replace" in again.output
    assert runner.invoke(app, ["node", "key", "north", "--out", str(tmp_path)]).exit_code == 0
    assert runner.invoke(app, ["keys", "north", "--out", str(tmp_path)]).exit_code == 0
    reg = Registry()
    reg.add("north", _binding(11))
    reg.save(tmp_path / "registry.json")
    # No SuperLink runs here: the command must stop before `flwr supernode register`.
    bound = runner.invoke(
        app,
        [
            "node", "register", "north",
            "--node-key", str(tmp_path / "north.node.pub"),
            "--ledger-key", str(tmp_path / "north.pub"),
            "--registry", str(tmp_path / "registry.json"),
        ],
    )  # fmt: skip
    assert bound.exit_code == 2 and "already bound to node 11" in bound.output
    assert Registry.load(tmp_path / "registry.json").clients == reg.clients
