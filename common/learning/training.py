"""Training and evaluation loops shared by the centralized trainer and the federated clients."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.data.sequences import Batch, Sequences
from common.learning.configs import lr_scale
from common.learning.metrics import (
    FULL_RANKING,
    SAMPLED_RANKING,
    full_ranks,
    hit_ndcg,
    sampled_ranks,
)
from common.learning.model import BehaviorModel, per_user_loss

EVAL_BATCH = 512
# A dense float32 score matrix [users, items] stays within this, under glibc's largest mmap
# threshold (32 MiB): a larger one is mapped fresh, and zeroed by the kernel, at every
# allocation. On Ta-Feng's 23.5k items that was most of the rules' time (system time); at
# 16 MiB, one client's rules and served blend took 19 s instead of 37, with the same ranks.
SCORE_MATRIX_BYTES = 16 * 2**20


def score_rows(n_items: int, most: int, itemsize: int = 4) -> int:
    """Users per batch of [users, n_items] scores (float32 unless `itemsize` says otherwise):
    at most `most`, within SCORE_MATRIX_BYTES."""
    return max(1, min(most, SCORE_MATRIX_BYTES // (itemsize * n_items)))


def pick_device(name: str = "auto") -> torch.device:
    """CUDA when present (regional data centers have GPUs), else CPU; an explicit name wins."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but this machine has no CUDA device")
    return torch.device(name)


def adam(model: nn.Module, lr: float) -> torch.optim.Adam:
    """Adam at `lr`, with the model's priors at their faster rate (`lr_scale`)."""
    groups: dict[float, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        groups.setdefault(lr * lr_scale(name), []).append(p)
    return torch.optim.Adam([{"params": ps, "lr": rate} for rate, ps in groups.items()], lr=lr)


def loader(seqs: Sequences, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        TensorDataset(*seqs.tensors()), batch_size=batch_size, shuffle=shuffle, generator=gen
    )


def reduced_loss(model: nn.Module, per_user: torch.Tensor) -> torch.Tensor:
    """The per-user losses [B] summed where the model says so (Opacus' `loss_reduction` on a
    DP-SGD model: its per-user gradients are then the backprops as they come), else averaged."""
    return per_user.sum() if getattr(model, "loss_reduction", "mean") == "sum" else per_user.mean()


def train_epoch(
    model: nn.Module,
    batches: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    demand_weight: float,
    after_step: Callable[[int], None] | None = None,
    on_empty: Callable[[], None] | None = None,
) -> dict[str, float]:
    """One pass; returns mean per-user losses (total, next-item, demand).

    `after_step(users)` runs after every optimizer step; `on_empty()` steps for a batch that
    Poisson sampling left empty (DP-SGD still adds its noise and accounts the step there). The
    per-user losses are reduced as the model asks (`reduced_loss`).
    """
    model.train()
    sums, users = np.zeros(3), 0
    for tensors in batches:
        batch = Batch(*tensors)
        if len(batch.items) == 0:
            if on_empty:
                on_empty()
                if after_step:
                    after_step(0)
            continue
        total, rec, dem = per_user_loss(model, batch.trim().to(device), demand_weight)
        optimizer.zero_grad(set_to_none=True)
        reduced_loss(model, total).backward()
        optimizer.step()
        n = len(total)
        sums += n * np.array([total.mean().item(), rec.mean().item(), dem.mean().item()])
        users += n
        if after_step:
            after_step(n)
    mean = sums / max(users, 1)
    return {"loss": mean[0], "loss_next_item": mean[1], "loss_demand": mean[2], "users": users}


@torch.no_grad()
def per_batch(
    fn: Callable[[Batch], torch.Tensor],
    seqs: Sequences,
    device: torch.device,
    width: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(fn(batch), held-out target [B], the batch's rows of `seqs` [B]) per evaluation batch;
    `width` is the number of scores fn gives each user (the batch size follows `score_rows`).

    Rows are batched in order of history length: a batch pads to its own longest history, and
    most are far shorter than the longest."""
    tensors = seqs.tensors()
    order = torch.argsort(tensors.length, stable=True)
    size = score_rows(width, EVAL_BATCH)
    for start in range(0, len(order), size):
        rows = order[start : start + size]
        b = Batch(*(t[rows] for t in tensors)).trim().to(device)
        yield fn(b), b.target, rows


class RankTally:
    """`rank_metrics`' figures gathered batch by batch, so one pass can score several rankers."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.full: list[torch.Tensor] = []
        self.sampled: list[torch.Tensor] = []

    def add(self, scores: torch.Tensor, target: torch.Tensor) -> None:
        scores, target = scores.float().cpu(), target.cpu()
        self.full.append(full_ranks(scores, target))
        self.sampled.append(sampled_ranks(scores, target, self.rng))

    def metrics(self, k: int = 10) -> dict[str, object]:
        full_r, sampled_r = torch.cat(self.full).numpy(), torch.cat(self.sampled).numpy()
        return {
            "users": len(full_r),
            "full": hit_ndcg(full_r, k),
            "sampled": hit_ndcg(sampled_r, k),
            "protocol": {"full": FULL_RANKING, "sampled": SAMPLED_RANKING},
        }


def rank_metrics(
    score_batches: Iterator[tuple[torch.Tensor, torch.Tensor]], k: int = 10, seed: int = 0
) -> dict[str, object]:
    """Full-ranking (primary) and sampled HR/NDCG@k from (scores [B, V], target [B]) batches."""
    tally = RankTally(seed)
    for scores, target in score_batches:
        tally.add(scores, target)
    return tally.metrics(k)


def evaluate_ranking(
    model: BehaviorModel, seqs: Sequences, device: torch.device, k: int = 10
) -> dict[str, object]:
    model.eval()
    batches = per_batch(model.score_items, seqs, device, model.shape.items)
    return rank_metrics(((scores, target) for scores, target, _ in batches), k)


@torch.no_grad()
def predict_demand(model: BehaviorModel, seqs: Sequences, device: torch.device) -> np.ndarray:
    """Expected units per user and top category over the model's horizon, [N, C]; N may be 0
    (a cut before any of a client's users arrived)."""
    model.eval()
    rates = torch.zeros(len(seqs), model.shape.top_categories)
    for units, _, rows in per_batch(model.expected_units, seqs, device):
        rates[rows] = units.cpu()
    return rates.numpy()
