"""The real data sets in ../shared/data, where present: counts and the reference baselines."""

import pytest

from common.data.formats import load_events
from common.learning.dataset import prepare
from common.learning.forecasting import baseline_scores, weekly_demand
from common.learning.popularity import popularity_results
from tests.conftest import RETAIL, TAFENG

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tafeng():
    if not TAFENG.exists():
        pytest.skip("Ta-Feng not in ../shared/data")
    return load_events(TAFENG)


def test_tafeng_loads_whole(tafeng):
    s = tafeng.summary()
    assert (s["rows_read"], s["accepted"], s["users"], s["items"], s["regions"]) == (
        817_741,
        817_741,
        32_266,
        23_812,
        8,
    )


def test_tafeng_reference_baselines(tafeng):
    """Reference figures of the developers' guide: HR@10 0.059 / 0.080, WAPE 0.430 / 0.185."""
    prepared = prepare(tafeng.events, top_category_chars=2)
    assert len(prepared.test) == 29_197
    assert len(prepared.catalog.items) == 23_557
    rec = popularity_results(prepared)
    assert rec["most_popular"]["full"]["hr@10"] == pytest.approx(0.059, abs=0.001)
    assert rec["own_history"]["full"]["hr@10"] == pytest.approx(0.080, abs=0.001)
    # The strongest rules (docs/results.md): the model must beat these.
    assert rec["repeat_aware"]["full"]["hr@10"] == pytest.approx(0.1006, abs=0.0005)
    assert rec["transition_aware"]["full"]["hr@10"] == pytest.approx(0.1142, abs=0.0005)
    assert rec["transition_aware"]["weights"]["top"] == 1.0  # 0.1125 without the top level
    series = weekly_demand(tafeng.events, 2)
    assert series.units.shape == (208, 17)
    fc = baseline_scores(series)
    assert fc["seasonal_naive"]["wape"] == pytest.approx(0.430, abs=0.001)
    assert fc["moving_average_4w"]["wape"] == pytest.approx(0.185, abs=0.001)


def test_online_retail_cleaning_matches_the_protocol():
    if not RETAIL.exists():
        pytest.skip("Online Retail II not in ../shared/data")
    result = load_events(RETAIL)
    s = result.summary()
    assert s["rows_read"] == 525_461
    assert s["rejected_by_reason"]["cancellation"] == 10_206
    assert (result.events["quantity"] > 0).all()
    assert s["accepted"] + s["rejected"] == s["rows_read"]
