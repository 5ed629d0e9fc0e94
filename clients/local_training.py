"""One client's training round: DP-SGD with Opacus and a cumulative, enforced budget."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from opacus import PrivacyEngine

from common.model import BehaviorModel
from common.runconfig import RunConfig
from common.sequences import Sequences
from common.training import loader, train_epoch
from privacy.accounting import PrivacyState, RoundSpend, plan_mechanism


@dataclass
class RoundResult:
    trained: bool
    metrics: dict[str, float] = field(default_factory=dict)
    spend: RoundSpend | None = None


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


def train_private(
    model: BehaviorModel,
    train: Sequences,
    cfg: RunConfig,
    state: PrivacyState,
    server_round: int,
    device: torch.device,
    proximal_mu: float = 0.0,
) -> RoundResult:
    """Train one round under DP-SGD unless it would exceed the budget; update `state`.

    The caller must persist `state` before replying: the spend is recorded first.
    """
    if state.budget.delta >= 1 / len(train):
        raise ValueError(
            f"delta {state.budget.delta:g} is not below 1/users (1/{len(train)}): "
            "the guarantee would allow revealing a user"
        )
    plain = loader(train, cfg.batch_size, shuffle=True, seed=cfg.seed + server_round)
    sample_rate = 1 / len(plain)  # what Opacus' DPDataLoader derives from this loader
    if state.mechanism is None:
        state.mechanism = plan_mechanism(
            state.budget,
            sample_rate,
            steps_per_round=cfg.local_epochs * len(plain),
            rounds=cfg.budget_rounds,
            clip_norm=cfg.clip_norm,
            accountant=cfg.accountant.value,
        )
    mech = state.mechanism
    if not state.affordable()[0]:
        return RoundResult(False, spend=state.record(server_round, [], "declined"))
    engine = PrivacyEngine(accountant=mech.accountant)
    dp_model, dp_opt, dp_loader = engine.make_private(
        module=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=cfg.lr),
        data_loader=plain,
        noise_multiplier=mech.noise_multiplier,
        max_grad_norm=mech.clip_norm,
        poisson_sampling=True,
    )

    def empty_step() -> None:
        engine.accountant.step(noise_multiplier=mech.noise_multiplier, sample_rate=sample_rate)

    pull = _proximal_pull(model, cfg.lr, proximal_mu) if proximal_mu > 0 else None
    losses = {}
    try:
        for _ in range(cfg.local_epochs):
            losses = train_epoch(
                dp_model, dp_loader, dp_opt, device, cfg.model.demand_weight, pull, empty_step
            )
    finally:
        dp_model.remove_hooks()  # the caller's model stays a plain module, reusable next round
    spend = state.record(server_round, list(engine.accountant.history), "trained")
    return RoundResult(True, {**losses, "steps": spend.steps}, spend)


def train_plain(
    model: BehaviorModel,
    train: Sequences,
    cfg: RunConfig,
    server_round: int,
    device: torch.device,
    proximal_mu: float = 0.0,
) -> RoundResult:
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    batches = loader(train, cfg.batch_size, shuffle=True, seed=cfg.seed + server_round)
    pull = _proximal_pull(model, cfg.lr, proximal_mu) if proximal_mu > 0 else None
    losses = {}
    for _ in range(cfg.local_epochs):
        losses = train_epoch(model, batches, optimizer, device, cfg.model.demand_weight, pull)
    return RoundResult(True, {**losses, "steps": cfg.local_epochs * len(batches)})
