"""Per-round wall time of one federated DP run (3 clients, tiny model and data, as the tests use)
in simulation and in deployment, each with and without SecAgg+, side by side, with what
deployment spends per message where the difference goes.

Deployment is the deployment test's federation: a real SuperLink and SuperNodes on 127.0.0.1
with TLS and SuperNode authentication. Rounds are timed by the ServerApp itself (`seconds` in
`rounds.json`: from sending the training instructions to the evaluation's aggregate).

    python benchmarks/rounds.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from common.data.synth import generate
from common.run_files import ROUNDS
from common.runconfig import RunConfig
from simulations.simulate import simulate
from tests.conftest import TINY
from tests.test_deployment import _run, local_federation, regions

CLIENTS = 3
# Messages each SuperNode handles per round: plain = train + evaluate; SecAgg+ = its four
# steps (setup, key shares, masked vector with training, unmasking) + evaluate.
MESSAGES = {False: 2, True: 5}
MODEL = "hidden=16 layers=1 max-len=12 batch-size=16 delta=0.001"


def _seconds(out: Path) -> list[float]:
    return [r["seconds"] for r in json.loads((out / ROUNDS).read_text()) if "seconds" in r]


def simulated(data: Path, out: Path, rounds: int, secagg: bool) -> list[float]:
    cfg = RunConfig(
        data=str(data), out=str(out), num_server_rounds=rounds, hidden=16, layers=1, heads=2,
        max_len=12, batch_size=16, delta=1e-3, secagg=secagg,
    )  # fmt: skip
    result = simulate(cfg, CLIENTS)
    if not result.ok:
        raise RuntimeError(result.log.read_text()[-2000:])
    return _seconds(out)


def deployed(tmp: Path, rounds: int, secagg: bool) -> list[float]:
    with local_federation(tmp) as fed:
        regions(fed, generate(TINY), CLIENTS)
        settings = f"num-server-rounds={rounds} min-clients={CLIENTS} secagg={str(secagg).lower()}"
        done = _run(fed, generate(TINY), settings)
        if not (tmp / "out" / ROUNDS).exists():
            raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
        return _seconds(tmp / "out")


def client_app_start() -> float:
    """Seconds a fresh interpreter takes to import the ClientApp: Flower starts one per message."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import clients.client_app"], check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    console = Console(width=140)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        data = tmp / "tiny.parquet"
        generate(TINY).to_parquet(data)
        for secagg in (False, True):
            label = "SecAgg+" if secagg else "plain"
            console.print(f"simulation, {label} …")
            sim = simulated(data, tmp / f"sim-{label}", args.rounds, secagg)
            console.print(f"deployment, {label} …")
            dep = deployed(tmp / f"dep-{label}", args.rounds, secagg)
            rows.append((label, sim, dep))
    start = client_app_start()
    table = Table(title=f"Seconds per round, {CLIENTS} clients, DP on (tiny model and data)")
    for column in ("aggregation", "simulation", "deployment", "deployment − simulation",
                   "messages per node", "ClientApp starts × import"):  # fmt: skip
        table.add_column(column, justify="right")
    for label, sim, dep in rows:
        messages = MESSAGES[label == "SecAgg+"]
        table.add_row(
            label,
            " / ".join(f"{s:.1f}" for s in sim),
            " / ".join(f"{s:.1f}" for s in dep),
            f"{statistics.mean(dep) - statistics.mean(sim):+.1f}",
            str(messages),
            f"{messages} × {start:.1f} = {messages * start:.1f}",
        )
    console.print(table)
    console.print(
        "Each deployed message also waits on Flower's polling: a SuperNode with nothing to do "
        "asks again after 3 s, and the ServerApp's grid pulls replies every 3 s."
    )


if __name__ == "__main__":
    main()
