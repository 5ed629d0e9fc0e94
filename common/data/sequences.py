"""From events to training examples: one example is one user's most recent events.

The user is the privacy unit, so every builder here emits exactly one row per user; a DP step
that samples rows therefore samples users.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from common.data.catalog import Catalog
from common.data.events import MIN_EVENTS, EventType, sort_events, user_regions

SPLITS = ("train", "valid", "test")
GAP_BUCKETS = 24  # 0 pad, 1 first event, 2.. log2 minutes since the previous event
IGNORE = -100
DAY_S = 86_400
MAX_LAG_DAYS = 91  # the longest absence the demand head is trained to forecast after


def leave_last_out(events: pd.DataFrame, min_events: int = MIN_EVENTS) -> pd.DataFrame:
    """Users with ≥ `min_events`; last event → test, second-to-last → valid, the rest → train."""
    events = sort_events(events)
    sizes = events.groupby("user_id", observed=True)["user_id"].transform("size")
    events = events[sizes >= min_events].reset_index(drop=True)
    from_end = events.groupby("user_id", observed=True).cumcount(ascending=False)
    events["split"] = np.select([from_end == 0, from_end == 1], ["test", "valid"], "train")
    return events


def encode(events: pd.DataFrame, catalog: Catalog) -> pd.DataFrame:
    """Integer features per event of a frame sorted by user, then time."""
    t = events["timestamp"].to_numpy("datetime64[s]").astype(np.int64)
    user_codes, _ = pd.factorize(events["user_id"])
    new_user = np.r_[True, user_codes[1:] != user_codes[:-1]]
    gap_min = np.maximum(np.diff(t, prepend=t[0]), 0) / 60.0
    gap = np.where(new_user, 1, 2 + np.minimum(np.floor(np.log2(1 + gap_min)), GAP_BUCKETS - 3))
    cats = catalog.category_index(events["category"])
    ts = events["timestamp"].dt
    region = user_regions(events).reindex(events["user_id"]).to_numpy()
    purchase = (events["event_type"] == EventType.PURCHASE.value).to_numpy()
    return pd.DataFrame(
        {
            "user": user_codes,
            "item_row": catalog.item_rows(events["item_id"]),
            "item_class": catalog.item_classes(events["item_id"]),
            "cat": cats,
            "top": catalog.top_of_category(cats),
            "dow": ts.day_of_week.to_numpy() + 1,
            "hour": ts.hour.to_numpy() + 1,
            "gap": gap.astype(np.int64),
            "region": catalog.region_index(pd.Series(region)),
            "t": t,
            "day": t // DAY_S,
            "bought": np.where(purchase, events["quantity"].to_numpy(float), 0.0),
        }
    ).assign(user_id=events["user_id"].to_numpy())


def demand_labels(
    enc: pd.DataFrame, n_top: int, horizon_s: int, lag_s: np.ndarray | None = None
) -> np.ndarray:
    """Per event: units bought per top category in (t + lag, t + lag + horizon] by the same
    user (lag 0 unless given)."""
    key = enc["user"].to_numpy(np.int64) * (1 << 40) + enc["t"].to_numpy()
    lag_s = np.zeros(len(key), dtype=np.int64) if lag_s is None else lag_s
    start = np.searchsorted(key, key + lag_s, side="right")
    end = np.searchsorted(key, key + lag_s + horizon_s, side="right")
    onehot = np.zeros((len(enc) + 1, n_top), dtype=np.float64)
    np.add.at(onehot, (np.arange(1, len(enc) + 1), enc["top"].to_numpy()), enc["bought"].to_numpy())
    cum = np.cumsum(onehot, axis=0)
    return (cum[end] - cum[start]).astype(np.float32)


class Batch(NamedTuple):
    """One batch of `Sequences` as tensors (every field but `users`), read by name."""

    items: torch.Tensor
    cats: torch.Tensor
    dow: torch.Tensor
    hour: torch.Tensor
    gap: torch.Tensor
    day: torch.Tensor
    lag: torch.Tensor
    region: torch.Tensor
    next_item: torch.Tensor
    demand: torch.Tensor
    demand_mask: torch.Tensor
    length: torch.Tensor
    target: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(*(t.to(device) for t in self))

    def trim(self) -> Batch:
        """Cut the padding columns no user in this batch needs (rows are right-padded)."""
        width = int(self.length.max().clamp_min(1))
        return Batch(*(t[:, :width] if t.dim() >= 2 else t for t in self))

    def tail(self, n: int) -> Batch:
        """Each row's last `n` events, still right-padded (rows of `n` or fewer are unchanged)."""
        batch = self.trim()
        if batch.items.shape[1] <= n:
            return batch
        width = batch.items.shape[1]
        start = (batch.length - n).clamp_min(0)
        slots = start[:, None] + torch.arange(n, device=start.device)[None, :]

        def cut(t: torch.Tensor) -> torch.Tensor:
            if t.dim() < 2 or t.shape[1] != width:  # per user, or a field this batch lacks
                return t
            index = slots.view(*slots.shape, *[1] * (t.dim() - 2)).expand(-1, -1, *t.shape[2:])
            return t.gather(1, index)

        return Batch(*(cut(t) for t in batch))._replace(length=batch.length.clamp_max(n))


