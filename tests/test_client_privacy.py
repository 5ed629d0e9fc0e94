"""The client's guarantee holds against the server: its own policy, OS randomness, only
accounted releases, ledgers that record what Opacus ran, one round at a time per ledger.

The ClientApp's train/evaluate functions run in-process on tiny data, as Flower would call them.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from clients import client_app
from clients.local_training import dp_loader
from clients.rounds import _policy
from common.learning.dataset import catalog_shape
from common.learning.model import BehaviorModel
from common.messages import LEDGER_HEADS
from common.run_files import CLIENT_LEDGER, CLIENTS, POLICY
from common.runconfig import RunConfig
from privacy.account import mechanism_shape
from privacy.accounting import (
    Budget,
    Mechanism,
    PrivacyState,
    plan_mechanism,
    release_steps,
    spend_fields,
)
from privacy.engine import PrivacyEngine
from privacy.ledger import LedgerError, Release, Spend, append, entries, locked
from privacy.policy import PrivacyPolicy
from privacy.randomness import torch_generator
from privacy.signing import create_pair
from privacy.verify import verify_paths
from server.aggregation_ledger import AggregationLedger
from server.platform import platform_for
from simulations.simulate import simulated_policy

NODE = {"partition-id": 0, "num-partitions": 3}


pytestmark = pytest.mark.usefixtures("task_identity")  # messages built outside Flower


@pytest.fixture
def run(tmp_path, tiny_events):
    """A simulated client's world: data, the server's platform files, the clients' policy."""
    data = tmp_path / "tiny.parquet"
    tiny_events.to_parquet(data)
    cfg = RunConfig(
        data=str(data), out=str(tmp_path / "out"), hidden=16, layers=1, heads=2, max_len=12,
        batch_size=16, delta=1e-3, epsilon=6.0,
    )  # fmt: skip
    platform = platform_for(cfg, Path(cfg.out))
    simulated_policy(cfg.model_copy(update={"epsilon": 8.0})).write(
        Path(cfg.out) / "clients" / POLICY
    )
    model = BehaviorModel(cfg.model, catalog_shape(platform.catalog))
    shared = {"catalog": str(platform.catalog_path), "demand-start": platform.demand_start}

    def call(kind: str, rnd: int, heads: str = "", **request) -> Message:
        config = ConfigRecord(shared | {"server-round": rnd, LEDGER_HEADS: heads})
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config})
        msg = Message(content=content, dst_node_id=1, message_type=kind)
        asked = cfg.model_copy(update=request).to_flower()
        context = Context(
            run_id=7, node_id=1, node_config=NODE, state=RecordDict(), run_config=asked
        )
        return getattr(client_app, kind)(msg, context)

    return call, Path(cfg.out) / "clients"


def _ledger(clients: Path) -> list[Spend]:
    found = list(clients.glob(f"*/{CLIENT_LEDGER}"))
    return entries(found[0], Spend) if found else []


def test_a_server_cannot_switch_dp_off_or_raise_the_budget(run):
    call, clients = run
    for request in ({"dp": False}, {"epsilon": 9.0}, {"delta": 1e-2}):
        reply = call("train", 1, **request)
        assert set(reply.content) == {"refused", "client"}  # no update, no metrics
        assert "allows at most" in reply.content["refused"]["reason"] or "requires DP" in str(
            reply.content["refused"]["reason"]
        )
    assert set(call("evaluate", 1, dp=False).content) == {"refused", "client"}
    assert _ledger(clients) == []


def test_a_restored_ledger_cannot_forget_an_evaluation(run, tmp_path):
    """The server records the entry each evaluation reply cites, as it does for training: a
    client ledger restored from before an evaluation lacks the head the server sends next."""
    call, clients = run
    server = AggregationLedger(tmp_path, create_pair(tmp_path / "server.key"), "7", "fedavg")
    server.record(1, [call("train", 1)], [], [], True)
    ledger = next(clients.glob(f"*/{CLIENT_LEDGER}"))
    backup = ledger.read_bytes()
    evaluated = call("evaluate", 1, server.heads_json())
    server.record_evaluation(1, [evaluated], [])
    assert entries(ledger, Spend)[-1].status == "evaluated"
    ledger.write_bytes(backup)  # restored from a backup taken before the evaluation
    with pytest.raises(LedgerError, match=r"entry 1 .* is missing"):
        call("train", 2, server.heads_json())
    with pytest.raises(LedgerError, match=r"entry 1 .* is missing"):
        call("evaluate", 2, server.heads_json())


