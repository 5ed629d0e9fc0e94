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
    start, end = demand_calendar(events, cfg.demand_start, cfg.demand_end)
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


def demand_calendar(events: pd.DataFrame, start: str = "", end: str = "") -> tuple[str, str]:
    """Every client's weekly demand bins: from the configured `start`, else the day of the
    first purchase, up to the configured `end`, else the day after the last purchase of all.
    All clients' weeks line up, and a client whose own purchases stop earlier still bins up
    to the end, so every client holds out the same calendar weeks."""
    days = events.loc[events["event_type"] == EventType.PURCHASE.value, "timestamp"].dt.normalize()
    last = days.max() + pd.Timedelta(days=1)
    return start or str(days.min().date()), end or str(last.date())
