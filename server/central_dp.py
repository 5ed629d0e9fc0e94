"""Client-level DP on the server, as a second layer: Flower's own wrappers and accountant.

Each client's update is clipped to `central-clip` and Gaussian noise is added to the uniform
average, so the model is also protected at the level of a whole client (all its users at once),
on top of each client's user-level DP-SGD. Fixed clipping uses Flower's accounted mode (its
wrapper composes the release into Flower's RDP accountant and insists on equal weights and full
participation). Flower's adaptive-clipping wrapper has no accountant hook; its noise multiplier is
the total one of Andrew et al. (2021), which splits it between the clipped-count and the update
releases, so each round is composed here as one Gaussian release with that multiplier.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.serverapp import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    RdpAccountant,
    SamplingMethod,
)
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from common.runconfig import CentralDP, RunConfig


@dataclass
class CentralPrivacy:
    strategy: Strategy
    accountant: RdpAccountant
    cfg: RunConfig
    clients: int

    def released(self) -> None:
        """Account one aggregate release (the fixed wrapper does this itself)."""
        if self.cfg.central_dp is CentralDP.ADAPTIVE:
            event = GaussianPrivacyEvent(self.cfg.central_noise, self.clients, self.clients)
            self.accountant.compose(event)

    def summary(self) -> dict[str, float | str]:
        spent = self.accountant.get_privacy_spent()
        wrapper = type(self.strategy).__name__
        clip = getattr(self.strategy, "clipping_norm", self.cfg.central_clip)
        return {
            "wrapper": wrapper,
            "noise_multiplier": self.cfg.central_noise,
            "clipping_norm": float(clip),
            "clients": self.clients,
            "releases": spent.num_releases,
            "epsilon": float(spent.epsilon) if spent.num_releases else 0.0,
            "delta": self.cfg.central_delta,
            "accountant": f"flwr {spent.accounting_method}",
        }


def wrap(strategy: Strategy, cfg: RunConfig, clients: int, state: dict | None) -> CentralPrivacy:
    """Wrap `strategy`; `state` is the accountant's saved state when resuming."""
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=cfg.central_delta,
            population_size=clients,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    if state:
        accountant.load_state_dict(state)
    if cfg.central_dp is CentralDP.FIXED:
        wrapped = DifferentialPrivacyServerSideFixedClipping(
            strategy, cfg.central_noise, cfg.central_clip, clients, accountant=accountant
        )
    else:
        # Flower's default count noise (clients/20) is too small for a handful of regional
        # clients to leave any noise for the update; σ_count = σ leaves it 1/sqrt(3/4) ≈ 1.15 σ.
        wrapped = DifferentialPrivacyServerSideAdaptiveClipping(
            strategy,
            cfg.central_noise,
            clients,
            initial_clipping_norm=cfg.central_clip,
            clipped_count_stddev=max(clients / 20, cfg.central_noise),
        )
    return CentralPrivacy(wrapped, accountant, cfg, clients)
