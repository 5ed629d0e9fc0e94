"""What a client does when the server asks it to train or evaluate: on this client's users
only, with user-level DP. `clients.client_app` hands Flower's messages to `train`/`evaluate`."""

from __future__ import annotations

import base64
import json
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from clients.local_data import CannotTakePart, ClientData, load_client_data
from clients.local_training import train_plain, train_private
from clients.secure_aggregation import secured
from common.learning.demand import PRIMARY, holdout_forecast
from common.learning.forecasting import moving_average
from common.learning.model import BehaviorModel
from common.learning.popularity import user_spread
from common.learning.training import evaluate_ranking, pick_device
from common.messages import (
    ARRAYS,
    CATALOG_PATH,
    CLIENT,
    CLIP_NORM,
    CONFIG,
    DECLINED,
    DELTA,
    DEMAND_ACTUAL_SUM,
    DEMAND_CELLS_SUM,
    DEMAND_COVERED_SUM,
    DEMAND_END,
    DEMAND_ERROR_SUM,
    DEMAND_LEVEL_ERROR_SUM,
    DEMAND_MA_ERROR_SUM,
    DEMAND_RAW_ERROR_SUM,
    DEMAND_START,
    DEMAND_SUMS,
    EPSILON,
    EPSILON_BUDGET,
    HITS_SUM,
    ITEM_POPULARITY,
    LEDGER_ENTRY,
    LEDGER_HASH,
    LEDGER_HEADS,
    LEDGER_SEQ,
    LEDGER_SIGNATURE,
    METRICS,
    NAME,
    NDCG_SUM,
    NOISE_MULTIPLIER,
    POPULARITY,
    PROXIMAL_MU,
    REASON,
    REFUSED,
    SAMPLE_RATE,
    SERVER_ROUND,
    STEPS,
    UNIFORM,
    USERS_SUM,
    WEIGHT,
)
from common.run_files import CLIENTS, POLICY
from common.runconfig import RunConfig
from privacy.account import PrivacyAccount
from privacy.ledger import Line, canonical
from privacy.policy import PrivacyPolicy, Refused


def _setup(
    msg: Message, context: Context
) -> tuple[RunConfig, ClientData, BehaviorModel, torch.device]:
    """The run config, this client's data, and the server's model on the device to use."""
    cfg = RunConfig.from_flower(context.run_config)
    server = msg.content[CONFIG]
    calendar = (str(server[DEMAND_START]), str(server.get(DEMAND_END, "")))
    data = load_client_data(dict(context.node_config), cfg, str(server[CATALOG_PATH]), calendar)
    model = BehaviorModel(cfg.model, data.prepared.shape)
    model.load_state_dict(msg.content[ARRAYS].to_torch_state_dict())
    device = pick_device(cfg.device)
    return cfg, data, model.to(device), device


def _account(
    msg: Message, context: Context, cfg: RunConfig, data: ClientData, policy: PrivacyPolicy
) -> AbstractContextManager[PrivacyAccount]:
    heads = json.loads(str(msg.content[CONFIG].get(LEDGER_HEADS, "")) or "{}")
    head = heads.get(data.name)
    return PrivacyAccount.open(
        data.name,
        data.state_dir,
        data.key_path,
        policy,
        cfg,
        tuple(head) if head else None,
        context.run_id,
    )


def _policy(context: Context, cfg: RunConfig) -> PrivacyPolicy:
    """The client's own policy: node config in deployment, the simulation's file otherwise.

    The file's path comes from the server's run config, so only a simulated client (a
    partition of the server's data, no `data-path` of its own) reads it: a deployed client
    without `privacy-*` keys keeps the defaults, whatever file the server points at."""
    node = dict(context.node_config)
    simulated = None if "data-path" in node else Path(cfg.out) / CLIENTS / POLICY
    return PrivacyPolicy.from_node_config(node, simulated)


def _client(name: str, line: Line | None = None) -> ConfigRecord:
    record = {NAME: name}
    if line is not None:
        record |= {
            LEDGER_SEQ: line.body["seq"],
            LEDGER_HASH: line.hash,
            LEDGER_ENTRY: canonical(line.body).decode(),
            LEDGER_SIGNATURE: base64.b64encode(line.signature).decode(),
        }
    return ConfigRecord(record)


def _refused(msg: Message, name: str, reason: Refused | CannotTakePart | str) -> Message:
    """Nothing about the data, only why: the server cannot make this client release more.

    Also the answer of a client whose data supports no head (`CannotTakePart`) or leaves no user
    to train: its one-line reason, without counts, lands in the round table."""
    content = RecordDict({REFUSED: ConfigRecord({REASON: str(reason)}), CLIENT: _client(name)})
    return Message(content, reply_to=msg)


NO_TRAINING_USER = "cannot train: every user is held out as an audit non-member"


