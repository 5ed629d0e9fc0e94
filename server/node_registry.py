"""Which authenticated SuperNode speaks for which client: the platform's node registry, and the
check every reply passes before the round loop counts it.

A reply's client name is self-reported. With SuperNode authentication on, the SuperLink signs
nothing for the ServerApp, but it does fix identities: `flwr supernode register KEY` assigns the
node id once per public key, and every Fleet request is signed with that key and must name that
node id, so `msg.metadata.src_node_id` is the authenticated node. Flower 1.42 does not show the
ServerApp the public key itself (the Grid gives node ids only), so the registry binds names to
the node ids registration returned, with the node's public key for the record and the
client's ledger key, against which every ledger entry a reply cites is checked.

Registry file (JSON, written by `fedshop node register`, kept by the platform):

    {"clients": {"north": {"node-id": 6174…, "node-public-key": "ecdsa-sha2-nistp384 AAAA…",
                           "ledger-public-key": "-----BEGIN PUBLIC KEY-----\\n…"}}}

Without a registry file (local trials, simulation) a name is bound to the first node that
reports it in this run, so two nodes still cannot hold one name.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from flwr.app import ConfigRecord, Message

from common.atomic import write_with
from common.messages import CLIENT, LEDGER_ENTRY, LEDGER_HASH, LEDGER_SIGNATURE, NAME
from privacy.signing import verifies

NODE_ID = "node-id"
NODE_PUBLIC_KEY = "node-public-key"
LEDGER_PUBLIC_KEY = "ledger-public-key"


class RegistryError(ValueError):
    """The registry file is unreadable, or a change would give a name or a node two owners."""


@dataclass(frozen=True)
class Binding:
    node_id: int
    node_public_key: str  # OpenSSH line the SuperNode authenticates with
    ledger_public_key: str  # PEM of the Ed25519 key that signs the client's privacy ledger


@dataclass
class Registry:
    clients: dict[str, Binding] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Registry:
        try:
            raw = json.loads(path.read_text())
            clients = {
                str(name): Binding(
                    int(b[NODE_ID]), str(b[NODE_PUBLIC_KEY]), str(b[LEDGER_PUBLIC_KEY])
                )
                for name, b in raw["clients"].items()
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RegistryError(f"{path}: not a readable node registry ({exc!r})") from exc
        registry = cls()
        for name, binding in clients.items():
            registry.add(name, binding)
        return registry

    def save(self, path: Path) -> None:
        body = {
            "clients": {
                name: {
                    NODE_ID: b.node_id,
                    NODE_PUBLIC_KEY: b.node_public_key,
                    LEDGER_PUBLIC_KEY: b.ledger_public_key,
                }
                for name, b in sorted(self.clients.items())
            }
        }
        write_with(path, lambda tmp: tmp.write_text(json.dumps(body, indent=2) + "\n"))

    def add(self, name: str, binding: Binding) -> None:
        """Bind `name`; a name or a node that already has another owner is an error (rotating
        a key is `remove` then `add`, so nobody holds a name twice by accident)."""
        if name in self.clients:
            raise RegistryError(f"client {name!r} is already bound to node {self.node_of(name)}")
        for other, b in self.clients.items():
            if binding.node_id == b.node_id or binding.node_public_key == b.node_public_key:
                raise RegistryError(f"node {binding.node_id} is already bound to {other!r}")
        self.clients[name] = binding

    def remove(self, name: str) -> Binding:
        if name not in self.clients:
            raise RegistryError(f"client {name!r} is not in the registry")
        return self.clients.pop(name)

    def node_of(self, name: str) -> int:
        return self.clients[name].node_id


@dataclass
class NodeBinder:
    """Checks a reply's self-reported name against the node it came from. `pinned`: bindings
    come from the platform's registry and an unknown node is rejected; otherwise each name is
    bound to the first node that reports it in this run."""

    names: dict[str, int]
    pinned: bool
    ledger_keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)

    @classmethod
    def for_run(cls, registry_path: str) -> NodeBinder:
        if not registry_path:
            return cls({}, pinned=False)
        registry = Registry.load(Path(registry_path))
        keys = {name: _ledger_key(name, b) for name, b in registry.clients.items()}
        return cls({name: b.node_id for name, b in registry.clients.items()}, True, keys)

    def rejection(self, msg: Message) -> str | None:
        """Why `msg` may not count for the name it reports, or None when it may. A reply
        without a client record (an error) names nobody and is left to triage."""
        if msg.has_error() or CLIENT not in msg.content:
            return None
        node = msg.metadata.src_node_id
        if NAME not in msg.content[CLIENT]:
            return f"node {node}: its client record names no client"
        name = str(msg.content[CLIENT][NAME])
        owner = self.names.get(name)
        if owner is None and self.pinned:
            return f"node {node} reports name {name!r}, which is not in the node registry"
        if owner is None:
            self.names[name] = node
            return None
        if owner != node:
            return f"node {node} reports name {name!r}, which belongs to node {owner}"
        return self._unsigned(name, msg.content[CLIENT]) if self.pinned else None

    def _unsigned(self, name: str, client: ConfigRecord) -> str | None:
        """Why the ledger entry a reply cites is not `name`'s own signed entry, or None.

        The hash and signature bind the reply to one entry signed with the key the platform
        pinned for `name`, so neither a stolen name nor a forged ledger head gets through."""
        if LEDGER_HASH not in client and LEDGER_ENTRY not in client:
            return None  # nothing cited: a refusal, or a client without DP (see Citation)
        entry = str(client.get(LEDGER_ENTRY, "")).encode()
        if hashlib.sha256(entry).hexdigest() != str(client.get(LEDGER_HASH)):
            return f"{name!r}: the cited ledger entry does not match its hash"
        signature = base64.b64decode(str(client.get(LEDGER_SIGNATURE, "")))
        if not verifies(self.ledger_keys[name], signature, entry):
            return f"{name!r}: the cited ledger entry is not signed with {name!r}'s registered key"
        if json.loads(entry).get("client") != name:
            return f"{name!r}: the cited ledger entry belongs to another client"
        return None


def _ledger_key(name: str, binding: Binding) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(binding.ledger_public_key.encode())
    except ValueError as exc:
        raise RegistryError(f"client {name!r}: the registered ledger key is not a PEM key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise RegistryError(f"client {name!r}: the registered ledger key is not Ed25519")
    return key
