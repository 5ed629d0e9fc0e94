"""The privacy ledger: tampering of every kind is caught on the right entry."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from ledger_factory import BUDGET, COUNT, write_client, write_server

from common.run_files import CLIENT_LEDGER, SERVER_LEDGER
from privacy.accounting import (
    Budget,
    Mechanism,
    PrivacyState,
    RoundSpend,
    plan_mechanism,
    restore,
    spend_fields,
)
from privacy.ledger import (
    Aggregation,
    LedgerError,
    Release,
    Spend,
    append,
    check_head,
    entries,
    read_lines,
)
from privacy.signing import (
    CLIENT_PUBLIC_KEY,
    SERVER_PUBLIC_KEY,
    KeyFileError,
    client_key,
    create_pair,
    load_keyring,
    load_or_create,
    private_keys,
)
from privacy.verify import verify_paths


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Written once: planning with PRV takes seconds; every test gets its own copy."""
    folder = tmp_path_factory.mktemp("run")
    client = write_client(folder, folder / "keys")
    other = write_client(folder, folder / "keys", "south")
    write_server(folder, folder / "keys", [client, other])
    return folder


@pytest.fixture
def run(pristine, tmp_path):
    shutil.copytree(pristine, tmp_path, dirs_exist_ok=True)
    return tmp_path, tmp_path / "keys", tmp_path / "north" / CLIENT_LEDGER, tmp_path / SERVER_LEDGER


def rewrite(path: Path, edit) -> None:
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    lines = edit(lines)
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def _one_round(name: str) -> tuple[PrivacyState, RoundSpend]:
    """A client's first trained round (with its user count), on a mechanism not planned here:
    planning takes seconds and these tests need only a consistent ledger."""
    mechanism = Mechanism(
        noise_multiplier=1.5,
        sample_rate=0.05,
        steps_per_round=20,
        clip_norm=1.0,
        accountant="prv",
        planned_rounds=2,
        noisy_users=20,
    )
    state = PrivacyState(client=name, budget=BUDGET, mechanism=mechanism)
    count = Release(what="user-count", noise_multiplier=5.0, sensitivity=1.0)
    return state, state.record(1, state.round_steps(), "trained", [count])


def first_problem(paths: list[Path], keys: Path | None) -> str:
    bad = [r for r in verify_paths(paths, keys) if not r.ok]
    assert bad, "verification passed but should have failed"
    return bad[0].first_problem()


def test_intact_ledgers_verify_and_accountants_agree(run):
    folder, keys, client, server = run
    reports = verify_paths([client, folder / "south" / CLIENT_LEDGER, server], keys)
    assert all(r.ok for r in reports), [r.findings for r in reports]
    checks = reports[0].entries
    assert [c.status for c in checks] == ["trained", "trained", "declined"]
    for c in checks:
        assert c.recomputed["prv"] == pytest.approx(c.reported, rel=1e-9)  # PRV plans by default
        # PLD's estimate sits just under PRV's upper bound; RDP's looser bound sits above both
        assert c.recomputed["prv"] - 0.02 <= c.recomputed["pld"] <= c.reported
        assert c.recomputed["rdp"] > c.reported
    assert 0 < checks[0].reported < checks[1].reported <= BUDGET.epsilon
    assert checks[2].reported == checks[1].reported


def test_state_is_rebuilt_from_the_ledger(run):
    _, _, client, _ = run
    spends = entries(client, Spend)
    state = restore("north", BUDGET, spends)
    assert state.epsilon() == pytest.approx(spends[-1].epsilon_after)
    assert [r.status for r in state.rounds] == ["trained", "trained", "declined"]
    assert not state.affordable()[0]


FORMAT = Path(__file__).parent / "data" / "ledger_format"


def test_a_ledger_signed_before_still_verifies_and_restores_to_the_same_entries():
    """A ledger signed by an earlier version (a trained round with the user count, an
    evaluation, a declined round) verifies against its pinned key, and the state restored from
    it gives back each entry's content field for field: the entry format has not moved."""
    path = FORMAT / CLIENT_LEDGER
    report = verify_paths([path], FORMAT / "keys")[0]
    assert report.ok, report.first_problem()
    spends = entries(path, Spend)
    state = restore("north", Budget.of_entry(spends[0]), spends)
    chaining = {"seq", "prev", "key", "time", "kind"}  # `append` adds these
    stored = [
        {k: v for k, v in line.body.items() if k not in chaining} for line in read_lines(path)
    ]
    assert [spend_fields(state, spend, "7") for spend in state.rounds] == stored
    assert [s["status"] for s in stored] == ["trained", "evaluated", "declined"]


