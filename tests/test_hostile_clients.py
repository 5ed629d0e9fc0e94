"""Hostile or broken clients (issue 12): replies the server must not aggregate are rejected with
the client's name before any strategy sees them, and Flower's robust strategies are selectable.

Everything runs in this process on small arrays (one real ClientApp DP round on tiny data); no
Flower run is started.
"""

from __future__ import annotations

import inspect
import json
from functools import partial

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    Bulyan,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
)
from ledger_factory import spend

from clients import client_app, local_training
from clients.rounds import _client
from common.learning.configs import FAST_LR, FAST_PARAMETERS, lr_scale
from common.learning.model import BehaviorModel, CatalogShape
from common.learning.training import adam
from common.messages import (
    ARRAYS,
    CLIENT,
    CLIP_NORM,
    DECLINED,
    DELTA,
    DEMAND_ACTUAL_SUM,
    DEMAND_SUMS,
    EPSILON,
    EPSILON_BUDGET,
    HITS_SUM,
    LEDGER_HASH,
    LEDGER_SEQ,
    METRICS,
    NAME,
    NDCG_SUM,
    NOISE_MULTIPLIER,
    POPULARITY,
    REFUSED,
    SAMPLE_RATE,
    STEPS,
    UNIFORM,
    USERS_SUM,
    WEIGHT,
)
from common.run_files import SERVER_LEDGER
from common.runconfig import RunConfig, StrategyName
from privacy.signing import create_pair
from server import checkpoint
from server.aggregation import make_strategy
from server.aggregation_ledger import AggregationLedger
from server.node_registry import NodeBinder
from server.reply_checks import (
    BETA1,
    BETA2,
    SLACK,
    Citation,
    ReplyChecks,
    adam_displacement,
    rho_limit,
)
from server.rounds import RoundLoop, client_rows, triage

pytestmark = pytest.mark.usefixtures("task_identity")  # messages built outside Flower
CFG = RunConfig()  # DP, lr 5e-3, batch 64, one local epoch, clip norm 1
TINY_SHAPE = CatalogShape(
    item_rows=12, items=10, categories=3, top_categories=2, regions=2, item_category=[1, 2] * 5
)
SHAPES = {"embed": (20, 4), "bias": (4,)}
SENT = {k: np.random.default_rng(1).normal(0, 0.1, s).astype(np.float32) for k, s in SHAPES.items()}
USERS = 300  # released user count: q = 1/5, 5 steps (privacy.account.mechanism_shape)
STEPS_FOR_USERS = 5


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def dp_metrics(users: int = USERS, **change) -> dict:
    metrics = {
        DECLINED: 0, UNIFORM: 1.0, WEIGHT: users, EPSILON: 2.0, DELTA: 1e-5,
        EPSILON_BUDGET: 8.0, NOISE_MULTIPLIER: 1.1, CLIP_NORM: 1.0,
        SAMPLE_RATE: 1 / STEPS_FOR_USERS, STEPS: STEPS_FOR_USERS,
    }  # fmt: skip
    return metrics | change


def reply(node: int, name: str, arrays=None, metrics=None, content=None) -> Message:
    """A training reply from `node` naming `name`: by default a plausible DP update (every
    coordinate moved by lr per step, half of them one way and half the other)."""
    if arrays is None:
        rng = np.random.default_rng(node)
        arrays = {
            k: v + CFG.lr * STEPS_FOR_USERS * rng.choice([-1.0, 1.0], v.shape).astype(np.float32)
            for k, v in SENT.items()
        }
    records = {
        ARRAYS: _record(arrays),
        METRICS: MetricRecord(dp_metrics() if metrics is None else metrics),
        CLIENT: ConfigRecord({NAME: name}),
    }
    records |= content or {}
    instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
    return Message(RecordDict(records), reply_to=instruction)


def _bigger(k: str) -> np.ndarray:
    return np.zeros((21, 4), np.float32) if k == "embed" else SENT[k]


