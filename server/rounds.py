"""The federated round loop: train, triage replies, aggregate, evaluate, checkpoint.

Flower's `Strategy.start` runs every round in one go; this loop calls the same strategy
methods per round so that each round is checkpointed, a run can resume, and clients that
decline (privacy budget) or fail are separated from the ones whose updates count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common.messages import CLIENT, LEDGER_HEADS, REFUSED
from server import checkpoint
from server.central_dp import CentralPrivacy
from server.trail import Trail


@dataclass
class Triage:
    trained: list[Message]
    declined: list[Message]
    failed: list[Message]
    refused: list[Message]


def triage(replies: list[Message]) -> Triage:
    failed = [m for m in replies if m.has_error()]
    ok = [m for m in replies if not m.has_error()]
    refused = [m for m in ok if REFUSED in m.content]
    answered = [m for m in ok if REFUSED not in m.content]
    declined = [m for m in answered if float(m.content["metrics"].get("declined", 0)) > 0]
    trained = [m for m in answered if m not in declined]
    return Triage(trained, declined, failed, refused)


def _name(m: Message) -> str:
    return str(m.content[CLIENT]["name"]) if CLIENT in m.content else str(m.metadata.src_node_id)


def client_rows(server_round: int, t: Triage) -> list[dict]:
    rows = []
    for status, messages in (("trained", t.trained), ("declined", t.declined)):
        for m in messages:
            rows.append(
                {
                    "round": server_round,
                    "client": _name(m),
                    "node": m.metadata.src_node_id,
                    "status": status,
                    **{k: float(v) for k, v in m.content["metrics"].items()},
                }
            )
    for m in t.refused:
        rows.append(
            {
                "round": server_round,
                "client": _name(m),
                "node": m.metadata.src_node_id,
                "status": "refused",
                "error": str(m.content[REFUSED]["reason"]),
            }
        )
    for m in t.failed:
        rows.append(
            {
                "round": server_round,
                "client": str(m.metadata.src_node_id),
                "node": m.metadata.src_node_id,
                "status": "failed",
                "error": m.error.reason,
            }
        )
    return rows


def run_rounds(
    grid: Grid,
    strategy: Strategy,
    arrays: ArrayRecord,
    first_round: int,
    last_round: int,
    min_clients: int,
    shared: dict[str, str],
    out: Path,
    history: list[dict],
    on_round: Callable[[dict], None],
    trail: Trail,
    central: CentralPrivacy | None = None,
) -> tuple[ArrayRecord, str]:
    """Run rounds `first_round..last_round`; returns the final arrays and why the loop ended."""
    for rnd in range(first_round, last_round + 1):
        log(INFO, "[ROUND %s/%s]", rnd, last_round)
        replies = list(
            grid.send_and_receive(
                strategy.configure_train(
                    rnd, arrays, ConfigRecord(shared | {LEDGER_HEADS: trail.heads_json()}), grid
                )
            )
        )
        t = triage(replies)
        record = {"round": rnd, "clients": client_rows(rnd, t)}
        for m in t.declined:
            log(
                WARNING,
                "node %s declined round %s: privacy budget exhausted",
                m.metadata.src_node_id,
                rnd,
            )
        for m in t.failed:
            log(
                WARNING,
                "node %s failed in round %s: %s",
                m.metadata.src_node_id,
                rnd,
                m.error.reason,
            )
        for m in t.refused:
            log(WARNING, "%s refused round %s: %s", _name(m), rnd, m.content[REFUSED]["reason"])
        if len(t.trained) < min_clients:
            reason = (
                f"round {rnd}: only {len(t.trained)} client(s) trained "
                f"({len(t.declined)} declined, {len(t.refused)} refused, {len(t.failed)} failed); "
                f"min-clients is {min_clients}, so the run stops here"
            )
            log(WARNING, reason)
            trail.record(
                rnd, t.trained, t.declined, t.refused, False, central and central.summary()
            )
            record["stopped"] = reason
            history.append(record)
            on_round(record)
            return arrays, reason
        new_arrays, train_metrics = strategy.aggregate_train(rnd, t.trained)
        if new_arrays is not None:
            arrays = new_arrays
            if central:
                central.released()
        else:
            log(WARNING, "round %s: no aggregate (the model is unchanged)", rnd)
        trail.record(
            rnd,
            t.trained,
            t.declined,
            t.refused,
            new_arrays is not None,
            central and central.summary(),
        )
        answers = triage(
            list(
                grid.send_and_receive(
                    strategy.configure_evaluate(rnd, arrays, ConfigRecord(shared), grid)
                )
            )
        )
        for m in answers.refused:
            log(
                WARNING, "%s refused evaluation %s: %s", _name(m), rnd, m.content[REFUSED]["reason"]
            )
        evaluation = strategy.aggregate_evaluate(rnd, answers.trained) if answers.trained else None
        record["train"] = dict(train_metrics or {})
        record["evaluate"] = dict(evaluation or {})
        record["evaluate_refused"] = [_name(m) for m in answers.refused]
        if central:
            record["central_dp"] = central.summary()
        history.append(record)
        saved = checkpoint.Checkpoint(
            rnd,
            arrays,
            checkpoint.strategy_state(strategy),
            history,
            central.accountant.state_dict() if central else None,
        )
        checkpoint.save(out, saved)
        on_round(record)
    return arrays, "completed"
