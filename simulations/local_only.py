"""Local-only training: every region trains alone on its own users, no federation.

It is the floor federation has to beat. Each region gets the same shared catalog and demand
calendar as in the federated run; metrics are pooled like the server pools them (users for
HR/NDCG, sums of absolute errors and of actual units for WAPE). Beside its model alone, each
region also has what it would serve with it (the model beside its own transition-aware rule,
`common.learning.blend`) and its rules, as the simulation's exact table scores a federated
model, so the two compare row by row.
"""

from __future__ import annotations

import pandas as pd

from common.data.catalog import Catalog
from common.data.events import MIN_EVENTS
from common.data.partition import plan, select
from common.data.sequences import leave_last_out
from common.learning.dataset import NoHistory, prepare
from common.learning.demand import PRIMARY
from server.platform import demand_calendar
from simulations.central import (
    CentralConfig,
    own_ranking,
    pool_client_scores,
    pool_ranks,
    train_central,
)


def train_local_only(
    events: pd.DataFrame, top_chars: int | None, clients: int, cfg: CentralConfig
) -> dict:
    """Train every region alone. A region without a user of MIN_EVENTS events is skipped and
    listed under `skipped` with the reason; one whose purchases span too few weeks for a
    forecast trains the next-item head only and pools no demand error (`no_forecast`)."""
    split = leave_last_out(events)
    catalog = Catalog.build(split[split["split"] == "train"], top_chars)
    start, end = demand_calendar(events)  # the platform's, as federated
    per_client, skipped, ranked, forecasts = {}, {}, [], []
    for part in plan(events, clients):
        try:
            prepared = prepare(
                select(events, part),
                top_category_chars=top_chars,
                history_len=cfg.model.history,
                demand_start=start,
                catalog=catalog,
                demand_end=end,
            )
        except NoHistory as exc:
            skipped[part.name] = str(exc)
            continue
        model, results = train_central(prepared, cfg)
        blend, rules = own_ranking(model, prepared)
        ranked.append((blend, rules))
        served = blend["served"]
        per_client[part.name] = {
            "users": served["users"],
            "test": blend["model"]["full"],
            "served": served["full"],
            "model_weight": served["model_weight"],
        }
        if prepared.demand is None:
            per_client[part.name]["no_forecast"] = prepared.demand_reason
            continue
        per_client[part.name]["forecast"] = results["forecast"][PRIMARY]
        forecasts.append((prepared, results["forecast"]))
    if not ranked:
        raise NoHistory(f"no region has a user with {MIN_EVENTS} or more events")
    alone = pool_ranks([blend["model"] for blend, _ in ranked])
    return {
        "clients": per_client,
        "skipped": skipped,
        "pooled": {
            "users": alone["users"],
            "hr@10": alone["full"]["hr@10"],
            "ndcg@10": alone["full"]["ndcg@10"],
            "wape": pool_client_scores(forecasts).get(PRIMARY, {}).get("wape", float("nan")),
        },
        "ranking": {
            "model": alone,
            "served": pool_ranks([blend["served"] for blend, _ in ranked]),
            "rules_own_region": {
                rule: pool_ranks([rules[rule] for _, rules in ranked]) for rule in ranked[0][1]
            },
        },
    }
