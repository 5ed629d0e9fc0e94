"""Choosing the strategy and aggregating what clients report.

Besides FedAvg, FedAdam and FedProx, the run config selects Flower's own Byzantine-robust
rules: FedTrimmedAvg (coordinate-wise trimmed mean), FedMedian (coordinate-wise median), Krum,
MultiKrum and Bulyan (El Mhamdi et al.: a Multi-Krum selection, then per coordinate the mean
of the values closest to their median). None keeps state between rounds (checkpoints hold
nothing for them). They need each client's update in the clear, so the run config refuses them
with SecAgg+ and with central DP (`RunConfig._check_robust`). Broken replies (NaN, wrong
shapes, updates larger than local training can make) never reach any of them:
`server.reply_checks` rejects those first, so a robust rule only has to deal with
plausible-looking poison such as a sign flip.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)

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
    = Σ|error| / Σ actual over the series of the clients that share demand sums. A rate of
    noisy sums can fall outside [0, 1] on few users; it is clamped there (post-processing, so
    no privacy cost), while the raw sums stay in the record."""
    records = [next(iter(r.metric_records.values())) for r in replies]
    out: dict[str, float] = {}
    for key in {k for m in records for k in m if k.endswith(SUM)}:
        out[key] = sum(float(m[key]) for m in records if key in m)
    users = max(out.get(USERS_SUM, 0.0), 1.0)
    out[WEIGHT] = users
    out[HR10] = _rate(out.get(HITS_SUM, 0.0), users)
    out[NDCG10] = _rate(out.get(NDCG_SUM, 0.0), users)
    actual = out.get(DEMAND_ACTUAL_SUM, 0.0)
    if actual > 0:
        out[WAPE] = out[DEMAND_ERROR_SUM] / actual
        out[WAPE_UNCALIBRATED] = out[DEMAND_RAW_ERROR_SUM] / actual
        out[WAPE_MOVING_AVERAGE] = out[DEMAND_MA_ERROR_SUM] / actual
    return MetricRecord(out)


def _rate(hits: float, users: float) -> float:
    return min(max(hits / users, 0.0), 1.0)


class _MultiKrum(MultiKrum):
    """Flower's MultiKrum averaging the n − f best-scored of the n updates it receives, as
    Blanchard et al. (2017) define Multi-Krum (`multikrum-select` = 0); Flower's needs a fixed
    count, which would be wrong whenever a client declines or fails."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.num_nodes_to_select = max(1, len(replies) - self.num_malicious_nodes)
        return super().aggregate_train(server_round, replies)


def make_strategy(cfg: RunConfig) -> Strategy:
    common = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
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
    f = cfg.malicious_clients
    match cfg.strategy:
        case StrategyName.FEDTRIMMEDAVG:
            return FedTrimmedAvg(**common, beta=cfg.trim_beta)
        case StrategyName.FEDMEDIAN:
            return FedMedian(**common)
        case StrategyName.KRUM:
            return Krum(**common, num_malicious_nodes=f)
        case StrategyName.MULTIKRUM if cfg.multikrum_select:
            return MultiKrum(
                **common, num_malicious_nodes=f, num_nodes_to_select=cfg.multikrum_select
            )
        case StrategyName.MULTIKRUM:
            return _MultiKrum(**common, num_malicious_nodes=f)
        case StrategyName.BULYAN:
            return Bulyan(**common, num_malicious_nodes=f)
    return FedAvg(**common)
