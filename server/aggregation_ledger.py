"""The server's signed aggregation ledger: per round, which client ledger entries it used."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Message

from common.messages import CLIENT, LEDGER_HASH, LEDGER_SEQ, NAME
from common.run_files import SERVER_LEDGER
from privacy.ledger import Aggregation, append, entries


def _entry(message: Message, status: str) -> dict:
    client = message.content.get(CLIENT, {})
    return {
        "client": str(client.get(NAME, message.metadata.src_node_id)),
        "status": status,
        "seq": int(client.get(LEDGER_SEQ, -1)),
        "hash": str(client.get(LEDGER_HASH, "")),
    }


@dataclass
class AggregationLedger:
    """The run folder's server ledger (`SERVER_LEDGER`), and the newest client entries it names."""

    out: Path
    key: Ed25519PrivateKey
    run_id: str
    strategy: str
    heads: dict[str, tuple[int, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for record in entries(self.out / SERVER_LEDGER, Aggregation):
            self._advance([c.model_dump() for c in record.clients])

    def _advance(self, clients: list[dict]) -> None:
        for c in clients:
            if c["seq"] >= 0 and c["seq"] >= self.heads.get(c["client"], (-1, ""))[0]:
                self.heads[c["client"]] = (c["seq"], c["hash"])

    def heads_json(self, name: str | None = None) -> str:
        """The newest ledger entry the server has seen from client `name` (None: from every
        client); clients check they still hold it before training or evaluating, so a lost or
        rolled-back ledger cannot reset a budget."""
        if name is None:
            return json.dumps(self.heads, sort_keys=True)
        return json.dumps({name: self.heads[name]} if name in self.heads else {})

    def record(
        self,
        server_round: int,
        used: list[Message],
        declined: list[Message],
        refused: list[Message],
        aggregated: bool,
        central_dp: dict[str, float | str] | None = None,
        secure_aggregation: dict | None = None,
    ) -> None:
        """Append the round's training record; `used` lists updates that went into the
        aggregate."""
        clients = [_entry(m, "used" if aggregated else "not-aggregated") for m in used]
        clients += [_entry(m, "declined") for m in declined]
        extra = {"central_dp": central_dp, "secure_aggregation": secure_aggregation}
        self._append(server_round, "train", clients + _refusals(refused), extra)

    def record_evaluation(
        self, server_round: int, evaluated: list[Message], refused: list[Message]
    ) -> None:
        """Append the round's evaluation record: the entries that recorded each client's
        evaluation spend."""
        clients = [_entry(m, "evaluated") for m in evaluated]
        self._append(server_round, "evaluate", clients + _refusals(refused))

    def _append(self, server_round: int, step: str, clients: list[dict], extra=None) -> None:
        fields = {
            "run_id": self.run_id,
            "server_round": server_round,
            "step": step,
            "strategy": self.strategy,
            "clients": clients,
            **(extra or {}),
        }
        append(self.out / SERVER_LEDGER, fields, self.key, Aggregation)
        self._advance(clients)


def _refusals(refused: list[Message]) -> list[dict]:
    return [_entry(m, "refused") for m in refused]  # nothing released, no ledger entry
