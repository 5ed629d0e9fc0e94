"""The federated round loop: train, triage replies, aggregate, evaluate, checkpoint.

Flower's `Strategy.start` runs every round in one go; this loop calls the same strategy
methods per round so that each round is checkpointed, a run can resume, and clients that
decline (privacy budget) or fail are separated from the ones whose updates count.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common.messages import (
    CLIENT,
    CONFIG,
    DECLINED,
    LEDGER_HEADS,
    METRICS,
    NAME,
    REASON,
    REFUSED,
)
from server import checkpoint
from server.aggregation import aggregate_evaluation
from server.aggregation_ledger import AggregationLedger
from server.central_dp import CentralPrivacy
from server.node_registry import NodeBinder
from server.popularity import Popularity
from server.reply_checks import Citation, ReplyChecks
from server.secure_aggregation import SecureAggregation, SecureAggregationError, SecureRound


@dataclass
class Triage:
    trained: list[Message]
    declined: list[Message]
    failed: list[Message]
    refused: list[Message]
    # Replies whose reported name is not their node's (see `server.node_registry`), or whose
    # content is broken or implausible (`server.reply_checks`), with the reason: never
    # aggregated, and kept out of the aggregation ledger so that an impostor cannot move the
    # ledger heads the server holds for the name it claims.
    rejected: list[tuple[Message, str]] = field(default_factory=list)


def triage(
    replies: list[Message],
    binder: NodeBinder | None = None,
    check: Callable[[Message], str | None] | None = None,
) -> Triage:
    """Sort replies by outcome. A reply that `check` finds broken or hostile (NaN, wrong
    arrays, an update no honest round can produce, a ledger entry its step did not write; see
    `server.reply_checks`) is rejected with the reason it gives."""
    failed = [m for m in replies if m.has_error()]
    rejected = [(m, why) for m in replies if binder and (why := binder.rejection(m))]
    ok = [m for m in replies if not m.has_error() and all(m is not r for r, _ in rejected)]
    refused = [m for m in ok if REFUSED in m.content]
    answered = [m for m in ok if REFUSED not in m.content]
    if check is not None:
        broken = [(m, why) for m in answered if (why := check(m))]
        rejected += broken
        answered = [m for m in answered if all(m is not r for r, _ in broken)]
    declined = [m for m in answered if float(m.content[METRICS].get(DECLINED, 0)) > 0]
    trained = [m for m in answered if m not in declined]
    return Triage(trained, declined, failed, refused, rejected)


def first_problem(checks: list[Callable[[Message], str | None]]) -> Callable[[Message], str | None]:
    """One check: the first of `checks` that finds a problem with a reply, in order."""
    return lambda m: next((why for check in checks if (why := check(m))), None)


def _name(m: Message) -> str:
    try:
        return str(m.content[CLIENT][NAME])
    except KeyError:  # no client record, or one without a name (a broken reply)
        return str(m.metadata.src_node_id)


def addressee(sent: list[Message]) -> Callable[[Message], int]:
    """The node a reply answers for: its sender, or, for an error the SuperLink wrote on the
    node's behalf (its src is the SuperLink: the node stopped sending heartbeats), the node
    the instruction went to."""
    to = {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}
    return lambda reply: to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


def _sender(m: Message) -> int:
    return m.metadata.src_node_id


def client_rows(
    server_round: int, t: Triage, node_of: Callable[[Message], int] = _sender
) -> list[dict]:
    rows = []
    for status, messages in (("trained", t.trained), ("declined", t.declined)):
        for m in messages:
            rows.append(
                {
                    "round": server_round,
                    "client": _name(m),
                    "node": m.metadata.src_node_id,
                    "status": status,
                    **{k: float(v) for k, v in m.content[METRICS].items()},
                }
            )
    for m in t.refused:
        rows.append(
            {
                "round": server_round,
                "client": _name(m),
                "node": m.metadata.src_node_id,
                "status": "refused",
                "error": str(m.content[REFUSED].get(REASON, "")),
            }
        )
    for m in t.failed:
        rows.append(
            {
                "round": server_round,
                "client": str(node_of(m)),
                "node": node_of(m),
                "status": "failed",
                "error": m.error.reason,
            }
        )
    for m, why in t.rejected:
        rows.append(
            {
                "round": server_round,
                "client": _name(m),
                "node": m.metadata.src_node_id,
                "status": "rejected",
                "error": why,
            }
        )
    return rows


def silent_rows(
    server_round: int, sent: list[Message], replies: list[Message], timeout: float | None
) -> list[dict]:
    """Nodes that were sent an instruction and did not answer within `timeout` seconds:
    killed, hung or cut off. Flower's grid returns only the replies that came (without a
    timeout it waits for every one, errors included, so there are none)."""
    if not timeout:
        return []
    node_of = addressee(sent)
    answered = {node_of(m) for m in replies}
    why = f"no reply within round-timeout ({timeout:g} s): the node is down, hung or cut off"
    return [
        {"round": server_round, "client": str(node), "node": node, "status": "failed", "error": why}
        for node in dict.fromkeys(m.metadata.dst_node_id for m in sent)
        if node not in answered
    ]


def dropped_rows(server_round: int, secure: SecureRound, t: Triage) -> list[dict]:
    """Sampled nodes that left SecAgg+ before their masked vector arrived and sent no error
    reply to the masked-vector step (those are `failed` rows already)."""
    failed = {m.metadata.src_node_id for m in t.failed}
    return [
        {
            "round": server_round,
            "client": str(node),
            "node": node,
            "status": "failed",
            "error": "dropped out of secure aggregation before its masked update arrived",
        }
        for node in secure.dropped
        if node not in failed
    ]


@dataclass
class RoundLoop:
    """What the round loop works with for the whole run; `run` drives it from a start point
    (fresh or a checkpoint's)."""

    grid: Grid
    strategy: Strategy
    shared: dict[str, str | float]  # config every client gets each round (catalog, …)
    out: Path  # the run folder: a checkpoint is saved there after every round
    ledger: AggregationLedger
    min_clients: int  # fewer trained replies than this stop the run
    last_round: int
    history: list[dict]  # one record per round run so far; the loop appends to it
    on_round: Callable[[list[dict]], None]  # after each round's record joins `history`
    central: CentralPrivacy | None = None
    binder: NodeBinder | None = None  # checks each reply's name against its node
    secure: SecureAggregation | None = None  # train under SecAgg+: the server sees only sums
    context: Context | None = None  # the ServerApp's (SecAgg+ runs in a legacy view of it)
    timeout: float | None = None  # seconds to wait for each step's replies; None = for all
    checks: ReplyChecks | None = None  # what a training reply must be to count; None = no checks

    def _train(
        self, rnd: int, arrays: ArrayRecord, config: ConfigRecord
    ) -> tuple[list[Message], list[Message], SecureRound | None]:
        """The round's training replies, the instructions they answer (none under SecAgg+,
        whose dropouts are rows of their own) and the SecAgg+ round when there is one."""
        instructions = self._with_heads(
            self.strategy.configure_train(rnd, arrays, config, self.grid)
        )
        if self.secure is None:
            return self._send(instructions), instructions, None
        secure = self.secure.train(self.grid, self.context, rnd, instructions, self.binder)
        return secure.replies, [], secure

    def _with_heads(self, instructions: Iterable[Message]) -> list[Message]:
        """Each instruction with the ledger head its client must still hold (`_heads_for`)."""
        names = {node: name for name, node in self.binder.names.items()} if self.binder else {}
        out = []
        for m in instructions:
            heads = self._heads_for(names.get(m.metadata.dst_node_id))
            config = ConfigRecord(dict(m.content[CONFIG]) | {LEDGER_HEADS: heads})
            # Flower's strategies give all their messages one RecordDict: each gets its own.
            m.content = RecordDict(dict(m.content) | {CONFIG: config})
            out.append(m)
        return out

    def _heads_for(self, name: str | None) -> str:
        """A node the binder has matched to client `name` gets that client's head alone, so
        clients do not learn how often the others took part. An unmatched node (None) gets
        none with a registry (it is not registered: its replies are rejected) and every head
        without one (it has not answered under a name in this ServerApp process yet)."""
        if name is not None:
            return self.ledger.heads_json(name)
        return "{}" if self.binder and self.binder.pinned else self.ledger.heads_json()

    def _check(
        self, step: str, rnd: int, check: Callable[[Message], str | None] | None
    ) -> Callable[[Message], str | None]:
        """`check` (if any), then whether the reply cites the ledger entry its step wrote."""
        cites = Citation(step, rnd, self.ledger.run_id).problem
        return first_problem([check, cites] if check else [cites])

    def _send(self, instructions: list[Message]) -> list[Message]:
        return list(self.grid.send_and_receive(instructions, timeout=self.timeout))

    def _stop(self, record: dict, reason: str) -> str:
        log(WARNING, reason)
        record["stopped"] = reason
        self.history.append(record)
        self.on_round(self.history)
        return reason

    def run(self, arrays: ArrayRecord, first_round: int) -> tuple[ArrayRecord, str]:
        """Run rounds `first_round..last_round`; returns the final arrays and why it ended."""
        grid, strategy, central = self.grid, self.strategy, self.central
        popularity = Popularity(self.history)
        for rnd in range(first_round, self.last_round + 1):
            log(INFO, "[ROUND %s/%s]", rnd, self.last_round)
            started = time.monotonic()
            sent = arrays
            try:
                replies, asked, secure = self._train(rnd, arrays, ConfigRecord(self.shared))
            except SecureAggregationError as exc:
                reason = f"round {rnd}: secure aggregation cannot run: {exc}; the run stops here"
                return arrays, self._stop({"round": rnd, "clients": []}, reason)
            # Under SecAgg+ the server holds only the masked sum, never one client's arrays:
            # only their metrics and histograms are checked (the run config refuses robust
            # strategies there).
            check = None
            if self.checks is not None:
                check = partial(self.checks.rejection, sent=arrays, secure=bool(secure))
            t = triage(replies, self.binder, self._check("train", rnd, check))
            node_of = addressee(asked)
            silent = silent_rows(rnd, asked, replies, self.timeout)
            record = {"round": rnd, "clients": client_rows(rnd, t, node_of) + silent}
            for row in silent:
                log(WARNING, "node %s in round %s: %s", row["node"], rnd, row["error"])
            if secure:
                record["secure_aggregation"] = secure.summary
                record["clients"] += dropped_rows(rnd, secure, t)
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
                    node_of(m),
                    rnd,
                    m.error.reason,
                )
            for m in t.refused:
                why = m.content[REFUSED].get(REASON, "")
                log(WARNING, "%s refused round %s: %s", _name(m), rnd, why)
            for _, why in t.rejected:
                log(WARNING, "round %s: reply rejected: %s", rnd, why)
            if len(t.trained) < self.min_clients:
                reason = (
                    f"round {rnd}: only {len(t.trained)} client(s) trained ({len(t.declined)} "
                    f"declined, {len(t.refused)} refused, {len(t.failed)} failed, "
                    f"{len(t.rejected)} rejected); "
                    f"min-clients is {self.min_clients}, so the run stops here"
                )
                self.ledger.record(
                    rnd,
                    t.trained,
                    t.declined,
                    t.refused,
                    False,
                    central and central.summary(),
                    secure and secure.summary,
                )
                return arrays, self._stop(record, reason)
            trained = t.trained
            if secure and t.rejected:
                # A rejected client's masked update is inside the sum and cannot be taken out.
                log(WARNING, "round %s: a reply under SecAgg+ was rejected; sum dropped", rnd)
                trained = []
            elif secure:
                trained = secure.with_aggregate(trained) if secure.aggregate is not None else []
            new_arrays, train_metrics = (
                strategy.aggregate_train(rnd, trained) if trained else (None, None)
            )
            if new_arrays is not None:
                arrays = new_arrays
                if central:
                    central.released()
                    central.save(self.out)
            else:
                log(WARNING, "round %s: no aggregate (the model is unchanged)", rnd)
            arrays = popularity.install(arrays, sent, t.trained, record["clients"])
            self.ledger.record(
                rnd,
                t.trained,
                t.declined,
                t.refused,
                new_arrays is not None,
                central and central.summary(),
                secure and secure.summary,
            )
            request = ConfigRecord(self.shared)
            asked = self._with_heads(strategy.configure_evaluate(rnd, arrays, request, grid))
            evaluated = self._send(asked)
            check = self.checks.evaluation_rejection if self.checks is not None else None
            answers = triage(evaluated, self.binder, self._check("evaluate", rnd, check))
            for row in silent_rows(rnd, asked, evaluated, self.timeout):
                log(WARNING, "evaluation %s: node %s: %s", rnd, row["node"], row["error"])
            for _, why in answers.rejected:
                log(WARNING, "evaluation %s: reply rejected: %s", rnd, why)
            for m in answers.refused:
                reason = m.content[REFUSED].get(REASON, "")
                log(WARNING, "%s refused evaluation %s: %s", _name(m), rnd, reason)
            self.ledger.record_evaluation(rnd, answers.trained, answers.refused)
            # Our own sums, not the strategy's aggregate_evaluate: Flower's refuses replies whose
            # metric names differ, and clients differ legitimately (demand sums only where a
            # client's policy shares them and its history supports a forecast).
            evaluation = (
                aggregate_evaluation([m.content for m in answers.trained])
                if answers.trained
                else None
            )
            record["train"] = dict(train_metrics or {})
            record["evaluate"] = dict(evaluation or {})
            record["evaluate_refused"] = [_name(m) for m in answers.refused]
            record["seconds"] = round(time.monotonic() - started, 2)  # train to evaluated
            if central:
                record["central_dp"] = central.summary()
            self.history.append(record)
            saved = checkpoint.Checkpoint(
                rnd,
                arrays,
                checkpoint.strategy_state(strategy),
                self.history,
                central.accountant.state_dict() if central else None,
            )
            checkpoint.save(self.out, saved)
            self.on_round(self.history)
        return arrays, "completed"
