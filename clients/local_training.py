"""One client's training round: DP-SGD with Opacus under a fixed mechanism, or plain training."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader, TensorDataset, default_collate

from common.data.sequences import Sequences
from common.learning.model import BehaviorModel
from common.learning.training import adam, loader, train_epoch
from common.messages import STEPS
from common.runconfig import RunConfig
from privacy.accounting import Mechanism, Step
from privacy.engine import PrivacyEngine
from privacy.randomness import torch_generator


@dataclass
class RoundResult:
    trained: bool
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[Step] = field(default_factory=list)  # Opacus' accountant history (DP only)


def _proximal_pull(model: BehaviorModel, lr: float, mu: float):
    """FedProx's proximal term as a step toward the global weights after each update.

    Under DP the term cannot sit in the per-user loss (Opacus clips per-user gradients only),
    and it needs no privacy: it depends on the global model, not on data.
    """
    anchor = [p.detach().clone() for p in model.parameters()]

    def pull(_: int) -> None:
        with torch.no_grad():
            for p, a in zip(model.parameters(), anchor, strict=True):
                p.sub_(lr * mu * (p - a))

    return pull


def dp_loader(train: Sequences, mech: Mechanism, generator: torch.Generator) -> DataLoader:
    """One epoch of Poisson sampling: each user joins each step with probability q, for exactly
    1/q steps (q = 1/k by construction), drawn from `generator` and nothing else."""
    dataset = TensorDataset(*train.tensors())
    sampler = UniformWithReplacementSampler(
        num_samples=len(dataset),
        sample_rate=mech.sample_rate,
        generator=generator,
        steps=round(1 / mech.sample_rate),
    )
    first = dataset[0]
    collate = wrap_collate_with_empty(
        collate_fn=default_collate,
        sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
        dtypes=[dtype_safe(x) for x in first],
    )
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)


def train_private(
    model: BehaviorModel,
    train: Sequences,
    cfg: RunConfig,
    mech: Mechanism,
    device: torch.device,
    proximal_mu: float = 0.0,
) -> RoundResult:
    """One round of DP-SGD with the fixed mechanism; `history` is what Opacus accounted.

    Sampling and noise come from fresh OS-seeded generators, never from the run's seed.
    """
    engine = PrivacyEngine(accountant=mech.accountant)
    dp_model, dp_opt, dp_loader_ = engine.make_private(
        module=model,
        optimizer=adam(model, cfg.lr),
        data_loader=dp_loader(train, mech, torch_generator()),
        noise_multiplier=mech.noise_multiplier,
        max_grad_norm=mech.clip_norm,
        poisson_sampling=False,  # the loader already samples (Poisson, exact steps)
        noise_generator=torch_generator(device),
        loss_reduction="sum",  # per-user gradients without rescaling every layer's backprops
    )
    # Opacus divides the noisy sum by len(dataset) × q: the exact user count. The released
    # count gives the same scale without making the update's size a function of the exact one.
    dp_opt.expected_batch_size = max(1, round(mech.noisy_users * mech.sample_rate))

    pull = _proximal_pull(model, cfg.lr, proximal_mu) if proximal_mu > 0 else None
    losses = {}
    try:
        for _ in range(cfg.local_epochs):
            losses = train_epoch(
                dp_model,
                dp_loader_,
                dp_opt,
                device,
                cfg.model.demand_weight,
                pull,
                dp_opt.empty_step,
            )
    finally:
        dp_model.remove_hooks()  # the caller's model stays a plain module, reusable next round
    history = list(engine.accountant.history)
    return RoundResult(True, {**losses, STEPS: sum(s for _, _, s in history)}, history)


def train_plain(
    model: BehaviorModel,
    train: Sequences,
    cfg: RunConfig,
    server_round: int,
    device: torch.device,
    proximal_mu: float = 0.0,
) -> RoundResult:
    optimizer = adam(model, cfg.lr)
    batches = loader(train, cfg.batch_size, shuffle=True, seed=cfg.seed + server_round)
    pull = _proximal_pull(model, cfg.lr, proximal_mu) if proximal_mu > 0 else None
    losses = {}
    for _ in range(cfg.local_epochs):
        losses = train_epoch(model, batches, optimizer, device, cfg.model.demand_weight, pull)
    return RoundResult(True, {**losses, STEPS: cfg.local_epochs * len(batches)})
