"""Real Flower simulations (local SuperLink, simulation engine, Ray) with 3 clients on tiny data."""

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from common.run_files import AUDIT, CARD, CLIENT_LEDGER, PRIVACY_REPORT_JSON, RESULTS
from common.runconfig import RunConfig
from privacy import report as privacy_report
from privacy.accounting import Budget, restore
from privacy.ledger import Spend, entries
from privacy.report import find_ledgers
from privacy.verify import verify_paths
from server import checkpoint
from simulations.cli import app
from simulations.resources import PeakMemory
from simulations.simulate import _alive, _processes, simulate, stop_tree
from tests.conftest import TINY

pytestmark = pytest.mark.slow
CLIENTS = 3
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory, tiny_events) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny.parquet"
    tiny_events.to_parquet(path)
    assert tiny_events["region"].nunique() == TINY.regions == CLIENTS
    return path


def _cfg(data: Path, out: Path, **overrides) -> RunConfig:
    base = dict(
        data=str(data),
        out=str(out),
        num_server_rounds=2,
        hidden=16,
        layers=1,
        heads=2,
        max_len=12,
        batch_size=16,
        delta=1e-3,
        epsilon=8.0,
    )
    return RunConfig(**(base | overrides))


def _states(out: Path):
    """Each client's privacy state, rebuilt from its ledger alone."""
    states = {}
    for path in (out / "clients").glob(f"*/{CLIENT_LEDGER}"):
        spends = entries(path, Spend)
        budget = Budget.of_entry(spends[-1])
        states[path.parent.name] = restore(path.parent.name, budget, spends)
    return states


def _verified(out: Path) -> list:
    reports = verify_paths(find_ledgers(out))
    assert [r.kind for r in reports].count("client") == CLIENTS
    assert all(r.ok for r in reports), [r.first_problem() for r in reports if not r.ok]
    return reports


def _no_superlink_left(out: Path) -> bool:
    marker = str(out / ".flwr")
    return not [
        pid
        for pid, (_, cmd) in _processes().items()
        if "flower-super" in cmd and marker in cmd and _alive(pid)
    ]


def _cli(cfg: RunConfig) -> list[str]:
    """`fedshop simulate` options for `cfg`: every run-config key is an option."""
    changed = cfg.model_dump(exclude_defaults=True)
    flag = {True: "--{}", False: "--no-{}"}
    return [
        flag[v].format(k.replace("_", "-"))
        if isinstance(v, bool)
        else f"--{k.replace('_', '-')}={v}"
        for k, v in changed.items()
    ]