BROKEN = {
    "nan": lambda: reply(9, "mallory", {**SENT, "bias": np.array([0, np.nan, 0, 0], np.float32)}),
    "inf": lambda: reply(9, "mallory", {**SENT, "embed": np.full((20, 4), np.inf, np.float32)}),
    "wrong shape": lambda: reply(9, "mallory", {k: _bigger(k) for k in SENT}),
    "wrong dtype": lambda: reply(9, "mallory", {k: v.astype(np.float64) for k, v in SENT.items()}),
    "missing array": lambda: reply(9, "mallory", {"embed": SENT["embed"]}),
    "extra array": lambda: reply(9, "mallory", {**SENT, "backdoor": np.ones(3, np.float32)}),
    "scaled update": lambda: reply(9, "mallory", {k: v + 10 * CFG.lr * 5 for k, v in SENT.items()}),
    "one coordinate": lambda: reply(
        9, "mallory", {**SENT, "bias": SENT["bias"] + np.array([0, 0, 0.2, 0], np.float32)}
    ),
    "nan weight": lambda: reply(9, "mallory", metrics=dp_metrics(**{WEIGHT: float("nan")})),
    "negative weight": lambda: reply(9, "mallory", metrics=dp_metrics(**{WEIGHT: -300})),
    "uniform weight": lambda: reply(9, "mallory", metrics=dp_metrics(**{UNIFORM: 50.0})),
    "more steps claimed": lambda: reply(9, "mallory", metrics=dp_metrics(**{STEPS: 500})),
    "other clip norm": lambda: reply(9, "mallory", metrics=dp_metrics(**{CLIP_NORM: 100.0})),
    "no DP metrics": lambda: reply(9, "mallory", metrics={DECLINED: 0, UNIFORM: 1.0, WEIGHT: 300}),
    "extra metric": lambda: reply(9, "mallory", metrics=dp_metrics(loss=0.1)),
    "no metrics": lambda: reply(9, "mallory", content={METRICS: ConfigRecord({"x": 1})}),
    "second array record": lambda: reply(9, "mallory", content={"more": _record(SENT)}),
    # values the round record and the ledger would fail on, or carry as NaN
    "nan epsilon": lambda: reply(9, "mallory", metrics=dp_metrics(**{EPSILON: float("nan")})),
    "list epsilon": lambda: reply(9, "mallory", metrics=dp_metrics(**{EPSILON: [1.0, 2.0]})),
    "declined with a list": lambda: reply(9, "mallory", metrics={DECLINED: 1, WEIGHT: [0.0]}),
    "huge weight": lambda: reply(9, "mallory", metrics=dp_metrics(**{WEIGHT: 1e300})),
    "ledger seq text": lambda: reply(
        9, "mallory", content={CLIENT: ConfigRecord({NAME: "mallory", LEDGER_SEQ: "oops"})}
    ),
}


POPULARITIES = {  # a first round's histogram the server cannot sum; the catalogue has 3 items
    "too short": ([1.0, 2.0], "popularity holds [2] values, the catalogue [3]"),
    "nan": ([1.0, float("nan"), 0.0], "popularity holds NaN, Inf or values past 1e+15"),
    "huge": ([1e38, 1e38, 0.0], "popularity holds NaN, Inf or values past 1e+15"),  # f32 Inf
    "text": (["a", "b", "c"], "popularity is not a list of numbers"),
}


@pytest.mark.parametrize("kind", list(POPULARITIES))
def test_a_broken_popularity_histogram_is_rejected(kind):
    values, why = POPULARITIES[kind]
    sent = _record({**SENT, "item_popularity": np.zeros(3, np.float32)})
    arrays = {**SENT, "item_popularity": np.zeros(3, np.float32)}
    checks = ReplyChecks(CFG)
    bad = reply(
        9, "mallory", arrays, content={POPULARITY: ConfigRecord({"item_popularity": values})}
    )
    assert checks.rejection(bad, sent=sent).startswith(f"'mallory' (node 9): {why}")
    noisy = ConfigRecord({"item_popularity": [-1.5, 0.0, 7.25]})  # noise may go below 0
    assert checks.rejection(reply(9, "ok", arrays, content={POPULARITY: noisy}), sent=sent) is None


