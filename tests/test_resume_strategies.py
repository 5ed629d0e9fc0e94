"""Resume covers every strategy: a run stopped after round 1 and resumed from its checkpoint
ends where the run that never stopped ends — FedAdam's server optimizer (m_t, v_t) included.
(`tests/test_federated.py` resumes a real interrupted simulation; this checks each strategy's
server state through the checkpoint file, with the strategies' own train/aggregate calls.)"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.messages import ARRAYS, METRICS, WEIGHT
from common.runconfig import RunConfig, StrategyName
from server import checkpoint
from server.aggregation import make_strategy

RNG = np.random.default_rng(1)
NODES = list(range(1, 8))  # enough for Bulyan's 4f + 3 with one malicious client
SHAPES = {"w": (4, 3), "b": (3,)}
# Per round, per node: the arrays each client sends back (its update applied), and its weight.
UPDATES = {
    rnd: {node: {k: RNG.normal(0, 0.1, s).astype(np.float32) for k, s in SHAPES.items()}
          for node in NODES}
    for rnd in (1, 2)
}  # fmt: skip
WEIGHTS = {node: 10.0 * node for node in NODES}


pytestmark = pytest.mark.usefixtures("task_identity")  # messages built outside Flower


class Nodes:
    """The part of a Grid that the strategies' `configure_train` reads."""

    def get_node_ids(self) -> list[int]:
        return NODES


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def _round(strategy, arrays: ArrayRecord, rnd: int) -> ArrayRecord:
    sent = list(strategy.configure_train(rnd, arrays, ConfigRecord({}), Nodes()))
    replies = []
    for m in sent:
        node = m.metadata.dst_node_id
        start = {k: m.content[ARRAYS][k].numpy() for k in SHAPES}
        back = {k: start[k] + UPDATES[rnd][node][k] for k in SHAPES}
        content = RecordDict(
            {ARRAYS: _record(back), METRICS: MetricRecord({WEIGHT: WEIGHTS[node]})}
        )
        replies.append(Message(content, reply_to=m))
    aggregated, _ = strategy.aggregate_train(rnd, replies)
    return aggregated


@pytest.mark.parametrize("name", list(StrategyName))
def test_a_resumed_run_ends_where_the_uninterrupted_one_does(tmp_path, name):
    cfg = RunConfig(strategy=name, min_clients=len(NODES), server_lr=0.05)
    start = _record({k: np.zeros(s, np.float32) for k, s in SHAPES.items()})
    straight = make_strategy(cfg)
    expected = _round(straight, _round(straight, start, 1), 2)

    first = make_strategy(cfg)
    after_one = _round(first, start, 1)
    checkpoint.save(tmp_path, checkpoint.Checkpoint(1, after_one, checkpoint.strategy_state(first)))
    saved = checkpoint.load(tmp_path)
    resumed = make_strategy(cfg)
    checkpoint.restore_strategy(resumed, saved.strategy_state)
    got = _round(resumed, saved.arrays, 2)
    for k in SHAPES:
        np.testing.assert_allclose(got[k].numpy(), expected[k].numpy(), rtol=1e-6, atol=1e-7)
    if name is StrategyName.FEDADAM:  # without its state FedAdam would land elsewhere
        forgetful = _round(make_strategy(cfg), saved.arrays, 2)
        assert not np.allclose(forgetful["w"].numpy(), expected["w"].numpy())