def train(msg: Message, context: Context) -> Message:
    """One round. Released: the update (DP-SGD), the noisy user count as the FedAvg weight and
    the mechanism's parameters, derived from that count, and with the first round the noisy
    item-popularity histogram; never losses or exact counts."""
    try:
        cfg, data, model, device = _setup(msg, context)
    except CannotTakePart as why:
        return _refused(msg, why.name, why)
    server_round = int(msg.content[CONFIG][SERVER_ROUND])
    mu = float(msg.content[CONFIG].get(PROXIMAL_MU, 0.0))
    train_seqs = data.prepared.train
    if len(train_seqs) == 0:
        return _refused(msg, data.name, NO_TRAINING_USER)
    policy = _policy(context, cfg)

    def popularity() -> np.ndarray:
        events, items = data.prepared.train_events, model.shape.items
        return user_spread(events, train_seqs.users, items)

    try:
        policy.check_aggregation(secured(msg))
        if not cfg.dp:
            policy.answer(cfg, None)  # refuses unless the policy allows it
            result = train_plain(model, train_seqs, cfg, server_round, device, mu)
            metrics = {WEIGHT: len(train_seqs), EPSILON: float("inf")}
            return _update(msg, model, metrics, _client(data.name), popularity())
        with _account(msg, context, cfg, data, policy) as account:
            mech = account.mechanism(len(train_seqs), popularity)
            if not account.can_train():
                line = account.decline(server_round)
                metrics = {DECLINED: 1, WEIGHT: 0}
                content = {METRICS: MetricRecord(metrics), CLIENT: _client(data.name, line)}
                return Message(RecordDict(content), reply_to=msg)
            result = train_private(model, train_seqs, cfg, mech, device, mu)
            line = account.trained(server_round, result.history)
            state = account.state
    except Refused as reason:
        return _refused(msg, data.name, reason)
    metrics = {
        WEIGHT: mech.noisy_users,
        EPSILON: state.epsilon(),
        DELTA: state.budget.delta,
        EPSILON_BUDGET: state.budget.epsilon,
        NOISE_MULTIPLIER: mech.noise_multiplier,
        CLIP_NORM: mech.clip_norm,
        SAMPLE_RATE: mech.sample_rate,
        STEPS: result.metrics[STEPS],
    }
    return _update(msg, model, metrics, _client(data.name, line), account.popularity)


def _update(
    msg: Message,
    model: BehaviorModel,
    metrics: dict,
    client: ConfigRecord,
    popularity: np.ndarray | None,
) -> Message:
    metrics = {DECLINED: 0, UNIFORM: 1.0, **metrics}
    content = {
        ARRAYS: ArrayRecord(model.cpu().state_dict()),
        METRICS: MetricRecord(metrics),
        CLIENT: client,
    }
    if popularity is not None:  # a config record: SecAgg+'s mod empties every array record
        content[POPULARITY] = ConfigRecord({ITEM_POPULARITY: popularity.tolist()})
    return Message(RecordDict(content), reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """Held-out ranking as (users, hits, NDCG) sums, noised and accounted under DP; demand
    error sums only where the client's policy shares them (they are not covered by ε)."""
    try:
        cfg, data, model, device = _setup(msg, context)
    except CannotTakePart as why:
        return _refused(msg, why.name, why)
    server_round = int(msg.content[CONFIG][SERVER_ROUND])
    policy = _policy(context, cfg)
    line = None
    try:  # a request the client refuses costs no evaluation either
        if cfg.dp:
            with _account(msg, context, cfg, data, policy) as account:
                sums, line = account.evaluation(server_round, _ranking_sums(model, data, device))
        else:
            policy.answer(cfg, None)
            sums = _ranking_sums(model, data, device)
    except Refused as reason:
        return _refused(msg, data.name, reason)
    metrics = {
        WEIGHT: max(float(sums[0]), 1.0),
        UNIFORM: 1.0,
        USERS_SUM: float(sums[0]),
        HITS_SUM: float(sums[1]),
        NDCG_SUM: float(sums[2]),
    }
    if policy.share_demand_evaluation or not cfg.dp:
        metrics |= _demand_sums(model, data, device)
    # The entry it cites joins the server's heads: a restored ledger cannot forget this spend.
    content = {METRICS: MetricRecord(metrics), CLIENT: _client(data.name, line)}
    return Message(RecordDict(content), reply_to=msg)


def _ranking_sums(model: BehaviorModel, data: ClientData, device) -> np.ndarray:
    """(users, hits@10, NDCG@10) summed over the held-out users: each user adds at most 1."""
    ranking = evaluate_ranking(model, data.prepared.test, device)
    users = ranking["users"]
    return np.array([users, ranking["full"]["hr@10"] * users, ranking["full"]["ndcg@10"] * users])


def _demand_sums(model: BehaviorModel, data: ClientData, device) -> dict[str, float]:
    """Forecast errors as sums so WAPE aggregates across clients; exact, not noised.

    Without a demand series (too few weeks of purchases) every sum is 0, a sum over no series:
    it adds nothing to the pooled WAPE or coverage, and the reply keeps the keys the other
    clients send (Flower's strategies refuse to aggregate metric records whose keys differ)."""
    if data.prepared.demand is None:
        return dict.fromkeys(DEMAND_SUMS, 0.0)
    held = holdout_forecast(model, data.prepared, device)
    actual, forecasts, planner = held.actual, held.forecasts, held.planner
    history, _ = data.prepared.demand.holdout(data.prepared.holdout_weeks)
    moving = moving_average(history, actual.shape[1])
    inside = (actual >= planner.lower[:, None]) & (actual <= planner.upper[:, None])
    return {
        DEMAND_ACTUAL_SUM: float(actual.sum()),
        DEMAND_ERROR_SUM: float(np.abs(actual - forecasts[PRIMARY]).sum()),
        DEMAND_RAW_ERROR_SUM: float(np.abs(actual - forecasts["bottom_up"]).sum()),
        DEMAND_MA_ERROR_SUM: float(np.abs(actual - moving).sum()),
        DEMAND_LEVEL_ERROR_SUM: float(np.abs(actual - planner.level[:, None]).sum()),
        # Interval coverage pools as covered / cells (both summed across clients); a series
        # without an interval (too little history) counts in neither.
        DEMAND_COVERED_SUM: float(inside.sum()),
        DEMAND_CELLS_SUM: float(np.isfinite(planner.lower).sum() * actual.shape[1]),
    }
