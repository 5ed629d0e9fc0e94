"""Choosing the strategy and aggregating what clients report."""

from __future__ import annotations

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from common.runconfig import CentralDP, RunConfig, StrategyName

WEIGHT = "num-examples"
UNIFORM = "uniform-weight"  # every client's update counts the same (client-level DP needs it)


def aggregate_evaluation(replies: list[RecordDict]) -> MetricRecord:
    """Rates are averaged weighted by users; `*-sum` fields add up, so WAPE is exact:
    Σ|error| / Σ actual over every client's series."""
    records = [next(iter(r.metric_records.values())) for r in replies]
    total = sum(float(m[WEIGHT]) for m in records) or 1.0
    out: dict[str, float] = {WEIGHT: total}
    for key in records[0]:
        if key == WEIGHT:
            continue
        values = [float(m[key]) for m in records]
        if key.endswith("-sum"):
            out[key] = sum(values)
        else:
            out[key] = (
                sum(v * float(m[WEIGHT]) for v, m in zip(values, records, strict=True)) / total
            )
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
