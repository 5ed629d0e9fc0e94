"""Synthetic spatio-temporal e-commerce behavior: the embedded default data set.

Regions differ in size and category taste, demand follows daily and weekly cycles, each region
runs promotions that lift one category, a shared holiday dents everyone, users keep persistent
tastes and favorite items and shop in sessions, and item popularity is Zipf-skewed per category.
Everything is drawn from one seeded generator, so a seed gives the same table every time.
"""

from __future__ import annotations

from datetime import date, timedelta

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from common.data.events import ROW, EventType

EVENT_TYPES = np.array([EventType.VIEW.value, EventType.CART.value, EventType.PURCHASE.value])
HOUR_WEIGHTS = np.array(
    [1, 0.5, 0.3, 0.2, 0.2, 0.4, 1, 2, 3, 3.5, 4, 4.5, 6, 5, 4, 4, 4.5, 5, 6, 7.5, 8.5, 8, 5, 2.5]
)
DAY_OF_WEEK_WEIGHTS = np.array([0.9, 0.9, 0.95, 1.0, 1.1, 1.35, 1.3])  # Monday first


class SynthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: int = Field(200_000, ge=100, description="Number of events.")
    users: int = Field(5_000, ge=10, description="Number of users.")
    items: int = Field(2_000, ge=20, description="Catalog size.")
    top_categories: int = Field(12, ge=2, le=99, description="Top-level categories.")
    subcategories: int = Field(6, ge=1, le=99, description="Subcategories per top category.")
    regions: int = Field(6, ge=1, le=99, description="Number of regions.")
    days: int = Field(120, ge=14, description="Days covered.")
    start: str = Field("2025-01-06", description="First day (ISO date).")
    promotions_per_region: int = Field(2, ge=0, description="Promotions per region.")
    favorite_share: float = Field(
        0.3, ge=0, le=1, description="Share of events on one of the user's four favourite items."
    )
    seed: int = Field(0, description="Random seed; the same seed gives the same data.")

    @field_validator("start")
    @classmethod
    def _in_the_past(cls, value: str, info: ValidationInfo) -> str:
        # Event loaders refuse times before 1970 or in the future; generate none of them.
        try:
            start = date.fromisoformat(value)
        except ValueError as exc:
            raise ValueError(f"{value!r} is not an ISO date (YYYY-MM-DD)") from exc
        days = info.data.get("days", 0)
        if start < date(1970, 1, 1) or start + timedelta(days=days) > date.today():
            raise ValueError(f"{value} and {days} days after it must lie between 1970 and today")
        return value


