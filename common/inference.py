"""Using an exported model: top-k items per user and next-week demand per region × category."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from common.catalog import Catalog
from common.dataset import catalog_shape
from common.events import sort_events
from common.forecasting import bottom_up, calibrated, moving_average, weekly_demand
from common.model import BehaviorModel, ModelConfig
from common.sequences import encode, history_sequences
from common.training import last_states, predict_demand

CARD = "model_card.json"


@dataclass
class Exported:
    model: BehaviorModel
    catalog: Catalog
    card: dict


def load_exported(path: str | Path) -> Exported:
    """Load `model.safetensors` + `model_card.json` + `catalog.json` from a folder (or the file)."""
    folder = Path(path)
    folder = folder.parent if folder.is_file() else folder
    try:
        card = json.loads((folder / CARD).read_text(encoding="utf-8"))
        catalog = Catalog.load(folder / card.get("catalog", "catalog.json"))
        model = BehaviorModel(ModelConfig(**card["config"]), catalog_shape(catalog))
        model.load_state_dict(load_file(str(folder / card.get("weights", "model.safetensors"))))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ValueError(f"{folder}: not a usable exported model ({exc})") from exc
    return Exported(model.eval(), catalog, card)


def _histories(exp: Exported, events: pd.DataFrame):
    enc = encode(sort_events(events), exp.catalog)
    return history_sequences(enc, len(exp.catalog.top_categories), exp.model.cfg.max_len)


def recommend(exp: Exported, events: pd.DataFrame, k: int = 10) -> pd.DataFrame:
    """Top-k items per user from each user's most recent events."""
    seqs = _histories(exp, events)
    rows, start = [], 0
    device = torch.device("cpu")
    for state, _ in last_states(exp.model, seqs, device):
        scores, items = exp.model.item_head(state).topk(k, dim=1)
        for i in range(len(state)):
            user = seqs.users[start + i]
            for rank, (item, score) in enumerate(
                zip(items[i].tolist(), scores[i].tolist(), strict=True)
            ):
                category = exp.catalog.categories[exp.catalog.item_category[item]]
                rows.append((user, rank + 1, exp.catalog.items[item], category, score))
        start += len(state)
    return pd.DataFrame(rows, columns=["user_id", "rank", "item_id", "category", "score"])


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
        seqs = _histories(exp, events[events["timestamp"] < cut])
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
