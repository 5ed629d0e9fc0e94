"""How a simulation grows with the number of clients: 10, 30 and 100 simulated clients on the
default synthetic data (5,000 users), DP on, the default model, 5 rounds, side by side in one
run: wall time, seconds per round (first and the mean of the others), peak memory and what each
round asks of the clients.

Peak memory is the most the simulation's processes (the SuperLink, the ServerApp, Ray and its
workers) held at once, summed, sampled every half second (`simulations.resources`).

    python benchmarks/load.py [--clients 10 30 100] [--rounds 5] [--fraction-train 1.0]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from common.run_files import ROUNDS
from common.runconfig import RunConfig
from simulations.resources import PeakMemory
from simulations.simulate import simulate

GIB = 2**30


@dataclass
class Measured:
    clients: int
    wall_s: float
    rounds: list[float]
    peak_bytes: int
    trained: int  # client replies that trained, over all rounds
    hr10: float


def measure(clients: int, rounds: int, fraction: float, out: Path) -> Measured:
    cfg = RunConfig(
        out=str(out), num_server_rounds=rounds, batch_size=16, fraction_train=fraction,
        fraction_evaluate=fraction, min_clients=2,
    )  # fmt: skip
    started = time.monotonic()
    memory = PeakMemory(out)
    result = simulate(cfg, clients, memory.sample, poll_s=0.5)
    wall = time.monotonic() - started
    if not result.ok:
        raise RuntimeError(result.log.read_text()[-3000:])
    history = [r for r in json.loads((out / ROUNDS).read_text()) if "seconds" in r]
    trained = sum(c["status"] == "trained" for r in history for c in r["clients"])
    last = history[-1]["evaluate"]
    seconds = [r["seconds"] for r in history]
    return Measured(clients, wall, seconds, memory.peak, trained, last.get("hr10", 0.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 30, 100])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--fraction-train", type=float, default=1.0)
    args = parser.parse_args()
    console = Console()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for clients in args.clients:
            console.print(f"{clients} clients × {args.rounds} rounds …")
            out = Path(tmp) / f"c{clients}"
            results.append(measure(clients, args.rounds, args.fraction_train, out))
    table = Table(
        title=f"{args.rounds} DP rounds, fraction-train = fraction-evaluate = "
        f"{args.fraction_train:g}, default model, batch 16"
    )
    for column in ("clients", "wall", "round 1", "later rounds (mean)", "peak memory",
                   "trained replies", "HR@10"):  # fmt: skip
        table.add_column(column, justify="right")
    for m in results:
        later = m.rounds[1:] or m.rounds
        table.add_row(
            str(m.clients), f"{m.wall_s / 60:.1f} min", f"{m.rounds[0]:.1f} s",
            f"{sum(later) / len(later):.1f} s", f"{m.peak_bytes / GIB:.2f} GiB", str(m.trained),
            f"{m.hr10:.4f}",
        )  # fmt: skip
    console.print(table)


if __name__ == "__main__":
    main()
