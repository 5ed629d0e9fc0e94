import numpy as np
import pytest
import torch

from common.learning.forecasting import moving_average, seasonal_naive, weekly_demand
from common.learning.metrics import full_ranks, hit_ndcg, mae, sampled_ranks, wape


def test_full_rank_counts_strictly_higher_scores_and_misses():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.5], [1.0, 0.0, 0.0, 0.0], [0.3, 0.2, 0.1, 0.0]])
    target = torch.tensor([2, 0, -1])
    assert full_ranks(scores, target).tolist() == [1, 0, 4]


def test_hit_and_ndcg_by_hand():
    m = hit_ndcg(np.array([0, 1, 9, 10]), k=10)
    assert m["hr@10"] == pytest.approx(3 / 4)
    expected = (1 / np.log2(2) + 1 / np.log2(3) + 1 / np.log2(11)) / 4
    assert m["ndcg@10"] == pytest.approx(expected)


def test_sampled_ranks_never_draw_the_target_and_are_seeded():
    scores = torch.arange(200, dtype=torch.float).repeat(50, 1)
    target = torch.arange(50) * 3
    r1 = sampled_ranks(scores, target, np.random.default_rng(0))
    r2 = sampled_ranks(scores, target, np.random.default_rng(0))
    assert torch.equal(r1, r2)
    # Every non-target item scores differently, so rank < 101 and ≤ items above the target.
    assert (r1 <= 100).all() and (r1 <= 199 - target).all()
    top = torch.full((50,), 199)
    assert (sampled_ranks(scores, top, np.random.default_rng(1)) == 0).all()


def test_wape_and_mae_by_hand():
    actual = np.array([[10.0, 0.0], [5.0, 5.0]])
    forecast = np.array([[8.0, 1.0], [5.0, 9.0]])
    assert wape(actual, forecast) == pytest.approx((2 + 1 + 0 + 4) / 20)
    assert mae(actual, forecast) == pytest.approx(7 / 4)


def test_forecast_baselines():
    history = np.array([[1.0, 2.0, 3.0, 4.0, 8.0]])
    assert seasonal_naive(history, 3).tolist() == [[8.0, 8.0, 8.0]]
    assert seasonal_naive(history, 3, season=2).tolist() == [[4.0, 8.0, 4.0]]
    assert moving_average(history, 2).tolist() == [[4.25, 4.25]]


def test_weekly_demand_bins_and_drops_partial_week(tiny_events):
    series = weekly_demand(tiny_events, None)
    bought = tiny_events[tiny_events["event_type"] == "purchase"]
    start = bought["timestamp"].min().normalize()
    full = bought[bought["timestamp"] < start + len(series.weeks) * np.timedelta64(7, "D")]
    assert series.units.sum() == pytest.approx(full["quantity"].sum())
    assert (
        series.units.shape[0] == bought["region"].nunique() * bought["category"].str[:2].nunique()
    )
