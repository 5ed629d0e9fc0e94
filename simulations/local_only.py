"""Local-only training: every region trains alone on its own users, no federation.

It is the floor federation has to beat. Each region gets the same shared catalog and demand
calendar as in the federated run; metrics are pooled like the server pools them (users for
HR/NDCG, sums of absolute errors and of actual units for WAPE).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from common.data.catalog import Catalog
from common.data.events import MIN_EVENTS
from common.data.partition import plan, select
from common.data.sequences import leave_last_out
from common.learning.dataset import NoHistory, prepare
from common.learning.demand import PRIMARY, forecast_holdout
from common.learning.forecasting import score
from common.learning.training import pick_device
from simulations.central import CentralConfig, train_central


def train_local_only(
    events: pd.DataFrame, top_chars: int | None, clients: int, cfg: CentralConfig
) -> dict:
    """Train every region alone. A region without a user of MIN_EVENTS events is skipped and
    listed under `skipped` with the reason; one whose purchases span too few weeks for a
    forecast trains the next-item head only and pools no demand error (`no_forecast`)."""
    split = leave_last_out(events)
    catalog = Catalog.build(split[split["split"] == "train"], top_chars)
    start = str(events["timestamp"].min().normalize().date())
    device = pick_device(cfg.train.device)
    per_client, skipped, users, hr, ndcg, err, actual_sum = {}, {}, 0, 0.0, 0.0, 0.0, 0.0
    for part in plan(events, clients):
        try:
            prepared = prepare(
                select(events, part),
                top_category_chars=top_chars,
                history_len=cfg.model.history,
                demand_start=start,
                catalog=catalog,
            )
        except NoHistory as exc:
            skipped[part.name] = str(exc)
            continue
        model, results = train_central(prepared, cfg)
        n = results["test"]["users"]
        users += n
        hr += n * results["test"]["full"]["hr@10"]
        ndcg += n * results["test"]["full"]["ndcg@10"]
        per_client[part.name] = {"users": n, "test": results["test"]["full"]}
        if prepared.demand is None:
            per_client[part.name]["no_forecast"] = prepared.demand_reason
            continue
        actual, forecasts = forecast_holdout(model, prepared, device)
        err += float(np.abs(actual - forecasts[PRIMARY]).sum())
        actual_sum += float(actual.sum())
        per_client[part.name]["forecast"] = score(actual, forecasts[PRIMARY])
    if not users:
        raise NoHistory(f"no region has a user with {MIN_EVENTS} or more events")
    return {
        "clients": per_client,
        "skipped": skipped,
        "pooled": {
            "users": users,
            "hr@10": hr / users,
            "ndcg@10": ndcg / users,
            "wape": err / actual_sum if actual_sum else float("nan"),
        },
    }
