"""Weekly demand per region × top-level category, and the forecasting baselines."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from common.catalog import top_category
from common.events import EventType
from common.metrics import mae, wape

WEEK = pd.Timedelta(days=7)


@dataclass
class DemandSeries:
    """Units bought per (region, top category) series and week; only full weeks are kept."""

    index: pd.MultiIndex  # (region, top_category)
    weeks: pd.DatetimeIndex  # start of each 7-day bin
    units: np.ndarray  # [series, weeks]

    def holdout(self, weeks: int) -> tuple[np.ndarray, np.ndarray]:
        return self.units[:, :-weeks], self.units[:, -weeks:]

    @property
    def cutoff(self) -> pd.Timestamp:
        """Time at which a forecast of the last weeks is made, given the holdout length."""
        return self.weeks[-1] + WEEK


def weekly_demand(
    events: pd.DataFrame, top_category_chars: int | None, start: str | pd.Timestamp | None = None
) -> DemandSeries:
    """Sum purchase quantities into 7-day bins from `start` (default: the first day in the data).

    Every region × category pair (of those seen in purchases) is a series, zero-filled; a trailing
    partial bin is dropped so every week counts seven days.
    """
    bought = events[events["event_type"] == EventType.PURCHASE.value]
    if bought.empty:
        raise ValueError("no purchase events: demand cannot be computed")
    origin = pd.Timestamp(start) if start is not None else bought["timestamp"].min().normalize()
    end = bought["timestamp"].max().normalize() + pd.Timedelta(days=1)
    n_weeks = int((end - origin) / WEEK)
    if n_weeks < 2:
        raise ValueError("fewer than two full weeks of purchases")
    week = ((bought["timestamp"] - origin) / WEEK).astype("float64").apply(np.floor)
    keep = (week >= 0) & (week < n_weeks)
    frame = pd.DataFrame(
        {
            "region": bought["region"].astype(str).to_numpy(),
            "top": top_category(bought["category"], top_category_chars).astype(str).to_numpy(),
            "week": week.to_numpy(),
            "units": bought["quantity"].to_numpy(float),
        }
    )[keep.to_numpy()]
    table = frame.pivot_table(
        index=["region", "top"], columns="week", values="units", aggfunc="sum", fill_value=0.0
    )
    full = pd.MultiIndex.from_product(
        [sorted(frame["region"].unique()), sorted(frame["top"].unique())], names=["region", "top"]
    )
    table = table.reindex(index=full, columns=range(n_weeks), fill_value=0.0)
    weeks = pd.DatetimeIndex([origin + i * WEEK for i in range(n_weeks)])
    return DemandSeries(table.index, weeks, table.to_numpy(dtype=np.float64))


def seasonal_naive(history: np.ndarray, horizon: int, season: int = 1) -> np.ndarray:
    """Repeat the last season; on weekly bins the weekly season is one bin (last week again)."""
    last = history[:, -season:]
    return np.tile(last, (1, -(-horizon // season)))[:, :horizon]


def moving_average(history: np.ndarray, horizon: int, window: int = 4) -> np.ndarray:
    """Flat forecast at the mean of the last `window` weeks."""
    return np.repeat(history[:, -window:].mean(1, keepdims=True), horizon, axis=1)


def score(actual: np.ndarray, forecast: np.ndarray) -> dict[str, float]:
    return {"wape": wape(actual, forecast), "mae": mae(actual, forecast)}


def baseline_scores(series: DemandSeries, holdout_weeks: int = 4) -> dict[str, dict[str, float]]:
    history, actual = series.holdout(holdout_weeks)
    return {
        "seasonal_naive": score(actual, seasonal_naive(history, holdout_weeks)),
        "moving_average_4w": score(actual, moving_average(history, holdout_weeks)),
    }


def bottom_up(
    per_user: np.ndarray,
    user_region: np.ndarray,
    regions: list[str],
    tops: list[str],
    series: DemandSeries,
) -> np.ndarray:
    """Sum per-user expected units [N, C] into the series' (region, top) rows, [S]."""
    table = np.zeros((len(regions), len(tops)))
    np.add.at(table, user_region, per_user)
    frame = pd.DataFrame(table, index=regions, columns=tops).stack()
    return frame.reindex(list(series.index), fill_value=0.0).to_numpy()


def calibrated(at_cutoff: np.ndarray, past: np.ndarray, actual_past: np.ndarray) -> np.ndarray:
    """Scale a bottom-up forecast by how the same sum compared with real demand in past weeks.

    The sum covers only users the model knows; new and occasional shoppers buy too. Per series,
    scale = Σ actual / Σ predicted over the calibration weeks (1 where nothing was predicted).
    """
    predicted = past.sum(1)
    scale = np.divide(
        actual_past.sum(1), predicted, out=np.ones_like(predicted), where=predicted > 0
    )
    return at_cutoff * scale