@pytest.mark.parametrize("kind", list(BROKEN))
def test_a_broken_reply_is_rejected_with_its_clients_name_and_the_others_aggregate(kind):
    bad = BROKEN[kind]()
    replies = [reply(1, "north"), bad, reply(2, "south")]
    t = triage(
        replies, NodeBinder.for_run(""), partial(ReplyChecks(CFG).rejection, sent=_record(SENT))
    )
    assert [m.metadata.src_node_id for m in t.trained] == [1, 2]
    assert len(t.rejected) == 1 and t.rejected[0][0] is bad
    why = t.rejected[0][1]
    assert why.startswith("'mallory' (node 9): "), why
    row = client_rows(4, t)[-1]
    assert (row["client"], row["status"], row["error"]) == ("mallory", "rejected", why)
    arrays, _ = FedAvg(weighted_by_key=WEIGHT).aggregate_train(4, t.trained)
    assert arrays is not None and set(arrays) == set(SHAPES)
    assert all(np.isfinite(arrays[k].numpy()).all() for k in SHAPES)


def test_the_reasons_say_what_is_wrong():
    checks, sent = ReplyChecks(CFG), _record(SENT)
    expect = {
        "nan": "array 'bias' holds NaN or Inf",
        "wrong shape": "array 'embed' is float32[21, 4], the model's is float32[20, 4]",
        "wrong dtype": "float64",
        "missing array": "arrays missing ['bias']",
        "extra array": "unexpected ['backdoor']",
        "scaled update": "update too large: 'embed' moved 0.25",
        "one coordinate": "update too large: 'bias' moved 0.2",
        "more steps claimed": "do not follow from its released user count 300",
        "other clip norm": "clip norm 100, the request fixed 1",
        "no DP metrics": "metrics missing",
        "extra metric": "unexpected ['loss']",
    }
    for kind, text in expect.items():
        assert text in checks.rejection(BROKEN[kind](), sent), kind


def test_under_secagg_metrics_and_histograms_are_checked_but_not_the_masked_arrays():
    checks, sent = ReplyChecks(CFG), _record({**SENT, "item_popularity": np.zeros(3, np.float32)})

    def masked(metrics: dict, popularity: list[float]) -> Message:
        content = {METRICS: MetricRecord(metrics), CLIENT: ConfigRecord({NAME: "north"})}
        content[POPULARITY] = ConfigRecord({"item_popularity": popularity})
        asked = Message(RecordDict(), dst_node_id=1, message_type="train")
        return Message(RecordDict(content), reply_to=asked)

    assert checks.rejection(masked(dp_metrics(), [1.0, 2.0, 3.0]), sent, secure=True) is None
    for bad in (
        masked(dp_metrics(**{WEIGHT: -600}), [1.0, 2.0, 3.0]),
        masked(dp_metrics(), [float("nan")] * 3),
    ):
        assert checks.rejection(bad, sent, secure=True) is not None
    over = CFG.model_copy(update={"secagg_max_weight": USERS - 1})  # its update was clipped
    clipped = masked(dp_metrics(), [1.0, 2.0, 3.0])
    assert "raise secagg-max-weight" in ReplyChecks(over).rejection(clipped, sent, secure=True)


def test_a_refusal_without_a_reason_is_recorded_not_a_crash():
    refusal = reply(9, "mallory", content={REFUSED: ConfigRecord({})})
    t = triage([reply(1, "north"), refusal], NodeBinder.for_run(""), None)
    assert client_rows(1, t)[-1]["error"] == ""


