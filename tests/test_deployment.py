"""Deployment mode for real: a SuperLink and SuperNodes on 127.0.0.1 with TLS (a CA from
`fedshop certs`) and SuperNode authentication (keys registered with `fedshop node register`),
each SuperNode pointing at its own data file through --node-config, driven by `flwr run`."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from common.data.catalog import Catalog
from common.data.partition import plan, select
from common.data.sequences import leave_last_out
from common.run_files import CARD, CLIENT_LEDGER, CLIENTS_CSV, SERVER_LEDGER
from privacy.ledger import Aggregation, Spend, entries
from privacy.verify import verify_paths
from server import checkpoint
from server.certs import make_certs
from server.node_registry import Registry
from simulations.cli import app
from simulations.simulate import APP_DIR, _alive, _processes, process_tree, stop_tree

pytestmark = pytest.mark.slow
PORT = 39291  # SuperLink's HTTP API (Fleet and Control); away from the local simulation's 39091
EXPIRED_PORT = PORT + 50  # a second SuperLink, serving an expired certificate
BIN = Path(sys.executable).parent


def _start(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(args, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _fedshop(*args: str, env: dict) -> None:
    """A `fedshop` command, in this process: a fresh one spends about 9 s importing."""
    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exit_code == 0, result.output


@dataclass
class Federation:
    """The platform's side of a test federation: its CA, keys, registry and Flower CLI home."""

    tmp: Path
    env: dict
    procs: list[subprocess.Popen]
    nodes: dict[str, subprocess.Popen] = field(default_factory=dict)  # SuperNodes by name

    @property
    def keys(self) -> Path:
        return self.tmp / "keys"

    @property
    def node_keys(self) -> Path:  # not with the ledger keys: those are compliance's keyring
        return self.tmp / "node-keys"

    @property
    def registry(self) -> Path:
        return self.tmp / "registry.json"

    def superlink(self, certs: Path | None = None, port: int = PORT) -> None:
        """Start a SuperLink serving `certs` (default: the platform's); wait for the platform's."""
        certs = certs or self.tmp / "certs"
        args = ["--ssl-ca-certfile", certs / "ca.crt", "--ssl-certfile", certs / "server.crt"]
        args += ["--ssl-keyfile", certs / "server.key", "--enable-supernode-auth"]
        args += ["--port", str(port), "--database", self.tmp / f"state-{port}.db"]
        args += ["--disable-runtime-dependency-installation"]
        self.procs.append(
            _start(
                [str(BIN / "flower-superlink"), *map(str, args)],
                self.tmp / f"superlink-{port}.log" if port != PORT else self.tmp / "superlink.log",
                self.env,
            )
        )
        if port != PORT:
            return
        # Registration goes through the Control API: it answers once the SuperLink is up.
        deadline = time.monotonic() + 60
        while self._flwr("supernode", "list").returncode != 0:
            assert time.monotonic() < deadline, (self.tmp / "superlink.log").read_text()[-2000:]
            time.sleep(1)

    def register(self, name: str, node: str | None = None) -> None:
        """Bind SuperNode `node`'s key (default: `name`'s) to client `name`."""
        _fedshop("node", "key", node or name, "--out", str(self.node_keys), env=self.env)
        _fedshop(
            "node", "register", name,
            "--node-key", str(self.node_keys / f"{node or name}.node.pub"),
            "--ledger-key", str(self.keys / f"{name}.pub"),
            "--registry", str(self.registry),
            env=self.env,
        )  # fmt: skip

    def supernode(
        self, name: str, node_config: str, ca: Path | None = None, link: int = PORT
    ) -> None:
        """Start SuperNode `name` with its authentication key, trusting `ca` (the platform's),
        dialing the SuperLink on port `link`."""
        port = PORT + 10 + len(self.procs)
        self.nodes[name] = _start(
            [
                str(BIN / "flower-supernode"),
                "--root-certificates",
                str(ca or self.tmp / "certs" / "ca.crt"),
                "--auth-supernode-private-key",
                str(self.node_keys / f"{name}.node"),
                "--superlink",
                f"127.0.0.1:{link}",
                "--port",
                str(port),
                "--node-config",
                node_config,
            ],
            self.tmp / f"node-{name}.log",
            self.env,
        )
        self.procs.append(self.nodes[name])

    def wait_online(self, count: int) -> None:
        """Until `count` SuperNodes are online: the strategy samples whoever is connected."""
        deadline = time.monotonic() + 120
        while True:
            listed = self._flwr("supernode", "list", "--format", "json").stdout
            nodes = json.loads(listed[listed.index("{") :])["nodes"] if "{" in listed else []
            if sum(n.get("status") == "online" for n in nodes) >= count:
                return
            assert time.monotonic() < deadline, listed
            time.sleep(1)

    def _flwr(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "flwr"), *args], env=self.env, capture_output=True, text=True
        )


