"""A client's cumulative privacy spend, kept across rounds and restarts.

Epsilon always comes from an Opacus accountant replaying the recorded mechanism history
(noise multiplier, sample rate, steps); nothing here computes epsilon by formula.
"""

from __future__ import annotations

import json
from pathlib import Path

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.atomic import write_text

Step = tuple[float, float, int]  # (noise multiplier, sample rate, steps), Opacus history form


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epsilon: float = Field(gt=0)
    delta: float = Field(gt=0, lt=1)


class Mechanism(BaseModel):
    """DP-SGD parameters fixed at a client's first round so the planned rounds fit its budget."""

    model_config = ConfigDict(extra="forbid")
    noise_multiplier: float = Field(gt=0)
    sample_rate: float = Field(gt=0, le=1)
    steps_per_round: int = Field(ge=1)
    clip_norm: float = Field(gt=0)
    accountant: str
    planned_rounds: int = Field(ge=1)


class RoundSpend(BaseModel):
    model_config = ConfigDict(extra="forbid")
    server_round: int
    status: str  # "trained" or "declined"
    steps: int
    epsilon_before: float
    epsilon_after: float


class PrivacyState(BaseModel):
    """Everything needed to recompute a client's epsilon: budget, mechanism, history."""

    model_config = ConfigDict(extra="forbid")
    client: str
    budget: Budget
    mechanism: Mechanism | None = None
    history: list[Step] = Field(default_factory=list)
    rounds: list[RoundSpend] = Field(default_factory=list)

    def epsilon(self, extra: list[Step] | None = None) -> float:
        """Epsilon of the recorded history (plus `extra`), from the configured accountant."""
        steps = [*self.history, *(extra or [])]
        if not steps:
            return 0.0
        accountant = create_accountant(self.mechanism.accountant if self.mechanism else "rdp")
        accountant.history = [tuple(s) for s in steps]
        return float(accountant.get_epsilon(delta=self.budget.delta))

    def round_steps(self) -> list[Step]:
        m = self.mechanism
        return [(m.noise_multiplier, m.sample_rate, m.steps_per_round)]

    def affordable(self) -> tuple[bool, float]:
        """Whether one more planned round stays within budget, and epsilon after it."""
        after = self.epsilon(self.round_steps())
        return after <= self.budget.epsilon, after

    def record(self, server_round: int, steps: list[Step], status: str) -> RoundSpend:
        before = self.epsilon()
        self.history.extend(steps)
        spend = RoundSpend(
            server_round=server_round,
            status=status,
            steps=sum(s[2] for s in steps),
            epsilon_before=before,
            epsilon_after=self.epsilon() if steps else before,
        )
        self.rounds.append(spend)
        return spend


def plan_mechanism(
    budget: Budget,
    sample_rate: float,
    steps_per_round: int,
    rounds: int,
    clip_norm: float,
    accountant: str = "rdp",
) -> Mechanism:
    """Smallest noise multiplier (Opacus' search) so that `rounds` rounds fit the budget."""
    sigma = get_noise_multiplier(
        target_epsilon=budget.epsilon,
        target_delta=budget.delta,
        sample_rate=sample_rate,
        steps=steps_per_round * rounds,
        accountant=accountant,
    )
    return Mechanism(
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps_per_round=steps_per_round,
        clip_norm=clip_norm,
        accountant=accountant,
        planned_rounds=rounds,
    )


def load_state(path: Path) -> PrivacyState | None:
    """The stored state, None when there is none yet; a corrupt file is an error, not a reset."""
    if not path.exists():
        return None
    try:
        return PrivacyState.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, ValidationError) as exc:
        raise ValueError(f"{path}: privacy state is corrupt ({exc}); refusing to reset it") from exc


def save_state(state: PrivacyState, path: Path) -> None:
    write_text(path, state.model_dump_json(indent=2) + "\n")