def test_plausible_updates_pass_and_declined_replies_are_left_to_triage():
    checks, sent = ReplyChecks(CFG), _record(SENT)
    assert checks.rejection(reply(1, "north"), sent) is None
    # the farthest any honest round of 5 Adam steps can reach passes too
    edge = {k: v + np.float32(adam_displacement(5, CFG.lr)) for k, v in SENT.items()}
    assert checks.rejection(reply(1, "north", edge), sent) is None
    # a sign flip is as large as an honest update: only a robust rule can stop it
    flipped = {k: 2 * SENT[k] - v.numpy() for k, v in reply(1, "north").content[ARRAYS].items()}
    assert checks.rejection(reply(1, "north", flipped), sent) is None
    declined = reply(3, "east", content={METRICS: MetricRecord({DECLINED: 1, WEIGHT: 0})})
    del declined.content[ARRAYS]
    t = triage([declined], None, partial(checks.rejection, sent=sent))
    assert t.declined == [declined] and not t.rejected


def test_a_reply_without_dp_gets_the_same_adam_bound():
    plain = CFG.model_copy(update={"dp": False})
    checks, sent = ReplyChecks(plain), _record(SENT)
    metrics = {DECLINED: 0, UNIFORM: 1.0, WEIGHT: 130, EPSILON: float("inf")}  # 3 batches of 64
    assert checks.steps(MetricRecord(metrics)) == 3
    step = np.float32(CFG.lr * 3)
    assert (
        checks.rejection(reply(1, "n", {k: v + step for k, v in SENT.items()}, metrics), sent)
        is None
    )
    far = {k: v + 10 * step for k, v in SENT.items()}
    assert "update too large" in checks.rejection(reply(1, "n", far, metrics), sent)


