"""Choosing the strategy and aggregating what clients report."""

from __future__ import annotations

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from common.messages import UNIFORM, WEIGHT
from common.runconfig import CentralDP, RunConfig, StrategyName


def aggregate_evaluation(replies: list[RecordDict]) -> MetricRecord:
    """Clients send sums (noised under DP), which add up: HR@10 = Σ hits / Σ users, and WAPE
    = Σ|error| / Σ actual over the series of the clients that share demand sums."""
    records = [next(iter(r.metric_records.values())) for r in replies]
    out: dict[str, float] = {}
    for key in {k for m in records for k in m if k.endswith("-sum")}:
        out[key] = sum(float(m[key]) for m in records if key in m)
    users = max(out.get("users-sum", 0.0), 1.0)
    out[WEIGHT] = users
    out["hr10"] = out.get("hits10-sum", 0.0) / users
    out["ndcg10"] = out.get("ndcg10-sum", 0.0) / users
    actual = out.get("demand-actual-sum", 0.0)
    if actual > 0:
        out["wape"] = out["demand-abs-error-sum"] / actual
        out["wape-uncalibrated"] = out["demand-raw-abs-error-sum"] / actual
        out["wape-moving-average"] = out["demand-ma-abs-error-sum"] / actual
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
