"""Using an exported model: top-k items per user and next-week demand per region × category."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file

from common.data.catalog import Catalog
from common.data.events import sort_events
from common.data.sequences import Sequences, encode, history_sequences
from common.digest import DIGEST, array_digest
from common.learning.blend import Blend, fit_blend, serve_scores
from common.learning.configs import ModelConfig
from common.learning.dataset import NoHistory, catalog_shape, prepare
from common.learning.model import BehaviorModel
from common.learning.popularity import RepeatWeights, RuleInputs, choose_rule_weights
from common.run_files import CARD, CATALOG, MODEL


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
        catalog = Catalog.load(folder / card.get("catalog", CATALOG))
        model = BehaviorModel(ModelConfig(**card["config"]), catalog_shape(catalog))
        model.load_state_dict(checked_weights(folder / card.get("weights", MODEL)))
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise ValueError(f"{folder}: not a usable exported model ({exc})") from exc
    return Exported(model.eval(), catalog, card)


def checked_weights(path: Path) -> dict[str, torch.Tensor]:
    """The weights of `path`, checked against the SHA-256 `server.export` stores beside them
    (an export written before it had one loads unchecked): safetensors checks the layout, not
    the bytes, so a flipped bit would otherwise serve silently."""
    with safe_open(str(path), framework="numpy") as fh:
        expected = (fh.metadata() or {}).get(DIGEST)
    tensors = load_file(str(path))
    if expected is not None and expected != array_digest(tensors):
        raise ValueError(f"{path.name}: checksum does not match: the file was altered or damaged")
    return {name: torch.from_numpy(value) for name, value in tensors.items()}


def encoded_histories(exp: Exported, events: pd.DataFrame) -> tuple[pd.DataFrame, Sequences]:
    """`events` encoded with the model's catalog (sorted by user and time), and each user's
    history as the model's input."""
    enc = encode(sort_events(events), exp.catalog)
    return enc, history_sequences(enc, len(exp.catalog.top_categories), exp.model.cfg.history)


def user_histories(exp: Exported, events: pd.DataFrame) -> Sequences:
    return encoded_histories(exp, events)[1]


def recommend(
    exp: Exported, events: pd.DataFrame, k: int = 10, users: list[str] | None = None
) -> pd.DataFrame:
    """Top-k items per user (all of `events`' users, or `users`) after their most recent events,
    as the region serves them: the model beside the transition-aware rule counted on all of
    `events` (`common.learning.blend`), with the weights chosen on `events` held out
    leave-last-out. Where no user has enough events to choose them, the model alone."""
    blend = served_blend(exp, events)
    enc, seqs = encoded_histories(exp, events)
    if users is not None:
        seqs = seqs.subset(np.flatnonzero(np.isin(seqs.users, users)))
    rows = []
    for scores, at in serve_scores(exp.model, blend, seqs, enc, exp.catalog):
        top, items = scores.topk(min(k, scores.shape[1]), dim=1)
        for i, row in enumerate(at.tolist()):
            for rank, (item, score) in enumerate(
                zip(items[i].tolist(), top[i].tolist(), strict=True)
            ):
                category = exp.catalog.categories[exp.catalog.item_category[item]]
                rows.append((seqs.users[row], rank + 1, exp.catalog.items[item], category, score))
    return pd.DataFrame(rows, columns=["user_id", "rank", "item_id", "category", "score"])


def served_blend(exp: Exported, events: pd.DataFrame) -> Blend:
    """The rule's and the model's weights, chosen on `events`' second-to-last event per user,
    as a client chooses them; the model alone when no user has the events to hold one out."""
    try:
        prepared = prepare(
            events, top_category_chars=None, history_len=exp.model.cfg.history, catalog=exp.catalog
        )
    except NoHistory:
        return Blend(RepeatWeights(), math.inf)
    inputs = RuleInputs.of(prepared)
    _, (rule, _) = choose_rule_weights(prepared, inputs)
    return fit_blend(exp.model, prepared, inputs, rule)[0]
