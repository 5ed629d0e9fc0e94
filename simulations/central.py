"""Centralized, non-private training: the reference the federated runs are measured against."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save_file

from common.atomic import write_json, write_with
from common.learning.configs import ModelConfig, TrainConfig
from common.learning.dataset import Prepared, prepare
from common.learning.demand import PRIMARY, holdout_forecast
from common.learning.forecasting import baseline_scores, score
from common.learning.inference import load_exported
from common.learning.model import BehaviorModel
from common.learning.popularity import popularity_results
from common.learning.training import (
    adam,
    evaluate_ranking,
    loader,
    pick_device,
    train_epoch,
)
from common.run_files import CATALOG, MODEL, RESULTS


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


def baselines(prepared: Prepared) -> dict:
    """The recommendation baselines, and the forecasting ones where there is a demand series
    (`no_forecast` says why not)."""
    if prepared.demand is None:
        return {
            "recommendation": popularity_results(prepared),
            "forecast": {},
            "no_forecast": prepared.demand_reason,
        }
    return {
        "recommendation": popularity_results(prepared),
        "forecast": baseline_scores(prepared.demand, prepared.holdout_weeks),
    }


def evaluate_exported(run: Path, events: pd.DataFrame, top_category_chars: int | None) -> dict:
    """A run's exported model evaluated exactly on the whole of `events`, beside the baselines on
    the same users and series, in `train-central`'s layout. A federated run's own figures are
    DP releases (noisy sums from each client); a simulation holds every client's data, so it
    can also say exactly where the model stands against the rules."""
    exported = load_exported(run)
    prepared = prepare(
        events,
        top_category_chars=top_category_chars,
        history_len=exported.model.cfg.history,
        catalog=exported.catalog,
    )
    cpu = torch.device("cpu")
    model = {
        "test": evaluate_ranking(exported.model, prepared.test, cpu),
        "forecast": model_forecast(exported.model, prepared, cpu),
    }
    return {"bert": model, "baselines": baselines(prepared)}


def save_run(out: Path, model: BehaviorModel | None, prepared: Prepared, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    prepared.catalog.save(out / CATALOG)
    if model is not None:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        write_with(out / MODEL, lambda p: save_file(state, str(p)))
    write_json(out / RESULTS, results)
