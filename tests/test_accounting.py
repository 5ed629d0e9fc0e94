"""PRV plans and enforces budgets: tighter than RDP, never optimistic, checked by the verifier."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.run_files import CLIENT_LEDGER
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
