"""`simulate(..., ray_address=...)`: the ClientApps run as actors on a Ray cluster that was
started outside the run (here a head on this machine, as `ray start --head` on a cluster's first
node would be), not on a Ray of the run's own."""

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from common.runconfig import RunConfig
from simulations.simulate import simulate, stop_tree


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


@pytest.mark.slow
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