def test_the_models_priors_get_their_own_faster_bound():
    prior = sorted(FAST_PARAMETERS)[0]
    sent_arrays = {**SENT, prior: np.zeros(3, np.float32)}
    checks, sent = ReplyChecks(CFG), _record(sent_arrays)
    base = adam_displacement(STEPS_FOR_USERS, CFG.lr)
    fast = adam_displacement(STEPS_FOR_USERS, CFG.lr * FAST_LR)
    assert fast == pytest.approx(FAST_LR * base)
    moved = {**sent_arrays, prior: np.full(3, fast, np.float32)}
    assert checks.rejection(reply(1, "n", moved), sent) is None
    # the same move on an ordinary weight is out of reach of its lr
    moved = {**sent_arrays, "bias": SENT["bias"] + np.float32(fast)}
    assert "'bias' moved" in checks.rejection(reply(1, "n", moved), sent)
    moved = {**sent_arrays, prior: np.full(3, 2 * fast, np.float32)}
    assert f"{prior!r} moved" in checks.rejection(reply(1, "n", moved), sent)
    # the reason names the array furthest past its own bound, not the largest move
    bias = SENT["bias"] + np.float32(4 * SLACK * base)
    moved = {**sent_arrays, prior: np.full(3, 2 * SLACK * fast, np.float32), "bias": bias}
    assert "'bias' moved" in checks.rejection(reply(1, "n", moved), sent)
    # the clients' optimizer puts exactly these parameters at the faster rate
    model = BehaviorModel(CFG.model, TINY_SHAPE)
    rates = {id(p): g["lr"] for g in adam(model, CFG.lr).param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert rates[id(p)] == CFG.lr * lr_scale(name), name
    assert {n for n, _ in model.named_parameters()} >= FAST_PARAMETERS


def _adam_path(grads: torch.Tensor, lr: float, pull: float = 0.0) -> float:
    """Run torch's Adam (as the clients do) over the gradient sequence; the farthest
    coordinate from the start at the end."""
    p = torch.nn.Parameter(torch.zeros(grads.shape[1], dtype=torch.float64))
    opt = torch.optim.Adam([p], lr=lr)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        if pull:
            with torch.no_grad():
                p.sub_(lr * pull * p)
    return float(p.detach().abs().max())


def test_the_size_bound_holds_for_any_gradients_and_is_nearly_reached():
    torch.manual_seed(0)
    lr, steps = 0.01, 60
    t = torch.arange(steps, dtype=torch.float64)[:, None]
    growth = (BETA2 / BETA1) ** t  # the Cauchy–Schwarz equality case: the bound's worst case
    cases = {
        "noise": torch.randn(steps, 50, dtype=torch.float64),
        "constant": torch.ones(steps, 3, dtype=torch.float64),
        "late spike": torch.where(t == steps - 1, 1.0, 0.0) * torch.ones(steps, 2),
        "growing": growth * torch.ones(steps, 2, dtype=torch.float64),
        "alternating": (-1.0) ** t * torch.ones(steps, 2, dtype=torch.float64),
    }
    bound = adam_displacement(steps, lr)
    for name, grads in cases.items():
        moved = _adam_path(grads.to(torch.float64), lr)
        assert moved <= bound * (1 + 1e-9), name
    assert _adam_path(cases["growing"], lr) > 0.9 * bound  # tight: no room to shrink it
    assert _adam_path(cases["constant"], lr) == pytest.approx(lr * steps, rel=1e-6)
    # a long run approaches ρ∞ per step; FedProx's pull only shrinks a displacement
    assert adam_displacement(10**6, lr) / (lr * 10**6) == pytest.approx(rho_limit(), rel=1e-2)
    assert _adam_path(cases["growing"], lr, pull=5.0) <= adam_displacement(steps, lr, 5.0)
    assert adam_displacement(steps, lr, pull=300.0) > bound  # lr·μ > 2 overshoots: wider bound


def test_the_bound_matches_the_optimizer_the_clients_use():
    assert torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))]).defaults["betas"] == (
        BETA1,
        BETA2,
    )
    source = inspect.getsource(local_training)
    assert source.count("adam(model, cfg.lr)") == 2
    assert "weight_decay" not in source and "amsgrad" not in source
    opt = adam(torch.nn.Linear(2, 1), 0.01)
    assert type(opt) is torch.optim.Adam and not opt.defaults["amsgrad"]
    assert opt.defaults["weight_decay"] == 0


def test_a_real_dp_update_passes_and_the_same_update_scaled_up_does_not(tiny_run):
    cfg, shared, shape = tiny_run
    torch.manual_seed(0)
    sent = ArrayRecord(BehaviorModel(cfg.model, shape).state_dict())
    config = ConfigRecord(shared | {"server-round": 1})
    msg = Message(RecordDict({ARRAYS: sent, "config": config}), dst_node_id=1, message_type="train")
    context = Context(
        run_id=7, node_id=1, node_config={"partition-id": 0, "num-partitions": 3},
        state=RecordDict(), run_config=cfg.to_flower(),
    )  # fmt: skip
    real = client_app.train(msg, context)
    checks = ReplyChecks(cfg)
    assert checks.rejection(real, sent) is None
    trained = real.content[ARRAYS]
    steps = checks.steps(real.content[METRICS])
    share = max(
        float(np.abs(trained[k].numpy() - sent[k].numpy()).max()) / checks.bound(steps, k)
        for k in sent
    )
    assert 0 < share <= 1 / 1.4  # far inside the bound, slack aside
    scaled = {k: sent[k].numpy() + 10 * (trained[k].numpy() - sent[k].numpy()) for k in sent}
    real.content[ARRAYS] = _record(scaled)
    why = checks.rejection(real, sent)
    assert why and why.startswith(f"{real.content[CLIENT][NAME]!r} (node 1): update too large")