@dataclass
class Sequences:
    """Right-padded per-user arrays; row i is one user. Fields as in `Batch`, plus user ids."""

    items: np.ndarray  # [N, L] embedding rows
    cats: np.ndarray
    dow: np.ndarray
    hour: np.ndarray
    gap: np.ndarray
    day: np.ndarray  # [N, L] days since 1970 (the copy component's recency)
    lag: np.ndarray  # [N, L] days from the event to when its demand horizon starts
    region: np.ndarray  # [N]
    next_item: np.ndarray  # [N, L] output class of the following event, IGNORE where none
    demand: np.ndarray  # [N, L, C] units per top category over the horizon after each event
    demand_mask: np.ndarray  # [N, L] whether that horizon is fully observed
    length: np.ndarray  # [N]
    target: np.ndarray  # [N] held-out item class (-1 = outside vocabulary), IGNORE in training
    users: np.ndarray  # [N] user ids

    def __len__(self) -> int:
        return len(self.users)

    def tensors(self) -> Batch:
        return Batch(*(torch.tensor(getattr(self, name)) for name in Batch._fields))

    def subset(self, idx: np.ndarray) -> Sequences:
        return Sequences(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})


def _last_events(enc: pd.DataFrame, keep: int) -> tuple[pd.DataFrame, np.ndarray]:
    """The last `keep` events of every user, with their slot in a right-padded row."""
    from_end = enc.groupby("user", sort=False).cumcount(ascending=False).to_numpy()
    kept = enc[from_end < keep]
    slot = kept.groupby("user", sort=False).cumcount().to_numpy()
    return kept, slot


