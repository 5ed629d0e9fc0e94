"""A client's own privacy policy, and how it answers what the server asks for.

The server's run config only *asks* (`dp`, `epsilon`, `delta`, the schedule). What a client
allows comes from its own configuration: in deployment the SuperNode's `node_config`
(`privacy-epsilon=4.0 privacy-require-dp=true …`), in simulation the policy file the
simulation writes beside the clients' state (`common.run_files.POLICY`). The server may ask for
less, never for more; the client's ledger then fixes the budget at its first entry.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.atomic import write_json
from common.runconfig import AccountantName, RunConfig
from privacy.accounting import Budget

NODE_PREFIX = "privacy-"


class Refused(Exception):
    """The client will not act on the server's request; nothing is released."""


class PrivacyPolicy(BaseModel):
    """What a client allows. Defaults are conservative: DP required, ε = 8 for its lifetime."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    require_dp: bool = True
    epsilon: float = Field(8.0, gt=0, description="Lifetime budget ε, user-level")
    delta: float = Field(1e-5, gt=0, lt=1, description="δ; kept below 1/users")
    accountant: AccountantName = AccountantName.PRV
    count_noise: float = Field(
        10.0, gt=0, description="σ of the released user count (users; sensitivity 1)"
    )
    popularity_noise: float = Field(
        3.0,
        gt=0,
        description="σ of the released item-popularity histogram (each user's distinct items "
        "scaled to L2 norm 1, so sensitivity 1)",
    )
    evaluation_noise: float = Field(
        10.0, gt=0, description="σ of each evaluation release, in units of its sensitivity"
    )
    min_noise_multiplier: float = Field(
        0.0, ge=0, description="Refuse a DP-SGD plan with less noise than this"
    )
    max_sample_rate: float = Field(
        1.0, gt=0, le=1, description="Refuse a DP-SGD plan sampling more users per step"
    )
    share_demand_evaluation: bool = Field(
        False,
        description="Send demand error sums without noise (named in the report as not covered)",
    )
    require_secure_aggregation: bool = Field(
        False, description="Send updates only inside SecAgg+, never in the clear to the server"
    )

    @classmethod
    def from_node_config(
        cls, node_config: Mapping[str, Any], fallback: Path | None
    ) -> PrivacyPolicy:
        """`privacy-*` keys of the node config; else the simulation's file; else the defaults."""
        fields = {
            k.removeprefix(NODE_PREFIX).replace("-", "_"): v
            for k, v in node_config.items()
            if k.startswith(NODE_PREFIX)
        }
        source = "node config"
        if not fields and fallback is not None and fallback.exists():
            source = str(fallback)
            try:
                fields = json.loads(fallback.read_text())
            except ValueError as exc:
                raise ValueError(f"{fallback}: not a JSON privacy policy ({exc})") from exc
        try:
            return cls.model_validate(fields)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = NODE_PREFIX + "-".join(str(p) for p in first["loc"]).replace("_", "-")
            raise ValueError(f"{source}: privacy policy '{field}': {first['msg']}") from exc

    def write(self, path: Path) -> None:
        write_json(path, self.model_dump(mode="json"))

    def check_aggregation(self, secured: bool) -> None:
        """Refuse to send an update the server would see on its own, where the policy says so."""
        if self.require_secure_aggregation and not secured:
            raise Refused(
                "this client's policy requires secure aggregation (SecAgg+); the server asked "
                "for a plain round"
            )

    def answer(self, request: RunConfig, fixed: Budget | None) -> tuple[Budget, float]:
        """Check the server's request: the budget to account against and the ε this run may
        reach (the request's, never above the budget).

        `fixed` is the budget of the client's first ledger entry, if it has one: from then on
        it is the client's budget whatever its policy file or the server says. Without one, a
        request below the policy becomes the budget that the first entry fixes.
        """
        if not request.dp:
            if self.require_dp:
                raise Refused("this client's policy requires DP; the server asked for dp=false")
            return Budget(epsilon=self.epsilon, delta=self.delta), 0.0
        allowed = fixed or Budget(epsilon=self.epsilon, delta=self.delta)
        if request.epsilon > allowed.epsilon or request.delta > allowed.delta:
            raise Refused(
                f"the server asked for ε = {request.epsilon:g}, δ = {request.delta:g}; this "
                f"client allows at most ε = {allowed.epsilon:g}, δ = {allowed.delta:g}"
            )
        if fixed and request.delta < fixed.delta:
            raise Refused(  # ε at a smaller δ is larger: the cap would not mean what was asked
                f"the server asked for δ = {request.delta:g}; this client's ledger fixed "
                f"δ = {fixed.delta:g}, and every ε it reports is at that δ"
            )
        budget = fixed or Budget(epsilon=request.epsilon, delta=request.delta)
        return budget, request.epsilon
