"""Choosing the strategy and aggregating what clients report."""

from __future__ import annotations

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from common.messages import (
    DEMAND_ACTUAL_SUM,
    DEMAND_ERROR_SUM,
    DEMAND_MA_ERROR_SUM,
    DEMAND_RAW_ERROR_SUM,
    HITS_SUM,
    HR10,
    NDCG10,
    NDCG_SUM,
    SUM,
    UNIFORM,
    USERS_SUM,
    WAPE,
    WAPE_MOVING_AVERAGE,
    WAPE_UNCALIBRATED,
    WEIGHT,
)
from common.runconfig import CentralDP, RunConfig, StrategyName


def aggregate_evaluation(replies: list[RecordDict]) -> MetricRecord:
    """Clients send sums (noised under DP), which add up: HR@10 = Σ hits / Σ users, and WAPE
    = Σ|error| / Σ actual over the series of the clients that share demand sums."""
    records = [next(iter(r.metric_records.values())) for r in replies]
    out: dict[str, float] = {}
    for key in {k for m in records for k in m if k.endswith(SUM)}:
        out[key] = sum(float(m[key]) for m in records if key in m)
    users = max(out.get(USERS_SUM, 0.0), 1.0)
    out[WEIGHT] = users
    out[HR10] = out.get(HITS_SUM, 0.0) / users
    out[NDCG10] = out.get(NDCG_SUM, 0.0) / users
    actual = out.get(DEMAND_ACTUAL_SUM, 0.0)
    if actual > 0:
        out[WAPE] = out[DEMAND_ERROR_SUM] / actual
        out[WAPE_UNCALIBRATED] = out[DEMAND_RAW_ERROR_SUM] / actual
        out[WAPE_MOVING_AVERAGE] = out[DEMAND_MA_ERROR_SUM] / actual
    return MetricRecord(out)


def make_strategy(cfg: RunConfig) -> Strategy:
    common = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": cfg.min_clients,
        "min_evaluate_nodes": cfg.min_clients,
        "min_available_nodes": cfg.min_clients,
        "weighted_by_key": WEIGHT if cfg.central_dp is CentralDP.OFF else UNIFORM,
        # evaluation is always weighted by users, whatever the training weights
        "evaluate_metrics_aggr_fn": lambda replies, _: aggregate_evaluation(replies),
    }
    if cfg.strategy is StrategyName.FEDADAM:
        return FedAdam(**common, eta=cfg.server_lr, eta_l=cfg.lr)
    if cfg.strategy is StrategyName.FEDPROX:
        return FedProx(**common, proximal_mu=cfg.proximal_mu)
    return FedAvg(**common)
