"""Demand forecasts from the model: the held-out weeks of a prepared data set, and the weeks
after a cut in an event log (next week, or each recent week for monitoring).

The forecast is the one planners use: the series' robust level (`planning_level` of its history
weeks, the window chosen by a backtest), corrected by how the model's bottom-up sum over users
moved where that clearly helped in a backtest, with an interval from backtest errors. The raw
bottom-up sum and its older calibration stay beside it for comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from common.data.events import EventType
from common.learning.dataset import Prepared
from common.learning.forecasting import (
    QUANTILES,
    WEEK,
    DemandSeries,
    Forecast,
    bottom_up,
    calibrated,
    coverage,
    moving_average,
    planner_forecast,
    weekly_demand,
)
from common.learning.inference import Exported, user_histories
from common.learning.model import BehaviorModel
from common.learning.training import predict_demand
from common.run_files import DEMAND_WEEKS_FROM

PRIMARY = "corrected"  # the model's forecast: robust level × the model's ratio
CALIBRATION_WEEKS = 4  # model sums at this many weekly cuts before the cutoff


@dataclass
class HoldoutForecast:
    actual: np.ndarray  # [S, W]
    forecasts: dict[str, np.ndarray]  # name → [S, W]; PRIMARY is the model's forecast
    planner: Forecast  # PRIMARY's level, ratio and interval

    def coverage(self) -> float:
        return coverage(self.actual, self.planner.lower, self.planner.upper)


def holdout_forecast(
    model: BehaviorModel, prepared: Prepared, device: torch.device
) -> HoldoutForecast:
    """The model's forecasts of the held-out weeks, flat over them, with PRIMARY's interval;
    a ValueError saying why for data without a demand series (`Prepared.demand` None)."""
    cat, demand, weeks = prepared.catalog, prepared.demand, prepared.holdout_weeks
    if demand is None:
        raise ValueError(prepared.demand_reason or "no demand series")
    sums = [
        bottom_up(
            predict_demand(model, seqs, device),
            seqs.region,
            cat.regions,
            cat.top_categories,
            demand,
        )
        for seqs in prepared.forecast_inputs
    ]
    history, actual = demand.holdout(weeks)
    # forecast_inputs: the cutoff, then the calibration cuts in time order.
    past = np.stack(sums[1:], axis=1)
    planner = planner_forecast(history, np.column_stack([sums[0], past[:, ::-1]]))
    flat = {
        PRIMARY: planner.point,
        "bottom_up": sums[0],
        "calibrated": calibrated(sums[0], past, history[:, -past.shape[1] :]),
    }
    return HoldoutForecast(
        actual, {k: np.repeat(v[:, None], weeks, axis=1) for k, v in flat.items()}, planner
    )


def model_sums(
    exp: Exported, events: pd.DataFrame, series: DemandSeries, cuts: list[pd.Timestamp]
) -> dict[pd.Timestamp, np.ndarray]:
    """The model's bottom-up sum [S] from the users' events before each cut."""
    cat, device, out = exp.catalog, torch.device("cpu"), {}
    for cut in cuts:
        seqs = user_histories(exp, events[events["timestamp"] < cut])
        per_user = predict_demand(exp.model, seqs, device)
        out[cut] = bottom_up(per_user, seqs.region, cat.regions, cat.top_categories, series)
    return out


def calibration_cuts(series: DemandSeries, week: int) -> list[pd.Timestamp]:
    """The cut at the start of week `week` and the weekly cuts before it that have events."""
    return [series.weeks[0] + (week - k) * WEEK for k in range(CALIBRATION_WEEKS + 1) if week > k]


def forecast_week(
    series: DemandSeries,
    week: int,
    sums: dict[pd.Timestamp, np.ndarray],
    quantiles: tuple[float, float] = QUANTILES,
) -> Forecast:
    """Forecast week `week` (len(weeks) = the week after the data) from the weeks before it."""
    cuts = calibration_cuts(series, week)
    return planner_forecast(
        series.units[:, :week], np.column_stack([sums[c] for c in cuts]), quantiles
    )


def served_weeks(exp: Exported, events: pd.DataFrame) -> DemandSeries:
    """The full weeks of `events`, binned on the weekdays of the model's demand calendar (the
    card's DEMAND_WEEKS_FROM) from the first such day on or after the first purchase; a model
    card without it (exported before it was stored) bins from the first purchase day."""
    anchor = exp.card.get(DEMAND_WEEKS_FROM)
    bought = events.loc[events["event_type"] == EventType.PURCHASE.value, "timestamp"]
    start = None
    if anchor and len(bought):  # without purchases, weekly_demand says why there is no demand
        anchor = pd.Timestamp(anchor)
        start = anchor + math.ceil((bought.min().normalize() - anchor) / WEEK) * WEEK
    return weekly_demand(events, exp.catalog.top_category_chars, start)


def unseen(exp: Exported, index: pd.MultiIndex) -> list[str]:
    """The regions and top categories of a (region, top category) `index` that the model's
    catalog lacks: the model predicts nothing there, so their forecast is the level alone."""
    regions = sorted(set(index.get_level_values(0)) - set(exp.catalog.regions))
    tops = sorted(set(index.get_level_values(1)) - set(exp.catalog.top_categories))
    return [f"region {r}" for r in regions] + [f"category {t}" for t in tops]


def forecast_next_week(exp: Exported, events: pd.DataFrame) -> pd.DataFrame:
    """Units per region × top category for the week after the last full week in `events`:
    the model's forecast with its interval, and beside it the robust level, the 4-week moving
    average and last week."""
    series = served_weeks(exp, events)
    week = len(series.weeks)
    sums = model_sums(exp, events, series, calibration_cuts(series, week))
    fc = forecast_week(series, week, sums)
    return pd.DataFrame(
        {
            "forecast": fc.point,
            "lower": fc.lower,  # QUANTILES of the forecast
            "upper": fc.upper,
            "robust_level": fc.level,
            "model_ratio": fc.ratio,
            "bottom_up": sums[series.cutoff],
            "moving_average_4w": moving_average(series.units, 1)[:, 0],
            "last_week": series.units[:, -1],
        },
        index=series.index,
    ).assign(week_start=str(series.cutoff.date()))
