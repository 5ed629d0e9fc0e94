import numpy as np
import pandas as pd
import pytest

from common.data.catalog import Catalog
from common.data.events import sort_events
from common.data.sequences import encode, history_sequences
from common.learning.forecasting import DemandSeries, baseline_scores, robust_level
from common.learning.metrics import full_ranks, hit_ndcg
from common.learning.popularity import (
    REPEAT_GRID,
    TRANSITION_WEIGHTS,
    RepeatWeights,
    choose_repeat_weights,
    item_counts,
    item_transitions,
    repeat_features,
    repeat_scores,
    user_spread,
)

# Twelve popular items, bought four times each by other users: plain popularity ranks
# the repeat items 10th or lower.
POPULAR = [f"p{i:02d}" for i in range(12)]
CATEGORY = {"a": "01.1", "b": "01.1", "c": "02.1", "x": "03.1", "y": "04.1", "d": "01.2"}
CATEGORY |= dict.fromkeys(POPULAR, "09.1")


def _events(rows: list[tuple[str, str, int]]) -> pd.DataFrame:
    """(user, item, day) → canonical purchase events."""
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "day"])
    return pd.DataFrame(
        {
            "user_id": frame["user_id"],
            "item_id": frame["item_id"],
            "timestamp": pd.Timestamp("2024-01-01 10:00") + pd.to_timedelta(frame["day"], "D"),
            "region": "r",
            "category": frame["item_id"].map(CATEGORY),
            "quantity": 1.0,
            "price": 1.0,
            "event_type": "purchase",
            "source_row": np.arange(1, len(frame) + 1),
        }
    )


def _setup(history_rows, target_rows):
    """(users' sequences with targets, their encoded history, item counts, catalog, and the
    item transitions of every user's history)."""
    crowd = [(f"o{i}", item, 0) for i, item in enumerate(POPULAR) for _ in range(4)]
    crowd.append(("ob", "b", 0))  # b is in the vocabulary, bought once
    crowd += [(f"f{i}", item, day) for i in range(3) for day, item in enumerate("yx")]  # y, x
    history = _events(crowd + history_rows)
    catalog = Catalog.build(history)
    enc = encode(sort_events(history), catalog)
    counts = item_counts(enc, len(catalog.items))
    transitions = item_transitions(enc, len(catalog.items))
    enc = enc[enc["user_id"].isin({u for u, _, _ in target_rows})].reset_index(drop=True)
    targets = encode(sort_events(_events(target_rows)), catalog)
    seqs = history_sequences(enc, len(catalog.top_categories), 10, targets)
    return seqs, enc, counts, catalog, transitions


def _ranks(history_rows, target_rows, weights: RepeatWeights) -> dict[str, int]:
    """Rank of each user's target under the repeat- or transition-aware scores (0 = first)."""
    seqs, enc, counts, catalog, transitions = _setup(history_rows, target_rows)
    features = repeat_features(seqs, enc, transitions)
    scores, target = next(repeat_scores(seqs, features, counts, catalog, weights))
    return dict(zip(seqs.users, full_ranks(scores, target).tolist(), strict=True))


def test_repeat_beats_popularity_for_a_repeating_user():
    history = [("u", "a", 1), ("u", "a", 2), ("u", "a", 3), ("u", "c", 4)]
    popularity_only = RepeatWeights(item=0.0, category=0.0, basket=0.0)
    assert _ranks(history, [("u", "a", 5)], popularity_only)["u"] >= 10
    assert _ranks(history, [("u", "a", 5)], RepeatWeights())["u"] == 0


def test_category_counts_lift_an_unbought_item_of_a_bought_category():
    history = [("u", "a", 1), ("u", "a", 2), ("u", "c", 3)]
    no_category = RepeatWeights(item=4.0, category=0.0, basket=0.0)
    # b shares a's fine category; without the category term it sits behind every popular item.
    assert _ranks(history, [("u", "b", 4)], no_category)["u"] >= 10
    assert _ranks(history, [("u", "b", 4)], RepeatWeights(basket=0.0))["u"] < 10


