"""Using an exported model: top-k items per user and next-week demand per region × category."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file

from common.data.catalog import Catalog
from common.data.events import sort_events
from common.data.sequences import encode, history_sequences
from common.digest import DIGEST, array_digest
from common.learning.configs import ModelConfig
from common.learning.dataset import catalog_shape
from common.learning.model import BehaviorModel
from common.learning.training import per_batch
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


def user_histories(exp: Exported, events: pd.DataFrame):
    enc = encode(sort_events(events), exp.catalog)
    return history_sequences(enc, len(exp.catalog.top_categories), exp.model.cfg.history)


def recommend(exp: Exported, events: pd.DataFrame, k: int = 10) -> pd.DataFrame:
    """Top-k items per user from each user's most recent events."""
    seqs = user_histories(exp, events)
    rows = []
    for log_p, _, users in per_batch(exp.model.score_items, seqs, torch.device("cpu")):
        scores, items = log_p.exp().topk(k, dim=1)
        for i, row in enumerate(users.tolist()):
            for rank, (item, score) in enumerate(
                zip(items[i].tolist(), scores[i].tolist(), strict=True)
            ):
                category = exp.catalog.categories[exp.catalog.item_category[item]]
                rows.append(
                    (row, seqs.users[row], rank + 1, exp.catalog.items[item], category, score)
                )
    columns = ["row", "user_id", "rank", "item_id", "category", "score"]
    # Users in the order of their histories, as given; evaluation batches them by length.
    table = pd.DataFrame(rows, columns=columns).sort_values(["row", "rank"], kind="stable")
    return table.drop(columns="row").reset_index(drop=True)
