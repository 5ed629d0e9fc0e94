"""Popularity baselines, scored by the same ranking code as the model.

Counts come from every event of the training part (not only the last L the model sees).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch

from common.dataset import Prepared
from common.sequences import Sequences
from common.training import rank_metrics

TIE_BREAK = 1e-6  # global popularity orders the items a region or a user scores equally
BATCH = 1024

ScoreBatches = Iterator[tuple[torch.Tensor, torch.Tensor]]


def item_counts(events: pd.DataFrame, n_items: int) -> np.ndarray:
    """Occurrences of each vocabulary item in encoded events."""
    classes = events["item_class"].to_numpy()
    return np.bincount(classes[classes >= 0], minlength=n_items).astype(np.float64)


def region_counts(events: pd.DataFrame, n_items: int, n_regions: int) -> np.ndarray:
    known = events[events["item_class"] >= 0]
    counts = np.zeros((n_regions, n_items))
    np.add.at(counts, (known["region"].to_numpy(), known["item_class"].to_numpy()), 1.0)
    return counts


def _targets(seqs: Sequences, s: slice) -> torch.Tensor:
    return torch.from_numpy(seqs.target[s].copy())


def global_scores(seqs: Sequences, counts: np.ndarray) -> ScoreBatches:
    row = torch.from_numpy(counts)[None]
    for start in range(0, len(seqs), BATCH):
        s = slice(start, start + BATCH)
        yield row.expand(len(seqs.target[s]), -1), _targets(seqs, s)


def regional_scores(seqs: Sequences, counts: np.ndarray, by_region: np.ndarray) -> ScoreBatches:
    table = torch.from_numpy(by_region + TIE_BREAK * counts)
    for start in range(0, len(seqs), BATCH):
        s = slice(start, start + BATCH)
        yield table[seqs.region[s]], _targets(seqs, s)


def own_history_scores(seqs: Sequences, history: pd.DataFrame, counts: np.ndarray) -> ScoreBatches:
    """A user's own most frequent items (whole history), then the globally popular ones."""
    known = history[history["item_class"] >= 0]
    row_of = pd.Series(np.arange(len(seqs)), index=pd.Index(seqs.users))
    user_row = row_of.reindex(known["user_id"].to_numpy()).to_numpy()
    pairs = pd.DataFrame({"row": user_row, "item": known["item_class"].to_numpy()}).dropna()
    pairs = pairs.astype(np.int64).value_counts().reset_index()
    pairs = pairs.sort_values("row", kind="stable")
    bounds = np.searchsorted(pairs["row"].to_numpy(), np.arange(0, len(seqs) + BATCH, BATCH))
    base = torch.from_numpy(TIE_BREAK * counts)
    for b, start in enumerate(range(0, len(seqs), BATCH)):
        s = slice(start, start + BATCH)
        part = pairs.iloc[bounds[b] : bounds[b + 1]]
        scores = base.repeat(len(seqs.target[s]), 1)
        rows = torch.from_numpy(part["row"].to_numpy(copy=True) - start)
        scores[rows, torch.from_numpy(part["item"].to_numpy(copy=True))] += torch.from_numpy(
            part["count"].to_numpy(np.float64)
        )
        yield scores, _targets(seqs, s)


def popularity_results(prepared: Prepared) -> dict[str, dict[str, object]]:
    """Most-popular (global, per region) and own-history baselines on the test split."""
    n_items = len(prepared.catalog.items)
    counts = item_counts(prepared.train_events, n_items)
    by_region = region_counts(prepared.train_events, n_items, len(prepared.catalog.regions))
    return {
        "most_popular": rank_metrics(global_scores(prepared.test, counts)),
        "most_popular_region": rank_metrics(regional_scores(prepared.test, counts, by_region)),
        "own_history": rank_metrics(
            own_history_scores(prepared.test, prepared.test_history, counts)
        ),
    }
