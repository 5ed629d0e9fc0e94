"""fedshop ClientApp: trains the shared model on this client's users only, with user-level DP."""

from __future__ import annotations

import json

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.local_data import ClientData, load_client_data
from clients.local_training import train_plain, train_private
from common.demand import PRIMARY, holdout_forecast
from common.forecasting import moving_average
from common.model import BehaviorModel
from common.runconfig import RunConfig
from common.training import evaluate_ranking, pick_device
from privacy.accounting import Budget, PrivacyState, restore, spend_fields
from privacy.ledger import CLIENT_LEDGER, Line, Spend, append, check_head, parse, read_lines
from privacy.signing import load_or_create

app = ClientApp()


def _setup(msg: Message, context: Context) -> tuple[RunConfig, ClientData, BehaviorModel]:
    cfg = RunConfig.from_flower(context.run_config)
    server = msg.content["config"]
    data = load_client_data(
        dict(context.node_config), cfg, str(server["catalog"]), str(server["demand-start"])
    )
    model = BehaviorModel(cfg.model, data.prepared.shape)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return cfg, data, model


def _privacy_state(data: ClientData, cfg: RunConfig, heads: str) -> PrivacyState:
    """Rebuilt from the ledger beside the client's data, so it survives any restart; first
    checked against the newest entry the server recorded from this client."""
    path = data.state_dir / CLIENT_LEDGER
    lines = read_lines(path) if path.exists() else []
    head = json.loads(heads or "{}").get(data.name)
    check_head(path, lines, tuple(head) if head else None)
    spends = [parse(path, line, Spend) for line in lines]
    return restore(data.name, Budget(epsilon=cfg.epsilon, delta=cfg.delta), spends)


def _write_ahead(state: PrivacyState, data: ClientData, run_id: int) -> Line:
    """Sign and store the round's spend; only after this may the update leave the client."""
    fields = spend_fields(state, state.rounds[-1], run_id)
    return append(data.state_dir / CLIENT_LEDGER, fields, load_or_create(data.key_path), Spend)


def _client(data: ClientData, line: Line | None = None) -> ConfigRecord:
    record = {"name": data.name}
    if line is not None:
        record |= {"ledger-seq": line.body["seq"], "ledger-hash": line.hash}
    return ConfigRecord(record)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, data, model = _setup(msg, context)
    device = pick_device(cfg.device)
    model.to(device)
    server_round = int(msg.content["config"]["server-round"])
    mu = float(msg.content["config"].get("proximal-mu", 0.0))
    train_seqs = data.prepared.train
    metrics: dict[str, float] = {
        "num-examples": len(train_seqs),
        "uniform-weight": 1.0,
        "declined": 0,
    }
    line = None
    if cfg.dp:
        state = _privacy_state(data, cfg, str(msg.content["config"].get("ledger-heads", "")))
        result = train_private(model, train_seqs, cfg, state, server_round, device, mu)
        line = _write_ahead(state, data, context.run_id)
        mech = state.mechanism
        metrics |= {
            "epsilon": state.epsilon(),
            "delta": state.budget.delta,
            "epsilon-budget": state.budget.epsilon,
            "noise-multiplier": mech.noise_multiplier,
            "clip-norm": mech.clip_norm,
            "sample-rate": mech.sample_rate,
        }
    else:
        result = train_plain(model, train_seqs, cfg, server_round, device, mu)
        metrics |= {"epsilon": float("inf")}
    if not result.trained:
        metrics |= {"declined": 1, "num-examples": 0, "steps": 0}
        content = RecordDict({"metrics": MetricRecord(metrics), "client": _client(data, line)})
        return Message(content, reply_to=msg)
    metrics |= {
        "steps": result.metrics["steps"],
        "loss": result.metrics["loss"],
        "loss-next-item": result.metrics["loss_next_item"],
        "loss-demand": result.metrics["loss_demand"],
    }
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.cpu().state_dict()),
            "metrics": MetricRecord(metrics),
            "client": _client(data, line),
        }
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Metrics on this client's held-out data; forecast errors as sums so WAPE aggregates."""
    cfg, data, model = _setup(msg, context)
    device = pick_device(cfg.device)
    model.to(device)
    ranking = evaluate_ranking(model, data.prepared.test, device)
    held = holdout_forecast(model, data.prepared, device)
    actual, forecasts, planner = held.actual, held.forecasts, held.planner
    history, _ = data.prepared.demand.holdout(data.prepared.holdout_weeks)
    moving = moving_average(history, actual.shape[1])
    inside = (actual >= planner.lower[:, None]) & (actual <= planner.upper[:, None])
    metrics = {
        "num-examples": ranking["users"],
        "uniform-weight": 1.0,  # Flower checks the training weight key in every reply
        "hr10": ranking["full"]["hr@10"],
        "ndcg10": ranking["full"]["ndcg@10"],
        "hr10-sampled": ranking["sampled"]["hr@10"],
        "ndcg10-sampled": ranking["sampled"]["ndcg@10"],
        "demand-actual-sum": float(actual.sum()),
        "demand-abs-error-sum": float(np.abs(actual - forecasts[PRIMARY]).sum()),
        "demand-raw-abs-error-sum": float(np.abs(actual - forecasts["bottom_up"]).sum()),
        "demand-ma-abs-error-sum": float(np.abs(actual - moving).sum()),
        "demand-level-abs-error-sum": float(np.abs(actual - planner.level[:, None]).sum()),
        # Interval coverage pools as covered / cells (both summed across clients); a series
        # without an interval (too little history) counts in neither.
        "demand-covered-sum": float(inside.sum()),
        "demand-cells-sum": float(np.isfinite(planner.lower).sum() * actual.shape[1]),
    }
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
