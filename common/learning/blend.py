"""What a region serves: its own transition-aware rule, counted on its own events, plus the
shared model's log-probabilities.

The shared model carries what DP-SGD lets the regions learn together; the rule carries what
only raw counts over a region's own users hold, above all which item follows which. Those
counts cannot be shared: under user-level DP almost no item pair survives the noise
(benchmarks/dp_transitions.py), and the model, even trained without noise, does not learn all
of them. A region runs that rule anyway, so what the federation gives it is the sum:

    score = rule + w · log p(next item | model)

with w chosen on the region's own validation split, as the rule's own weights are: w = ∞
serves the model alone, w = 0 the rule alone. Nothing here leaves the client. The counts and the
weight stay where the events are, like any rule the region runs; the DP guarantee covers what
the client releases, and these never are.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch

from common.data.catalog import Catalog
from common.data.sequences import Sequences
from common.learning.dataset import Prepared
from common.learning.metrics import full_ranks, hit_ndcg
from common.learning.model import BehaviorModel
from common.learning.popularity import (
    BATCH,
    RepeatFeatures,
    RepeatWeights,
    RuleInputs,
    item_counts,
    item_transitions,
    repeat_features,
    repeat_scores,
)
from common.learning.training import RankTally, per_batch, score_rows

# The model's weight beside the rule, most model first: a tie keeps the earlier.
MODEL_WEIGHTS = (math.inf, 32.0, 16.0, 8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.0)


@dataclass(frozen=True)
class Blend:
    rule: RepeatWeights
    model_weight: float  # ∞ = the model alone, 0 = the rule alone

    def scores(self, rule: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
        if self.model_weight == math.inf:
            return log_p
        if self.model_weight == 0:  # 0 · log p would be NaN where log p is −∞
            return rule
        return rule + self.model_weight * log_p

    def describe(self) -> dict[str, object]:
        weight = "model alone" if self.model_weight == math.inf else self.model_weight
        return {"model_weight": weight, "rule": asdict(self.rule)}


def _log_p(model: BehaviorModel, seqs: Sequences) -> torch.Tensor:
    device = next(model.parameters()).device
    out = torch.empty(len(seqs), model.shape.items)
    for log_p, _, rows in per_batch(model.score_items, seqs, device, model.shape.items):
        out[rows] = log_p.float().cpu()
    return out


def _batches(
    model: BehaviorModel,
    seqs: Sequences,
    features: RepeatFeatures,
    counts: np.ndarray,
    catalog: Catalog,
    rule: RepeatWeights,
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(rows, rule scores, model log p, target) for consecutive rows of `seqs`."""
    model.eval()
    scored = repeat_scores(seqs, features, counts, catalog, rule)
    starts = range(0, len(seqs), score_rows(len(catalog.items), BATCH))
    for start, (rule_scores, target) in zip(starts, scored, strict=True):
        rows = np.arange(start, start + len(target))
        yield rows, rule_scores, _log_p(model, seqs.subset(rows)), target


def fit_blend(
    model: BehaviorModel, prepared: Prepared, inputs: RuleInputs, rule: RepeatWeights
) -> tuple[Blend, dict[str, float]]:
    """The model weight with the best validation NDCG@10 beside the rule's weights (themselves
    chosen on validation), and its validation metrics."""
    ranks: dict[float, list[torch.Tensor]] = {w: [] for w in MODEL_WEIGHTS}
    for _, rule_scores, log_p, target in _batches(
        model, prepared.valid, inputs.valid, inputs.counts, prepared.catalog, rule
    ):
        for w in MODEL_WEIGHTS:
            ranks[w].append(full_ranks(Blend(rule, w).scores(rule_scores, log_p), target))
    metrics = {w: hit_ndcg(torch.cat(r).numpy()) for w, r in ranks.items()}
    best = max(MODEL_WEIGHTS, key=lambda w: metrics[w]["ndcg@10"])
    return Blend(rule, best), metrics[best]


def served_results(
    model: BehaviorModel, prepared: Prepared, inputs: RuleInputs, rule: RepeatWeights
) -> dict[str, dict]:
    """On the test split: the blend fitted on validation (`served`) and the model alone."""
    blend, valid = fit_blend(model, prepared, inputs, rule)
    served, alone = RankTally(), RankTally()
    for _, rule_scores, log_p, target in _batches(
        model, prepared.test, inputs.test, inputs.counts, prepared.catalog, rule
    ):
        served.add(blend.scores(rule_scores, log_p), target)
        alone.add(log_p, target)
    return {
        "served": {**served.metrics(), **blend.describe(), "valid": valid},
        "model": alone.metrics(),
    }


def serve_scores(
    model: BehaviorModel,
    blend: Blend,
    seqs: Sequences,
    history: pd.DataFrame,
    catalog: Catalog,
) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """The blend's scores [B, V] after every event of `history` (encoded, sorted by user and
    time; the rule counts over all of it), with the rows of `seqs` they belong to."""
    n_items = len(catalog.items)
    transitions = item_transitions(history, n_items)
    features = repeat_features(seqs, history, transitions)
    counts = item_counts(history, n_items)
    for rows, rule_scores, log_p, _ in _batches(model, seqs, features, counts, catalog, blend.rule):
        yield blend.scores(rule_scores, log_p), rows