def test_epsilon_grows_then_a_client_at_its_budget_declines(tiny_file, tmp_path):
    """Under SecAgg+, so that declines, failures and the ledgers are checked through it too."""
    out = tmp_path / "run"
    cfg = _cfg(tiny_file, out, audit_holdout=0.2, secagg=True)
    first = runner.invoke(app, ["simulate", *_cli(cfg)])
    assert first.exit_code == 0, first.output
    card = json.loads((out / CARD).read_text())
    assert card["outcome"] == "completed"
    assert "internally consistent, keys not pinned" in " ".join(first.output.split())
    rows = pd.read_csv(out / "clients.csv")
    assert sorted(rows["client"].unique()) == ["region-01", "region-02", "region-03"]
    for _, per_client in rows.groupby("client"):
        eps = per_client.sort_values("round")["epsilon"].tolist()
        assert len(eps) == 2 and 0 < eps[0] < eps[1] <= 8.0
    states = _states(out)
    assert len(states) == CLIENTS
    for name, state in states.items():
        reported = rows[(rows["client"] == name) & (rows["round"] == 2)]["epsilon"].item()
        assert [r.status for r in state.rounds] == ["trained", "evaluated"] * 2
        assert state.rounds[2].epsilon_after == pytest.approx(reported, rel=1e-9)
        assert state.epsilon() == pytest.approx(state.rounds[3].epsilon_after)  # Opacus' replay
    for name in (
        "model.safetensors",
        "model_card.json",
        "checkpoint.safetensors",
        "plots/epsilon.png",
        "plots/metrics.png",
        "metrics.csv",
    ):
        assert (out / name).stat().st_size > 0
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["num-examples"].iloc[-1] > 0 and 0 <= metrics["hr10"].iloc[-1] <= 1
    # the final model exactly, beside the strongest rules on the same users
    exact = json.loads((out / RESULTS).read_text())
    assert 0 <= exact["bert"]["test"]["full"]["hr@10"] <= 1
    assert {"repeat_aware", "transition_aware"} <= set(exact["baselines"]["recommendation"])
    own_rules = exact["baselines"]["recommendation_own_region"]
    assert own_rules["transition_aware"]["users"] == exact["bert"]["served"]["users"]
    regions = set(pd.read_parquet(tiny_file)["region"])
    assert {c["client"] for c in exact["bert"]["clients"]} == regions
    assert "transition aware, own region's" in " ".join(first.output.split())
    assert "(served)" in first.output and "exact results in" in first.output
    # demand as the clients forecast it: each calibrates on its own series, as in the rounds
    wape = exact["bert"]["forecast"]["corrected"]["wape"]
    assert wape == pytest.approx(metrics["wape"].iloc[-1], rel=1e-6)
    assert _no_superlink_left(out)
    _verified(out)
    audited = runner.invoke(app, ["privacy", "audit", str(out)])
    assert audited.exit_code == 0, audited.output
    attack = json.loads((out / AUDIT).read_text())["runs"][0]
    assert attack["non_members"] > 0  # held out of training, yet still evaluated
    # members: the users of the clients that trained; the clients released their count with
    # noise of σ = 10 each (the FedAvg weight), so the sum lies within a few σ of it
    assert abs(attack["members"] - rows[rows["round"] == 1]["num-examples"].sum()) < 100
    assert 0 <= attack["attacks"]["loss"]["auc"] <= 1 and attack["epsilon"] <= 8.0
    reported = runner.invoke(app, ["privacy", "report", str(out)])
    assert reported.exit_code == 0, reported.output
    written = json.loads((out / PRIVACY_REPORT_JSON).read_text())
    assert written["verified"] and written["audit"]["runs"][0]["attacks"] == attack["attacks"]
    assert [r["secure_aggregation"]["protocol"] for r in written["secure_aggregation"]] == [
        "secagg+"
    ] * 2
    assert "masked vectors" in (out / "privacy_report.html").read_text()

    # Budgets were planned for 2 rounds: a third round must be declined, spending nothing.
    # One client lost its ledger meanwhile: it must refuse to train rather than start from ε = 0.
    before = {name: s.epsilon() for name, s in states.items()}
    lost = out / "clients" / "region-01" / CLIENT_LEDGER
    backup = lost.rename(lost.with_suffix(".bak"))
    third = simulate(cfg.model_copy(update={"num_server_rounds": 3}), CLIENTS)
    assert third.ok, third.log.read_text()[-3000:]
    assert third.summary["outcome"].startswith(
        "round 3: only 0 client(s) trained (2 declined, 0 refused, 1 failed"
    )
    assert third.summary["rounds_completed"] == 2
    rows = pd.read_csv(out / "clients.csv")
    third_rows = rows[rows["round"] == 3]
    assert sorted(third_rows["status"]) == ["declined", "declined", "failed"]
    assert "restore the ledger" in third_rows[third_rows["status"] == "failed"]["error"].item()
    assert not lost.exists()
    backup.rename(lost)
    for name, state in _states(out).items():
        assert state.epsilon() == pytest.approx(before[name])
        if name != "region-01":
            assert state.rounds[-1].status == "declined" and state.rounds[-1].steps == 0
            assert third.summary["privacy"]["clients"][name]["declined_rounds"] == [3]
    server = next(r for r in _verified(out) if r.kind == "server")
    steps = [(rec.server_round, rec.step) for rec in server.records]
    assert steps == [(1, "train"), (1, "evaluate"), (2, "train"), (2, "evaluate"), (3, "train")]
    assert {u.status for u in server.records[-1].clients} == {"declined"}
    assert {u.status for u in server.records[1].clients} == {"evaluated"}
    trained = [r for r in server.records if r.step == "train"]
    assert all(r.secure_aggregation["protocol"] == "secagg+" for r in trained)


class Interrupt(Exception):
    pass


def test_resume_after_an_interrupted_run_continues_from_the_checkpoint(tiny_file, tmp_path):
    out = tmp_path / "run"
    # with client-level DP on the server too: its accountant must survive the restart
    cfg = _cfg(tiny_file, out, planned_rounds=4, central_dp="fixed", central_noise=0.8)

    def crash_after_round_one(history: list[dict]) -> None:
        if any(r["round"] == 1 and "evaluate" in r for r in history):
            raise Interrupt

    with pytest.raises(Interrupt):
        simulate(cfg, CLIENTS, crash_after_round_one, poll_s=0.1)
    assert _no_superlink_left(out)
    saved = checkpoint.load(out)
    assert saved is not None and saved.server_round == 1
    assert not (out / "model_card.json").exists()

    resumed = simulate(cfg, CLIENTS)
    assert resumed.ok, resumed.log.read_text()[-3000:]
    assert "resuming from" in resumed.log.read_text()
    assert resumed.summary["rounds_completed"] == 2
    rounds = pd.read_csv(out / "metrics.csv")["round"].tolist()
    assert rounds == [1, 2]
    for state in _states(out).values():
        trained = [r.server_round for r in state.rounds if r.status == "trained"]
        # Round 1 counted once; round 2 once, or twice if the crash hit while it trained —
        # a recomputed round is a new spend and is never dropped.
        assert trained.count(1) == 1 and trained.count(2) in (1, 2)
        assert state.epsilon() == pytest.approx(state.rounds[-1].epsilon_after)
    # Every update the server aggregated is in its client's ledger, and each ledger holds.
    reports = _verified(out)
    server = next(r for r in reports if r.kind == "server")
    assert [(rec.server_round, rec.step) for rec in server.records][-2:] == [
        (2, "train"),
        (2, "evaluate"),
    ]
    expected = {"train": "used", "evaluate": "evaluated"}
    assert all(u.status == expected[rec.step] for rec in server.records for u in rec.clients)
    central = resumed.summary["privacy"]["central_dp"]
    assert central["wrapper"] == "DifferentialPrivacyServerSideFixedClipping"
    assert central["releases"] == 2 and central["clients"] == CLIENTS  # round 1 kept, counted once
    assert 0 < server.records[0].central_dp["epsilon"] < central["epsilon"]
    html = privacy_report.write(out) and (out / "privacy_report.html").read_text()
    assert f"Client-level ε = <b>{central['epsilon']:.4f}</b>" in html


