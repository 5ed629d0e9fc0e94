import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from common.data.catalog import Catalog
from common.data.events import EventType
from common.learning import forecasting
from common.learning.configs import ModelConfig
from common.learning.dataset import catalog_shape
from common.learning.demand import served_weeks
from common.learning.forecasting import (
    LEVEL_WINDOWS,
    RATIO_BOUNDS,
    TRIM,
    choose_shrink,
    choose_window,
    coverage,
    planner_forecast,
    planning_level,
    robust_level,
    weekly_demand,
)
from common.learning.inference import load_exported
from common.learning.model import BehaviorModel
from common.learning.monitor import MIN_MISS, MONITOR_QUANTILES, monitor, plot_alerts
from common.run_files import CARD, DEMAND_WEEKS_FROM
from simulations.cli import app

TINY_MODEL = ModelConfig(hidden=16, layers=1, heads=2, intermediate=32, max_len=12)


def test_an_uninformative_model_leaves_the_robust_level():
    rng = np.random.default_rng(0)
    history = rng.poisson(20, (6, 12)).astype(float)
    flat = np.full((6, 5), 7.0)  # the model's sum never moves: ratio 1
    fc = planner_forecast(history, flat)
    assert fc.window is None  # no trend: the trimmed mean of all weeks
    assert np.allclose(fc.point, robust_level(history, TRIM))
    assert (fc.lower <= fc.point).all() and (fc.point <= fc.upper).all()


def test_a_model_wrong_in_the_backtest_gets_no_say():
    history = np.full((3, 12), 10.0)
    # The model's series move against each other while demand stays flat.
    swings = np.array([[3.0, 1, 2, 1, 2], [1.0, 3, 1, 2, 1], [2.0, 2, 2, 2, 2]])
    fc = planner_forecast(history, swings)
    assert fc.shrink == 0.0
    assert np.allclose(fc.point, 10.0)


# Demand moves from the second category to the first; the model's sums (at the cutoff and
# 1..5 weeks before it) moved the same way.
MIX_SHIFT = (
    np.array([np.r_[np.full(8, 10.0), np.full(4, 20.0)], np.r_[np.full(8, 20.0), [10] * 4]]),
    np.array([[20.0, 20, 20, 20, 20, 10], [10.0, 10, 10, 10, 10, 20]]),
)


def test_a_model_that_saw_the_mix_shift_corrects_the_levels_within_bounds():
    fc = planner_forecast(*MIX_SHIFT)
    assert fc.shrink > 0
    assert fc.level[0] < fc.point[0] <= RATIO_BOUNDS[1] * fc.level[0]
    assert RATIO_BOUNDS[0] * fc.level[1] <= fc.point[1] < fc.level[1]


def test_a_correction_must_clearly_beat_the_level_in_the_backtest(monkeypatch):
    """A few backtest cuts over one client's series pick a correction by chance, so one that
    does not cut the level's backtest error by SHRINK_MARGIN is left out. The mix shift's full
    correction halves that error: it stays, unless the margin asks for more."""
    assert choose_shrink(*MIX_SHIFT) == 1.0
    monkeypatch.setattr(forecasting, "SHRINK_MARGIN", 0.6)
    assert choose_shrink(*MIX_SHIFT) == 0.0


def test_the_planning_level_trims_only_where_trimming_cuts_a_week():
    """A 20 % trimmed mean of 4 weeks cuts nothing and would follow the spike: the median
    stands in; from 5 weeks on, one week goes at each end."""
    history = np.array([[30.0, 10, 10, 100, 12], [0.0, 4, 4, 4, 6]])
    assert planning_level(history, window=4).tolist() == [11.0, 4.0]
    assert planning_level(history).tolist() == [pytest.approx(52 / 3), 4.0]
    assert planning_level(history).tolist() == robust_level(history, TRIM).tolist()


