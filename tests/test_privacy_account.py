"""The client's privacy account against a server that asks again and again, and against a
ledger or policy changed behind its back (RDP: these tests are about the account, not the
accountant)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from common.run_files import CLIENT_LEDGER, NOISY_COUNT
from common.runconfig import RunConfig
from privacy.account import PrivacyAccount
from privacy.ledger import LedgerError, Spend, entries
from privacy.policy import PrivacyPolicy, Refused

POLICY = PrivacyPolicy(epsilon=4.0, delta=1e-5, accountant="rdp")
REQUEST = RunConfig(epsilon=4.0, delta=1e-5, batch_size=50, num_server_rounds=3)


def _open(folder: Path, policy=POLICY, request=REQUEST, client: str = "north"):
    return PrivacyAccount.open(client, folder, folder / "k.key", policy, request, None, 1)


def _round(folder: Path, server_round: int, users: int = 1000, **kw) -> str:
    """One round as `clients.rounds.train` runs it, Opacus' history being the fixed plan."""
    with _open(folder, **kw) as account:
        mech = account.mechanism(users, lambda: np.zeros(5))
        if not account.can_train():
            return account.decline(server_round).body["status"]
        history = [(mech.noise_multiplier, mech.sample_rate, mech.steps_per_round)]
        return account.trained(server_round, history).body["status"]


def _evaluate(folder: Path, server_round: int, policy=POLICY) -> None:
    with _open(folder, policy) as account:
        account.evaluation(server_round, np.array([10.0, 3.0, 1.0]))


@pytest.fixture
def ledger(tmp_path) -> Path:
    assert _round(tmp_path, 1) == "trained"
    _evaluate(tmp_path, 1)
    assert _round(tmp_path, 2) == "trained"
    return tmp_path / CLIENT_LEDGER


def _rewrite(path: Path, edit) -> None:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        edit(record["entry"])
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_an_edited_ledger_is_refused_not_believed(ledger):
    with _open(ledger.parent) as account:
        spent = account.state.epsilon()
    assert spent > 0
    _rewrite(ledger, lambda entry: entry.update(steps=0))  # would forget every DP-SGD step
    with pytest.raises(LedgerError, match=re.escape(f"{ledger}, line 1: entry altered")):
        _open(ledger.parent).__enter__()


def test_an_emptied_or_foreign_ledger_is_refused_naming_the_file(ledger):
    foreign = f"{ledger}: ledger entry 0 belongs to 'north', not 'south'"
    with pytest.raises(LedgerError, match=re.escape(foreign)):
        _open(ledger.parent, client="south").__enter__()
    ledger.write_text("")
    with pytest.raises(LedgerError, match=re.escape(f"{ledger}: the ledger is empty")):
        _open(ledger.parent).__enter__()


def test_refusals_before_the_first_round_all_come_from_one_noisy_count(tmp_path):
    """A server asking again must not collect fresh draws of the count to average: the count
    is drawn once, kept until the first trained entry records it, then dropped."""
    strict = POLICY.model_copy(update={"max_sample_rate": 0.05})  # q = 1/round(noisy/50)
    outcomes = set()
    for _ in range(12):  # 975 users: about half of all draws would refuse, half plan
        with _open(tmp_path, strict) as account:
            try:
                outcomes.add(account.mechanism(975, lambda: np.zeros(5)).noise_multiplier)
            except Refused as why:
                outcomes.add(str(why))
    kept = json.loads((tmp_path / NOISY_COUNT).read_text())["noisy_users"]
    assert len(outcomes) == 1 and not (tmp_path / CLIENT_LEDGER).exists()
    assert _round(tmp_path, 1, users=975) == "trained"
    with _open(tmp_path) as account:
        assert account.state.mechanism.noisy_users == kept
    assert not (tmp_path / NOISY_COUNT).exists()


def test_a_budget_too_small_to_plan_is_a_refusal(tmp_path):
    with pytest.raises(Refused, match="cannot cover the other releases"):
        _round(tmp_path, 1, request=REQUEST.model_copy(update={"epsilon": 0.05}))


def test_a_smaller_delta_than_the_ledger_fixed_is_refused(ledger):
    with pytest.raises(Refused, match="ledger fixed δ = 1e-05"):
        _round(ledger.parent, 3, request=REQUEST.model_copy(update={"delta": 1e-9}))


def test_evaluation_noise_stays_what_the_ledger_released_with(ledger):
    changed = POLICY.model_copy(update={"evaluation_noise": 4.0})
    with pytest.raises(Refused, match=r"evaluation noise 4; its ledger .* fixed 10"):
        _evaluate(ledger.parent, 3, changed)


@pytest.mark.parametrize("field", ["epsilon", "count-noise", "min-noise-multiplier"])
def test_a_policy_of_infinite_or_nan_values_is_an_error_naming_the_key(field):
    for value in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match=f"'privacy-{field}'"):
            PrivacyPolicy.from_node_config({f"privacy-{field}": value}, None)


def test_the_released_histogram_goes_with_every_later_reply_and_is_accounted_once(tmp_path):
    """A lost first reply (a round run again after a crash, a rejected or late reply) must
    not lose the client's histogram: later replies carry the same release again."""
    with _open(tmp_path) as account:
        mech = account.mechanism(1000, lambda: np.ones(5))
        account.trained(1, [(mech.noise_multiplier, mech.sample_rate, mech.steps_per_round)])
        first = account.popularity
    assert first is not None and _round(tmp_path, 1) == "trained"  # round 1 run again
    with _open(tmp_path) as account:
        assert np.array_equal(account.popularity, first)
    spends = entries(tmp_path / CLIENT_LEDGER, Spend)
    assert [r.what for s in spends for r in s.releases].count("item-popularity") == 1