def test_first_entry_fixes_budget_and_mechanism_and_releases_only_accounted_values(run):
    call, clients = run
    reply = call("train", 1)  # asks ε = 6, below the client's 8: the ledger fixes 6
    spends = _ledger(clients)
    assert [s.status for s in spends] == ["trained"] and spends[0].budget_epsilon == 6.0
    assert [r.what for r in spends[0].releases] == ["user-count", "item-popularity"]
    histogram = np.array(reply.content["popularity"]["item_popularity"])  # noisy, not exact
    assert histogram.shape == reply.content["arrays"]["item_popularity"].numpy().shape
    assert (histogram < 0).any() and (histogram % 1 != 0).all()
    metrics = dict(reply.content["metrics"])
    # the FedAvg weight is the released noisy count, never the exact one; no losses leave
    assert metrics["num-examples"] == spends[0].noisy_users
    assert not {k for k in metrics if "loss" in k}
    assert metrics["sample-rate"] == spends[0].sample_rate == 1 / round(1 / spends[0].sample_rate)
    for request in ({"epsilon": 8.0}, {"batch_size": 4}, {"local_epochs": 2}):
        assert "refused" in call("train", 2, **request).content  # 8 ≤ policy, but > fixed 6
    evaluated = call("evaluate", 1)
    values = dict(evaluated.content["metrics"])
    assert {"users-sum", "hits10-sum", "ndcg10-sum"} <= set(values)
    spends = _ledger(clients)
    assert [s.status for s in spends] == ["trained", "evaluated"]
    assert spends[1].epsilon_after > spends[1].epsilon_before
    assert [r.what for r in spends[1].releases] == ["evaluation"]
    # released once, with the first round; later replies carry that same release again
    again = call("train", 2).content["popularity"]["item_popularity"]
    assert np.array_equal(np.array(again), histogram)
    assert [r.what for s in _ledger(clients) for r in s.releases].count("item-popularity") == 1
    assert all(r.ok for r in verify_paths([p for p in clients.glob(f"*/{CLIENT_LEDGER}")]))


def test_demand_sums_leave_only_where_the_policy_shares_them(run):
    call, clients = run
    policy = PrivacyPolicy.model_validate_json((clients / POLICY).read_text())
    assert policy.share_demand_evaluation  # the simulation's engineer shares them
    policy.model_copy(update={"share_demand_evaluation": False}).write(clients / POLICY)
    call("train", 1)
    assert not {k for k in call("evaluate", 1).content["metrics"] if k.startswith("demand")}


def test_policy_comes_from_node_config_first_and_errors_name_the_key(tmp_path):
    fallback = tmp_path / POLICY
    PrivacyPolicy(epsilon=3.0).write(fallback)
    assert PrivacyPolicy.from_node_config({"privacy-epsilon": 2.0}, fallback).epsilon == 2.0
    assert PrivacyPolicy.from_node_config({"data-path": "x"}, fallback).epsilon == 3.0
    assert PrivacyPolicy.from_node_config({}, None) == PrivacyPolicy()
    with pytest.raises(ValueError, match="privacy-delta"):
        PrivacyPolicy.from_node_config({"privacy-delta": 2.0}, None)


def test_a_deployed_client_never_reads_a_policy_file_the_server_points_at(tmp_path):
    cfg = RunConfig(out=str(tmp_path))  # the run config comes from the server
    PrivacyPolicy(epsilon=80.0, share_demand_evaluation=True).write(tmp_path / CLIENTS / POLICY)

    def policy(node_config: dict) -> PrivacyPolicy:
        context = Context(1, 1, node_config, RecordDict(), cfg.to_flower())
        return _policy(context, cfg)

    assert policy({"data-path": "/srv/north.csv"}) == PrivacyPolicy()
    assert policy({"partition-id": 0, "num-partitions": 2}).epsilon == 80.0


class _Rows:
    """The part of `Sequences` a DP loader reads: its tensors."""

    def __init__(self, users: int) -> None:
        self.users = users

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (torch.arange(self.users, dtype=torch.float32)[:, None],)


def _mechanism(q: float, steps: int, users: int = 100) -> Mechanism:
    return Mechanism(
        noise_multiplier=1.0,
        sample_rate=q,
        steps_per_round=steps,
        clip_norm=1.0,
        accountant="rdp",
        planned_rounds=1,
        noisy_users=users,
    )


def test_sampling_is_unpredictable_even_with_the_same_seed():
    mech = _mechanism(0.1, 10)
    batches = []
    for _ in range(2):
        torch.manual_seed(0)  # the public run seed reaches the global generator; must not matter
        loader = dp_loader(_Rows(500), mech, torch_generator())
        batches.append([tuple(b[0][:, 0].int().tolist()) for b in loader])
    assert batches[0] != batches[1]