def test_altered_entry_is_named(run):
    _, keys, client, _ = run

    def edit(lines):
        lines[1]["entry"]["epsilon_after"] *= 0.5
        return lines

    rewrite(client, edit)
    assert "line 2 (entry 1): entry altered" in first_problem([client], keys)


def test_removed_entry_is_named(run):
    _, keys, client, _ = run
    rewrite(client, lambda lines: [lines[0], lines[2]])
    problem = first_problem([client], keys)
    assert "line 2 (entry 2)" in problem and "missing entries" in problem


def test_reordered_entries_are_named(run):
    _, keys, client, _ = run
    rewrite(client, lambda lines: [lines[0], lines[2], lines[1]])
    assert "line 2 (entry 2): out of order" in first_problem([client], keys)


def test_cut_off_newest_entries_are_caught_against_the_server_record(run):
    _, keys, client, server = run
    rewrite(client, lambda lines: lines[:1])
    assert verify_paths([client], keys)[0].ok  # alone, a shorter chain is still a chain
    problem = first_problem([client, server], keys)
    assert "entry 1 that the server's round 2 used is missing" in problem


def test_miscomputed_but_signed_entry_is_named(tmp_path):
    keys = tmp_path / "keys"
    key = create_pair(keys / "north.key")
    state = PrivacyState(client="north", budget=BUDGET)
    state.mechanism = plan_mechanism(BUDGET, 0.05, 20, rounds=2, clip_norm=1.0)
    path = tmp_path / CLIENT_LEDGER
    for rnd in (1, 2):
        count = [COUNT] if rnd == 1 else []
        fields = spend_fields(state, state.record(rnd, state.round_steps(), "trained", count), 7)
        if rnd == 2:
            fields["epsilon_after"] *= 0.9  # a client that under-states its spend, then signs it
        append(path, fields, key, Spend)
    problem = first_problem([path], keys)
    assert "line 2 (entry 1): miscomputed" in problem


def test_ledger_re_signed_with_another_key_fails_against_pinned_keys(run, tmp_path):
    keys = run[1]
    forged = write_client(tmp_path / "forged", tmp_path / "attacker")
    assert verify_paths([forged], tmp_path / "attacker")[0].ok
    assert "not trusted" in first_problem([forged], keys)
    assert set(load_keyring(keys)) == {"north", "south", "server"}


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda t: t[: len(t) - 25], "truncated"),
        (lambda t: t.replace('"signature"', '"sig"', 1), "line 1: not a ledger entry"),
        (lambda t: "{not json\n" + t, "line 1: not a ledger entry"),
        (lambda t: "", "empty"),
    ],
)
def test_truncated_or_corrupt_file_is_an_error_not_a_crash(run, damage, expected):
    _, keys, client, _ = run
    client.write_text(damage(client.read_text()))
    assert expected in first_problem([client], keys)
    if expected != "empty":
        with pytest.raises(LedgerError, match=expected):
            read_lines(client)


def test_append_refuses_to_extend_a_corrupt_ledger_and_keeps_it(run):
    _, keys, client, _ = run
    damaged = client.read_text()[:-10]
    client.write_text(damaged)
    with pytest.raises(LedgerError):
        append(client, {}, create_pair(keys / "x.key"), Spend)
    assert client.read_text() == damaged


def test_cli_keys_and_verify_exit_codes(run, tmp_path):
    from typer.testing import CliRunner

    from simulations.cli import app

    runner = CliRunner()
    made = runner.invoke(app, ["keys", "east", "server", "--out", str(tmp_path / "k")])
    assert made.exit_code == 0, made.output
    assert (tmp_path / "k" / "east.key").stat().st_mode & 0o777 == 0o600
    again = runner.invoke(app, ["keys", "east", "--out", str(tmp_path / "k")])
    assert again.exit_code == 2 and "refusing to replace" in again.output

    _, keys, client, server = run
    south = client.parent.parent / "south" / CLIENT_LEDGER
    good = runner.invoke(
        app, ["privacy", "verify", str(client), str(south), str(server), "--keys", str(keys)]
    )
    assert good.exit_code == 0, good.output
    assert "verified against pinned keys" in " ".join(good.output.split())
    rewrite(client, lambda lines: [lines[1], lines[0], lines[2]])
    bad = runner.invoke(app, ["privacy", "verify", str(client), "--keys", str(keys)])
    assert bad.exit_code == 1 and "line 1 (entry 1)" in bad.output
    client.write_bytes(b"\x00\xff garbage")
    broken = runner.invoke(app, ["privacy", "verify", str(client)])
    assert broken.exit_code == 1 and isinstance(broken.exception, SystemExit | None)
    assert "cannot read" in broken.output or "not a ledger entry" in broken.output


