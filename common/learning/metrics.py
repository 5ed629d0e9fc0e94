"""Ranking and forecasting metrics, exactly as `docs/protocol.md` states them."""

from __future__ import annotations

import numpy as np
import torch

FULL_RANKING = (
    "full ranking over the item vocabulary; rank = items scoring strictly higher than the "
    "target; nothing excluded; a target outside the vocabulary is a miss"
)
SAMPLED_RANKING = (
    "target vs 100 negatives drawn uniformly without replacement from the vocabulary minus "
    "the target (seeded; all of them when there are no more than 100); for comparison with "
    "published numbers only"
)


def full_ranks(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Rank of each target among all items (0 = best); targets < 0 get rank = n_items (a miss)."""
    n_items = scores.shape[1]
    safe = target.clamp_min(0)
    target_score = scores.gather(1, safe[:, None])
    # int32: summing bools into int64 converts the whole [B, V] mask first (1.6× slower).
    ranks = (scores > target_score).sum(1, dtype=torch.int32).long()
    return torch.where(target >= 0, ranks, torch.full_like(ranks, n_items))


def sampled_ranks(
    scores: torch.Tensor, target: torch.Tensor, rng: np.random.Generator, negatives: int = 100
) -> torch.Tensor:
    """Rank of each target among itself and `negatives` uniform non-target items (every other
    item when the vocabulary has no more than that)."""
    n_items = scores.shape[1]
    negatives = min(negatives, n_items - 1)
    # Uniform without replacement from the vocabulary minus the target: draw from n-1 slots
    # and shift every slot at or after the target up by one.
    draws = np.stack(
        [rng.choice(n_items - 1, negatives, replace=False) for _ in range(len(target))]
    )
    safe = target.clamp_min(0)[:, None]
    negs = torch.as_tensor(draws) + (torch.as_tensor(draws) >= safe).long()
    ranks = (scores.gather(1, negs) > scores.gather(1, safe)).sum(1)
    return torch.where(target >= 0, ranks, torch.full_like(ranks, negatives + 1))


def hit_ndcg(ranks: np.ndarray | torch.Tensor, k: int = 10) -> dict[str, float]:
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.size == 0:
        return {f"hr@{k}": float("nan"), f"ndcg@{k}": float("nan")}
    hit = ranks < k
    ndcg = np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)
    return {f"hr@{k}": float(hit.mean()), f"ndcg@{k}": float(ndcg.mean())}


def wape(actual: np.ndarray, forecast: np.ndarray) -> float:
    """Σ|actual − forecast| / Σ actual over every series and step."""
    total = float(np.abs(actual).sum())
    return float(np.abs(actual - forecast).sum() / total) if total else float("nan")


def mae(actual: np.ndarray, forecast: np.ndarray) -> float:
    return float(np.abs(actual - forecast).mean())
