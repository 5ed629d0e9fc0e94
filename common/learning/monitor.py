"""Demand alerts: recent region × category weeks whose actual fell outside the forecast interval.

Each monitored week is forecast exactly as `fedshop forecast` would have forecast it at the
time, from the events before it, so an alert means "this week surprised the forecast".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from common.atomic import write_with
from common.learning.demand import calibration_cuts, forecast_week, model_sums, served_weeks
from common.learning.forecasting import MIN_INTERVAL_WEEKS, DemandSeries, Forecast
from common.learning.inference import Exported

# Wider than the planning interval: an alert should be rare when nothing changed
# (about 1 in 20 series-weeks if the backtest errors are representative).
MONITOR_QUANTILES = (0.025, 0.975)
# Units are counted whole: missing a bound by less than half a unit (an empty week under a lower
# bound of 0.3, or rounding in the bounds) is no alert.
MIN_MISS = 0.5
ALERT_COLUMNS = ["region", "category", "week", "actual", "forecast", "lower", "upper", "outside"]


@dataclass
class Monitored:
    series: DemandSeries
    first: int  # index of the first monitored week
    forecasts: list[Forecast]  # one per monitored week
    alerts: pd.DataFrame  # ALERT_COLUMNS; outside = units beyond the nearer bound (signed)
    quantiles: tuple[float, float]


def monitor(
    exp: Exported,
    events: pd.DataFrame,
    weeks: int = 4,
    quantiles: tuple[float, float] = MONITOR_QUANTILES,
) -> Monitored:
    """Forecast each of the last `weeks` full weeks from the data before it; list the misses."""
    series = served_weeks(exp, events)
    first = len(series.weeks) - weeks
    if weeks < 1 or first < MIN_INTERVAL_WEEKS:
        raise ValueError(
            f"monitoring {weeks} week(s) needs at least {MIN_INTERVAL_WEEKS} full weeks "
            f"before them; the data has {len(series.weeks)} full weeks"
        )
    monitored = range(first, len(series.weeks))
    cuts = sorted({cut for week in monitored for cut in calibration_cuts(series, week)})
    sums = model_sums(exp, events, series, cuts)
    forecasts = [forecast_week(series, week, sums, quantiles) for week in monitored]
    return Monitored(series, first, forecasts, _alerts(series, first, forecasts), quantiles)


def _alerts(series: DemandSeries, first: int, forecasts: list[Forecast]) -> pd.DataFrame:
    rows = []
    for week, fc in enumerate(forecasts, start=first):
        actual = series.units[:, week]
        outside = np.where(actual > fc.upper, actual - fc.upper, np.minimum(actual - fc.lower, 0.0))
        for s in np.flatnonzero(np.abs(outside) >= MIN_MISS):
            region, category = series.index[s]
            rows.append(
                {
                    "region": region,
                    "category": category,
                    "week": series.weeks[week].date(),
                    "actual": actual[s],
                    "forecast": fc.point[s],
                    "lower": fc.lower[s],
                    "upper": fc.upper[s],
                    "outside": outside[s],
                }
            )
    return pd.DataFrame(rows, columns=ALERT_COLUMNS)


def _file_name(region: str, category: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{region}__{category}") + ".png"


def plot_alerts(result: Monitored, out: Path) -> list[Path]:
    """One PNG per flagged series: weekly history, the monitored weeks' forecasts and intervals,
    the weeks outside marked. Earlier alert plots in `out` (REGION__CATEGORY.png) that this
    run does not write again are removed, so the folder shows this run's alerts only."""
    series, weeks = result.series, result.series.weeks
    recent = weeks[result.first :]
    low, high = result.quantiles
    paths = []
    for (region, category), flagged in result.alerts.groupby(["region", "category"], sort=False):
        s = series.index.get_loc((region, category))
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.plot(weeks, series.units[s], marker=".", color="black", label="actual")
        ax.fill_between(
            recent,
            [fc.lower[s] for fc in result.forecasts],
            [fc.upper[s] for fc in result.forecasts],
            alpha=0.25,
            label=f"{low:.1%}–{high:.1%} interval",
        )
        ax.plot(recent, [fc.point[s] for fc in result.forecasts], "--o", label="forecast")
        ax.scatter(
            pd.to_datetime(flagged["week"]),
            flagged["actual"],
            s=90,
            facecolors="none",
            edgecolors="red",
            linewidths=2,
            zorder=3,
            label="outside the interval",
        )
        ax.set(title=f"{region} × {category}: units per week", ylabel="units")
        ax.legend(fontsize="small")
        fig.autofmt_xdate()
        fig.tight_layout()
        path = out / _file_name(str(region), str(category))
        write_with(path, lambda p, fig=fig: fig.savefig(p, format="png", dpi=100))
        plt.close(fig)
        paths.append(path)
    for stale in set(out.glob("*__*.png")) - set(paths):
        stale.unlink()
    return paths
