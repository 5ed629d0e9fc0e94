"""Poisoning clients against FedAvg and Flower's robust strategies, on the synthetic data.

Every run is a real federated run in this process: each node is the production ClientApp
(`clients.client_app.app`: its own data partition, policy and ledger), called through a small
Grid that carries every message in Flower's wire format; the server is the real
`server.rounds.RoundLoop` with the real strategy (`server.aggregation.make_strategy`) and the
reply checks on (`server.reply_checks`). The attack is applied to the first n clients' training
replies between their ClientApp and the server, so no attack code exists in the ClientApp:

- sign-flip: the client sends sent − Δ instead of its trained sent + Δ (the same size, so it
  passes the size check and only the aggregation rule can stop it);
- scaled ×10: sent + 10·Δ (caught by the size check: rejected every round, named in the log).

Accuracy is HR@10 / NDCG@10 with full ranking of the final model over every client's held-out
users, pooled (exact: the benchmark owns all the data), so the between-round federated
evaluation is switched off. Clients train without DP by default: plain training is seeded, so
every number is reproducible and differences come from the aggregation alone; at this size,
three DP rounds barely move the model from its initialisation, which would hide any attack
(`--dp` runs the same with the clients' DP-SGD, in about twice the time).

    python benchmarks/poisoning.py [--dp] [--seed 0] [--clients 8] [--regions 3] [--rounds 3]
        [--strategies fedavg,fedmedian] [--attacks "none:0,sign-flip:2"]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from rich.console import Console
from rich.table import Table

from clients.client_app import app as client_app
from clients.local_data import load_client_data
from common.learning.dataset import catalog_shape
from common.learning.model import BehaviorModel
from common.learning.training import evaluate_ranking
from common.messages import ARRAYS, CATALOG_PATH, DEMAND_END, DEMAND_START, METRICS
from common.run_files import CLIENTS, POLICY
from common.runconfig import RunConfig
from privacy.signing import load_or_create
from server.aggregation import make_strategy
from server.aggregation_ledger import AggregationLedger
from server.node_registry import NodeBinder
from server.platform import platform_for
from server.reply_checks import ReplyChecks
from server.rounds import RoundLoop
from simulations.simulate import simulated_policy
from tests.inprocess_grid import InProcessGrid

SMALL = {
    "synth_events": 40_000,
    "synth_users": 1200,
    "synth_items": 400,
    "hidden": 32,
    "layers": 1,
    "max_len": 20,
    "windows": 1,
    "device": "cpu",
}
STRATEGIES = ["fedavg", "fedtrimmedavg", "fedmedian", "krum", "multikrum", "bulyan"]
ATTACKS = [("none", 0), ("sign-flip", 1), ("sign-flip", 2), ("scaled ×10", 1), ("scaled ×10", 2)]


def flip(sent: np.ndarray, trained: np.ndarray) -> np.ndarray:
    return sent - (trained - sent)


def scale10(sent: np.ndarray, trained: np.ndarray) -> np.ndarray:
    return sent + 10 * (trained - sent)


ATTACK = {"sign-flip": flip, "scaled ×10": scale10}


class PoisoningGrid(InProcessGrid):
    """Carries each message in Flower's wire format to its node's ClientApp and back. The
    training replies of `attackers` are poisoned with `attack` on the way back; for the others
    it notes how close their update came to the size check's bound (`headroom`)."""

    def __init__(self, cfg: RunConfig, clients: int, attackers: set[int], attack) -> None:
        super().__init__(
            {
                n: Context(
                    run_id=1,
                    node_id=n,
                    node_config={"partition-id": n - 1, "num-partitions": clients},
                    state=RecordDict(),
                    run_config=cfg.to_flower(),
                )
                for n in range(1, clients + 1)
            }
        )
        self.attackers, self.attack = attackers, attack
        self.checks = ReplyChecks(cfg)
        self.headroom: list[float] = []  # honest updates: largest |Δ| / the bound

    def answer(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        reply = client_app(message, self.contexts[node])
        trained = not reply.has_error() and ARRAYS in reply.content
        if message.metadata.message_type == "train" and trained:
            if node in self.attackers:
                return self._poison(message, reply)
            self.headroom.append(self._moved(message, reply))
        return reply

    def _poison(self, request: Message, reply: Message) -> Message:
        sent, got = request.content[ARRAYS], reply.content[ARRAYS]
        poisoned = {k: Array(self.attack(sent[k].numpy(), got[k].numpy())) for k in got}
        reply.content[ARRAYS] = ArrayRecord(poisoned)
        return reply

    def _moved(self, request: Message, reply: Message) -> float:
        sent, got = request.content[ARRAYS], reply.content[ARRAYS]
        steps = self.checks.steps(reply.content[METRICS])
        return max(
            float(np.abs(got[k].numpy() - sent[k].numpy()).max()) / self.checks.bound(steps, k)
            for k in got
        )


@dataclass
class Outcome:
    hr10: float
    ndcg10: float
    rejected: int  # replies rejected over the run
    stopped: str
    seconds: float
    headroom: list[float]


def pooled_metrics(cfg: RunConfig, arrays: ArrayRecord, shared: dict, clients: int) -> tuple:
    """HR@10 / NDCG@10 (full ranking) of `arrays` over every client's held-out users."""
    users = hits = ndcg = 0.0
    for pid in range(clients):
        node = {"partition-id": pid, "num-partitions": clients}
        calendar = (str(shared[DEMAND_START]), str(shared[DEMAND_END]))
        data = load_client_data(node, cfg, str(shared[CATALOG_PATH]), calendar)
        model = BehaviorModel(cfg.model, data.prepared.shape)
        model.load_state_dict(arrays.to_torch_state_dict())
        ranking = evaluate_ranking(model, data.prepared.test, torch.device("cpu"))
        users += ranking["users"]
        hits += ranking["full"]["hr@10"] * ranking["users"]
        ndcg += ranking["full"]["ndcg@10"] * ranking["users"]
    return hits / users, ndcg / users


def assumed(strategy: str, clients: int, malicious: int) -> dict:
    """The robust rule's settings: Krum and MultiKrum assume `malicious` poisoners; Bulyan the
    most its 4f + 3 updates allow (at most `malicious`), and needs them every round."""
    if strategy == "bulyan":
        f = min(malicious, (clients - 3) // 4)
        return {"malicious_clients": f, "min_clients": 4 * f + 3}
    return {"malicious_clients": malicious, "min_clients": 2}


def run_once(base: RunConfig, shared: dict, shape, clients: int, strategy: str, attack, n: int):
    out = Path(tempfile.mkdtemp(prefix=f"{strategy}-", dir=base.out))
    settings = {"strategy": strategy, "out": str(out)}
    settings |= assumed(strategy, clients, base.malicious_clients)
    cfg = RunConfig(**(base.model_dump() | settings))
    simulated_policy(cfg).write(out / CLIENTS / POLICY)
    started = time.monotonic()
    grid = PoisoningGrid(cfg, clients, set(range(1, n + 1)), ATTACK.get(attack))
    torch.manual_seed(cfg.seed)  # the same initial model for every run
    arrays = ArrayRecord(BehaviorModel(cfg.model, shape).state_dict())
    strategy_ = make_strategy(cfg)
    strategy_.fraction_evaluate = 0.0  # no federated evaluation: measured exactly below
    history: list[dict] = []
    loop = RoundLoop(
        grid=grid,
        strategy=strategy_,
        shared=shared,
        out=out,
        ledger=AggregationLedger(
            out, load_or_create(out.with_name(out.name + ".keys") / "server.key"), "1", strategy
        ),
        min_clients=cfg.min_clients,
        last_round=cfg.num_server_rounds,
        history=history,
        on_round=lambda done: None,
        binder=NodeBinder.for_run(""),
        checks=ReplyChecks(cfg),
    )
    arrays, outcome = loop.run(arrays, 1)
    hr, ndcg = pooled_metrics(cfg, arrays, shared, clients)
    rejected = sum(r["status"] == "rejected" for rec in history for r in rec["clients"])
    return Outcome(hr, ndcg, rejected, outcome, time.monotonic() - started, grid.headroom)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--regions", type=int, default=3, help="large regions are sharded")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--attacks", default="all", help="all, or e.g. 'none:0,sign-flip:1'")
    parser.add_argument("--malicious", type=int, default=2, help="f the Krum family assumes")
    parser.add_argument("--trim-beta", type=float, default=0.25)
    parser.add_argument("--dp", action="store_true", help="clients train with DP-SGD")
    parser.add_argument("--seed", type=int, default=0, help="synthetic data, model init")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    attacks = ATTACKS
    if args.attacks != "all":
        attacks = [(a, int(n)) for a, n in (x.rsplit(":", 1) for x in args.attacks.split(","))]
        unknown = sorted({a for a, _ in attacks} - set(ATTACK) - {"none"})
        if unknown:
            parser.error(f"--attacks: unknown {unknown}; known: none, {', '.join(ATTACK)}")
    strategies = args.strategies.split(",")
    work = Path(tempfile.mkdtemp(prefix="fedshop-poisoning-"))
    base = RunConfig(
        **SMALL,
        synth_regions=args.regions,
        num_server_rounds=args.rounds,
        malicious_clients=args.malicious,
        trim_beta=args.trim_beta,
        dp=args.dp,
        seed=args.seed,
        out=str(work),
    )
    # One catalog and demand calendar for all runs (the clients' prepared data is reused).
    platform = platform_for(base, work)
    shared = {
        CATALOG_PATH: str(platform.catalog_path),
        DEMAND_START: platform.demand_start,
        DEMAND_END: platform.demand_end,
    }
    fixed = {
        "catalog": shared[CATALOG_PATH],
        "demand_start": shared[DEMAND_START],
        "demand_end": shared[DEMAND_END],
    }
    base = RunConfig(**(base.model_dump() | fixed))
    shape = catalog_shape(platform.catalog)
    console = Console(width=200)
    started = time.monotonic()
    torch.manual_seed(base.seed)
    initial = ArrayRecord(BehaviorModel(base.model, shape).state_dict())
    hr, ndcg = pooled_metrics(base, initial, shared, args.clients)
    table = Table(
        title=f"HR@10 / NDCG@10 after {args.rounds} rounds, {args.clients} clients, "
        f"DP {'on' if base.dp else 'off'}, seed {base.seed}; initial model {hr:.4f} / {ndcg:.4f}"
    )
    columns = ["attack", "poisoners"]
    for s in strategies:
        f = assumed(s, args.clients, args.malicious)["malicious_clients"]
        extra = {"krum": f" f={f}", "multikrum": f" f={f}", "bulyan": f" f={f}"}.get(s, "")
        columns.append(s + (f" β={args.trim_beta:g}" if s == "fedtrimmedavg" else extra))
    for col in columns:
        table.add_column(col)
    rows: list[list[str]] = []
    headroom: list[float] = []
    for attack, n in attacks:
        cells = []
        for strategy in strategies:
            o = run_once(base, shared, shape, args.clients, strategy, attack, n)
            headroom += o.headroom
            cell = f"{o.hr10:.4f} / {o.ndcg10:.4f}"
            if o.rejected:
                cell += f" (rejected {o.rejected})"
            if o.stopped != "completed":
                cell += " (stopped)"
                console.print(f"  stopped: {o.stopped}")
            console.print(f"{attack} ×{n} {strategy}: {cell}  [{o.seconds:.0f} s]")
            cells.append(cell)
        table.add_row(attack, str(n), *cells)
        rows.append([attack, str(n), *cells])
    console.print(table)
    for row in [columns, ["---"] * len(columns), *rows]:  # the same, for docs/results.md
        print("| " + " | ".join(row) + " |")
    console.print(
        f"honest updates: largest |Δ| is {min(headroom):.0%}–{max(headroom):.0%} of the size "
        f"check's bound ({len(headroom)} replies)"
    )
    console.print(f"wall time {time.monotonic() - started:.0f} s; runs in {work}")


if __name__ == "__main__":
    main()
