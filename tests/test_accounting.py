"""Privacy accounting: PRV plans and enforces budgets (tighter than RDP, never optimistic,
checked by the verifier), and a client's rounds through Opacus spend what was planned."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from clients.local_training import train_private
from common.learning.dataset import prepare
from common.learning.model import BehaviorModel
from common.run_files import CLIENT_LEDGER
from common.runconfig import RunConfig
from privacy.account import PrivacyAccount
from privacy.accounting import (
    Budget,
    Mechanism,
    PrivacyState,
    plan_mechanism,
    release_steps,
    replay,
    spend_fields,
)
from privacy.ledger import Release, Spend, append
from privacy.policy import PrivacyPolicy
from privacy.signing import create_pair
from privacy.verify import verify_paths

BUDGET = Budget(epsilon=3.0, delta=1e-5)
Q, STEPS, ROUNDS = 0.05, 20, 2


@pytest.fixture(scope="module")
def prv():
    return plan_mechanism(BUDGET, Q, STEPS, ROUNDS, clip_norm=1.0)


def test_prv_is_the_default_and_its_plan_fits_the_budget(prv):
    assert prv.accountant == "prv"
    state = PrivacyState(client="c", budget=BUDGET, mechanism=prv)
    for rnd in range(1, ROUNDS + 1):
        assert state.affordable()[0]  # every planned round fits, including the last
        state.record(rnd, state.round_steps(), "trained")
    # Opacus' search stops within 0.01 of the target, from below
    assert BUDGET.epsilon - 0.02 <= state.epsilon() <= BUDGET.epsilon
    assert not state.affordable()[0]


def test_a_round_past_the_budget_is_declined_and_costs_nothing(prv):
    state = PrivacyState(client="c", budget=BUDGET, mechanism=prv)
    spent = []
    for rnd in range(1, ROUNDS + 2):
        ok, _ = state.affordable()
        steps, status = (state.round_steps(), "trained") if ok else ([], "declined")
        spent.append(state.record(rnd, steps, status))
    assert [s.status for s in spent] == ["trained"] * ROUNDS + ["declined"]
    assert 0 < spent[0].epsilon_after < spent[1].epsilon_after <= BUDGET.epsilon
    assert spent[-1].epsilon_after == spent[-2].epsilon_after and spent[-1].steps == 0


def test_prv_buys_a_smaller_noise_multiplier_than_rdp(prv):
    rdp = plan_mechanism(BUDGET, Q, STEPS, ROUNDS, clip_norm=1.0, accountant="rdp")
    assert prv.noise_multiplier < 0.97 * rdp.noise_multiplier
    history = [(prv.noise_multiplier, Q, STEPS * ROUNDS)]
    assert replay(history, BUDGET.delta, "rdp") > BUDGET.epsilon  # RDP would refuse that σ


def test_per_round_history_replays_exactly_as_planned(prv):
    steps = (prv.noise_multiplier, Q, STEPS)
    whole = replay([(prv.noise_multiplier, Q, STEPS * ROUNDS)], BUDGET.delta, "prv")
    assert replay([steps] * ROUNDS, BUDGET.delta, "prv") == whole


def test_replay_is_prvs_upper_bound_not_its_estimate(prv):
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(prv.noise_multiplier, Q, STEPS * ROUNDS)]
    err, delta_err = 0.01, BUDGET.delta / 1000  # Opacus' defaults
    low, estimate, upper = acc._get_dprv(err, delta_err).compute_epsilon(
        BUDGET.delta, delta_err, err
    )
    assert replay(acc.history, BUDGET.delta, "prv") == upper > estimate + err > low + 2 * err


def ledger(folder: Path, mechanism: Mechanism, tamper: float = 0.0) -> Path:
    """A signed two-round ledger, the user count released with the first round, planned like
    `mechanism`; `tamper` is added to the second entry's epsilon before signing."""
    key = create_pair(folder / "keys" / "north.key")
    count = Release(what="user-count", noise_multiplier=10.0, sensitivity=1.0)
    planned = plan_mechanism(
        BUDGET, Q, STEPS, ROUNDS, 1.0, mechanism.accountant, spent=release_steps([count])
    )
    state = PrivacyState(client="north", budget=BUDGET, mechanism=planned)
    path = folder / CLIENT_LEDGER
    for rnd in range(1, ROUNDS + 1):
        releases = [count] if rnd == 1 else []
        spend = state.record(rnd, state.round_steps(), "trained", releases)
        fields = spend_fields(state, spend, 7)
        fields["epsilon_after"] += tamper if rnd == ROUNDS else 0.0
        append(path, fields, key, Spend)
    return path


