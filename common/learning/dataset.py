"""One prepared data set: leave-last-out split, shared catalog and model-ready sequences."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from common.data.catalog import Catalog
from common.data.sequences import (
    Sequences,
    encode,
    history_sequences,
    leave_last_out,
    training_sequences,
)
from common.learning.forecasting import DemandSeries, weekly_demand
from common.learning.model import CatalogShape

DAY_S = 86_400


@dataclass
class Prepared:
    catalog: Catalog
    train: Sequences  # one row per user: training part, next-item + demand targets
    valid: Sequences  # history = training part, target = second-to-last event
    test: Sequences  # history = all but the last event, target = last event
    demand: DemandSeries
    # Users' events before the forecast cutoff, then before each of the `holdout_weeks` weeks
    # ahead of it (those calibrate the bottom-up sum against known demand).
    forecast_inputs: list[Sequences]
    train_events: pd.DataFrame  # encoded training part (all events, not only the last L)
    test_history: pd.DataFrame  # encoded events before each user's test event
    holdout_weeks: int
    top_category_chars: int | None

    @property
    def shape(self) -> CatalogShape:
        return catalog_shape(self.catalog)


def catalog_shape(catalog: Catalog) -> CatalogShape:
    return CatalogShape(
        item_rows=catalog.n_rows,
        items=len(catalog.items),
        categories=len(catalog.categories),
        top_categories=len(catalog.top_categories),
        regions=len(catalog.regions),
        item_category=catalog.item_category,
    )


def prepare(
    events: pd.DataFrame,
    *,
    top_category_chars: int | None,
    history_len: int = 200,
    horizon_days: int = 7,
    holdout_weeks: int = 4,
    demand_start: str | None = None,
    catalog: Catalog | None = None,
) -> Prepared:
    """Build everything the trainers and evaluators need from one canonical event table.

    Demand labels used for training stop at the forecast cutoff, so the held-out weeks are
    never a training target.
    """
    split = leave_last_out(events)
    if split.empty:
        raise ValueError("no user has 3 or more events")
    is_train = (split["split"] == "train").to_numpy()
    catalog = catalog or Catalog.build(split[is_train], top_category_chars)
    enc = encode(split, catalog)
    n_top = len(catalog.top_categories)
    demand = weekly_demand(events, top_category_chars, demand_start)
    week_starts = demand.weeks.to_numpy().astype("datetime64[s]").astype(np.int64)
    cutoff_s = int(week_starts[-holdout_weeks])
    calibration = week_starts[max(len(week_starts) - 2 * holdout_weeks, 1) : -holdout_weeks]
    train_enc = enc[is_train].reset_index(drop=True)
    not_test = enc[(split["split"] != "test").to_numpy()].reset_index(drop=True)

    def history_before(t: int) -> Sequences:
        return history_sequences(
            enc[enc["t"].to_numpy() < t].reset_index(drop=True), n_top, history_len, at=t
        )

    return Prepared(
        catalog=catalog,
        train=training_sequences(train_enc, n_top, history_len, horizon_days * DAY_S, cutoff_s),
        valid=history_sequences(train_enc, n_top, history_len, enc[split["split"] == "valid"]),
        test=history_sequences(not_test, n_top, history_len, enc[split["split"] == "test"]),
        demand=demand,
        forecast_inputs=[history_before(int(t)) for t in (cutoff_s, *calibration)],
        train_events=train_enc,
        test_history=not_test,
        holdout_weeks=holdout_weeks,
        top_category_chars=top_category_chars,
    )
