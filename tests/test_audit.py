"""The membership-inference audit's measurement and its non-member split."""

import numpy as np
import pytest

from common.partition import audit_non_members
from privacy.audit import roc_summary


def test_roc_summary_separates_and_ties():
    rng = np.random.default_rng(0)
    low, high = rng.normal(0, 1, 2000), rng.normal(10, 1, 2000)
    perfect = roc_summary(high, low)
    assert perfect["auc"] == 1.0 and perfect["tpr_at_fpr"]["0.01"] == 1.0
    same = roc_summary(rng.normal(0, 1, 4000), rng.normal(0, 1, 4000))
    assert same["auc"] == pytest.approx(0.5, abs=0.03)
    assert same["tpr_at_fpr"]["0.01"] == pytest.approx(0.01, abs=0.01)
    assert roc_summary(low, high)["auc"] == 0.0


def test_non_members_are_stable_and_about_the_asked_share():
    users = np.array([f"u{i}" for i in range(20_000)])
    held = audit_non_members(users, 0.1)
    assert held.mean() == pytest.approx(0.1, abs=0.01)
    assert (audit_non_members(users[::-1], 0.1)[::-1] == held).all()
    assert not audit_non_members(users, 0.0).any()