def test_top_level_counts_lift_an_item_of_another_sub_category_of_a_bought_one():
    # d sits in 01.2, a and b in 01.1: only the top-level count (01) knows u shops there.
    history = [("u", "a", 1), ("u", "b", 2), ("u", "a", 3), ("u", "c", 3), ("ob", "d", 0)]
    fine = RepeatWeights(item=4.0, category=2.0, basket=0.0)
    assert _ranks(history, [("u", "d", 4)], fine)["u"] >= 10
    assert _ranks(history, [("u", "d", 4)], RepeatWeights(basket=0.0, top=4.0))["u"] < 10


def test_last_day_basket_items_are_pushed_down():
    # x: bought often, also on the last day (that basket is being filled: x is in it already).
    history = [("u", "x", 1), ("u", "x", 2), ("u", "a", 2), ("u", "x", 5), ("u", "c", 5)]
    assert _ranks(history, [("u", "x", 5)], RepeatWeights(basket=0.0))["u"] == 0
    assert _ranks(history, [("u", "x", 5)], RepeatWeights())["u"] >= 10
    # a (bought before, not on the last day) now leads.
    assert _ranks(history, [("u", "a", 5)], RepeatWeights())["u"] == 0


def test_what_others_bought_right_after_the_last_item_lifts_it():
    # Three users bought x right after y; u's last item is y, and u never bought x.
    history = [("u", "a", 1), ("u", "y", 2)]
    assert _ranks(history, [("u", "x", 3)], RepeatWeights(basket=0.0))["u"] >= 10
    assert _ranks(history, [("u", "x", 3)], RepeatWeights(basket=0.0, transition=4.0))["u"] == 0
    # After a, nobody bought anything next: the transition term leaves a's user as it was.
    history = [("u", "y", 1), ("u", "a", 2)]
    assert _ranks(history, [("u", "x", 3)], RepeatWeights(basket=0.0, transition=4.0))["u"] >= 10


def test_transitions_count_consecutive_known_items_of_one_user():
    rows = [("u", "a", 0), ("u", "b", 1), ("u", "a", 2), ("v", "b", 0), ("v", "a", 1)]
    rows += [("w", "a", 0), ("w", "zz", 1), ("w", "b", 2)]  # zz: outside the vocabulary
    catalog = Catalog.build(_events(rows[:5]))
    transitions = item_transitions(encode(sort_events(_events(rows)), catalog), 2)
    a, b = catalog.item_classes(pd.Series(["a", "b"]))
    at, follower, count = transitions.after(np.array([a, -1, b]))
    # a→b once (u), b→a twice (u, v); v's b does not follow u's a, nor w's b its a.
    assert (at.tolist(), follower.tolist(), count.tolist()) == ([0, 2], [b, a], [1.0, 2.0])


def test_ties_count_against_the_target():
    # Every popular item has the same count: a target among them ranks behind all eleven others.
    history = [("u", "c", 1), ("u", "c", 2)]
    weights = RepeatWeights(item=0.0, category=0.0, basket=0.0)
    assert _ranks(history, [("u", "p03", 3)], weights)["u"] == len(POPULAR) - 1


def test_the_weight_search_ranks_exactly_like_the_dense_scores():
    # Users with repeats, categories, baskets and many tied popular items; one target is new.
    history = [("u", "a", 1), ("u", "a", 2), ("u", "c", 3), ("v", "x", 1), ("v", "p01", 1)]
    history += [("w", "p02", 1), ("w", "b", 2), ("w", "p02", 2)]
    targets = [("u", "a", 4), ("v", "p05", 2), ("w", "zz", 3)]
    history += [("x", "a", 1), ("x", "y", 2)]  # its last item, y, has a follower
    targets.append(("x", "x", 3))
    seqs, enc, counts, catalog, transitions = _setup(history, targets)
    grid = REPEAT_GRID[::5] + tuple(RepeatWeights(transition=t) for t in TRANSITION_WEIGHTS[::3])
    grid += (RepeatWeights(top=2.0), RepeatWeights(item=8.0, top=4.0, transition=2.0))
    features = repeat_features(seqs, enc, transitions)
    for w in grid:
        scores = next(repeat_scores(seqs, features, counts, catalog, w))
        dense = hit_ndcg(full_ranks(*scores))
        chosen = choose_repeat_weights(seqs, features, counts, catalog, (w,))
        assert chosen == (w, dense)