@settings(max_examples=300, deadline=None)
@given(users=st.integers(1, 200_000), batch=st.integers(1, 1024), epochs=st.integers(1, 4))
def test_the_planned_sample_rate_is_the_one_opacus_accounts(users, batch, epochs):
    request = RunConfig(batch_size=batch, local_epochs=epochs)
    q, steps = mechanism_shape(users, request)
    per_epoch = steps // epochs
    assert steps == per_epoch * epochs and round(1 / q) == per_epoch
    assert 1 / per_epoch == q  # what Opacus derives from a loader of `per_epoch` batches


def _private(
    model: torch.nn.Module, noise_multiplier: float, clip: float
) -> tuple[PrivacyEngine, torch.optim.Optimizer]:
    """`model` made private as a client does (its Poisson loader: 50 users, q = 0.1), SGD."""
    engine = PrivacyEngine(accountant="rdp")
    _, opt, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=dp_loader(_Rows(50), _mechanism(0.1, 10), torch_generator()),
        noise_multiplier=noise_multiplier,
        max_grad_norm=clip,
        poisson_sampling=False,
    )
    return engine, opt


def test_an_empty_poisson_batch_still_takes_a_noisy_accounted_step():
    """Skipping the step would show in the update whether anyone was sampled."""
    model = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    engine, opt = _private(model, noise_multiplier=1.0, clip=1.0)
    opt.empty_step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert engine.accountant.history == [(1.0, 0.1, 1)]


def test_every_parameter_gets_its_own_noise_at_the_planned_scale():
    """One Gaussian draw serves all parameters (`SparseRowsDPOptimizer.add_noise`): each
    coordinate still gets N(0, (σ·C)²) on the clipped sum, divided by the expected batch size,
    and no two parameters share their noise."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 60), torch.nn.Linear(60, 50))
    _, opt = _private(model, noise_multiplier=2.0, clip=0.5)
    opt.empty_step()  # nothing to clip: the gradients are the noise alone
    scale = 2.0 * 0.5 / opt.expected_batch_size
    grads = [p.grad.flatten() for p in model.parameters()]
    assert [g.numel() for g in grads] == [2400, 60, 3000, 50]
    for big in (grads[0], grads[2]):
        assert big.std().item() == pytest.approx(scale, rel=0.06)
        assert abs(big.mean().item()) < 4 * scale / big.numel() ** 0.5
    assert not torch.equal(grads[1], grads[0][:60]) and not torch.equal(grads[3], grads[2][:50])


@pytest.mark.parametrize("per_epoch", [1, 2, 93, 99])
def test_honest_ledgers_of_real_opacus_rounds_verify(tmp_path, per_epoch):
    """Two rounds through Opacus for batch counts where 1/int(1/q) ≠ q used to break ledgers."""
    users = 3 * per_epoch
    q, steps = mechanism_shape(users, RunConfig(batch_size=3))
    budget = Budget(epsilon=50.0, delta=1e-5)
    state = PrivacyState(client="north", budget=budget)
    count = Release(what="user-count", noise_multiplier=10.0, sensitivity=1.0)
    state.mechanism = plan_mechanism(
        budget, q, steps, 2, 1.0, "rdp", noisy_users=users, spent=release_steps([count])
    )
    key = create_pair(tmp_path / "keys" / "north.key")
    path = tmp_path / CLIENT_LEDGER
    for rnd in (1, 2):
        model = torch.nn.Linear(1, 1)
        engine = PrivacyEngine(accountant="rdp")
        dp_model, opt, loader = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=dp_loader(_Rows(users), state.mechanism, torch_generator()),
            noise_multiplier=state.mechanism.noise_multiplier,
            max_grad_norm=1.0,
            poisson_sampling=False,
        )
        for (x,) in loader:
            if len(x):
                opt.zero_grad()
                dp_model(x).sum().backward()
                opt.step()
            else:
                opt.empty_step()
        history = list(engine.accountant.history)
        assert history == [(state.mechanism.noise_multiplier, q, steps)]
        spend = state.record(rnd, history, "trained", [count] if rnd == 1 else [])
        append(path, spend_fields(state, spend, 1), key, Spend)
    report = verify_paths([path], tmp_path / "keys")[0]
    assert report.ok, report.first_problem()


def test_two_rounds_on_one_ledger_take_turns(tmp_path):
    path = tmp_path / CLIENT_LEDGER
    order: list[str] = []
    holding = threading.Event()

    def first() -> None:
        with locked(path):
            holding.set()
            time.sleep(0.3)
            order.append("first")

    def second() -> None:
        holding.wait()
        with locked(path):
            order.append("second")

    threads = [threading.Thread(target=f) for f in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert order == ["first", "second"]
