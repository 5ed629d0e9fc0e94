"""Centralized, non-private training: the reference the federated runs are measured against."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from flwr.app import ArrayRecord
from pydantic import BaseModel, ConfigDict, Field

from common.atomic import write_json
from common.data.partition import Partition, select
from common.learning.blend import served_results
from common.learning.configs import ModelConfig, TrainConfig
from common.learning.dataset import NoHistory, Prepared, prepare
from common.learning.demand import PRIMARY, holdout_forecast
from common.learning.forecasting import baseline_scores, score
from common.learning.inference import load_exported
from common.learning.model import BehaviorModel
from common.learning.popularity import RepeatWeights, RuleInputs, popularity_results
from common.learning.training import (
    adam,
    evaluate_ranking,
    loader,
    pick_device,
    train_epoch,
)
from common.run_files import CATALOG, DEMAND_WEEKS_FROM, RESULTS
from server.export import export
from server.platform import demand_calendar


class CentralConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


def train_central(
    prepared: Prepared,
    cfg: CentralConfig,
    on_progress: Callable[[str, float], None] | None = None,
) -> tuple[BehaviorModel, dict]:
    """Train on all users pooled; keep the epoch with the best validation NDCG@10."""
    torch.manual_seed(cfg.train.seed)
    device = pick_device(cfg.train.device)
    model = BehaviorModel(cfg.model, prepared.shape).to(device)
    opt = adam(model, cfg.train.lr)
    history, best, best_state = [], -1.0, None
    for epoch in range(1, cfg.train.epochs + 1):
        start = time.perf_counter()
        batches = loader(
            prepared.train, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed + epoch
        )
        step = (lambda n: on_progress("train", n)) if on_progress else None
        losses = train_epoch(model, batches, opt, device, cfg.model.demand_weight, step)
        seconds = time.perf_counter() - start
        valid = evaluate_ranking(model, prepared.valid, device)
        ndcg = valid["full"]["ndcg@10"]
        history.append(
            {
                "epoch": epoch,
                **losses,
                "seconds": seconds,
                "users_per_s": losses["users"] / seconds,
                "valid": valid["full"],
            }
        )
        if ndcg > best:
            best, best_state = ndcg, copy.deepcopy(model.state_dict())
        if on_progress:
            on_progress("epoch", epoch)
    model.load_state_dict(best_state)
    results = {
        "best_epoch": max(history, key=lambda h: h["valid"]["ndcg@10"])["epoch"],
        "history": history,
        "test": evaluate_ranking(model, prepared.test, device),
        "forecast": model_forecast(model, prepared, device),
    }
    if prepared.demand is None:
        results["no_forecast"] = prepared.demand_reason
    return model, results


def model_forecast(model: BehaviorModel, prepared: Prepared, device: torch.device) -> dict:
    """Scores of the model's forecasts of the held-out weeks; none without a demand series."""
    if prepared.demand is None:
        return {}
    held = holdout_forecast(model, prepared, device)
    forecast = {k: score(held.actual, f) for k, f in held.forecasts.items()}
    forecast[PRIMARY] |= {
        "coverage": held.coverage(),
        "interval": list(held.planner.quantiles),
        "shrink": held.planner.shrink,
    }
    return forecast


def baselines(prepared: Prepared, inputs: RuleInputs | None = None) -> dict:
    """The recommendation baselines (counting `inputs` if given), and the forecasting ones where
    there is a demand series (`no_forecast` says why not)."""
    if prepared.demand is None:
        return {
            "recommendation": popularity_results(prepared, inputs),
            "forecast": {},
            "no_forecast": prepared.demand_reason,
        }
    return {
        "recommendation": popularity_results(prepared, inputs),
        "forecast": baseline_scores(prepared.demand, prepared.holdout_weeks),
    }


def served(model: BehaviorModel, prepared: Prepared, rules: dict, inputs: RuleInputs) -> dict:
    """What the data's owner would serve (`common.learning.blend`), and the model alone, on
    the test split: the model beside the transition-aware rule with the weights that
    `popularity_results` (`rules`) chose from the same `inputs`."""
    rule = RepeatWeights(**rules["transition_aware"]["weights"])
    return served_results(model, prepared, inputs, rule)