ROBUST = {
    "fedtrimmedavg": (FedTrimmedAvg, {"trim_beta": 0.3}, {"beta": 0.3}),
    "fedmedian": (FedMedian, {}, {}),
    "krum": (Krum, {"malicious_clients": 2}, {"num_malicious_nodes": 2, "num_nodes_to_select": 1}),
    "multikrum": (MultiKrum, {"malicious_clients": 1, "multikrum_select": 3},
                  {"num_malicious_nodes": 1, "num_nodes_to_select": 3}),
    "bulyan": (Bulyan, {"malicious_clients": 1, "min_clients": 7}, {"num_malicious_nodes": 1}),
}  # fmt: skip


def _updates(n: int, poisoned: int) -> list[Message]:
    """n replies near `SENT + 0.01`, the first `poisoned` of them far off (−5)."""
    rng = np.random.default_rng(3)
    out = []
    for node in range(1, n + 1):
        shift = -5.0 if node <= poisoned else 0.01
        arrays = {
            k: v + shift + rng.normal(0, 1e-3, v.shape).astype(np.float32) for k, v in SENT.items()
        }
        out.append(reply(node, f"c{node}", arrays))
    return out


@pytest.mark.parametrize("name", list(ROBUST))
def test_each_robust_strategy_is_built_from_the_run_config_and_resists_an_outlier(name):
    kind, settings, attributes = ROBUST[name]
    cfg = RunConfig.from_flower(
        {"strategy": name, **{k.replace("_", "-"): v for k, v in settings.items()}}
    )
    strategy = make_strategy(cfg)
    assert isinstance(strategy, kind)
    for attr, value in attributes.items():
        assert getattr(strategy, attr) == value
    arrays, metrics = strategy.aggregate_train(1, _updates(7, poisoned=1))
    assert arrays is not None and metrics is not None
    for k in SHAPES:
        assert np.abs(arrays[k].numpy() - (SENT[k] + 0.01)).max() < 0.01, (name, k)
    # nothing to checkpoint, and a restored strategy aggregates the same
    assert checkpoint.strategy_state(strategy) == {}
    resumed = make_strategy(cfg)
    checkpoint.restore_strategy(resumed, checkpoint.strategy_state(strategy))
    again, _ = resumed.aggregate_train(2, _updates(7, poisoned=1))
    assert all(np.array_equal(again[k].numpy(), arrays[k].numpy()) for k in SHAPES)


def test_multikrum_averages_all_but_f_by_default():
    strategy = make_strategy(RunConfig(strategy="multikrum", malicious_clients=2))
    strategy.aggregate_train(1, _updates(7, poisoned=2))
    assert strategy.num_nodes_to_select == 5
    strategy.aggregate_train(2, _updates(4, poisoned=0))  # fewer replies this round
    assert strategy.num_nodes_to_select == 2


def test_fedavg_follows_the_outlier_the_robust_rules_ignore():
    arrays, _ = make_strategy(RunConfig()).aggregate_train(1, _updates(7, poisoned=1))
    assert np.abs(arrays["bias"].numpy() - (SENT["bias"] + 0.01)).max() > 0.5


@pytest.mark.parametrize("name", list(ROBUST))
def test_robust_strategies_refuse_settings_they_cannot_work_with(name):
    with pytest.raises(ValueError, match=f"strategy {name} compares each client's update.*secagg"):
        RunConfig(strategy=name, secagg=True, min_clients=7)
    with pytest.raises(ValueError, match="central-dp"):
        RunConfig(strategy=name, central_dp="fixed", min_clients=7)
    with pytest.raises(ValueError, match="secagg hides them"):
        RunConfig.from_flower({"strategy": name, "secagg": True, "min-clients": 7})


def test_bulyan_needs_4f_plus_3_updates_every_round():
    with pytest.raises(ValueError, match=r"fewer than 4f \+ 3 = 7 updates.*min-clients to 7"):
        RunConfig(strategy="bulyan", malicious_clients=1, min_clients=6)
    RunConfig(strategy="bulyan", malicious_clients=0, min_clients=3)
    assert {s.value for s in StrategyName if s.robust} == set(ROBUST)