def test_the_level_window_follows_a_trend_and_ignores_a_spike():
    trend = np.arange(1.0, 17.0)[None] * 10  # grows every week
    assert choose_window(trend) == min(w for w in LEVEL_WINDOWS if w)
    spiky = np.full((1, 16), 10.0)
    spiky[0, [5, 11, 14]] = 80.0
    assert choose_window(spiky) is None
    # noise: the 8-week level backtests 3.6 % better than all weeks (30.5 vs 31.6), not a trend
    noisy = np.array([[14.0, 5, 11, 9, 9, 10, 6, 10, 8, 17, 10, 9, 9, 9, 8, 9]])
    assert choose_window(noisy) is None
    # a level shift: the 4-week median backtests 12.5 % better and wins
    assert choose_window(np.r_[np.full(12, 10.0), [14.0] * 4][None]) == 4


def test_a_drift_shared_by_every_series_is_not_a_correction():
    # Each cut knows more users, so every sum grows; demand does not.
    history = np.full((2, 12), 10.0)
    sums = np.array([[14.0, 13, 12, 11, 10], [28.0, 26, 24, 22, 20]])
    assert np.allclose(planner_forecast(history, sums).point, 10.0)


def test_coverage_counts_weeks_inside_the_bounds():
    actual = np.array([[1.0, 5, 9], [0, 0, 2]])
    assert coverage(actual, np.array([2.0, 0]), np.array([9.0, 1])) == pytest.approx(4 / 6)


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """A small synthetic event log and a tiny untrained exported model for it."""
    from common.data.synth import SynthConfig, generate

    events = generate(
        SynthConfig(events=6_000, users=200, items=150, regions=3, top_categories=4, days=56)
    )
    folder = tmp_path_factory.mktemp("run")
    catalog = Catalog.build(events)
    catalog.save(folder / "catalog.json")
    torch.manual_seed(0)
    model = BehaviorModel(TINY_MODEL, catalog_shape(catalog))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "model_card.json").write_text(json.dumps({"config": TINY_MODEL.model_dump()}))
    return events, folder


def _plant(events: pd.DataFrame, region: str, category: str, factor: float) -> pd.DataFrame:
    """Multiply the units of one region × top category in the last full week by `factor`."""
    series = weekly_demand(events, None)
    last = series.weeks[-1]
    hit = (
        (events["region"] == region)
        & events["category"].str.startswith(f"{category}.")
        & (events["event_type"] == EventType.PURCHASE.value)
        & (events["timestamp"] >= last)
        & (events["timestamp"] < last + pd.Timedelta(days=7))
    )
    out = events.copy()
    out.loc[hit, "quantity"] *= factor
    return out