def _sample_rows(cum: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw one column index per entry of `rows` from the row-wise cumulative weights `cum`."""
    u = rng.random(len(rows))
    flat = (cum + np.arange(cum.shape[0])[:, None]).ravel()
    idx = np.searchsorted(flat, rows + u * (1 - 1e-12), side="right")
    return np.minimum(idx - rows * cum.shape[1], cum.shape[1] - 1)


def _row_cumsum(weights: np.ndarray) -> np.ndarray:
    cum = np.cumsum(weights, axis=1)
    return cum / cum[:, -1:]


def generate(cfg: SynthConfig | None = None) -> pd.DataFrame:
    """Return `cfg.events` events in the canonical table, sorted by time."""
    cfg = cfg or SynthConfig()
    rng = np.random.default_rng(cfg.seed)
    n_cat, n_reg, n_days = cfg.top_categories, cfg.regions, cfg.days

    # Catalog: items sit in a top category and a subcategory; popularity is Zipf per category.
    item_cat = np.sort(rng.integers(0, n_cat, cfg.items))
    item_sub = rng.integers(0, cfg.subcategories, cfg.items)
    cat_sizes = np.bincount(item_cat, minlength=n_cat)
    n_per_cat = max(cat_sizes.max(), 1)
    cat_start = np.concatenate([[0], np.cumsum(cat_sizes)[:-1]])
    ranks = np.arange(cfg.items) - cat_start[item_cat]
    item_pop = 1.0 / (ranks + 1.0) ** 1.1
    pop_table = np.zeros((n_cat, n_per_cat))
    pop_table[item_cat, ranks] = item_pop
    pop_cum = _row_cumsum(pop_table + 1e-15)

    def draw_items(cats: np.ndarray) -> np.ndarray:
        rank = _sample_rows(pop_cum, cats, rng) % np.maximum(cat_sizes[cats], 1)
        return cat_start[cats] + rank

    item_price = np.round(rng.lognormal(2.0, 0.8, cfg.items), 2)

    # Regions: Zipf-ish sizes, their own category taste, and promotions on one category each.
    region_w = 1.0 / np.arange(1, n_reg + 1) ** 0.9
    region_pref = rng.dirichlet(np.full(n_cat, 0.8), n_reg)
    day_w = np.tile(
        DAY_OF_WEEK_WEIGHTS[(np.arange(n_days) + pd.Timestamp(cfg.start).day_of_week) % 7],
        (n_reg, 1),
    )
    holiday = rng.integers(n_days // 3, 2 * n_days // 3)
    day_w[:, max(holiday - 4, 0) : holiday] *= 1.5  # rush before the holiday
    day_w[:, holiday : holiday + 3] *= 0.3
    promo_cat = np.full((n_reg, n_days), -1)
    for r in range(n_reg):
        for _ in range(cfg.promotions_per_region):
            s, length = rng.integers(0, n_days - 7), rng.integers(4, 10)
            promo_cat[r, s : s + length] = rng.integers(0, n_cat)
            day_w[r, s : s + length] *= 1.6
    day_cum = _row_cumsum(day_w)

    # Users: a region, an activity level, three favorite categories and a few favorite items.
    user_region = rng.choice(n_reg, cfg.users, p=region_w / region_w.sum())
    activity = rng.lognormal(0, 1.0, cfg.users)
    user_cats = _sample_rows(_row_cumsum(region_pref), np.repeat(user_region, 3), rng).reshape(
        -1, 3
    )
    fav_cat = user_cats[np.arange(cfg.users)[:, None], rng.integers(0, 3, (cfg.users, 4))]
    fav_items = draw_items(fav_cat.ravel()).reshape(-1, 4)

    # Sessions: enough to cover the requested events; geometric length, mean about 4 events.
    mean_len = 4.0
    n_sessions = int(cfg.events / mean_len * 1.15) + 10
    s_user = rng.choice(cfg.users, n_sessions, p=activity / activity.sum())
    s_len = rng.geometric(1 / mean_len, n_sessions)
    s_day = _sample_rows(day_cum, user_region[s_user], rng)
    s_hour = rng.choice(24, n_sessions, p=HOUR_WEIGHTS / HOUR_WEIGHTS.sum())
    s_start = (s_day * 24 + s_hour) * 3600 + rng.integers(0, 3600, n_sessions)
    ev_session = np.repeat(np.arange(n_sessions), s_len)[: cfg.events]
    n = len(ev_session)
    if n < cfg.events:
        raise ValueError("internal: too few sessions generated")
    first = np.concatenate([[True], ev_session[1:] != ev_session[:-1]])
    gaps = rng.exponential(90.0, n)
    gaps[first] = 0
    cum = np.cumsum(gaps)
    session_base = np.maximum.accumulate(np.where(first, cum, 0))
    ev_time = s_start[ev_session] + (cum - session_base)
    ev_user = s_user[ev_session]
    ev_region = user_region[ev_user]

    # What is looked at: own tastes, regional taste, live promotions, favorites.
    pick = rng.random(n)
    own = user_cats[ev_user, rng.integers(0, 3, n)]
    regional = _sample_rows(_row_cumsum(region_pref), ev_region, rng)
    ev_cat = np.where(pick < 0.65, own, regional)
    promo = promo_cat[ev_region, np.minimum(ev_time // 86400, n_days - 1).astype(int)]
    ev_cat = np.where((promo >= 0) & (rng.random(n) < 0.35), promo, ev_cat)
    ev_item = draw_items(ev_cat)
    fav = rng.random(n) < cfg.favorite_share
    ev_item = np.where(fav, fav_items[ev_user, rng.integers(0, 4, n)], ev_item)

    # Funnel: favorites and promoted items convert more often.
    p_buy = 0.18 + 0.2 * fav + 0.1 * (promo == ev_cat)
    u = rng.random(n)
    etype = np.where(u < p_buy, 2, np.where(u < p_buy + 0.15, 1, 0))
    qty = np.where(etype == 2, 1 + rng.poisson(0.6, n), 1).astype(float)

    regions = np.array([f"region-{r + 1:02d}" for r in range(n_reg)])
    users = np.array([f"u{u:06d}" for u in range(cfg.users)])
    items = np.array([f"i{i:05d}" for i in range(cfg.items)])
    cats = np.array(
        [f"{c + 1:02d}.{s + 1:02d}" for c in range(n_cat) for s in range(cfg.subcategories)]
    )
    frame = pd.DataFrame(
        {
            "user_id": users[ev_user],
            "item_id": items[ev_item],
            "timestamp": pd.Timestamp(cfg.start)
            + pd.to_timedelta(ev_time.astype(np.int64), unit="s"),
            "region": regions[ev_region],
            "category": cats[item_cat[ev_item] * cfg.subcategories + item_sub[ev_item]],
            "quantity": qty,
            "price": item_price[ev_item],
            "event_type": EVENT_TYPES[etype],
        }
    )
    frame = frame.sort_values("timestamp", kind="stable").reset_index(drop=True)
    for col in ("user_id", "item_id", "region", "category"):
        frame[col] = frame[col].astype("string")
    frame["event_type"] = pd.Categorical(frame["event_type"], categories=list(EVENT_TYPES))
    frame.insert(0, ROW, np.arange(1, len(frame) + 1))
    return frame