SUMS = {USERS_SUM: 10.0, HITS_SUM: 3.0, NDCG_SUM: 1.0, WEIGHT: 10.0, UNIFORM: 1.0}


class _Grid:
    """Nodes whose training replies are fixed in advance (None: the node never answers, as
    one killed or hung past the round timeout); evaluation answers `evaluations` or SUMS, under
    the name the node trained with."""

    def __init__(self, replies: dict[int, Message | None], evaluations: dict) -> None:
        self.replies, self.evaluations = replies, evaluations

    def get_node_ids(self) -> list[int]:
        return list(self.replies)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            if self.replies[node] is None:
                continue
            if m.metadata.message_type == "train":
                out.append(Message(self.replies[node].content, reply_to=m))
            else:
                sums = MetricRecord(self.evaluations.get(node, SUMS))
                client = ConfigRecord({NAME: self.replies[node].content[CLIENT][NAME]})
                out.append(Message(RecordDict({METRICS: sums, CLIENT: client}), reply_to=m))
        return out


EVALUATIONS = {  # what a client's evaluation reply may not hold
    "nan": SUMS | {HITS_SUM: float("nan")},
    "huge": SUMS | {HITS_SUM: 1e308},  # finite, but the pooled sum would overflow
    "extra key": SUMS | {"loss": 0.1},
    "some demand sums": SUMS | {DEMAND_ACTUAL_SUM: 5.0},
    "negative demand": SUMS | dict.fromkeys(DEMAND_SUMS, 1.0) | {DEMAND_ACTUAL_SUM: -5.0},
}


@pytest.mark.parametrize("kind", EVALUATIONS)
def test_a_broken_evaluation_reply_is_rejected_with_its_clients_name(kind):
    checks = ReplyChecks(CFG)
    bad = Message(RecordDict({METRICS: MetricRecord(EVALUATIONS[kind])}), reply_to=_asked(9))
    assert checks.evaluation_rejection(bad).startswith("node 9 (no client name): evaluation ")
    for honest in (SUMS, SUMS | dict.fromkeys(DEMAND_SUMS, 2.0), SUMS | {HITS_SUM: -0.5}):
        fine = Message(RecordDict({METRICS: MetricRecord(honest)}), reply_to=_asked(9))
        assert checks.evaluation_rejection(fine) is None  # DP noise may make a sum negative
    cites = RecordDict({METRICS: MetricRecord(SUMS), CLIENT: ConfigRecord({LEDGER_SEQ: "3"})})
    assert "ledger entry '3'" in checks.evaluation_rejection(Message(cites, reply_to=_asked(9)))


def _asked(node: int) -> Message:
    return Message(RecordDict(), dst_node_id=node, message_type="evaluate")


