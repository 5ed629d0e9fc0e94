"""Real ledgers for tests: planned with Opacus, signed with fresh keys."""

from __future__ import annotations

from pathlib import Path

from common.run_files import CLIENT_LEDGER, SERVER_LEDGER
from privacy.accounting import (
    Budget,
    Mechanism,
    PrivacyState,
    plan_mechanism,
    release_steps,
    restore,
    spend_fields,
)
from privacy.ledger import Aggregation, Line, Release, Spend, append, entries, read_lines
from privacy.signing import create_pair, load_or_create

BUDGET = Budget(epsilon=3.0, delta=1e-5)
COUNT = Release(what="user-count", noise_multiplier=5.0, sensitivity=1.0)
EVALUATION = Release(what="evaluation", noise_multiplier=50.0, sensitivity=3**0.5)


def _planned(rounds: int) -> Mechanism:
    """The factory's clients' mechanism: q 0.05, 20 steps a round, the count released once."""
    return plan_mechanism(
        BUDGET, 0.05, 20, rounds=rounds, clip_norm=1.0, noisy_users=400,
        spent=release_steps([COUNT]),
    )  # fmt: skip


def write_client(folder: Path, keys: Path, name: str = "north", rounds: int = 3) -> Path:
    """A real ledger: planned for 2 rounds, so round 3 is declined; the first round also
    releases the user count, as a client does."""
    key = create_pair(keys / f"{name}.key", overwrite=True)
    state = PrivacyState(client=name, budget=BUDGET)
    state.mechanism = _planned(rounds=2)
    path = folder / name / CLIENT_LEDGER
    for rnd in range(1, rounds + 1):
        ok, _ = state.affordable()
        spend = state.record(
            rnd,
            state.round_steps() if ok else [],
            "trained" if ok else "declined",
            [COUNT] if rnd == 1 else [],
        )
        append(path, spend_fields(state, spend, run_id=7), key, Spend)
    return path


def write_server(folder: Path, keys: Path, client_ledgers: list[Path]) -> Path:
    key = create_pair(keys / "server.key", overwrite=True)
    path = folder / SERVER_LEDGER
    spends = {p: entries(p, Spend) for p in client_ledgers}
    for rnd in (1, 2, 3):
        used = []
        for p, rows in spends.items():
            line = read_lines(p)[rnd - 1]
            status = "used" if rows[rnd - 1].status == "trained" else "declined"
            used.append(
                {"client": rows[0].client, "status": status, "seq": rnd - 1, "hash": line.hash}
            )
        fields = {"run_id": "7", "server_round": rnd, "strategy": "fedavg", "clients": used}
        append(path, fields, key, Aggregation)
    return path


def spend(
    folder: Path, keys: Path, name: str, server_round: int, run_id: str = "7", evaluated=False
) -> Line:
    """One trained round more in `name`'s real ledger under `folder`, recorded as a client
    records it before its update leaves (planned like `write_client`'s, for 4 rounds); with
    `evaluated`, the round's evaluation release instead."""
    path = folder / name / CLIENT_LEDGER
    key = load_or_create(keys / f"{name}.key")
    spends = entries(path, Spend) if path.exists() else []
    state = restore(name, BUDGET, spends)
    if state.mechanism is None:
        state.mechanism = _planned(rounds=4)
    if evaluated:
        done = state.record(server_round, [], "evaluated", [EVALUATION])
    else:
        done = state.record(server_round, state.round_steps(), "trained", [] if spends else [COUNT])
    return append(path, spend_fields(state, done, run_id), key, Spend)
