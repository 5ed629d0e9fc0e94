"""The federated run's configuration: one pydantic model for the Flower run config and the CLI.

Flower run-config keys are kebab-case (`num-server-rounds`); field names are their snake_case
twins. Validation happens once, where the config enters (ServerApp, ClientApp, CLI).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from datetime import date
from enum import StrEnum
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from common.data.synth import SynthConfig
from common.learning.configs import Device, ModelConfig


class StrategyName(StrEnum):
    FEDAVG = "fedavg"
    FEDADAM = "fedadam"
    FEDPROX = "fedprox"
    # Byzantine-robust rules (Flower's own): they need every client's update in the clear
    FEDTRIMMEDAVG = "fedtrimmedavg"
    FEDMEDIAN = "fedmedian"
    KRUM = "krum"
    MULTIKRUM = "multikrum"
    BULYAN = "bulyan"

    @property
    def robust(self) -> bool:
        return self in ROBUST


ROBUST = frozenset(
    {
        StrategyName.FEDTRIMMEDAVG,
        StrategyName.FEDMEDIAN,
        StrategyName.KRUM,
        StrategyName.MULTIKRUM,
        StrategyName.BULYAN,
    }
)


class CentralDP(StrEnum):
    OFF = "off"
    FIXED = "fixed"
    ADAPTIVE = "adaptive"


class AccountantName(StrEnum):
    RDP = "rdp"
    PRV = "prv"


def _model_field(name: str) -> Any:
    """ModelConfig's field `name` (default, bounds, description): the run config checks the
    model's sizes at the edge by the model's own rules."""
    return copy.copy(ModelConfig.model_fields[name])


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    num_server_rounds: int = Field(3, ge=1, description="Federated rounds")
    strategy: StrategyName = Field(StrategyName.FEDAVG, description="Server strategy")
    server_lr: float = Field(0.01, gt=0, description="FedAdam server learning rate (eta)")
    proximal_mu: float = Field(0.01, ge=0, description="FedProx proximal weight")
    trim_beta: float = Field(
        0.2, ge=0, lt=0.5, description="FedTrimmedAvg: share of updates cut from each tail"
    )
    malicious_clients: int = Field(
        1, ge=0, description="Krum, MultiKrum, Bulyan: poisoned clients to tolerate (f)"
    )
    multikrum_select: int = Field(
        0, ge=0, description="MultiKrum: updates averaged per round; 0 = replies − f"
    )
    planned_rounds: int = Field(
        0, ge=0, description="Rounds each client's budget is planned for; 0 = num-server-rounds"
    )
    min_clients: int = Field(2, ge=1, description="Fewest trained clients a round needs")
    fraction_train: float = Field(1.0, gt=0, le=1, description="Share of clients asked per round")
    fraction_evaluate: float = Field(
        1.0, gt=0, le=1, description="Share of clients asked to evaluate per round (DP: each pays)"
    )
    local_epochs: int = Field(1, ge=1, description="Local epochs per round")
    batch_size: int = Field(64, ge=1, description="Expected users per (Poisson) batch")
    lr: float = Field(5e-3, gt=0, description="Client Adam learning rate")
    dp: bool = Field(True, description="Ask clients for DP-SGD (their policy may require it)")
    epsilon: float = Field(8.0, gt=0, description="Per-client budget ε (user-level)")
    delta: float = Field(1e-5, gt=0, lt=1, description="Per-client δ; kept below 1/users")
    clip_norm: float = Field(1.0, gt=0, description="Per-user gradient clipping norm")
    central_dp: CentralDP = Field(
        CentralDP.OFF, description="Client-level DP on the server: off, fixed or adaptive clipping"
    )
    central_noise: float = Field(0.5, gt=0, description="Server-side noise multiplier")
    central_clip: float = Field(1.0, gt=0, description="Server-side (initial) clipping norm")
    central_delta: float = Field(1e-3, gt=0, lt=1, description="δ for the client-level ε")
    secagg: bool = Field(
        False, description="Aggregate with Flower's SecAgg+: the server learns only the sum"
    )
    secagg_num_shares: float = Field(
        1.0, gt=0, description="SecAgg+ key shares: a count (≥ 3), or ≤ 1 a share of the clients"
    )
    secagg_reconstruction_threshold: float = Field(
        0.67, gt=0, description="Shares that rebuild a key: a count (≥ 2), or ≤ 1 a share of them"
    )
    secagg_clipping_range: float = Field(
        8.0, gt=0, description="SecAgg+ clips each weighted parameter to ± this, then quantizes"
    )
    secagg_quantization_range: int = Field(
        2**22, ge=2, lt=2**32, description="SecAgg+ quantization levels (below its 2^32 modulus)"
    )
    secagg_max_weight: float = Field(
        10_000.0, gt=0, description="Largest FedAvg weight (noisy user count) SecAgg+ expects"
    )
    round_timeout: float = Field(
        0.0, ge=0, description="Seconds the server waits for each step's replies; 0 = all of them"
    )
    audit_holdout: float = Field(
        0.0, ge=0, lt=0.5, description="Share of users kept out of training for the MIA audit"
    )
    accountant: AccountantName = Field(
        AccountantName.PRV, description="Opacus accountant that plans and enforces each budget"
    )
    data: str = Field("", description="Event log path; empty = embedded synthetic data")
    format: str = Field("auto", description="Event log format (auto detects it)")
    spec: str = Field("", description="Dataset spec (TOML/JSON) that reads data; empty = none")
    columns: str = Field(
        "", description="Column map for data, FIELD=COLUMN pairs split by commas; empty = none"
    )
    synth_events: int = Field(200_000, ge=100, description="Synthetic data: events")
    synth_users: int = Field(5_000, ge=10, description="Synthetic data: users")
    synth_items: int = Field(2_000, ge=20, description="Synthetic data: catalog size")
    synth_regions: int = Field(6, ge=1, description="Synthetic data: regions")
    seed: int = Field(0, description="Seed of the model init and synthetic data (never of DP)")
    catalog: str = Field("", description="Shared catalog file; empty = <out>/catalog.json")
    out: str = Field("runs/simulation", description="Run folder")
    server_key: str = Field("", description="Server signing key; empty = <out>.keys/server.key")
    registry: str = Field(
        "", description="Node registry (client name → SuperNode); empty = bind names at first reply"
    )
    resume: bool = Field(True, description="Resume from the run folder's checkpoint")
    device: Device = Field("auto", description="auto (CUDA if present), cpu or cuda")
    hidden: int = _model_field("hidden")
    layers: int = _model_field("layers")
    heads: int = _model_field("heads")
    max_len: int = _model_field("max_len")
    windows: int = _model_field("windows")
    item_dim: int = _model_field("item_dim")
    # DP-SGD's noise regularises already; measured on Ta-Feng at ε = 8, 0 beat 0.2 in HR@10,
    # NDCG@10 and time a round (docs/results.md).
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout in the encoder")
    demand_start: str = Field("", description="First day of the weekly demand bins (ISO date)")
    demand_end: str = Field(
        "", description="Day after the last day the demand bins cover (ISO date; empty = data's)"
    )

    @field_validator("demand_start", "demand_end")
    @classmethod
    def _iso_date(cls, value: str) -> str:
        if value:
            try:
                return date.fromisoformat(value).isoformat()
            except ValueError as exc:
                raise ValueError(f"{value!r} is not an ISO date (YYYY-MM-DD)") from exc
        return value

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if self.strategy.robust:
            self._check_robust()
        if self.central_dp is not CentralDP.OFF and (
            self.strategy is StrategyName.FEDADAM or self.fraction_train < 1
        ):
            raise ValueError(
                "central-dp needs every client each round and a plain average "
                "(strategy fedavg or fedprox, fraction-train 1)"
            )
        if self.secagg:
            self._check_secagg()
        return self

    def _check_robust(self) -> None:
        name = self.strategy.value
        if self.secagg:
            raise ValueError(
                f"strategy {name} compares each client's update, and secagg hides them from "
                "the server (it learns only their sum): use one or the other"
            )
        if self.central_dp is not CentralDP.OFF:
            raise ValueError(
                f"central-dp's noise (σ·C/n) covers one client in an average of n clipped "
                f"updates; strategy {name}'s result can follow one client further (a median "
                "or a Krum pick is one update), so the noise would not cover it: use "
                "central-dp with fedavg or fedprox"
            )
        # Flower's Bulyan aggregates nothing from fewer than 4f + 3 updates (El Mhamdi et al.
        # 2018). (Multi-)Krum's guarantee needs n ≥ 2f + 3 (Blanchard et al. 2017), but Flower's
        # runs with fewer, and a round that lost rejected replies is better served than stopped.
        least = 4 * self.malicious_clients + 3
        if self.strategy is StrategyName.BULYAN and self.min_clients < least:
            raise ValueError(
                f"strategy bulyan aggregates nothing from fewer than 4f + 3 = {least} updates "
                f"(malicious-clients f = {self.malicious_clients}): set min-clients to {least} "
                "or more, or lower malicious-clients"
            )

    def _check_secagg(self) -> None:
        if self.central_dp is not CentralDP.OFF:
            raise ValueError(
                "secagg hides each client's update, and central-dp clips each one on the "
                "server: use one or the other"
            )
        shares, threshold = self.secagg_num_shares, self.secagg_reconstruction_threshold
        for key, value, least in (
            ("num-shares", shares, 3),
            ("reconstruction-threshold", threshold, 2),
        ):
            if value > 1 and (value != int(value) or value < least):
                raise ValueError(
                    f"secagg-{key} must be a share (≤ 1) or a whole count ≥ {least}, not {value:g}"
                )
        if shares > 1 and threshold > 1 and threshold >= shares:
            raise ValueError(
                f"secagg-reconstruction-threshold ({threshold:g}) must be below "
                f"secagg-num-shares ({shares:g})"
            )

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Validate a Flower run config (kebab-case keys); errors name the offending key."""
        data = {key.replace("-", "_"): value for key, value in run_config.items()}
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            key = "-".join(str(p) for p in first["loc"]).replace("_", "-")
            raise ValueError(f"run config '{key}': {first['msg']}") from exc

    def to_flower(self) -> dict[str, Any]:
        return {
            k.replace("_", "-"): (v.value if isinstance(v, StrEnum) else v)
            for k, v in self.model_dump().items()
        }

    @property
    def budget_rounds(self) -> int:
        return self.planned_rounds or self.num_server_rounds

    @property
    def model(self) -> ModelConfig:
        return ModelConfig(
            hidden=self.hidden,
            layers=self.layers,
            heads=self.heads,
            intermediate=4 * self.hidden,
            max_len=self.max_len,
            windows=self.windows,
            item_dim=self.item_dim,
            dropout=self.dropout,
        )

    @property
    def synth(self) -> SynthConfig:
        return SynthConfig(
            events=self.synth_events,
            users=self.synth_users,
            items=self.synth_items,
            regions=self.synth_regions,
            seed=self.seed,
        )