def evaluate_exported(
    run: Path,
    events: pd.DataFrame,
    top_category_chars: int | None,
    parts: list[Partition],
    configured_start: str = "",
    configured_end: str = "",
) -> dict:
    """A run's exported model evaluated exactly, beside the baselines, in `train-central`'s
    layout. A federated run's own ranking figures are DP releases (noisy sums from each
    client); a simulation holds every client's data, so it can also say exactly where the
    model stands against the rules.

    Each client `parts` names is scored on its own data, as it would serve it: the model alone,
    what it serves (the model beside its own rule, `common.learning.blend`), and the rules
    counted on its own events; per-user figures are pooled over clients. The rules are also
    counted over every region's data at once (stronger than any one region's). Demand is scored
    the way the clients forecast: each client calibrates the planner (the level's window, the
    shrinkage, the intervals) on its own series, and the errors are pooled, as the federated
    evaluation's demand sums are."""
    exported = load_exported(run)
    history = exported.model.cfg.history
    start, end = demand_calendar(events, configured_start, configured_end)

    def prepared_of(frame: pd.DataFrame) -> Prepared:
        return prepare(
            frame,
            top_category_chars=top_category_chars,
            history_len=history,
            demand_start=start,
            catalog=exported.catalog,
            demand_end=end,
        )

    whole = prepared_of(events)
    clients, ranked = [], []
    for part in parts:
        try:
            own = prepared_of(select(events, part))
        except NoHistory:
            continue
        clients.append(own)
        ranked.append((part.name, *own_ranking(exported.model, own)))
    demand = [p for p in clients if p.demand is not None]
    cpu = torch.device("cpu")
    model = pool_client_scores([(p, model_forecast(exported.model, p, cpu)) for p in demand])
    base = pool_client_scores([(p, baseline_scores(p.demand, p.holdout_weeks)) for p in demand])
    return {
        "bert": {
            "test": pool_ranks([blend["model"] for _, blend, _ in ranked]),
            "served": pool_ranks([blend["served"] for _, blend, _ in ranked]),
            "clients": [
                {
                    "client": name,
                    "users": blend["served"]["users"],
                    "model_weight": blend["served"]["model_weight"],
                    "rule": blend["served"]["rule"],
                }
                for name, blend, _ in ranked
            ],
            "forecast": model,
        },
        "baselines": {
            "recommendation": popularity_results(whole),
            "recommendation_own_region": {
                rule: pool_ranks([rules[rule] for _, _, rules in ranked])
                for rule in (ranked[0][2] if ranked else {})
            },
            "forecast": base,
            **({} if demand else {"no_forecast": "no client has a demand series"}),
        },
    }


def own_ranking(model: BehaviorModel, own: Prepared) -> tuple[dict, dict]:
    """One region's served blend and model alone, and its own rules, on its own test users."""
    inputs = RuleInputs.of(own)
    rules = popularity_results(own, inputs)
    return served(model, own, rules, inputs), rules


def pool_ranks(per_client: list[dict]) -> dict:
    """Per-user ranking figures of several clients as one: means weighted by their users."""
    users = sum(m["users"] for m in per_client)
    pooled: dict = {"users": users}
    for protocol in ("full", "sampled"):
        keys = per_client[0][protocol] if per_client else {}
        pooled[protocol] = {
            k: sum(m[protocol][k] * m["users"] for m in per_client) / users if users else 0.0
            for k in keys
        }
    if per_client:
        pooled["protocol"] = per_client[0]["protocol"]
    return pooled


def pool_client_scores(scored: list[tuple[Prepared, dict]]) -> dict:
    """Per-client WAPE and MAE pooled as sums over every client's held-out cells, interval
    coverage weighted by each client's cells (a per-client choice, such as a level's window,
    has no pooled value)."""
    out: dict[str, dict] = {}
    for prepared, scores in scored:
        _, actual = prepared.demand.holdout(prepared.holdout_weeks)
        if not actual.size:  # a client without a series adds nothing, as its zero sums do
            continue
        for name, m in scores.items():
            sums = out.setdefault(
                name, dict.fromkeys(("error", "actual", "cells", "covered", "with_interval"), 0.0)
            )
            sums["error"] += m["mae"] * actual.size  # Σ|error|, defined where Σ actual = 0
            sums["actual"] += float(actual.sum())
            sums["cells"] += actual.size
            if not np.isnan(m.get("coverage", np.nan)):
                sums["covered"] += m["coverage"] * actual.size
                sums["with_interval"] += actual.size
                sums["interval"] = m["interval"]
    return {
        name: {
            "wape": s["error"] / s["actual"] if s["actual"] else float("nan"),
            "mae": s["error"] / s["cells"],
            **(
                {"coverage": s["covered"] / s["with_interval"], "interval": s["interval"]}
                if s["with_interval"]
                else {}
            ),
        }
        for name, s in out.items()
    }


def save_run(out: Path, model: BehaviorModel | None, prepared: Prepared, results: dict) -> None:
    """The catalog, the results and, with a model, the model exported as a federated run
    exports it, so `fedshop recommend` and `forecast` serve it the same way."""
    out.mkdir(parents=True, exist_ok=True)
    prepared.catalog.save(out / CATALOG)
    if model is not None:
        arrays = ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()})
        demand = prepared.demand
        card = {
            "training": "centralized, non-private",
            DEMAND_WEEKS_FROM: str(demand.weeks[0].date()) if demand is not None else None,
        }
        export(out, arrays, model.cfg, prepared.shape, card)
    write_json(out / RESULTS, results)
