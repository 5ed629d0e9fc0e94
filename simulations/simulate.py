"""Local multi-region simulation through Flower's own runtime (`flwr run` on a local SuperLink).

A run gets its own FLWR_HOME inside the output folder, so the connection config, the local
SuperLink's state and its log stay with the run and nothing touches ~/.flwr.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.run_files import (
    CARD,
    CLIENTS,
    FLOWER_HOME,
    FLOWER_LOG,
    POLICY,
    PRIVACY_REPORT_HTML,
    ROUNDS,
)
from common.runconfig import RunConfig
from privacy import report as privacy_report
from privacy.policy import PrivacyPolicy

APP_DIR = Path(__file__).resolve().parents[1]
CONNECTION = "local"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def run_config_arg(cfg: RunConfig) -> str:
    return " ".join(f"{k}={_toml_value(v)}" for k, v in cfg.to_flower().items())


def write_flower_home(home: Path) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = ":local:"\n'
    )


def federation_config_arg(clients: int, cpus_per_client: int) -> str:
    return (
        f"num-supernodes={clients} client-resources-num-cpus={cpus_per_client} "
        "client-resources-num-gpus=0.0"
    )


def ray_env(address: str | None) -> dict[str, str]:
    """Which Ray cluster the simulation's ClientApps run on, as environment for `flwr run`.

    Flower's federation config has no key for it: its `init-args-*` keys reach `ray.init` only
    as num_cpus, num_gpus, logging_level and log_to_driver (flwr.simulation.app's
    `_run_simulation_settings`), and Ray refuses the first two when it attaches. The Ray backend
    (flwr.server.superlink.fleet.vce.backend.raybackend, `RayBackend.init_ray`) calls
    `ray.init()` without an address, so Ray looks for one itself: first in RAY_ADDRESS, which
    the local SuperLink and the simulation process it starts inherit from `flwr run`. Without
    an address, "local": a Ray of the run's own, even where `ray start` left a cluster on this
    machine that a bare `ray.init()` would join.

    An address nothing answers at is refused here: `ray.init` would wait for it without end.
    """
    if address is None:
        return {"RAY_ADDRESS": "local"}
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except (ValueError, OSError) as exc:
        raise RuntimeError(
            f"no Ray cluster answers at {address!r} ({exc}): give the HOST:PORT that "
            "`ray start --head` printed, of a cluster this machine is a node of"
        ) from exc
    return {"RAY_ADDRESS": address}


def _processes() -> dict[int, tuple[int, str]]:
    """pid → (parent pid, command line) for every process we may inspect."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        table[int(entry.name)] = (ppid, cmdline)
    return table


def process_tree(roots: list[int], table: dict[int, tuple[int, str]] | None = None) -> list[int]:
    """`roots` and every process below them, each after its parent (`table`: `_processes()`)."""
    table = _processes() if table is None else table
    tree: list[int] = []
    frontier = list(roots)
    while frontier:
        pid = frontier.pop()
        tree.append(pid)
        frontier.extend(child for child, (ppid, _) in table.items() if ppid == pid)
    return tree


def stop_tree(roots: list[int]) -> list[int]:
    """Stop processes and everything below them, children first (SIGTERM, then SIGKILL)."""
    doomed = process_tree(roots)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in reversed(doomed):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(pid) for pid in doomed):
            time.sleep(0.2)
        if not any(_alive(pid) for pid in doomed):
            break
    return doomed


def stop_local_superlink(home: Path) -> list[int]:
    """`flwr run` leaves a detached SuperLink running (with SuperExec, the simulation and its
    Ray workers below it); stop this run's."""
    marker = str(home / "local-superlink")
    return stop_tree(
        [
            pid
            for pid, (_, cmd) in _processes().items()
            if "flower-superlink" in cmd and marker in cmd
        ]
    )


def _alive(pid: int) -> bool:
    """Running and not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@dataclass
class SimulationResult:
    ok: bool
    summary: dict
    log: Path
    privacy_report: dict | None = None  # the verified report's facts (DP runs)
    privacy_report_path: Path | None = None


def simulate(
    cfg: RunConfig,
    clients: int,
    on_poll: Callable[[list[dict]], None] | None = None,
    poll_s: float = 1.0,
    cpus_per_client: int = 1,
    ray_address: str | None = None,
) -> SimulationResult:
    """Run the federation to the end; `on_poll(history)` sees the rounds as they finish.

    `ray_address` (host:port of a running cluster's head) runs the ClientApps as actors on that
    cluster; by default Flower starts a Ray of its own on this machine. See docs/ray-cluster.md.
    """
    ray = ray_env(ray_address)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    home = out / FLOWER_HOME
    other = [
        pid
        for pid, (_, cmd) in _processes().items()
        if "flower-superlink" in cmd
        and "--simulation" in cmd
        and str(home) not in cmd
        and _alive(pid)
    ]
    if other:
        # `flwr run` would submit to that local SuperLink (same port) with its own state; a
        # deployment SuperLink on its own port is no obstacle.
        raise RuntimeError(
            f"another local Flower SuperLink is running (pid {other[0]}); stop it first"
        )
    write_flower_home(home)
    simulated_policy(cfg).write(out / CLIENTS / POLICY)
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        # Offline: a SuperLink would otherwise try to install the app's dependencies per run.
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        **ray,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log_path = out / FLOWER_LOG
    started = time.time()
    command = [
        str(Path(sys.executable).parent / "flwr"),
        "run",
        str(APP_DIR),
        CONNECTION,
        "--stream",
        "--run-config",
        run_config_arg(cfg),
        "--federation-config",
        federation_config_arg(clients, cpus_per_client),
    ]
    proc = None
    try:
        with open(log_path, "w") as log:
            proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
            while proc.poll() is None:
                time.sleep(poll_s)
                if on_poll:
                    on_poll(_rounds(out))
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
        stop_local_superlink(home)
    if on_poll:
        on_poll(_rounds(out))
    summary_path = out / CARD
    # `flwr run` can exit 0 although the run failed: judge by what the ServerApp wrote.
    ok = summary_path.exists() and summary_path.stat().st_mtime >= started
    summary = json.loads(summary_path.read_text()) if ok else {}
    result = SimulationResult(ok, summary, log_path)
    if ok and cfg.dp:  # every DP run ends with its ledgers verified and the compliance report
        result.privacy_report = privacy_report.write(out)
        result.privacy_report_path = out / PRIVACY_REPORT_HTML
    return result


def simulated_policy(cfg: RunConfig) -> PrivacyPolicy:
    """What the simulated clients allow: whoever runs a simulation owns every client, so their
    policy is the run's settings. They share demand error sums (not covered by ε, and the
    report says so) because an engineer trying models needs the federated WAPE."""
    return PrivacyPolicy(
        require_dp=cfg.dp,
        epsilon=cfg.epsilon,
        delta=cfg.delta,
        accountant=cfg.accountant,
        share_demand_evaluation=True,
    )


def _rounds(out: Path) -> list[dict]:
    try:
        return json.loads((out / ROUNDS).read_text())
    except (OSError, ValueError):
        return []
