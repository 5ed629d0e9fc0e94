"""Client-level DP on the server, as a second layer: Flower's own wrappers and accountant.

Each client's update is clipped to `central-clip` and Gaussian noise is added to the uniform
average, so the model is also protected at the level of a whole client (all its users at once),
on top of each client's user-level DP-SGD. Both wrappers calibrate the noise to the number of
clients counted at the start (`clients`): its standard deviation is σ·C/`clients`, which is σ
times the sensitivity C/m of an average over m clients only when m = `clients`. With fewer
replies (a client declined or failed) the same noise would be a σ·m/`clients` release, so what
holds is: an aggregate is released only from exactly `clients` updates, and each release is
composed into Flower's RDP accountant with the configured σ.

- Fixed clipping uses Flower's accounted mode: its wrapper refuses (no aggregate) a round whose
  reply count differs from `clients`, and composes each release itself.
- Flower's adaptive-clipping wrapper only warns on a short round and releases anyway, and it has
  no accountant hook. `_AdaptiveClipping` refuses such a round before anything is computed, so
  neither the noisy clipped count (which moves the clipping norm) nor the average is released;
  `CentralPrivacy.released` composes each aggregate the round loop receives. The noise multiplier
  is the total one of Andrew et al. (2021), which splits it between the clipped-count and the
  update releases, so each round is one Gaussian release with that multiplier.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log
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
from flwr.serverapp.strategy.dp_fixed_clipping import validate_replies

from common.atomic import write_json
from common.run_files import CENTRAL_ACCOUNTANT
from common.runconfig import CentralDP, RunConfig


class _AdaptiveClipping(DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping, strict about the reply count like its accounted
    fixed-clipping mode: the noise is calibrated to `num_sampled_clients` averaged updates."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if not validate_replies(replies, self.num_sampled_clients, strict=True):
            log(
                WARNING,
                "round %s: %s update(s) where central DP is calibrated to %s; nothing released",
                server_round,
                len(replies),
                self.num_sampled_clients,
            )
            return None, None
        return super().aggregate_train(server_round, replies)


@dataclass
class CentralPrivacy:
    strategy: Strategy
    accountant: RdpAccountant
    cfg: RunConfig
    clients: int

    def save(self, out: Path) -> None:
        """Keep the accountant's state before the aggregate leaves (the evaluation request
        carries it): a crash after that point may count a release twice, never miss one."""
        write_json(out / CENTRAL_ACCOUNTANT, self.accountant.state_dict())

    def released(self) -> None:
        """Account one aggregate release (the fixed wrapper does this itself); the adaptive
        wrapper only releases from the full set of clients its noise is calibrated to."""
        if self.cfg.central_dp is CentralDP.ADAPTIVE:
            event = GaussianPrivacyEvent(self.cfg.central_noise, self.clients, self.clients)
            self.accountant.compose(event)

    def summary(self) -> dict[str, float | str]:
        spent = self.accountant.get_privacy_spent()
        wrapper = type(self.strategy).__name__
        if isinstance(self.strategy, _AdaptiveClipping):
            # the report names Flower's wrapper; the subclass only adds the reply-count check
            wrapper = DifferentialPrivacyServerSideAdaptiveClipping.__name__ + " (strict count)"
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


def saved_state(out: Path, checkpointed: dict | None) -> dict | None:
    """The accountant's state as saved before the last aggregate left; else the checkpoint's.
    A run that crashed after sending an aggregate but before its checkpoint is behind by it."""
    path = out / CENTRAL_ACCOUNTANT
    if not path.exists():
        return checkpointed
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a saved accountant state ({exc})") from exc


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
        wrapped = _AdaptiveClipping(
            strategy,
            cfg.central_noise,
            clients,
            initial_clipping_norm=cfg.central_clip,
            clipped_count_stddev=max(clients / 20, cfg.central_noise),
        )
    return CentralPrivacy(wrapped, accountant, cfg, clients)
