"""Memory a local simulation holds: every process of its federation (the SuperLink, the
ServerApp, the simulation engine, Ray's own processes and its workers) runs below the run's
local SuperLink, so their resident sets summed is what the run costs the machine. Shared pages
count once per process, so the sum is an upper bound."""

from __future__ import annotations

from pathlib import Path

from common.run_files import FLOWER_HOME
from simulations.simulate import _processes, process_tree

KIB = 1024


def federation_rss(out: Path) -> int:
    """Bytes resident in the processes of the simulation whose run folder is `out`."""
    table = _processes()
    marker = str(out / FLOWER_HOME)
    roots = [p for p, (_, cmd) in table.items() if "flower-superlink" in cmd and marker in cmd]
    return sum(_rss(pid) for pid in process_tree(roots, table))


def _rss(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # gone meanwhile
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * KIB
    return 0


class PeakMemory:
    """Pass `sample` as `simulate`'s `on_poll`: `peak` is then the most the run held at once
    (sampled at every poll)."""

    def __init__(self, out: Path) -> None:
        self.out, self.peak = out, 0

    def sample(self, _history: list[dict] | None = None) -> None:
        self.peak = max(self.peak, federation_rss(self.out))