def test_monitor_flags_exactly_the_planted_week_and_plots_it(shop, tmp_path):
    events, folder = shop
    exp = load_exported(folder)
    clean = monitor(exp, events, weeks=2)
    region, category = weekly_demand(events, None).index[2]
    planted = monitor(exp, _plant(events, region, category, 10.0), weeks=2)
    new = planted.alerts.merge(clean.alerts, how="left", indicator=True)
    new = new[new["_merge"] == "left_only"]
    assert new[["region", "category"]].values.tolist() == [[region, category]]
    assert str(new["week"].iloc[0]) == str(planted.series.weeks[-1].date())
    assert new["outside"].iloc[0] > 0
    paths = plot_alerts(planted, tmp_path / "plots")
    assert tmp_path / "plots" / f"{region}__{category}.png" in paths
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_monitor_command(shop, tmp_path):
    events, folder = shop
    region, category = weekly_demand(events, None).index[2]
    clean, planted = tmp_path / "clean.parquet", tmp_path / "planted.parquet"
    events.to_parquet(clean)
    _plant(events, region, category, 10.0).to_parquet(planted)
    runner = CliRunner()
    out = tmp_path / "alerts"
    args = ["--model", str(folder), "--weeks", "2"]
    result = runner.invoke(app, ["monitor", *args, "--events", str(planted), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert region in result.output and "outside" in result.output
    assert [p.name for p in out.iterdir()] == [f"{region}__{category}.png"]
    result = runner.invoke(app, ["monitor", *args, "--events", str(clean), "--out", str(out)])
    assert result.exit_code == 0 and "no alerts" in result.output
    assert not list(out.iterdir())  # the planted week's plot is no alert now: removed
    too_long = runner.invoke(app, ["monitor", "--model", str(folder), "--events", str(clean)])
    assert too_long.exit_code == 2 and "full weeks" in too_long.output


def test_a_client_whose_purchases_stop_early_holds_out_the_platforms_weeks(shop):
    """Every client bins up to the platform's end: a region that stopped buying three weeks
    early holds out the same calendar weeks as the rest, with zero demand in them."""
    from server.platform import demand_calendar

    events = shop[0]
    start, end = demand_calendar(events)
    region = events["region"].iloc[0]
    early = events[
        (events["region"] == region)
        & (events["timestamp"] < events["timestamp"].max() - pd.Timedelta(days=21))
    ]
    platform, client = (
        weekly_demand(events, None, start, end),
        weekly_demand(early, None, start, end),
    )
    assert list(client.weeks) == list(platform.weeks)
    assert (client.units[:, -3:] == 0).all()
    assert len(weekly_demand(early, None, start).weeks) < len(platform.weeks)  # its own end


def test_monitor_intervals_flag_about_their_share_of_ordinary_weeks():
    """On stationary Poisson weeks, the monitor's 2.5–97.5 % interval flags at most its 5 %:
    per-series quantiles of ten weeks' overlapping backtest errors flagged 10–16 %."""
    rng = np.random.default_rng(0)
    for lam in (3, 20, 100):
        units = rng.poisson(lam, size=(300, 17)).astype(float)
        flagged = []
        for week in range(13, 17):
            fc = planner_forecast(units[:, :week], None, MONITOR_QUANTILES)
            actual = units[:, week]
            outside = np.maximum(actual - fc.upper, fc.lower - actual)
            flagged.append(outside >= MIN_MISS)
        assert np.mean(flagged) <= 0.06, lam
    # 13 history weeks give 10 distinct error weeks: enough for 10 % and 90 %, per series
    # (1 − 0.9 is 0.0999… in floating point, which must not ask for 11)
    errors = rng.normal(size=(2, 34))
    per_series = forecasting.error_quantiles(errors, (0.1, 0.9), weeks=10)
    assert (per_series[0] != per_series[1]).all()
    pooled = forecasting.error_quantiles(errors, MONITOR_QUANTILES, weeks=10)
    assert (pooled[0] == pooled[1]).all()


def test_the_point_forecast_lies_inside_its_interval():
    """expm1(log1p(x)) can miss x by a rounding step, as for 23/6: the bounds still hold it."""
    history = np.full((1, 13), 23 / 6)
    point = np.array([23 / 6])
    lower, upper = forecasting.interval(point, history, (0.1, 0.9))
    assert lower[0] <= point[0] <= upper[0]


def test_served_events_are_binned_on_the_models_calendar_and_unseen_series_named(shop, tmp_path):
    """`forecast` bins recent events on the weekdays the model was trained on (the card's
    first demand day), warns about regions and categories its catalog lacks, and says how
    many rows it dropped."""
    events, folder = shop
    model = tmp_path / "model"
    shutil.copytree(folder, model)
    first = events["timestamp"].min().normalize()
    anchor = first - pd.Timedelta(days=18)  # another weekday than the first event's
    card = json.loads((model / CARD).read_text()) | {DEMAND_WEEKS_FROM: str(anchor.date())}
    (model / CARD).write_text(json.dumps(card))
    series = served_weeks(load_exported(model), events)
    assert series.weeks[0] == anchor + pd.Timedelta(days=21)  # the first full week in events
    recent = events.copy()
    recent.loc[recent["region"] == recent["region"].iloc[0], "region"] = "elsewhere"
    recent = recent.assign(quantity=recent["quantity"].astype(str))
    recent.loc[recent.index[:3], "quantity"] = "12 units"
    path = tmp_path / "recent.csv"
    recent.to_csv(path, index=False)
    result = CliRunner().invoke(app, ["forecast", "--model", str(model), "--events", str(path)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    end = anchor + len(served_weeks(load_exported(model), events).weeks) * pd.Timedelta(days=7)
    assert f"units in the week from {(end + pd.Timedelta(days=21)).date()}" in said
    assert "region elsewhere not in the model's catalog" in said
    assert f"3 of {len(recent)} rows rejected (bad_quantity 3)" in said
