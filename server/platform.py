"""Platform data the server shares with every client: the item catalog and the demand calendar.

In deployment both are the platform's own (`catalog`, `demand-start`, `demand-end` in the run
config). In a
simulation the server derives them from the simulated data set, as the platform's item listing
would: items of the training parts and their categories, never a user's events.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from common.data.catalog import Catalog
from common.data.events import EventType
from common.data.sequences import leave_last_out
from common.data.sources import run_events
from common.run_files import CATALOG
from common.runconfig import RunConfig


@dataclass(frozen=True)
class Platform:
    catalog: Catalog
    catalog_path: Path
    demand_start: str
    demand_end: str
    summary: dict


def platform_for(cfg: RunConfig, out: Path) -> Platform:
    if cfg.catalog:
        path = Path(cfg.catalog)
        catalog = Catalog.load(path)
        return Platform(catalog, path, cfg.demand_start, cfg.demand_end, {"catalog": str(path)})
    events, top_chars = run_events(
        cfg.data, cfg.format, cfg.synth.model_dump_json(), cfg.spec, cfg.columns
    )
    split = leave_last_out(events)
    catalog = Catalog.build(split[split["split"] == "train"], top_chars)
    path = catalog.save(out / CATALOG)
    start, end = demand_start(events, cfg.demand_start), demand_end(events, cfg.demand_end)
    summary = {
        "source": cfg.data or f"synthetic(seed={cfg.seed}, events={cfg.synth_events})",
        "events": len(events),
        "users": int(events["user_id"].nunique()),
        "items_in_catalog": len(catalog.items),
        "regions": len(catalog.regions) - 1,
        "first": str(events["timestamp"].min()),
        "last": str(events["timestamp"].max()),
    }
    return Platform(catalog, path, start, end, summary)


def demand_start(events: pd.DataFrame, configured: str = "") -> str:
    """The first day of every client's weekly demand bins: the configured one, else the day
    of the first purchase, so that all clients' weeks line up."""
    bought = events[events["event_type"] == EventType.PURCHASE.value]
    return configured or str(bought["timestamp"].min().normalize().date())


def demand_end(events: pd.DataFrame, configured: str = "") -> str:
    """The day after the last one every client's weekly demand bins cover: the configured
    one, else the day after the last purchase of all. A client whose own purchases stop
    earlier still bins up to it, so every client holds out the same calendar weeks."""
    bought = events[events["event_type"] == EventType.PURCHASE.value]
    last = bought["timestamp"].max().normalize() + pd.Timedelta(days=1)
    return configured or str(last.date())
