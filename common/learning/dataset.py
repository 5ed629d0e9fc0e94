"""One prepared data set: leave-last-out split, shared catalog and model-ready sequences."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from common.data.catalog import Catalog
from common.data.events import sort_events
from common.data.sequences import (
    MIN_EVENTS,
    Sequences,
    encode,
    history_sequences,
    leave_last_out,
    training_sequences,
)
from common.learning.forecasting import DemandSeries, TooLittleDemand, weekly_demand
from common.learning.model import CatalogShape

DAY_S = 86_400
# Full weeks of demand before the held-out ones: a level to forecast from and one earlier cut
# at which the model's sum calibrates.
MIN_HISTORY_WEEKS = 2


class NoHistory(ValueError):
    """No user has enough events for any head: there is nothing to train or evaluate."""


@dataclass
class Prepared:
    catalog: Catalog
    train: Sequences  # one row per user: training part, next-item + demand targets
    valid: Sequences  # history = training part, target = second-to-last event
    test: Sequences  # history = all but the last event, target = last event
    # None when the purchases are too few or span too few weeks for a forecast to be held out
    # (`demand_reason` says why): then no demand label trains and nothing is forecast.
    demand: DemandSeries | None
    # Users' events before the forecast cutoff, then before each of the `holdout_weeks` weeks
    # ahead of it (those calibrate the bottom-up sum against known demand); empty without demand.
    forecast_inputs: list[Sequences]
    train_events: pd.DataFrame  # encoded training part (all events, not only the last L)
    test_history: pd.DataFrame  # encoded events before each user's test event
    holdout_weeks: int
    top_category_chars: int | None
    demand_reason: str | None = None

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
    demand_end: str | None = None,
) -> Prepared:
    """Build everything the trainers and evaluators need from one canonical event table.

    Demand labels used for training stop at the forecast cutoff, so the held-out weeks are
    never a training target. Without `holdout_weeks + MIN_HISTORY_WEEKS` full weeks of
    purchases there is no demand: the next-item head trains alone (NoHistory when no user has
    MIN_EVENTS events, so that not even it can).
    """
    split = leave_last_out(events)
    if split.empty:
        raise NoHistory(f"no user has {MIN_EVENTS} or more events")
    is_train = (split["split"] == "train").to_numpy()
    catalog = catalog or Catalog.build(split[is_train], top_category_chars)
    enc = encode(split, catalog)
    n_top = len(catalog.top_categories)
    demand, demand_reason = demand_history(
        events, top_category_chars, demand_start, holdout_weeks, demand_end
    )
    cutoff_s, cuts = None, []
    if demand is not None:
        week_starts = demand.weeks.to_numpy().astype("datetime64[s]").astype(np.int64)
        cutoff_s = int(week_starts[-holdout_weeks])
        calibration = week_starts[max(len(week_starts) - 2 * holdout_weeks, 1) : -holdout_weeks]
        cuts = [cutoff_s, *calibration]
    train_enc = enc[is_train].reset_index(drop=True)
    not_test = enc[(split["split"] != "test").to_numpy()].reset_index(drop=True)
    # A forecast at a cut knows every user who shopped before it, not only those the whole
    # log later shows with MIN_EVENTS events: that would pick users by their future.
    everyone = encode(sort_events(events), catalog) if cuts else enc

    def history_before(t: int) -> Sequences:
        known = everyone[everyone["t"].to_numpy() < t].reset_index(drop=True)
        return history_sequences(known, n_top, history_len, at=t)

    train = training_sequences(train_enc, n_top, history_len, horizon_days * DAY_S, cutoff_s)
    if demand is None:  # no demand target anywhere: the demand loss is 0 for every user
        train.demand_mask[:] = False
        train.demand[:] = 0
    return Prepared(
        catalog=catalog,
        train=train,
        valid=history_sequences(train_enc, n_top, history_len, enc[split["split"] == "valid"]),
        test=history_sequences(not_test, n_top, history_len, enc[split["split"] == "test"]),
        demand=demand,
        forecast_inputs=[history_before(int(t)) for t in cuts],
        train_events=train_enc,
        test_history=not_test,
        holdout_weeks=holdout_weeks,
        top_category_chars=top_category_chars,
        demand_reason=demand_reason,
    )


def demand_history(
    events: pd.DataFrame,
    top_category_chars: int | None,
    start: str | None,
    holdout_weeks: int,
    end: str | None = None,
) -> tuple[DemandSeries | None, str | None]:
    """The weekly demand series, or None and why when it cannot hold `holdout_weeks` out with
    MIN_HISTORY_WEEKS before them."""
    need = holdout_weeks + MIN_HISTORY_WEEKS
    needs = f"the forecast needs {need} ({holdout_weeks} held out, {MIN_HISTORY_WEEKS} before)"
    try:
        demand = weekly_demand(events, top_category_chars, start, end)
    except TooLittleDemand as exc:
        return None, f"no demand forecast: {exc}; {needs}"
    if len(demand.weeks) < need:
        return None, f"no demand forecast: {len(demand.weeks)} full weeks of purchases; {needs}"
    return demand, None
