import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import GaussianPrivacyEvent
from flwr.supercore.task_identity import TaskIdentity

from common.messages import CLIENT, ITEM_POPULARITY, NAME, POPULARITY
from common.run_files import CENTRAL_ACCOUNTANT, CHECKPOINT
from common.runconfig import RunConfig
from server import checkpoint, run_tables
from server.aggregation import aggregate_evaluation, make_strategy
from server.central_dp import saved_state, wrap
from server.popularity import Popularity


def test_evaluation_adds_up_sums_hit_rate_and_wape():
    replies = [
        RecordDict(
            {
                "metrics": MetricRecord(
                    {
                        "num-examples": 10,
                        "users-sum": 10.0,
                        "hits10-sum": 5.0,
                        "ndcg10-sum": 2.0,
                        "demand-actual-sum": 100.0,
                        "demand-abs-error-sum": 10.0,
                        "demand-raw-abs-error-sum": 50.0,
                        "demand-ma-abs-error-sum": 20.0,
                    }
                )
            }
        ),
        RecordDict(
            {
                "metrics": MetricRecord(
                    {
                        "num-examples": 30,
                        "users-sum": 30.0,
                        "hits10-sum": 3.0,
                        "ndcg10-sum": 1.0,
                        "demand-actual-sum": 300.0,
                        "demand-abs-error-sum": 90.0,
                        "demand-raw-abs-error-sum": 30.0,
                        "demand-ma-abs-error-sum": 60.0,
                    }
                )
            }
        ),
    ]
    out = aggregate_evaluation(replies)
    assert out["num-examples"] == 40
    assert out["hr10"] == pytest.approx((10 * 0.5 + 30 * 0.1) / 40)
    assert out["ndcg10"] == pytest.approx(3 / 40)
    assert out["wape"] == pytest.approx(100 / 400)
    assert out["wape-moving-average"] == pytest.approx(80 / 400)


def test_rates_of_noisy_sums_stay_within_zero_and_one():
    """DP noise on few users can make Σ hits exceed Σ users, or Σ NDCG fall below 0."""
    noisy = {"num-examples": 127.0, "users-sum": 127.0, "hits10-sum": 162.0, "ndcg10-sum": -4.0}
    out = aggregate_evaluation([RecordDict({"metrics": MetricRecord(noisy)})])
    assert out["hr10"] == 1.0 and out["ndcg10"] == 0.0
    assert out["hits10-sum"] == 162.0 and out["ndcg10-sum"] == -4.0


