"""Deployment mode for real: a SuperLink and three SuperNodes on 127.0.0.1, each SuperNode
pointing at its own data file through --node-config, driven by `flwr run`."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from common.data.catalog import Catalog
from common.data.partition import plan, select
from common.data.sequences import leave_last_out
from common.run_files import CLIENT_LEDGER, SERVER_LEDGER
from privacy.ledger import Spend, entries
from privacy.verify import verify_paths
from simulations.simulate import APP_DIR, stop_tree

pytestmark = pytest.mark.slow
PORT = 39291  # SuperLink's HTTP API (Fleet and Control); away from the local simulation's 39091
BIN = Path(sys.executable).parent


def _start(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(args, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam", "fedprox"])
def test_superlink_and_supernodes_train_on_their_own_files(tmp_path, tiny_events, strategy):
    split = leave_last_out(tiny_events)
    Catalog.build(split[split["split"] == "train"], None).save(tmp_path / "catalog.json")
    names = []
    for part in plan(tiny_events, 3):
        select(tiny_events, part).to_parquet(tmp_path / f"{part.name}.parquet")
        names.append(part.name)
    keys = tmp_path / "keys"
    subprocess.run([str(BIN / "fedshop"), "keys", *names, "server", "--out", str(keys)], check=True)
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "dep"\n\n'
        f'[superlink.dep]\naddress = "127.0.0.1:{PORT}"\ninsecure = true\n'
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    procs = [
        _start(
            [
                str(BIN / "flower-superlink"),
                "--insecure",
                "--port",
                str(PORT),
                "--database",
                str(tmp_path / "state.db"),
                "--disable-runtime-dependency-installation",
            ],
            tmp_path / "superlink.log",
            env,
        )
    ]
    try:
        time.sleep(3)
        for i, name in enumerate(names):
            node_config = (
                f'data-path="{tmp_path / name}.parquet" state-dir="{tmp_path / ("state-" + name)}" '
                f'catalog="{tmp_path / "catalog.json"}" signing-key="{keys / name}.key" '
                "privacy-delta=0.001"  # the client's own policy; the server can only ask
            )
            procs.append(
                _start(
                    [
                        str(BIN / "flower-supernode"),
                        "--insecure",
                        "--superlink",
                        f"127.0.0.1:{PORT}",
                        "--port",
                        str(PORT + 10 + i),
                        "--node-config",
                        node_config,
                    ],
                    tmp_path / f"node-{name}.log",
                    env,
                )
            )
        run_config = (
            f"strategy={strategy!r} num-server-rounds=2 hidden=16 layers=1 max-len=12 "
            "batch-size=16 "
            "delta=0.001 "
            f'min-clients=3 catalog="{tmp_path / "catalog.json"}" '
            f'demand-start="{tiny_events["timestamp"].min().date()}" out="{tmp_path / "out"}" '
            f'server-key="{keys / "server.key"}"'
        )
        result = subprocess.run(
            [str(BIN / "flwr"), "run", str(APP_DIR), "dep", "--stream", "--run-config", run_config],
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
    finally:
        stop_tree([p.pid for p in procs])
    out = tmp_path / "out"
    assert (out / "model_card.json").exists(), result.stdout[-3000:] + result.stderr[-2000:]
    assert (out / "model_card.json").read_text().count(f'"strategy": "{strategy}"') == 2
    rows = pd.read_csv(out / "clients.csv")
    assert sorted(rows["client"].unique()) == sorted(names)
    assert (rows["status"] == "trained").all() and len(rows) == 6
    ledgers = [tmp_path / f"state-{name}" / CLIENT_LEDGER for name in names]  # beside its data
    for name, ledger in zip(names, ledgers, strict=True):
        spends = entries(ledger, Spend)
        assert [(s.server_round, s.status) for s in spends] == [
            (r, status) for r in (1, 2) for status in ("trained", "evaluated")
        ]
        last = rows[(rows["client"] == name) & (rows["round"] == 2)]["epsilon"].item()
        assert spends[-2].epsilon_after == pytest.approx(last)
        assert spends[0].delta == 0.001
    # Compliance checks them against the public keys it was given, not the ones beside them.
    reports = verify_paths([*ledgers, out / SERVER_LEDGER], keys)
    assert all(r.ok for r in reports), [r.first_problem() for r in reports if not r.ok]
    assert all(r.key_source == "pinned" for r in reports)