def findings(path: Path) -> list[str]:
    return [f.problem for f in verify_paths([path], path.parent / "keys")[0].findings]


def test_honest_ledgers_of_either_accountant_verify(tmp_path, prv):
    rdp = plan_mechanism(BUDGET, Q, STEPS, ROUNDS, clip_norm=1.0, accountant="rdp")
    assert findings(ledger(tmp_path / "prv", prv)) == []
    assert findings(ledger(tmp_path / "rdp", rdp)) == []  # ledgers written before PRV still pass


def test_a_miscomputed_prv_entry_fails(tmp_path, prv):
    problems = findings(ledger(tmp_path, prv, tamper=-0.3))
    assert any(p.startswith("miscomputed") for p in problems), problems


def test_an_optimistic_prv_figure_fails_though_within_one_percent(tmp_path, prv):
    # 0.02 below the bound is where PRV's lower bound lies (estimate − 0.01, itself 0.01 below)
    problems = findings(ledger(tmp_path, prv, tamper=-0.02))
    assert not any(p.startswith("miscomputed") for p in problems)
    assert any(p.startswith("under-reported") for p in problems), problems


# A tiny model on the tiny synthetic events: real DP-SGD rounds in seconds.
TINY_RUN = RunConfig(
    num_server_rounds=2,
    hidden=16,
    layers=1,
    max_len=6,
    batch_size=16,
    delta=1e-3,
    epsilon=4.0,
)


@pytest.fixture(scope="module")
def prepared(tiny_events):
    return prepare(tiny_events, top_category_chars=None, history_len=TINY_RUN.model.history)


def test_client_rounds_through_opacus_accumulate_epsilon_and_decline_at_the_budget(
    prepared, tmp_path
):
    torch.manual_seed(0)
    model = BehaviorModel(TINY_RUN.model, prepared.shape)
    policy = PrivacyPolicy(epsilon=4.0, delta=1e-3)
    device = torch.device("cpu")
    statuses, eps = [], []
    for rnd in (1, 2, 3):
        with PrivacyAccount.open(
            "all", tmp_path, tmp_path / "k.key", policy, TINY_RUN, None, 1
        ) as acc:
            mech = acc.mechanism(len(prepared.train), lambda: np.zeros(prepared.shape.items))
            if acc.can_train():
                result = train_private(model, prepared.train, TINY_RUN, mech, device)
                assert result.metrics["steps"] == mech.steps_per_round
                statuses.append(acc.trained(rnd, result.history).body["status"])
            else:
                statuses.append(acc.decline(rnd).body["status"])
            eps.append(acc.state.epsilon())
    assert statuses == ["trained", "trained", "declined"]
    assert 0 < eps[0] < eps[1] <= 4.0 and eps[2] == eps[1]


def test_planning_where_the_other_releases_dominate_epsilon_at_large_sigma():
    """A Ta-Feng-sized area (q = 0.01, 100 steps a round) beside the count, the popularity
    histogram and three evaluations: ε is nearly flat in σ from 20 up, so the secant once
    jumped to σ ≈ 1e-168, where Opacus' RDP divides by σ² = 0."""
    spent = release_steps(
        [
            Release(what="user-count", noise_multiplier=10.0, sensitivity=1.0),
            Release(what="item-popularity", noise_multiplier=3.0, sensitivity=1.0),
        ]
    )
    evaluation = release_steps(
        [Release(what="evaluation", noise_multiplier=10.0, sensitivity=3**0.5)]
    )
    budget = Budget(epsilon=8.0, delta=1e-5)
    for accountant in ("rdp", "prv"):
        mech = plan_mechanism(
            budget, 0.01, 100, 3, 1.0, accountant, spent=spent, per_round=evaluation
        )
        history = [*spent, *evaluation * 3, *mech.round_steps() * 3]
        assert 7.99 <= replay(history, budget.delta, accountant) <= 8.0