def test_checkpoint_round_trip_and_corruption(tmp_path):
    arrays = ArrayRecord({"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(3)})
    state = {"m_t": {"w": np.ones((2, 3), dtype=np.float32)}}
    accountant = {"compositions": [1]}
    checkpoint.save(tmp_path, checkpoint.Checkpoint(4, arrays, state, [{"round": 4}], accountant))
    loaded = checkpoint.load(tmp_path)
    assert loaded.server_round == 4 and loaded.history == [{"round": 4}]
    assert list(loaded.arrays.keys()) == ["w", "b"]  # DP wrappers pair arrays by position
    assert loaded.central_accountant == accountant
    assert torch.equal(loaded.arrays.to_torch_state_dict()["w"], torch.arange(6.0).reshape(2, 3))
    assert np.array_equal(loaded.strategy_state["m_t"]["w"], state["m_t"]["w"])
    (tmp_path / CHECKPOINT).write_bytes(b"truncated")
    with pytest.raises(ValueError, match="checkpoint is corrupt"):
        checkpoint.load(tmp_path)
    assert checkpoint.load(tmp_path / "empty") is None


def test_run_tables_without_dp_plot_metrics_only(tmp_path):
    history = [
        {
            "round": 1,
            "clients": [{"round": 1, "client": "a", "status": "trained", "epsilon": float("inf")}],
            "train": {"loss": 1.0},
            "evaluate": {"hr10": 0.1, "ndcg10": 0.05, "wape": 0.3},
        }
    ]
    run_tables.write_tables(tmp_path, history)
    paths = run_tables.plot(tmp_path, history)
    assert [p.name for p in paths] == ["metrics.png"]


def test_strategy_choice_comes_from_the_run_config():
    from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

    from common.runconfig import RunConfig
    from server.aggregation import make_strategy

    assert type(make_strategy(RunConfig())) is FedAvg
    adam = make_strategy(RunConfig(strategy="fedadam", server_lr=0.05))
    assert isinstance(adam, FedAdam) and adam.eta == 0.05
    prox = make_strategy(RunConfig(strategy="fedprox", proximal_mu=0.1))
    assert isinstance(prox, FedProx) and prox.proximal_mu == 0.1
    with pytest.raises(ValueError, match="strategy"):
        RunConfig.from_flower({"strategy": "fedsgd"})


def test_fedprox_pull_moves_weights_toward_the_global_model():
    from clients.local_training import _proximal_pull

    model = torch.nn.Linear(2, 1)
    start = [p.detach().clone() for p in model.parameters()]
    pull = _proximal_pull(model, lr=0.5, mu=1.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    pull(1)
    for p, s in zip(model.parameters(), start, strict=True):
        assert torch.allclose(p, s + 0.5)  # half-way back with lr·mu = 0.5


@pytest.mark.parametrize("mode", ["fixed", "adaptive"])
def test_central_dp_wraps_flower_strategies_and_accounts_releases(mode):
    cfg = RunConfig(central_dp=mode, central_noise=1.0, central_clip=0.5)
    central = wrap(make_strategy(cfg), cfg, clients=4, state=None)
    assert type(central.strategy).__name__.endswith(f"{mode.capitalize()}Clipping")
    assert central.summary()["epsilon"] == 0.0 and central.summary()["releases"] == 0
    if mode == "fixed":  # Flower's wrapper composes its own releases
        central.accountant.compose(GaussianPrivacyEvent(1.0, 4, 4))
    else:
        central.released()
    once = central.summary()
    assert once["releases"] == 1 and once["epsilon"] > 0
    resumed = wrap(make_strategy(cfg), cfg, clients=4, state=central.accountant.state_dict())
    assert resumed.summary()["epsilon"] == pytest.approx(once["epsilon"])


def test_an_aggregate_sent_after_the_last_checkpoint_stays_accounted(tmp_path):
    """The round loop saves the accountant before the aggregate leaves; a run resumed from an
    older checkpoint starts from that state, so a crash never loses a release."""
    cfg = RunConfig(central_dp="adaptive", central_noise=1.0, central_clip=0.5)
    central = wrap(make_strategy(cfg), cfg, clients=4, state=None)
    checkpointed = central.accountant.state_dict()  # the last checkpoint, before the round
    central.released()
    central.save(tmp_path)  # then the aggregate went out, and the server died
    resumed = wrap(make_strategy(cfg), cfg, clients=4, state=saved_state(tmp_path, checkpointed))
    assert resumed.summary()["releases"] == 1
    assert saved_state(tmp_path / "fresh", checkpointed) == checkpointed
    (tmp_path / CENTRAL_ACCOUNTANT).write_text("{cut")
    with pytest.raises(ValueError, match=CENTRAL_ACCOUNTANT):
        saved_state(tmp_path, checkpointed)


class _Grid:
    """Just enough of Flower's Grid for `configure_train`: four connected nodes."""

    def get_node_ids(self) -> list[int]:
        return [1, 2, 3, 4]


def _train_replies(instructions: list[Message], count: int) -> list[Message]:
    replies = []
    for i, instruction in enumerate(instructions[:count]):
        update = ArrayRecord({"w": torch.full((3,), float(i + 1))})
        content = RecordDict({"arrays": update, "metrics": MetricRecord({"uniform-weight": 1.0})})
        replies.append(Message(content, reply_to=instruction))
    return replies


@pytest.mark.parametrize("mode", ["fixed", "adaptive"])
def test_central_dp_releases_nothing_from_fewer_clients_than_its_noise_assumes(mode, monkeypatch):
    # the noise is σ·C/4: from 3 updates it would be a σ·3/4 release, accounted as σ
    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    cfg = RunConfig(central_dp=mode, central_noise=1.0, central_clip=0.5)
    central = wrap(make_strategy(cfg), cfg, clients=4, state=None)
    start = ArrayRecord({"w": torch.zeros(3)})
    clip = central.strategy.clipping_norm
    for rnd, count in ((1, 3), (2, 4)):
        sent = list(central.strategy.configure_train(rnd, start, ConfigRecord({}), _Grid()))
        arrays, _ = central.strategy.aggregate_train(rnd, _train_replies(sent, count))
        if arrays is not None:
            central.released()  # what the round loop does with an aggregate
        if count == 3:
            assert arrays is None
            assert central.summary()["releases"] == 0
            assert central.strategy.clipping_norm == clip  # the clipped count stayed private
    assert arrays is not None and central.summary()["releases"] == 1


def test_central_dp_refuses_a_weighted_server_optimizer():
    with pytest.raises(ValueError, match="central-dp needs"):
        RunConfig(central_dp="fixed", strategy="fedadam")


@pytest.mark.usefixtures("task_identity")  # messages built outside Flower
def test_the_popularity_sums_each_clients_histogram_once_and_survives_a_resume():
    sent = ArrayRecord(
        {"w": Array(np.zeros(2, np.float32)), ITEM_POPULARITY: Array(np.ones(3, np.float32))}
    )

    def released(name: str, values: list[float]) -> Message:
        content = RecordDict({CLIENT: ConfigRecord({NAME: name})})
        content[POPULARITY] = ConfigRecord({ITEM_POPULARITY: values})
        return Message(content, dst_node_id=1, message_type="train")

    averaged = ArrayRecord(
        {"w": Array(np.ones(2, np.float32)), ITEM_POPULARITY: Array(np.full(3, 0.9, np.float32))}
    )
    rows = [{"client": c, "status": "trained"} for c in ("a", "b")]
    popularity = Popularity([])
    out = popularity.install(
        averaged, sent, [released("a", [1, 2, -1]), released("b", [0, 1, 1])], rows
    )
    np.testing.assert_array_equal(out[ITEM_POPULARITY].numpy(), [2, 4, 1])  # sent + both
    np.testing.assert_array_equal(out["w"].numpy(), [1, 1])  # the rest as aggregated
    assert all(row["popularity"] for row in rows)
    # a resumed loop knows from the round table who is in the sum: a repeat adds nothing
    again = Popularity([{"round": 1, "clients": rows}])
    later = again.install(
        out, out, [released("a", [5, 5, 5])], [{"client": "a", "status": "trained"}]
    )
    np.testing.assert_array_equal(later[ITEM_POPULARITY].numpy(), [2, 4, 1])