@contextlib.contextmanager
def local_federation(tmp_path: Path) -> Iterator[Federation]:
    """The platform's CA and a Flower CLI home that trusts it; stops every process started."""
    home = tmp_path / "flwr-home"
    home.mkdir(parents=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "dep"\n\n'
        f'[superlink.dep]\naddress = "127.0.0.1:{PORT}"\n'
        f'root-certificates = "{tmp_path / "certs" / "ca.crt"}"\n'
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    _fedshop("certs", "--out", str(tmp_path / "certs"), env=env)
    fed = Federation(tmp_path, env, [])
    try:
        yield fed
    finally:
        pids = [p.pid for p in fed.procs]
        stop_tree(pids + _superexecs_of(pids))


@pytest.fixture
def federation(tmp_path):
    with local_federation(tmp_path) as fed:
        yield fed


def _superexecs_of(pids: list[int]) -> list[int]:
    """SuperExec processes our SuperNodes started: a refused SuperNode exits and leaves its
    SuperExec orphaned, naming its parent only on its command line (`--parent-pid`)."""
    marks = [f"--parent-pid\0{pid}\0" for pid in pids]
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if any(m in (proc / "cmdline").read_text() for m in marks):
                found.append(int(proc.name))
    return found


def _node_config(
    tmp_path: Path, node: str, data: str = "", claims: str = "", policy: str = ""
) -> str:
    """SuperNode `node`'s config: its own state and ledger key, reading `data`'s file (default:
    its own), reporting the name `claims` (default: its own), with more of its own `policy`."""
    return (
        f'data-path="{tmp_path / (data or node)}.parquet" client-name="{claims or node}" '
        f'state-dir="{tmp_path / ("state-" + node)}" catalog="{tmp_path / "catalog.json"}" '
        f'signing-key="{tmp_path / "keys" / node}.key" '
        f"privacy-delta=0.001 {policy}"  # the client's own policy; the server can only ask
    )


def _data(tmp_path: Path, events: pd.DataFrame, clients: int) -> list[str]:
    split = leave_last_out(events)
    Catalog.build(split[split["split"] == "train"], None).save(tmp_path / "catalog.json")
    names = []
    for part in plan(events, clients):
        select(events, part).to_parquet(tmp_path / f"{part.name}.parquet")
        names.append(part.name)
    return names


def regions(fed: Federation, events: pd.DataFrame, clients: int, policy: str = "") -> list[str]:
    """A SuperLink and `clients` registered SuperNodes, each on its own part of `events`."""
    names = _data(fed.tmp, events, clients)
    _fedshop("keys", *names, "server", "--out", str(fed.keys), env=fed.env)
    fed.superlink()
    for name in names:
        fed.register(name)
        fed.supernode(name, _node_config(fed.tmp, name, policy=policy))
    return names


def _run_command(fed: Federation, events: pd.DataFrame, settings: str) -> list[str]:
    run_config = (
        f"{settings} hidden=16 layers=1 max-len=12 batch-size=16 delta=0.001 "
        f'catalog="{fed.tmp / "catalog.json"}" demand-start="{events["timestamp"].min().date()}" '
        f'out="{fed.tmp / "out"}" server-key="{fed.keys / "server.key"}" '
        f'registry="{fed.registry}"'
    )
    return [str(BIN / "flwr"), "run", str(APP_DIR), "dep", "--stream", "--run-config", run_config]


def _run(fed: Federation, events: pd.DataFrame, settings: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        _run_command(fed, events, settings),
        env=fed.env,
        capture_output=True,
        text=True,
        timeout=400,
    )


def test_superlink_and_supernodes_train_on_their_own_files(federation, tmp_path, tiny_events):
    """FedAdam (server optimizer state) under SecAgg+, which the clients' policies require, so
    a plain round would be refused. FedProx without SecAgg+ runs in the fault test below;
    FedAvg under SecAgg+ in test_federated's simulation (the same ClientApp and ServerApp).
    One round: a SecAgg+ round is five messages per node, each a fresh ClientApp process
    (about 200 s a round while the rest of the suite runs); spending that accumulates over
    rounds, under SecAgg+, is the simulation test's."""
    strategy = "fedadam"
    policy = "privacy-require-secure-aggregation=true"
    names = regions(federation, tiny_events, 3, policy)
    settings = f"strategy={strategy!r} num-server-rounds=1 min-clients=3 secagg=true"
    result = _run(federation, tiny_events, settings)
    out = tmp_path / "out"
    assert (out / "model_card.json").exists(), result.stdout[-3000:] + result.stderr[-2000:]
    assert (out / "model_card.json").read_text().count(f'"strategy": "{strategy}"') == 2
    rows = pd.read_csv(out / "clients.csv")
    assert sorted(rows["client"].unique()) == sorted(names)
    assert (rows["status"] == "trained").all() and len(rows) == 3
    registry = Registry.load(federation.registry)  # each name came from its registered node
    assert all(registry.node_of(r.client) == r.node for r in rows.itertuples())
    ledgers = [tmp_path / f"state-{name}" / CLIENT_LEDGER for name in names]  # beside its data
    for name, ledger in zip(names, ledgers, strict=True):
        spends = entries(ledger, Spend)
        assert [(s.server_round, s.status) for s in spends] == [
            (1, "trained"),
            (1, "evaluated"),
        ]
        last = rows[rows["client"] == name]["epsilon"].item()
        assert spends[-2].epsilon_after == pytest.approx(last)
        assert spends[0].delta == 0.001
    # Compliance checks them against the public keys it was given, not the ones beside them.
    reports = verify_paths([*ledgers, out / SERVER_LEDGER], federation.keys)
    assert all(r.ok for r in reports), [r.first_problem() for r in reports if not r.ok]
    assert all(r.key_source == "pinned" for r in reports)
    records = entries(out / SERVER_LEDGER, Aggregation)
    assert [r.step for r in records] == ["train", "evaluate"]
    protocols = [rec.secure_aggregation for rec in records if rec.step == "train"]
    assert [p["protocol"] for p in protocols] == ["secagg+"]
    assert all(p["clients"] == 3 and p["dropped"] == [] for p in protocols)


def test_only_registered_nodes_behind_the_platforms_ca_take_part(federation, tmp_path, tiny_events):
    real, other = _data(tmp_path, tiny_events, 2)
    keys = federation.keys
    _fedshop("keys", real, other, "impostor", "server", "--out", str(keys), env=federation.env)
    _fedshop("certs", "--out", str(tmp_path / "other-ca"), env=federation.env)
    federation.superlink()
    for name in (real, other):
        federation.register(name)
        federation.supernode(name, _node_config(tmp_path, name))
    # Registered as itself, but reports the name of `real`, with its own ledger and data.
    federation.register("impostor")
    federation.supernode("impostor", _node_config(tmp_path, "impostor", other, claims=real))
    # A key the platform never registered, and a node that trusts another CA.
    _fedshop(
        "node",
        "key",
        "stranger",
        "misled",
        "late",
        "--out",
        str(federation.node_keys),
        env=federation.env,
    )
    federation.supernode("stranger", _node_config(tmp_path, "stranger", other))
    misled = _node_config(tmp_path, "misled", other)
    federation.supernode("misled", misled, ca=tmp_path / "other-ca" / "ca.crt")
    # A SuperLink whose certificate expired yesterday, and a node that trusts its CA.
    expired = tmp_path / "expired-ca"
    make_certs(expired, days=1, start=datetime.now(UTC) - timedelta(days=2))
    federation.superlink(expired, port=EXPIRED_PORT)
    late = _node_config(tmp_path, "late", other)
    federation.supernode("late", late, ca=expired / "ca.crt", link=EXPIRED_PORT)
    federation.wait_online(3)
    result = _run(federation, tiny_events, "num-server-rounds=1 min-clients=2")
    out = tmp_path / "out"
    assert (out / "model_card.json").exists(), result.stdout[-3000:] + result.stderr[-2000:]
    registry = Registry.load(federation.registry)
    rows = pd.read_csv(out / "clients.csv")
    seen = sorted(zip(rows["client"], rows["node"], rows["status"], strict=True))
    assert seen == sorted(
        [
            (real, registry.node_of(real), "trained"),
            (other, registry.node_of(other), "trained"),
            (real, registry.node_of("impostor"), "rejected"),
        ]
    )
    why = rows[rows["status"] == "rejected"]["error"].item()
    assert f"belongs to node {registry.node_of(real)}" in why
    # The impostor's entry never reaches the server's record: the head it holds for `real` is
    # real's own newest entry.
    used = entries(out / SERVER_LEDGER, Aggregation)[0].clients
    assert sorted(c.client for c in used) == sorted([real, other])
    head = entries(tmp_path / f"state-{real}" / CLIENT_LEDGER, Spend)[0]
    assert [c.seq for c in used if c.client == real] == [head.seq]
    # Both are refused before they can ask for work, and their logs say why.
    stranger = (tmp_path / "node-stranger.log").read_text()
    assert "Failed to activate SuperNode" in stranger, stranger[-2000:]
    link = (tmp_path / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in link, link[-2000:]
    misled_log = (tmp_path / "node-misled.log").read_text()
    assert "CERTIFICATE_VERIFY_FAILED" in misled_log, misled_log[-2000:]
    late_log = (tmp_path / "node-late.log").read_text()
    assert "certificate has expired" in late_log.lower(), late_log[-2000:]


def _below(root: int, program: str) -> list[int]:
    """Live processes below `root` running `program` (a SuperNode's ClientApps, a SuperLink's
    ServerApps)."""
    table = _processes()
    below = process_tree([root], table)[1:]
    return [pid for pid in below if program in table[pid][1] and _alive(pid)]


def _kill(pids: list[int]) -> None:
    """SIGKILL: a crash, no exit handler runs."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _until(what: Callable[[], object], why: str, timeout_s: float = 300) -> object:
    deadline = time.monotonic() + timeout_s
    while not (found := what()):
        assert time.monotonic() < deadline, f"gave up waiting for {why}"
        time.sleep(0.2)
    return found


def _spends(fed: Federation, name: str) -> list[int]:
    """The rounds client `name` spent privacy training for, from its own ledger."""
    ledger = fed.tmp / f"state-{name}" / CLIENT_LEDGER
    if not ledger.exists():
        return []
    return [s.server_round for s in entries(ledger, Spend) if s.status == "trained"]


def _aggregated(out: Path) -> list[int]:
    """The rounds the server's ledger records as aggregated, in order."""
    ledger = out / SERVER_LEDGER
    if not ledger.exists():
        return []
    return [r.server_round for r in entries(ledger, Aggregation) if r.step == "train"]


def _saved_round(out: Path) -> int:
    saved = checkpoint.load(out)
    return saved.server_round if saved else 0


def test_a_killed_supernode_a_hung_client_and_a_killed_serverapp_lose_nothing(
    federation, tmp_path, tiny_events
):
    """Faults on real processes, one after another in a FedProx run of 3 rounds:
    1. SuperNode `c` is killed (SIGKILL, with its ClientApp) while it trains round 1: the
       SuperLink answers for it once its heartbeats stop (Flower's "Node Unavailable");
    2. the ServerApp is killed after round 1's checkpoint; a new `flwr run` resumes;
    3. the resumed ServerApp is killed right after it aggregated round 2 and recorded that in
       its ledger, before the round's checkpoint (the clients are evaluating); the next
       `flwr run` resumes from round 1's checkpoint again and ends after round 2;
    4. `b` hangs (its SuperNode and everything below it stopped with SIGSTOP) as the last run
       sends round 3, and stays hung past the round timeout (30 s; Flower would only declare
       it unavailable 34 to 60 s after its last heartbeat). A ClientApp stopped alone is not
       a hung node to Flower: a task whose process stops before it starts is started again,
       one that stops while running fails with "No heartbeat received from the task"
       (flwr.supercore.corestate, `_cleanup_expired_task_tokens_locked`).
    The run completes, the checkpoints read back intact, each fault is named in clients.csv,
    every ledger verifies, and each client spent once per update it made: a round recomputed
    after a crash is a new spend, never dropped, never a copy."""
    a, b, c = regions(federation, tiny_events, 3)
    federation.wait_online(3)
    out, link = tmp_path / "out", federation.procs[0].pid
    # A recomputed round spends again: budgets planned for 5 rounds leave room for it.
    settings = "strategy='fedprox' planned-rounds=5 min-clients=1"

    def launch(rounds: int = 3, extra: str = "") -> subprocess.Popen:
        runs = len(list(tmp_path.glob("run-*.log")))
        return _start(
            _run_command(federation, tiny_events, f"{settings} num-server-rounds={rounds} {extra}"),
            tmp_path / f"run-{runs + 1}.log",
            federation.env,
        )

    def kill_serverapp(run: subprocess.Popen) -> None:
        _kill([*_below(link, "flwr-serverapp"), run.pid])

    def clientapps(name: str) -> set[int]:
        return set(_below(federation.nodes[name].pid, "flwr-clientapp"))

    run = launch()
    _until(lambda: clientapps(c), "c's round-1 ClientApp")
    _kill([federation.nodes[c].pid, *_below(federation.nodes[c].pid, "")])
    _until(lambda: _saved_round(out) == 1, "round 1's checkpoint")
    kill_serverapp(run)

    run = launch()
    _until(lambda: 2 in _aggregated(out), "round 2's aggregate")
    kill_serverapp(run)
    assert _saved_round(out) == 1  # the last checkpoint, intact

    assert launch(rounds=2).wait(timeout=400) == 0
    assert _saved_round(out) == 2

    run = launch(extra="round-timeout=30")
    _until(lambda: "[ROUND 3/3]" in (tmp_path / "run-4.log").read_text(), "round 3")
    for pid in [federation.nodes[b].pid, *_below(federation.nodes[b].pid, "")]:
        os.kill(pid, signal.SIGSTOP)
    assert run.wait(timeout=400) == 0, (tmp_path / "run-4.log").read_text()[-3000:]

    card = json.loads((out / CARD).read_text())
    assert card["outcome"] == "completed" and card["rounds_completed"] == 3
    assert _saved_round(out) == 3
    rows = pd.read_csv(out / CLIENTS_CSV)
    failed = rows[rows["status"] == "failed"]
    registry = Registry.load(federation.registry)
    assert sorted(zip(failed["round"], failed["node"], strict=True)) == [
        (1, registry.node_of(c)),
        (3, registry.node_of(b)),
    ]
    assert "Node Unavailable" in failed[failed["round"] == 1]["error"].item()
    assert "round-timeout (30 s)" in failed[failed["round"] == 3]["error"].item()
    assert set(rows[rows["status"] == "trained"]["client"]) == {a, b}
    # Round 2 was aggregated twice (the killed run's and the recomputed one), each from
    # updates spent once; a killed run's instructions sent just before the kill may still be
    # carried out and spent (the update left), never dropped. b's hung round 3 never finished
    # and c died before its first update: neither spent.
    assert _aggregated(out) == [1, 2, 2, 3]
    assert all(r.secure_aggregation is None for r in entries(out / SERVER_LEDGER, Aggregation))
    for name, last in ((a, 3), (b, 2)):
        spent = _spends(federation, name)
        assert spent == sorted(spent) and spent[-1] == last, spent
        assert spent.count(1) == 1 and spent.count(2) in (2, 3), spent
    assert _spends(federation, c) == []
    ledgers = [tmp_path / f"state-{n}" / CLIENT_LEDGER for n in (a, b, c)]
    kept = [p for p in ledgers if p.exists()]
    reports = verify_paths([*kept, out / SERVER_LEDGER], federation.keys)
    assert all(r.ok for r in reports), [r.first_problem() for r in reports if not r.ok]