def test_the_round_loop_rejects_logs_and_keeps_the_reply_out_of_aggregate_and_ledger(
    tmp_path, caplog
):
    replies = {1: reply(1, "north"), 2: reply(2, "south"), 3: reply(3, "east"),
               4: BROKEN["scaled update"](), 5: None}  # fmt: skip
    replies[4].content[CLIENT] = ConfigRecord({NAME: "west"})
    # the median the honest three make (strategies consume the replies' arrays)
    expected = np.median([replies[n].content[ARRAYS]["bias"].numpy() for n in (1, 2, 3)], axis=0)
    key = create_pair(tmp_path / "server.key")
    history: list[dict] = []
    cfg = RunConfig(min_clients=3, num_server_rounds=1, out=str(tmp_path / "run"))
    loop = RoundLoop(
        grid=_Grid(replies, {3: EVALUATIONS["nan"]}),
        strategy=make_strategy(cfg.model_copy(update={"strategy": StrategyName.FEDMEDIAN})),
        shared={},
        out=tmp_path,
        ledger=AggregationLedger(tmp_path, key, "1", "fedmedian"),
        min_clients=3,
        last_round=1,
        history=history,
        on_round=lambda done: None,
        binder=NodeBinder.for_run(""),
        checks=ReplyChecks(cfg),
        timeout=30,
    )
    arrays, outcome = loop.run(_record(SENT), 1)
    assert outcome == "completed"
    rows = {r["client"]: r for r in history[0]["clients"]}
    assert rows["5"]["status"] == "failed"  # sampled, never answered: named, not forgotten
    assert rows["5"]["error"].startswith("no reply within round-timeout (30 s)")
    assert "node 5 in round 1: no reply within round-timeout" in caplog.text
    # east's NaN evaluation is left out of the round's metrics: the other three count.
    assert history[0]["evaluate"]["hr10"] == pytest.approx(0.3)
    assert history[0]["evaluate"]["users-sum"] == 30
    assert "evaluation 1: reply rejected: 'east' (node 3): evaluation metric" in caplog.text
    assert rows["west"]["status"] == "rejected"
    assert rows["west"]["error"].startswith("'west' (node 4): update too large")
    assert {rows[c]["status"] for c in ("north", "south", "east")} == {"trained"}
    assert "reply rejected: 'west' (node 4): update too large" in caplog.text
    np.testing.assert_allclose(arrays["bias"].numpy(), expected)
    ledger = [json.loads(line) for line in (tmp_path / SERVER_LEDGER).read_text().splitlines()]
    named = {e["entry"]["step"]: sorted(c["client"] for c in e["entry"]["clients"]) for e in ledger}
    assert named == {"train": ["east", "north", "south"], "evaluate": ["north", "south", "west"]}


def test_a_reply_must_cite_the_ledger_entry_its_step_wrote(tmp_path):
    """The server's heads and record keep what a reply cites: only the signed entry of the
    reply's own kind, round and run passes, under the seq it was written with."""
    keys = tmp_path / "keys"
    trained = spend(tmp_path, keys, "north", 1, "7")
    evaluated = spend(tmp_path, keys, "north", 1, "7", evaluated=True)

    def citing(line, kind="train", metrics=None, **changed) -> Message:
        client = ConfigRecord(dict(_client("north", line)) | changed)
        if kind == "train":
            return reply(1, "north", metrics=metrics, content={CLIENT: client})
        return Message(
            RecordDict({METRICS: MetricRecord(SUMS), CLIENT: client}), reply_to=_asked(1)
        )

    train, evaluate = Citation("train", 1, "7"), Citation("evaluate", 1, "7")
    assert train.problem(citing(trained)) is None
    assert evaluate.problem(citing(evaluated, "evaluate")) is None
    assert train.problem(reply(1, "north")) is None  # cites nothing: a client without DP
    wrong = {
        "status 'trained', not 'evaluated'": evaluate.problem(citing(trained, "evaluate")),
        "status 'evaluated', not 'trained'": train.problem(citing(evaluated)),
        "status 'trained', not 'declined'": train.problem(
            citing(trained, metrics=dp_metrics() | {DECLINED: 1.0})
        ),
        "server_round 1, not 2": Citation("train", 2, "7").problem(citing(trained)),
        "run_id '7', not '8'": Citation("train", 1, "8").problem(citing(trained)),
        "seq 0, not 5": train.problem(citing(trained, **{LEDGER_SEQ: 5})),
        "does not match its hash": train.problem(citing(trained, **{LEDGER_HASH: "0" * 64})),
    }
    for why, found in wrong.items():
        assert found is not None and found.startswith("'north' (node 1): ") and why in found
    bare = reply(1, "north", content={CLIENT: ConfigRecord({NAME: "north", LEDGER_SEQ: 10**6})})
    assert "cites ledger entry 1000000 without the entry itself" in train.problem(bare)