def test_median_and_trimmed_mean_ignore_a_spike():
    history = np.array([[10.0, 10, 100, 10, 10], [4, 0, 4, 4, 4]])  # a spike, an empty week
    assert robust_level(history).tolist() == [10.0, 4.0]
    assert robust_level(history, 0.2).tolist() == [10.0, 4.0]
    assert history.mean(1)[0] == pytest.approx(28.0)


def test_baseline_scores_include_the_robust_levels():
    units = np.array([[10.0, 10, 100, 10, 10, 10, 10], [5, 5, 5, 5, 5, 5, 5]])
    series = DemandSeries(
        pd.MultiIndex.from_tuples([("r", "01"), ("r", "02")], names=["region", "top"]),
        pd.date_range("2024-01-01", periods=7, freq="7D"),
        units,
    )
    scores = baseline_scores(series, holdout_weeks=2)
    assert scores["median_level"]["wape"] == 0.0
    assert scores["trimmed_mean_level"]["wape"] == 0.0
    assert scores["moving_average_4w"]["wape"] > 0.5
    assert scores["robust_level_backtested"]["wape"] == 0.0


def test_user_spread_counts_buyers_and_one_user_moves_it_by_at_most_one():
    rows = [("u1", "a", 0), ("u1", "a", 1), ("u1", "b", 1), ("u2", "a", 0), ("u3", "c", 0)]
    enc = encode(sort_events(_events(rows)), catalog := Catalog.build(_events(rows)))
    width = len(catalog.items)
    everyone = user_spread(enc, np.array(["u1", "u2", "u3"]), width)
    a, b, c = (catalog.items.index(i) for i in "abc")
    # u1 bought two distinct items (a twice): 1/√2 on each; u2 and u3 one item each
    assert everyone[[a, b, c]] == pytest.approx([1 + 2**-0.5, 2**-0.5, 1.0])
    for user in ("u1", "u2", "u3"):
        without = user_spread(enc, np.array([u for u in ("u1", "u2", "u3") if u != user]), width)
        assert np.linalg.norm(everyone - without) == pytest.approx(1.0)


def test_clients_forecast_errors_pool_as_sums_and_a_client_without_series_adds_nothing():
    from types import SimpleNamespace

    from simulations.central import pool_client_scores

    def client(actual: np.ndarray) -> SimpleNamespace:
        series = SimpleNamespace(holdout=lambda weeks: (None, actual))
        return SimpleNamespace(demand=series, holdout_weeks=actual.shape[1])

    busy = client(np.array([[10.0, 10, 10, 10], [30.0, 30, 30, 30]]))
    quiet = client(np.array([[2.0, 2, 2, 2]]))
    empty = client(np.zeros((0, 4)))  # Online Retail's RSA: no series at all
    nan = float("nan")
    pooled = pool_client_scores(
        [
            (busy, {"level": {"wape": 0.1, "mae": 2.0, "coverage": 0.5, "interval": [0.1, 0.9]}}),
            (quiet, {"level": {"wape": 0.5, "mae": 1.0, "coverage": 1.0, "interval": [0.1, 0.9]}}),
            (empty, {"level": {"wape": nan, "mae": nan, "coverage": nan, "interval": [0.1, 0.9]}}),
        ]
    )["level"]
    assert pooled["wape"] == pytest.approx((2.0 * 8 + 1.0 * 4) / (160 + 8))
    assert pooled["mae"] == pytest.approx((2.0 * 8 + 1.0 * 4) / 12)
    assert pooled["coverage"] == pytest.approx((0.5 * 8 + 1.0 * 4) / 12)


def test_score_batches_fit_the_matrix_budget_and_rank_alike(monkeypatch, tiny_events):
    from common.learning import training
    from common.learning.dataset import prepare
    from common.learning.popularity import popularity_results

    assert training.score_rows(23_557, 1024) * 4 * 23_557 <= training.SCORE_MATRIX_BYTES
    assert training.score_rows(10**9, 1024) == 1 and training.score_rows(10, 512) == 512
    prepared = prepare(tiny_events, top_category_chars=None, history_len=12)
    whole = popularity_results(prepared)
    width = len(prepared.catalog.items)
    monkeypatch.setattr(training, "SCORE_MATRIX_BYTES", 8 * width * 7)  # 7 users, or 14
    assert training.score_rows(width, 1024) == 14
    batched = popularity_results(prepared)
    for rule, metrics in whole.items():
        assert batched[rule]["full"] == metrics["full"], rule
