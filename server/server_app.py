"""fedshop ServerApp: coordinates the regional clients and keeps the shared model."""

from __future__ import annotations

import shutil
import time
from logging import ERROR, INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common.atomic import StorageError, write_with
from common.learning.dataset import catalog_shape
from common.learning.model import BehaviorModel
from common.messages import (
    CATALOG_PATH,
    CLIP_NORM,
    DELTA,
    DEMAND_END,
    DEMAND_START,
    EPSILON,
    EPSILON_BUDGET,
    NOISE_MULTIPLIER,
    PROXIMAL_MU,
    SAMPLE_RATE,
)
from common.run_files import CATALOG, CHECKPOINT, DEMAND_WEEKS_FROM
from common.runconfig import CentralDP, RunConfig, StrategyName
from privacy.accounting import NEIGHBOURING
from privacy.signing import SERVER_PUBLIC_KEY, load_or_create, private_keys
from server import central_dp, checkpoint, run_tables
from server.aggregation import make_strategy
from server.aggregation_ledger import AggregationLedger
from server.export import export
from server.node_registry import NodeBinder
from server.platform import platform_for
from server.reply_checks import ReplyChecks
from server.rounds import RoundLoop
from server.secure_aggregation import SecureAggregation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_flower(context.run_config)
    try:
        serve(grid, context, cfg)
    except StorageError as exc:
        # Every file is replaced whole or not at all (common.atomic): the last checkpoint and
        # both ledgers are as the last finished round left them, so a rerun resumes there.
        log(ERROR, "run %s stopped: %s. Free space or make %s writable, then run again: it "
            "resumes from the last checkpoint.", context.run_id, exc, cfg.out)  # fmt: skip
        raise


def serve(grid: Grid, context: Context, cfg: RunConfig) -> None:
    """The whole run: rounds from a fresh model or the checkpoint, then the export."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    platform = platform_for(cfg, out)
    if platform.catalog_path.resolve() != (out / CATALOG).resolve():
        write_with(out / CATALOG, lambda tmp: shutil.copyfile(platform.catalog_path, tmp))
    shape = catalog_shape(platform.catalog)
    strategy = make_strategy(cfg)
    saved = (
        checkpoint.load(out, BehaviorModel(cfg.model, shape).state_dict()) if cfg.resume else None
    )
    central = None
    if cfg.central_dp is not CentralDP.OFF:
        clients = wait_for_clients(grid, cfg.min_clients)
        state = saved and saved.central_accountant
        central = central_dp.wrap(
            strategy, cfg, clients, central_dp.saved_state(out, state) if cfg.resume else None
        )
        strategy = central.strategy
    if saved:
        log(INFO, "resuming from %s after round %s", out / CHECKPOINT, saved.server_round)
        arrays, first, history = saved.arrays, saved.server_round + 1, saved.history
        checkpoint.restore_strategy(strategy, saved.strategy_state)
    else:
        torch.manual_seed(cfg.seed)
        arrays = ArrayRecord(BehaviorModel(cfg.model, shape).state_dict())
        first, history = 1, []
    shared = {
        CATALOG_PATH: str(platform.catalog_path.resolve()),
        DEMAND_START: platform.demand_start,
        DEMAND_END: platform.demand_end,
    }
    if cfg.strategy is StrategyName.FEDPROX:
        shared[PROXIMAL_MU] = cfg.proximal_mu

    # The default private key stays outside the run folder handed to compliance; its public
    # half goes in, where the verifier looks for it.
    key = load_or_create(
        Path(cfg.server_key) if cfg.server_key else private_keys(out) / "server.key",
        publish=out / SERVER_PUBLIC_KEY,
    )
    loop = RoundLoop(
        grid=grid,
        strategy=strategy,
        shared=shared,
        out=out,
        ledger=AggregationLedger(out, key, str(context.run_id), cfg.strategy.value),
        min_clients=cfg.min_clients,
        last_round=cfg.num_server_rounds,
        history=history,
        on_round=lambda done: run_tables.write_tables(out, done),
        central=central,
        binder=NodeBinder.for_run(cfg.registry),
        secure=SecureAggregation.from_config(cfg),
        context=context,
        timeout=cfg.round_timeout or None,
        checks=ReplyChecks(cfg),
    )
    arrays, outcome = loop.run(arrays, first)
    run_tables.write_tables(out, history)
    run_tables.plot(out, history)
    finished = [r for r in history if "evaluate" in r]
    card = {
        "outcome": outcome,
        "rounds_completed": finished[-1]["round"] if finished else 0,
        "strategy": cfg.strategy.value,
        "data": platform.summary,
        "privacy": privacy_summary(cfg, history) | {"central_dp": central and central.summary()},
        "metrics": finished[-1]["evaluate"] if finished else {},
        "run_config": cfg.to_flower(),
        DEMAND_WEEKS_FROM: platform.demand_start or None,  # None: each client's own first day
    }
    export(out, arrays, cfg.model, shape, card)
    log(INFO, "run %s: %s; results in %s", context.run_id, outcome, out)


def wait_for_clients(grid: Grid, least: int, timeout_s: float = 300.0) -> int:
    """How many clients are connected, once at least `least` are: client-level DP calibrates
    its noise to the number of clients averaged each round."""
    deadline = time.monotonic() + timeout_s
    while len(nodes := list(grid.get_node_ids())) < least:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} client(s) connected; central DP needs {least}")
        time.sleep(1)
    return len(nodes)


def privacy_summary(cfg: RunConfig, history: list[dict]) -> dict:
    """Per client: the latest epsilon it reported, its mechanism and the rounds it declined
    (budget), refused (the request asked for more than its policy allows) or failed."""
    clients: dict[str, dict] = {}
    for record in history:
        for row in record["clients"]:
            if row["status"] == "rejected":  # a name its node does not hold: not that client
                continue
            entry = clients.setdefault(
                row["client"], {"declined_rounds": [], "refused_rounds": [], "failed_rounds": []}
            )
            if row["status"] in ("declined", "refused", "failed"):
                entry[f"{row['status']}_rounds"].append(record["round"])
            if row["status"] in ("refused", "failed"):
                continue
            for key in (
                EPSILON,
                DELTA,
                EPSILON_BUDGET,
                NOISE_MULTIPLIER,
                CLIP_NORM,
                SAMPLE_RATE,
            ):
                if key in row:
                    entry[key] = row[key]
    return {
        "dp": cfg.dp,
        "unit": f"user (one example per user per client); neighbours: {NEIGHBOURING}",
        "accountant": cfg.accountant.value,
        "clients": clients,
    }