def test_a_hundred_clients_for_five_rounds_a_tenth_asked_each_round(tmp_path):
    """Load: 100 simulated clients on synthetic data (20 users each), 5 DP rounds, a tenth of
    the clients asked to train and another tenth to evaluate each round. Memory stays bounded:
    Ray runs one worker per core whatever the number of clients (`benchmarks/load.py` measures
    10, 30 and 100 clients in full)."""
    out = tmp_path / "run"
    cfg = RunConfig(
        out=str(out), num_server_rounds=5, fraction_train=0.1, fraction_evaluate=0.1,
        synth_users=2_000, synth_events=40_000, synth_items=300, hidden=16, layers=1, heads=2,
        max_len=12, batch_size=8, delta=1e-3, accountant="rdp",
    )  # fmt: skip
    memory = PeakMemory(out)
    result = simulate(cfg, 100, memory.sample, poll_s=0.5)
    assert result.ok, result.log.read_text()[-3000:]
    assert result.summary["rounds_completed"] == 5
    rows = pd.read_csv(out / "clients.csv")
    assert rows.groupby("round").size().tolist() == [10] * 5  # Flower sampled 10 of 100
    assert (rows["status"] == "trained").all() and rows["client"].nunique() > 10
    assert 0 < memory.peak < 6 * 2**30, f"{memory.peak / 2**30:.2f} GiB"
    reports = verify_paths(find_ledgers(out))  # the clients asked to train or to evaluate
    assert [r.kind for r in reports].count("client") >= rows["client"].nunique()
    assert all(r.ok for r in reports), [r.first_problem() for r in reports if not r.ok]


# A Ray cluster started outside the run: `simulate(..., ray_address=...)` runs the ClientApps as
# actors on it (here a head on this machine, as `ray start --head` on a cluster's first node
# would be), not on a Ray of the run's own. In this file, not its own: like every simulation
# here it uses the local SuperLink's ports, so it must not run beside them.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """A Ray head with 2 CPUs on a free port, its address and its temp dir; stopped by its own
    process tree afterwards (`ray stop` would stop every Ray of this user on the machine)."""
    port = _free_port()
    # Short, and the head's own: Ray's socket paths must fit in 107 characters, and a head on
    # the default /tmp/ray would become the cluster a bare `ray.init()` on this machine joins.
    temp = Path(tempfile.mkdtemp(prefix="fsray-", dir="/tmp"))
    head = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--block",
            "--num-cpus=2",
            f"--port={port}",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while not (temp / "session_latest" / "sockets" / "raylet").exists():
            assert head.poll() is None and time.time() < deadline, "the Ray head did not start"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", temp / "session_latest" / "logs"
    finally:
        stop_tree([head.pid])
        head.wait()
        shutil.rmtree(temp, ignore_errors=True)


def test_clients_run_as_actors_on_the_given_cluster(tmp_path, tiny_events, ray_head):
    address, logs = ray_head
    data = tmp_path / "tiny.parquet"
    tiny_events.to_parquet(data)
    cfg = RunConfig(
        data=str(data), out=str(tmp_path / "run"), num_server_rounds=1, hidden=16, layers=1,
        heads=2, max_len=12, batch_size=16, delta=1e-3,
    )  # fmt: skip
    result = simulate(cfg, 3, ray_address=address)
    assert result.ok, result.log.read_text()[-3000:]
    assert result.summary["outcome"] == "completed"
    # The head's own logs: Flower's simulation process joined this cluster as a driver, and
    # the ClientApp actors were workers of this head's raylet (Ray opens each actor's log with
    # its class name). A Ray of the run's own would have logged under /tmp/ray instead.
    assert list(logs.glob("python-core-driver-*.log"))
    actors = [p for p in logs.glob("worker-*.out") if ":actor_name:ClientAppActor" in p.read_text()]
    assert actors, sorted(p.name for p in logs.iterdir())
    assert result.privacy_report and result.privacy_report["verified"]


def test_an_address_nothing_answers_at_is_refused_before_flower_starts(tmp_path):
    cfg = RunConfig(out=str(tmp_path / "run"))
    with pytest.raises(RuntimeError, match="no Ray cluster answers at"):
        simulate(cfg, 3, ray_address=f"127.0.0.1:{_free_port()}")
    assert not (tmp_path / "run").exists()