def test_a_ledger_behind_the_servers_record_is_refused(run):
    folder, keys, client, _ = run
    from server.aggregation_ledger import AggregationLedger

    # reloads the server's record
    server = AggregationLedger(folder, create_pair(keys / "other.key"), "7", "fedavg")
    lines = read_lines(client)
    assert server.heads["north"] == (2, lines[2].hash)
    check_head(client, lines, server.heads["north"])  # intact: fine
    with pytest.raises(LedgerError, match=r"entry 2 .* is missing"):
        check_head(client, lines[:2], server.heads["north"])  # restored from an old backup
    with pytest.raises(LedgerError, match="differs"):
        check_head(client, lines, (1, lines[2].hash))


def test_a_private_key_is_never_readable_by_others(tmp_path, monkeypatch):
    """Even with umask 0, the key file is 0600 from its creation to its final name: every mode
    it is created with, changed to, synced or renamed with is owner-only."""
    modes: list[int] = []
    real = {name: getattr(os, name) for name in ("open", "chmod", "fsync", "replace")}

    def is_key(path) -> bool:
        return "north.key" in os.fspath(path)

    def open_(path, flags, mode=0o777, *args, **kwargs):
        if is_key(path) and flags & os.O_CREAT:
            modes.append(mode & 0o777)
        return real["open"](path, flags, mode, *args, **kwargs)

    def chmod(path, mode, *args, **kwargs):
        if is_key(path):
            modes.append(mode & 0o777)
        return real["chmod"](path, mode, *args, **kwargs)

    def fsync(fd) -> None:
        if is_key(os.readlink(f"/proc/self/fd/{fd}")):
            modes.append(os.fstat(fd).st_mode & 0o777)
        real["fsync"](fd)

    def replace(src, dst) -> None:
        if is_key(dst):
            modes.append(os.stat(src).st_mode & 0o777)
        real["replace"](src, dst)

    old = os.umask(0)
    try:
        for name, fake in (
            ("open", open_),
            ("chmod", chmod),
            ("fsync", fsync),
            ("replace", replace),
        ):
            monkeypatch.setattr(os, name, fake)
        create_pair(tmp_path / "keys" / "north.key")
        create_pair(tmp_path / "keys" / "north.key", overwrite=True)
    finally:
        os.umask(old)
        monkeypatch.undo()
    assert len(modes) >= 6 and set(modes) == {0o600}, [oct(m) for m in modes]
    assert (tmp_path / "keys" / "north.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "keys").stat().st_mode & 0o077 == 0
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["north.key", "north.pub"]


def test_default_private_keys_stay_outside_the_run_folder(tmp_path):
    """The run folder goes to compliance: it gets public keys only, where the verifier looks."""
    out = tmp_path / "run"
    server_key = load_or_create(private_keys(out) / "server.key", publish=out / SERVER_PUBLIC_KEY)
    state = out / "clients" / "north"
    client = client_key(state, out, "north")
    client_private = load_or_create(client, publish=state / CLIENT_PUBLIC_KEY)
    assert load_or_create(client, publish=state / CLIENT_PUBLIC_KEY)  # reloads, same key
    assert client.parent == private_keys(out) == tmp_path / "run.keys"
    inside = [p for p in out.rglob("*") if p.is_file()]
    assert sorted(p.relative_to(out).as_posix() for p in inside) == [
        "clients/north/signing.pub",
        "keys/server.pub",
    ]
    assert not any(b"PRIVATE" in p.read_bytes() for p in inside)
    # the verifier, without pinned keys, finds both public keys in the run folder
    path = state / CLIENT_LEDGER
    fields = spend_fields(*_one_round("north"), run_id=7)
    append(path, fields, client_private, Spend)
    server_fields = {"run_id": "7", "server_round": 1, "strategy": "fedavg"}
    used = {"client": "north", "status": "used", "seq": 0, "hash": read_lines(path)[0].hash}
    append(out / SERVER_LEDGER, server_fields | {"clients": [used]}, server_key, Aggregation)
    reports = verify_paths([out / SERVER_LEDGER, path])
    assert all(r.ok for r in reports), [r.findings for r in reports]
    # a deployed client's own state folder (outside any run folder) keeps its key
    assert client_key(tmp_path / "north.fedshop", out, "north").parent.name == "north.fedshop"
    # another key than the one that signed the ledger is refused, not silently published
    with pytest.raises(KeyFileError, match="another public key"):
        load_or_create(tmp_path / "other.key", publish=state / CLIENT_PUBLIC_KEY)
