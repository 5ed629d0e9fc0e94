"""Splitting one event log into federated clients the way a platform's regions would be.

Natural: one client per region (area / country). With more clients than regions, the regions
with most users per client are split further by a stable hash of the user id; with fewer, the
smallest regions are pooled. A user always lands in exactly one client (their main region), so
per-client DP stays user-level.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from common.data.events import user_regions


@dataclass(frozen=True)
class Partition:
    name: str
    regions: tuple[str, ...]
    shard: int = 0
    shards: int = 1


def plan(events: pd.DataFrame, n_clients: int) -> list[Partition]:
    sizes = user_regions(events).value_counts()
    regions = [str(r) for r in sizes.index]
    if n_clients <= 0:
        raise ValueError("need at least one client")
    if n_clients < len(regions):
        groups: list[list[str]] = [[r] for r in regions[: n_clients - 1]]
        groups.append(regions[n_clients - 1 :])
        return [
            Partition("+".join(g) if len(g) <= 3 else f"{g[0]}+{len(g) - 1} more", tuple(g))
            for g in groups
        ]
    shards = dict.fromkeys(regions, 1)
    for _ in range(n_clients - len(regions)):
        busiest = max(regions, key=lambda r: sizes[r] / shards[r])
        shards[busiest] += 1
    return [
        Partition(r if shards[r] == 1 else f"{r}#{s + 1}", (r,), s, shards[r])
        for r in regions
        for s in range(shards[r])
    ]


def _hash(user_ids: pd.Series, salt: str = "") -> np.ndarray:
    return np.array(
        [
            int.from_bytes(hashlib.blake2b((salt + u).encode(), digest_size=8).digest(), "little")
            for u in user_ids.astype(str)
        ],
        dtype=np.uint64,
    )


def _shard_of(user_ids: pd.Series, shards: int) -> np.ndarray:
    return (_hash(user_ids) % np.uint64(shards)).astype(np.int64)


def audit_non_members(user_ids: np.ndarray, fraction: float) -> np.ndarray:
    """Users a client keeps out of training so a membership audit has true non-members.

    A stable hash (salted apart from the sharding) picks them, so the client and a later audit
    agree on who they are without exchanging any list.
    """
    unit = _hash(pd.Series(user_ids), "audit:") / np.float64(2**64)
    return unit < fraction


def users_per_part(events: pd.DataFrame, parts: list[Partition], min_events: int = 1) -> list[int]:
    """How many users with at least `min_events` events each partition holds (one pass, where
    `select` per partition would scan the events once each)."""
    sizes = events.groupby("user_id", observed=True).size()
    home = user_regions(events).astype(str)
    home = home[sizes.reindex(home.index).to_numpy() >= min_events]
    users = home.index.to_series()
    counts = []
    for part in parts:
        mine = users[home.isin(part.regions).to_numpy()]
        if part.shards > 1:
            mine = mine[_shard_of(mine, part.shards) == part.shard]
        counts.append(len(mine))
    return counts


def select(events: pd.DataFrame, part: Partition) -> pd.DataFrame:
    """The events of the users that belong to `part`."""
    home = user_regions(events)
    users = home[home.astype(str).isin(part.regions)].index.to_series()
    if part.shards > 1:
        users = users[_shard_of(users, part.shards) == part.shard]
    return events[events["user_id"].isin(users)].reset_index(drop=True)
