"""Demand forecasts from the model: the held-out weeks of a prepared data set, and next week
from an exported model's users."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from common.dataset import Prepared
from common.forecasting import bottom_up, calibrated, moving_average, weekly_demand
from common.inference import Exported, user_histories
from common.model import BehaviorModel
from common.training import predict_demand


def forecast_holdout(
    model: BehaviorModel, prepared: Prepared, device: torch.device
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Actual holdout demand [S, W] and the model's bottom-up forecasts of it, raw and calibrated.

    The model predicts each user's units for the next week; the same flat weekly value serves
    every holdout week.
    """
    cat, demand, weeks = prepared.catalog, prepared.demand, prepared.holdout_weeks
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
    past = np.stack(sums[1:], axis=1)
    scaled = calibrated(sums[0], past, history[:, -past.shape[1] :])
    flat = {"bottom_up": sums[0], "calibrated": scaled}
    return actual, {k: np.repeat(v[:, None], weeks, axis=1) for k, v in flat.items()}


def forecast_next_week(
    exp: Exported, events: pd.DataFrame, calibration_weeks: int = 4
) -> pd.DataFrame:
    """Units per region × top category for the week after the last full week in `events`.

    Next to the model's sum over users (raw and calibrated on the weeks before) stands the
    4-week moving average of the same series.
    """
    cat = exp.catalog
    series = weekly_demand(events, cat.top_category_chars)
    cuts = [series.cutoff - pd.Timedelta(days=7 * w) for w in range(calibration_weeks + 1)]
    cuts = [c for c in cuts if c > series.weeks[0]]
    device = torch.device("cpu")
    sums = []
    for cut in cuts:
        seqs = user_histories(exp, events[events["timestamp"] < cut])
        per_user = predict_demand(exp.model, seqs, device)
        sums.append(bottom_up(per_user, seqs.region, cat.regions, cat.top_categories, series))
    raw = sums[0]
    past = np.stack(sums[1:], axis=1)[:, ::-1]
    scaled = calibrated(raw, past, series.units[:, -past.shape[1] :]) if past.size else raw
    return pd.DataFrame(
        {
            "model": scaled,
            "model_uncalibrated": raw,
            "moving_average_4w": moving_average(series.units, 1)[:, 0],
            "last_week": series.units[:, -1],
        },
        index=series.index,
    ).assign(week_start=str(series.cutoff.date()))
