import numpy as np
import pandas as pd

from common.data.events import CANONICAL, EventType
from common.data.synth import SynthConfig, generate
from tests.conftest import TINY


def test_deterministic_for_a_seed(tiny_events):
    pd.testing.assert_frame_equal(tiny_events, generate(TINY))
    other = generate(TINY.model_copy(update={"seed": 1}))
    assert not tiny_events["item_id"].equals(other["item_id"])


def test_canonical_columns_and_exact_size(tiny_events):
    assert set(CANONICAL) <= set(tiny_events.columns)
    assert len(tiny_events) == TINY.events
    assert tiny_events["timestamp"].is_monotonic_increasing
    assert set(tiny_events["event_type"].astype(str)) <= {e.value for e in EventType}
    assert (tiny_events["quantity"] > 0).all()


def test_regions_differ_in_size_and_taste():
    ev = generate(SynthConfig(events=60_000, users=2_000, items=500, regions=4))
    sizes = ev.groupby("region").size().sort_values()
    assert sizes.iloc[-1] > 1.5 * sizes.iloc[0]
    top = ev["category"].str.split(".").str[0]
    share = pd.crosstab(ev["region"], top, normalize="index")
    assert (share.max() - share.min()).max() > 0.1  # some category is much more popular somewhere


def test_daily_and_weekly_cycles():
    ev = generate(SynthConfig(events=60_000, users=2_000, items=500))
    hours = ev["timestamp"].dt.hour.value_counts()
    assert hours.loc[20] > 5 * hours.loc[4]
    dow = ev["timestamp"].dt.day_of_week.value_counts()
    assert dow.loc[[5, 6]].mean() > dow.loc[[0, 1]].mean()


def test_users_have_persistent_tastes(tiny_events):
    top = tiny_events["category"].str.split(".").str[0]
    per_user = tiny_events.assign(top=top).groupby("user_id")["top"]
    own_share = per_user.agg(lambda s: s.value_counts(normalize=True).iloc[0])
    overall = top.value_counts(normalize=True).iloc[0]
    assert own_share[per_user.size() >= 20].mean() > overall + 0.1


def test_popularity_is_skewed(tiny_events):
    counts = tiny_events["item_id"].value_counts().to_numpy()
    top_decile = counts[: max(len(counts) // 10, 1)].sum() / counts.sum()
    assert top_decile > 0.25
    assert np.isfinite(tiny_events["price"]).all()
