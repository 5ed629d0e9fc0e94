"""Secure aggregation: a training round run under Flower's SecAgg+, so that the server learns
the weighted sum of the clients' updates and never any single one.

Flower 1.42 ships SecAgg+ only as a legacy workflow (`SecAggPlusWorkflow`, driven through a
`LegacyContext` by a legacy `Strategy`). This module bridges our round to it and writes no
protocol of its own: `_Instructions` hands the workflow the messages our strategy built and
keeps the sum the workflow unmasks; `_Screen` sits between the workflow and the grid and keeps
the replies of the masked-vector step, whose arrays Flower's client mod has emptied. Beside each
masked vector travel what must stay visible per client: its name, the ledger entry it cites,
its DP metrics (declined or not, ε, σ, q) or its refusal. The round loop then sees those
replies carrying only the aggregate, exactly as Flower's legacy workflow hands its strategy.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from common.messages import ARRAY_NAMES, ARRAYS, CLIENT, CONFIG, METRICS, POPULARITY, REFUSED
from common.runconfig import RunConfig
from server.node_registry import NodeBinder

PROTOCOL = "secagg+"
KEPT = (METRICS, CLIENT, REFUSED, POPULARITY)  # what a client's reply keeps after the protocol


class SecureAggregationError(ValueError):
    """SecAgg+ cannot run a round with these settings and clients."""


@dataclass(frozen=True)
class SecureAggregation:
    """SecAgg+'s settings for the run (`secagg-*` in the run config)."""

    num_shares: float
    threshold: float
    clipping_range: float
    quantization_range: int
    max_weight: float
    timeout: float | None

    @classmethod
    def from_config(cls, cfg: RunConfig) -> SecureAggregation | None:
        if not cfg.secagg:
            return None
        return cls(
            cfg.secagg_num_shares,
            cfg.secagg_reconstruction_threshold,
            cfg.secagg_clipping_range,
            cfg.secagg_quantization_range,
            cfg.secagg_max_weight,
            cfg.round_timeout or None,
        )

    def sizes(self, clients: int) -> tuple[int, int]:
        """(shares, threshold) for a round of `clients`, by Flower's rules (a share ≤ 1 is a
        proportion), checked so a round that cannot work fails before any key is made."""
        if clients < 2:
            raise SecureAggregationError(f"SecAgg+ needs 2 or more clients; {clients} sampled")
        if self.num_shares <= 1:
            shares = round(self.num_shares * clients)
            if shares < clients and shares % 2 == 0:
                shares += 1
            if shares <= 2:
                shares = clients
        else:
            shares = int(self.num_shares)
        if self.threshold <= 1:
            threshold = max(round(self.threshold * shares), 2)
        else:
            threshold = int(self.threshold)
        if shares > clients:
            raise SecureAggregationError(
                f"secagg-num-shares is {shares}, but only {clients} clients were sampled"
            )
        if threshold >= shares:
            raise SecureAggregationError(
                f"secagg-reconstruction-threshold is {threshold}, but each key is split into "
                f"only {shares} shares ({clients} clients sampled)"
            )
        return shares, threshold

    def summary(self, clients: int, shares: int, threshold: int, dropped: list[str]) -> dict:
        return {
            "protocol": PROTOCOL,
            "clients": clients,
            "num_shares": shares,
            "reconstruction_threshold": threshold,
            "clipping_range": self.clipping_range,
            "quantization_range": self.quantization_range,
            "max_weight": self.max_weight,
            "dropped": dropped,
        }

    def train(
        self,
        grid: Grid,
        context: Context,
        server_round: int,
        instructions: list[Message],
        binder: NodeBinder | None,
    ) -> SecureRound:
        """Run one SecAgg+ training round for `instructions` (our strategy's messages)."""
        shares, threshold = self.sizes(len(instructions))
        arrays: ArrayRecord = instructions[0].content[ARRAYS]
        strategy = _Instructions(grid, instructions, list(arrays))
        legacy = LegacyContext(context, strategy=strategy)
        legacy.state.array_records[MAIN_PARAMS_RECORD] = arrays
        legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: server_round}
        )
        screen = _Screen(grid, binder)
        workflow = SecAggPlusWorkflow(
            _flower(self.num_shares),
            _flower(self.threshold),
            max_weight=self.max_weight,
            clipping_range=self.clipping_range,
            quantization_range=self.quantization_range,
            timeout=self.timeout,
        )
        workflow(screen, legacy)  # type: ignore[arg-type]  # the screen passes as the grid
        aggregate = _named(strategy.total, arrays) if strategy.total is not None else None
        replies = [_plain(m) for m in screen.collected]
        answered = {m.metadata.src_node_id for m in replies if not m.has_error()}
        dropped = [m.metadata.dst_node_id for m in instructions]
        dropped = [node for node in dropped if node not in answered]
        names = {node: name for name, node in binder.names.items()} if binder else {}
        labels = [names.get(node, f"node {node}") for node in dropped]
        log(INFO, "round %s: SecAgg+ over %s clients; dropped: %s", server_round,
            len(instructions), ", ".join(labels) or "none")  # fmt: skip
        summary = self.summary(len(instructions), shares, threshold, labels)
        return SecureRound(replies, aggregate, dropped, summary)


