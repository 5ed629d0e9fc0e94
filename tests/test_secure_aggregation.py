"""SecAgg+ through our bridges: Flower's own workflow on the server side, Flower's own mod on
the client side, a grid that carries serialized messages between them in this process (the
deployment test runs the same over real SuperLink/SuperNode processes)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from clients.secure_aggregation import secure_aggregation
from common.messages import ARRAYS, CLIENT, DECLINED, METRICS, NAME, WEIGHT
from common.runconfig import RunConfig
from privacy.policy import PrivacyPolicy, Refused
from server.node_registry import NodeBinder
from server.rounds import triage
from server.secure_aggregation import SecureAggregation, SecureAggregationError
from tests.inprocess_grid import InProcessGrid, wire

RNG = np.random.default_rng(0)
SHAPES = {"embed": (20, 4), "bias": (4,)}
# node → (the name it reports, its update, its weight; 0 = it declines the round)
CLIENTS = {
    1: ("north", {k: RNG.normal(0, 0.5, s).astype(np.float32) for k, s in SHAPES.items()}, 700),
    2: ("south", {k: RNG.normal(0, 0.5, s).astype(np.float32) for k, s in SHAPES.items()}, 1300),
    3: ("east", {k: RNG.normal(0, 0.5, s).astype(np.float32) for k, s in SHAPES.items()}, 400),
    4: ("west", {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}, 0),
}
SETTINGS = SecureAggregation.from_config(RunConfig(secagg=True))


pytestmark = pytest.mark.usefixtures("task_identity")  # messages built outside Flower


client = ClientApp(mods=[secure_aggregation])


@client.train()
def _train(msg: Message, context: Context) -> Message:
    claimed, update, weight = CLIENTS[context.node_id]
    name = context.node_config.get("claims", claimed)
    content = RecordDict({CLIENT: ConfigRecord({NAME: name})})
    if weight == 0:
        content[METRICS] = MetricRecord({DECLINED: 1, WEIGHT: 0})
    else:
        content[ARRAYS] = _record(update)
        content[METRICS] = MetricRecord({DECLINED: 0, WEIGHT: weight})
    return Message(content, reply_to=msg)


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


class LocalGrid(InProcessGrid):
    """Each node runs `client` (with Flower's SecAgg+ mod), and a copy of every reply the
    server side received is kept. `silent` nodes stop answering from step `silent_from` on
    (0 setup, 1 key shares, 2 masked vectors, 3 unmasking)."""

    def __init__(self, nodes: dict[int, dict], silent: set[int] = frozenset(), silent_from=2):
        super().__init__(
            {
                n: Context(run_id=1, node_id=n, node_config=cfg, state=RecordDict(), run_config={})
                for n, cfg in nodes.items()
            }
        )
        self.silent, self.silent_from, self.step = silent, silent_from, -1
        self.received: list[Message] = []

    def answer(self, message: Message) -> Message | None:
        node = message.metadata.dst_node_id
        if node in self.silent and self.step >= self.silent_from:
            return None
        return client(message, self.contexts[node])

    def send_and_receive(self, messages, *, timeout=None):
        self.step += 1
        replies = super().send_and_receive(messages, timeout=timeout)
        self.received += [wire(r) for r in replies]
        return replies


def _round(grid: LocalGrid, binder: NodeBinder | None = None, settings=SETTINGS):
    arrays = _record({k: np.zeros(s, np.float32) for k, s in SHAPES.items()})
    strategy = FedAvg(min_available_nodes=2, min_train_nodes=2, weighted_by_key=WEIGHT)
    instructions = list(strategy.configure_train(1, arrays, ConfigRecord({}), grid))
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    secure = settings.train(grid, context, 1, instructions, binder)
    t = triage(secure.replies, binder)
    averaged, _ = strategy.aggregate_train(1, secure.with_aggregate(t.trained))
    return secure, t, averaged


def _fedavg(nodes: list[int]) -> dict[str, np.ndarray]:
    total = sum(CLIENTS[n][2] for n in nodes)
    return {k: sum(CLIENTS[n][1][k] * CLIENTS[n][2] for n in nodes) / total for k in SHAPES}


def _quantization_error(nodes: list[int]) -> float:
    """SecAgg+ rounds each weighted parameter to a step of 2·clip/levels: the sum of the
    clients' steps, divided by their summed weight ratios, bounds the error of the average."""
    step = 2 * SETTINGS.clipping_range / SETTINGS.quantization_range
    ratios = sum(CLIENTS[n][2] / SETTINGS.max_weight for n in nodes)
    return len(CLIENTS) * step / ratios


def _assert_close(averaged: ArrayRecord, nodes: list[int]) -> None:
    expected = _fedavg(nodes)
    worst = max(np.abs(averaged[k].numpy() - expected[k]).max() for k in SHAPES)
    assert worst <= _quantization_error(nodes), worst


def test_aggregate_is_fedavg_and_no_single_update_reaches_the_server():
    grid = LocalGrid({n: {} for n in CLIENTS})
    secure, t, averaged = _round(grid)
    assert len(t.trained) == 3 and len(t.declined) == 1  # the declined one adds weight 0
    _assert_close(averaged, [1, 2, 3])
    # What reached the server: SecAgg+ steps and replies whose arrays the client's mod emptied.
    assert grid.received and all(
        len(record) == 0 for m in grid.received for record in m.content.array_records.values()
    )
    updates = [u[k] for _, u, w in CLIENTS.values() if w for k in SHAPES]
    for m in secure.replies:  # what the round loop gets: its records and the aggregate only
        assert set(m.content) <= {CLIENT, METRICS, ARRAYS}
        held = [m.content[ARRAYS][k].numpy() for k in SHAPES] if ARRAYS in m.content else []
        assert not any(
            np.allclose(h, u, atol=1e-3) for h in held for u in updates if h.shape == u.shape
        )
    assert secure.summary["num_shares"] == 4 and secure.summary["dropped"] == []


def test_a_client_that_drops_out_mid_round_is_tolerated_down_to_the_threshold():
    grid = LocalGrid({n: {} for n in CLIENTS}, silent={3})  # gone after sharing its keys
    secure, _, averaged = _round(grid)
    assert secure.dropped == [3] and secure.summary["dropped"] == ["node 3"]
    _assert_close(averaged, [1, 2])
    # Below the threshold the protocol halts and nothing is aggregated.
    grid = LocalGrid({n: {} for n in CLIENTS}, silent={1, 2, 3})
    secure, _, _ = _round(grid)
    assert secure.aggregate is None


def test_an_impostors_masked_update_never_joins_the_sum():
    grid = LocalGrid({1: {}, 2: {"claims": "north"}, 3: {}, 4: {}})
    binder = NodeBinder({"north": 1, "south": 2, "east": 3, "west": 4}, pinned=False)
    secure, t, averaged = _round(grid, binder)
    assert secure.dropped == [] and [m.metadata.src_node_id for m, _ in t.rejected] == [2]
    _assert_close(averaged, [1, 3])


def test_settings_that_cannot_work_fail_clearly():
    with pytest.raises(SecureAggregationError, match="only 4 clients"):
        _round(
            LocalGrid({n: {} for n in CLIENTS}),
            settings=SecureAggregation(5, 3, 8.0, 2**22, 1e4, None),
        )
    with pytest.raises(SecureAggregationError, match="threshold is 6, but each key is split"):
        SecureAggregation(1.0, 6, 8.0, 2**22, 1e4, None).sizes(5)
    for bad in ({"secagg_num_shares": 2}, {"secagg_reconstruction_threshold": 2.5},
                {"secagg_num_shares": 3, "secagg_reconstruction_threshold": 3},
                {"central_dp": "fixed"}):  # fmt: skip
        with pytest.raises(ValueError, match="secagg"):
            RunConfig(secagg=True, **bad)


def test_a_client_can_require_secure_aggregation():
    PrivacyPolicy().check_aggregation(False)
    with pytest.raises(Refused, match="requires secure aggregation"):
        PrivacyPolicy(require_secure_aggregation=True).check_aggregation(False)
    PrivacyPolicy(require_secure_aggregation=True).check_aggregation(True)