def _pack(kept: pd.DataFrame, slot: np.ndarray, width: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """Model inputs as right-padded arrays (Sequences field names), the row of each kept event,
    and the user id of each row."""
    row, users = pd.factorize(kept["user"])
    n = len(users)
    inputs = {}
    for field, column in (
        ("items", "item_row"),
        ("cats", "cat"),
        ("dow", "dow"),
        ("hour", "hour"),
        ("gap", "gap"),
        ("day", "day"),
        ("lag", "lag"),
    ):
        arr = np.zeros((n, width), dtype=np.int64)
        arr[row, slot] = kept[column].to_numpy()
        inputs[field] = arr
    region = np.zeros(n, dtype=np.int64)
    region[row] = kept["region"].to_numpy()
    user_ids = np.empty(n, dtype=object)
    user_ids[row] = kept["user_id"].to_numpy()
    inputs |= {"region": region, "length": np.bincount(row, minlength=n)}
    return inputs, row, user_ids


def _quiet_lags(enc: pd.DataFrame, bound: np.ndarray) -> np.ndarray:
    """A lag per event, in whole days, drawn inside the quiet spell before the user's next event
    (or before `bound`): forecasts are made some time after a user's last visit, and a user who
    has been away longer tends to buy less. Drawn from a fixed seed: it shapes training
    examples, not privacy."""
    t = enc["t"].to_numpy()
    same_user = np.r_[enc["user"].to_numpy()[1:] == enc["user"].to_numpy()[:-1], False]
    quiet = np.where(same_user, np.r_[t[1:], 0] - t, bound - t).clip(0, MAX_LAG_DAYS * DAY_S)
    days = np.floor(np.random.default_rng(0).random(len(t)) * (quiet // DAY_S)).astype(np.int64)
    return days * DAY_S


def training_sequences(
    enc: pd.DataFrame, n_top: int, history_len: int, horizon_s: int, demand_until: int | None = None
) -> Sequences:
    """Next-item and demand targets at every position of each user's last `history_len` events.

    `enc` holds only training events. A demand label counts only when its whole horizon lies
    inside the user's observed training events and before `demand_until` (a global time cut).
    """
    last_t = enc.groupby("user", sort=False)["t"].transform("max").to_numpy()
    bound = last_t if demand_until is None else np.minimum(last_t, demand_until)
    lag_s = _quiet_lags(enc, bound)
    labels = demand_labels(enc, n_top, horizon_s, lag_s)
    observed = enc["t"].to_numpy() + lag_s + horizon_s <= bound
    enc = enc.assign(lag=lag_s // DAY_S)
    nxt = np.r_[enc["item_class"].to_numpy()[1:], IGNORE]
    same_user = np.r_[enc["user"].to_numpy()[1:] == enc["user"].to_numpy()[:-1], False]
    enc = enc.assign(next_class=np.where(same_user & (nxt >= 0), nxt, IGNORE), observed=observed)
    kept, slot = _last_events(enc, history_len)
    inputs, row, users = _pack(kept, slot, history_len)
    n = len(users)
    next_item = np.full((n, history_len), IGNORE, dtype=np.int64)
    next_item[row, slot] = kept["next_class"].to_numpy()
    # Half precision: per-user weekly units are small integers, and this is the largest array.
    demand = np.zeros((n, history_len, n_top), dtype=np.float16)
    demand[row, slot] = np.minimum(labels[kept.index.to_numpy()], np.finfo(np.float16).max)
    mask = np.zeros((n, history_len), dtype=bool)
    mask[row, slot] = kept["observed"].to_numpy()
    target = np.full(n, IGNORE, dtype=np.int64)
    return Sequences(
        **inputs, next_item=next_item, demand=demand, demand_mask=mask, target=target, users=users
    )


def history_sequences(
    history: pd.DataFrame,
    n_top: int,
    history_len: int,
    targets: pd.DataFrame | None = None,
    at: int | None = None,
) -> Sequences:
    """Each user's last `history_len` events as model input; `targets` (one row per user) to
    rank; `at` (seconds since 1970), when a demand forecast is made then, sets each event's lag."""
    lag = 0 if at is None else np.clip((at - history["t"].to_numpy()) // DAY_S, 0, None)
    kept, slot = _last_events(history.assign(lag=lag), history_len)
    inputs, _, users = _pack(kept, slot, history_len)
    n = len(users)
    target = np.full(n, -1, dtype=np.int64)
    if targets is not None:
        by_user = targets.set_index("user_id")["item_class"]
        target = by_user.reindex(users).fillna(-1).to_numpy(np.int64)
    return Sequences(
        **inputs,
        next_item=np.full((n, history_len), IGNORE, dtype=np.int64),
        demand=np.zeros((n, 0, n_top), dtype=np.float16),  # no labels: inputs to score only
        demand_mask=np.zeros((n, 0), dtype=bool),
        target=target,
        users=users,
    )