@dataclass
class SecureRound:
    """What the server holds after a SecAgg+ round: each client's reply without its update,
    and the unmasked sum as the weighted average (None when the protocol halted)."""

    replies: list[Message]
    aggregate: ArrayRecord | None
    dropped: list[int]  # sampled nodes whose masked vector never arrived
    summary: dict  # the protocol's settings and who dropped, for the aggregation ledger

    def with_aggregate(self, messages: list[Message]) -> list[Message]:
        """`messages` carrying the aggregate as their arrays, as Flower's legacy SecAgg+
        workflow hands its strategy: any weighted average of them is the aggregate."""
        for m in messages:
            m.content[ARRAYS] = self.aggregate
        return messages


class _Instructions(LegacyStrategy):
    """The legacy strategy SecAgg+ drives: it hands over the round's messages and keeps the
    unmasked sum; selecting clients and averaging stay with our own strategy."""

    def __init__(self, grid: Grid, instructions: list[Message], names: list[str]) -> None:
        self.grid = grid
        self.instructions = instructions
        self.names = json.dumps(names)
        self.total: Parameters | None = None

    def configure_fit(self, server_round, parameters, client_manager):
        run_id = self.grid.run.run_id
        return [
            (
                GridClientProxy(m.metadata.dst_node_id, self.grid, run_id),
                FitIns(
                    arrayrecord_to_parameters(m.content[ARRAYS], keep_input=True),
                    dict(m.content[CONFIG]) | {ARRAY_NAMES: self.names},
                ),
            )
            for m in self.instructions
        ]

    def aggregate_fit(self, server_round, results, failures):
        # Every result carries the same unmasked sum (SecAgg+ puts it there); no single
        # client's update ever reaches this method.
        self.total = results[0][1].parameters if results else None
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _Screen:
    """The grid as SecAgg+ sees it. It keeps the replies to the masked-vector step (their
    arrays already emptied by the client's mod) and withholds from the protocol any reply
    whose node may not speak for the client it names: to SecAgg+ that node dropped out, so
    its masked vector never joins the sum."""

    def __init__(self, grid: Grid, binder: NodeBinder | None) -> None:
        self.grid = grid
        self.binder = binder
        self.collected: list[Message] = []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        if messages and _stage(messages[0]) == Stage.COLLECT_MASKED_VECTORS:
            self.collected = replies
            replies = [m for m in replies if not (self.binder and self.binder.rejection(m))]
        return replies

    def __getattr__(self, name: str):
        return getattr(self.grid, name)


def _flower(value: float) -> int | float:
    """Flower reads an int as a count and a float as a proportion; the run config has floats."""
    return int(value) if value > 1 else float(value)


def _stage(message: Message) -> str:
    return str(message.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE, ""))


def _plain(reply: Message) -> Message:
    """The reply as the round loop reads the others: our records only, the masked vector and
    Flower's legacy records dropped."""
    if not reply.has_error():
        for key in [k for k in reply.content if k not in KEPT]:
            del reply.content[key]
    return reply


def _named(total: Parameters, like: ArrayRecord) -> ArrayRecord:
    """The unmasked average as a named ArrayRecord shaped and typed like the global model."""
    values = parameters_to_ndarrays(total)
    return ArrayRecord(
        OrderedDict(
            (name, Array(np.asarray(value, dtype=like[name].numpy().dtype)))
            for name, value in zip(like, values, strict=True)
        )
    )
