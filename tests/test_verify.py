"""The verifier's holes, closed: what the server's record cites must exist and match, nothing
fixed by a ledger's first entry may change, and the verdict says how far it can be trusted."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import Result
from ledger_factory import write_client, write_server
from typer.testing import CliRunner

from common.run_files import (
    AUDIT,
    CARD,
    CLIENT_LEDGER,
    CLIENTS,
    PRIVACY_REPORT_HTML,
    SERVER_LEDGER,
)
from privacy import report, report_page
from privacy.ledger import Aggregation, Chained, Spend, append, read_lines
from privacy.signing import CLIENT_PUBLIC_KEY, SERVER_PUBLIC_KEY, load_private
from privacy.verify import Verdict, verify_paths
from simulations.cli import app

Bodies = list[dict]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as a simulation leaves it (public keys beside the ledgers), written once:
    planning with PRV takes seconds."""
    folder = tmp_path_factory.mktemp("run")
    keys = folder.parent / f"{folder.name}-keys"
    ledgers = [write_client(folder / CLIENTS, keys, name) for name in ("north", "south")]
    write_server(folder, keys, ledgers)
    for name in ("north", "south"):
        shutil.copy(keys / f"{name}.pub", folder / CLIENTS / name / CLIENT_PUBLIC_KEY)
    (folder / SERVER_PUBLIC_KEY).parent.mkdir()
    shutil.copy(keys / "server.pub", folder / SERVER_PUBLIC_KEY)
    shutil.copytree(keys, folder / "trusted")  # stands for the keys compliance registered
    return folder


@pytest.fixture
def run(pristine: Path, tmp_path: Path) -> Path:
    shutil.copytree(pristine, tmp_path, dirs_exist_ok=True)
    return tmp_path


def ledger(run: Path, name: str) -> Path:
    return run / CLIENTS / name / CLIENT_LEDGER


def resign(path: Path, key: Path, model: type[Chained], edit: Callable[[Bodies], Bodies]) -> None:
    """Rewrite a ledger from edited entry bodies, chained and signed with its real key: what a
    dishonest party holding that key could produce."""
    bodies = edit([line.body for line in read_lines(path)])
    path.unlink()
    for body in bodies:
        fields = {k: v for k, v in body.items() if k not in ("seq", "prev", "key", "time")}
        append(path, fields, load_private(key), model)


def edit_server(run: Path, edit: Callable[[Bodies], Bodies]) -> None:
    resign(run / SERVER_LEDGER, run / "trusted" / "server.key", Aggregation, edit)


def edit_client(run: Path, name: str, edit: Callable[[Bodies], Bodies]) -> None:
    resign(ledger(run, name), run / "trusted" / f"{name}.key", Spend, edit)


def problems(run: Path, *names: str) -> list[str]:
    """Every finding, as `file, line N (entry S): reason`, of the server record and `names`."""
    paths = [run / SERVER_LEDGER, *(ledger(run, n) for n in names)]
    out = []
    for r in verify_paths(paths, run / "trusted"):
        for f in sorted(r.findings, key=lambda f: f.line):
            out.append(f"{Path(r.path).name}, line {f.line} (entry {f.seq}): {f.problem}")
    return out


def said(result: Result) -> str:
    """A command's output as one line: rich wraps it to the terminal's width."""
    return " ".join(result.output.split())


def test_an_intact_run_verifies_against_pinned_keys(run: Path) -> None:
    assert problems(run, "north", "south") == []
    verdict = Verdict.of(verify_paths(report.find_ledgers(run), run / "trusted"))
    assert verdict.ok and verdict.pinned
    assert verdict.headline == "all 3 ledgers verified against pinned keys"


def test_a_client_the_server_names_without_its_ledger_fails(run: Path) -> None:
    found = problems(run, "north")
    assert found == [
        "aggregation_ledger.jsonl, line 1 (entry 0): round 1: south's 'used' reply: no readable "
        "ledger of 'south' was given, so what it spent cannot be checked"
    ]
    ledger(run, "south").write_text("{broken\n")  # unreadable counts as not given
    assert any("no readable ledger of 'south'" in p for p in problems(run, "north", "south"))


def test_zero_ledgers_is_a_failure_not_all_verified(tmp_path: Path) -> None:
    verdict = Verdict.of([])
    assert not verdict.ok and verdict.problem == "no ledgers were given or found"
    built = report.build(tmp_path)
    assert not built["verified"] and built["verdict"]["headline"] == "verification FAILED"
    result = CliRunner().invoke(app, ["privacy", "report", str(tmp_path)])
    assert result.exit_code == 1
    assert "no ledgers were given or found" in said(result)
    assert "verified" not in said(result).replace("verification FAILED", "")
    html = (tmp_path / PRIVACY_REPORT_HTML).read_text()
    assert "all ledgers verified" not in html and "no ledgers were given or found" in html


@pytest.mark.parametrize("status", ["used", "not-aggregated", "declined"])
def test_a_reply_without_a_ledger_entry_fails(run: Path, status: str) -> None:
    def edit(bodies: Bodies) -> Bodies:
        bodies[1]["clients"][0] |= {"status": status, "seq": -1, "hash": ""}
        return bodies

    edit_server(run, edit)
    assert problems(run, "north", "south") == [
        f"aggregation_ledger.jsonl, line 2 (entry 1): round 2: north's {status!r} reply cites "
        "no ledger entry: a release the client did not record is not covered by its privacy "
        "accounting"
    ]


def test_only_a_refusal_cites_no_entry(run: Path) -> None:
    def refused(bodies: Bodies) -> Bodies:
        # round 3: north refused the request (nothing released, no entry); south declined
        bodies[2]["clients"][0] |= {"status": "refused", "seq": -1, "hash": ""}
        return bodies

    edit_server(run, refused)
    assert problems(run, "north", "south") == []

    def cites(bodies: Bodies) -> Bodies:
        bodies[2]["clients"][0]["seq"] = 2
        return bodies

    edit_server(run, cites)
    found = problems(run, "north", "south")
    assert found == [
        "aggregation_ledger.jsonl, line 3 (entry 2): round 3: north's 'refused' reply cites "
        "ledger entry 2; a refusal writes none"
    ]


def recite(run: Path) -> Callable[[Bodies], Bodies]:
    """Make the server's record cite north's entries by their current hashes."""
    hashes = [line.hash for line in read_lines(ledger(run, "north"))]

    def edit(bodies: Bodies) -> Bodies:
        for body in bodies:
            for c in body["clients"]:
                if c["client"] == "north":
                    c["hash"] = hashes[c["seq"]]
        return bodies

    return edit


@pytest.mark.parametrize(
    "record, seq, status, reason",
    [
        # round 3's decline passed off as an update the server used
        (
            2,
            2,
            "used",
            "north's 'used' reply cites {p}, line 3, a 'declined' entry, not a 'trained' one",
        ),
        # round 2's update cited again as if it were round 3's
        (
            2,
            1,
            "not-aggregated",
            "north's 'not-aggregated' reply cites {p}, line 2, an entry of round 2, not this round",
        ),
        # a trained round passed off as a decline
        (
            1,
            1,
            "declined",
            "north's 'declined' reply cites {p}, line 2, a 'trained' entry, not a 'declined' one",
        ),
    ],
)
def test_a_reply_must_cite_an_entry_of_its_kind_and_round(
    run: Path, record: int, seq: int, status: str, reason: str
) -> None:
    def cite(bodies: Bodies) -> Bodies:
        bodies[record]["clients"][0] |= {"seq": seq, "status": status}
        return recite(run)(bodies)

    edit_server(run, cite)
    found = problems(run, "north", "south")
    assert found == [
        f"aggregation_ledger.jsonl, line {record + 1} (entry {record}): round {record + 1}: "
        + reason.format(p=ledger(run, "north"))
    ]


def test_an_evaluation_record_cites_only_evaluated_entries(run: Path) -> None:
    """Round 2's training record passed off as its evaluation record: an update is no
    evaluation, and an evaluation reply citing a trained entry cites the wrong kind."""

    def as_evaluation(bodies: Bodies) -> Bodies:
        bodies[1]["step"] = "evaluate"
        bodies[1]["clients"][0]["status"] = "evaluated"
        return recite(run)(bodies)

    edit_server(run, as_evaluation)
    where = "aggregation_ledger.jsonl, line 2 (entry 1): round 2:"
    assert problems(run, "north", "south") == [
        f"{where} north's 'evaluated' reply cites {ledger(run, 'north')}, line 2, "
        "a 'trained' entry, not a 'evaluated' one",
        f"{where} south's 'used' reply: not a status of a 'evaluate' record",
    ]


def test_a_reply_must_cite_an_entry_of_its_run(run: Path) -> None:
    def other_run(bodies: Bodies) -> Bodies:
        for body in bodies:
            body["run_id"] = "8"
        return bodies

    edit_client(run, "north", other_run)
    # the server now cites north's entries by their new hashes, but they belong to run 8
    edit_server(run, recite(run))
    found = problems(run, "north", "south")
    assert len(found) == 3, found
    assert found[0].startswith("aggregation_ledger.jsonl, line 1 (entry 0): round 1: north's")
    assert found[0].endswith("line 1, an entry of run '8', not '7'")


@pytest.mark.parametrize(
    "field, value",
    [
        ("budget_epsilon", 30.0),
        ("delta", 1e-3),
        ("noise_multiplier", 2.5),
        ("sample_rate", 0.1),
        ("clip_norm", 5.0),
        ("accountant", "rdp"),
        ("steps_per_round", 5),
        ("planned_rounds", 9),
        ("noisy_users", 4000),
    ],
)
def test_the_first_entry_fixes_budget_delta_and_mechanism(
    run: Path, field: str, value: object
) -> None:
    def change(bodies: Bodies) -> Bodies:
        bodies[2][field] = value  # the declined round 3 "raised" it
        return bodies

    edit_client(run, "north", change)
    found = [f.problem for f in verify_paths([ledger(run, "north")])[0].findings if f.line == 3]
    assert any(p.startswith(f"{field} changed to {value!r}") for p in found), found
    assert all("line 3" not in p for p in found)  # named by the finding's line, not the text


def test_a_release_kind_keeps_its_mechanism_and_the_count_is_released_once(run: Path) -> None:
    def edit(bodies: Bodies) -> Bodies:
        count = bodies[0]["releases"][0]
        bodies[1]["releases"] = [count | {"noise_multiplier": 50.0}]  # again, other σ
        return bodies

    edit_client(run, "north", edit)
    found = [(f.line, f.problem) for f in verify_paths([ledger(run, "north")])[0].findings]
    assert (
        2,
        "user-count release with noise multiplier 50 and sensitivity 1; line 1 released it "
        "with 5 and 1: one kind of release keeps one mechanism",
    ) in found
    assert (
        2,
        "a user-count release outside the first trained entry (line 1): the count is "
        "released once, with the first training round",
    ) in found

    def no_count(bodies: Bodies) -> Bodies:
        return [b | {"releases": []} for b in bodies]

    edit_client(run, "north", no_count)
    found = [f.problem for f in verify_paths([ledger(run, "north")])[0].findings if f.line == 1]
    assert any(p.startswith("the first trained entry releases no user count") for p in found)


def test_the_popularity_histogram_leaves_only_with_the_first_trained_round(run: Path) -> None:
    def later(bodies: Bodies) -> Bodies:
        popularity = {"what": "item-popularity", "noise_multiplier": 3.0, "sensitivity": 1.0}
        bodies[1]["releases"] = [popularity]
        return bodies

    edit_client(run, "north", later)
    found = [(f.line, f.problem) for f in verify_paths([ledger(run, "north")])[0].findings]
    assert (
        2,
        "an item-popularity release outside the first trained entry, or twice: the histogram "
        "is released at most once, with the first training round",
    ) in found


def test_extra_ledgers_add_to_those_found_once_each(run: Path, tmp_path_factory) -> None:
    """Deployment: client ledgers collected elsewhere are checked with the run's own record."""
    elsewhere = tmp_path_factory.mktemp("collected")
    south = elsewhere / CLIENT_LEDGER
    shutil.move(ledger(run, "south"), south)
    shutil.copy(run / "trusted" / "south.pub", elsewhere / "signing.pub")
    alone = CliRunner().invoke(app, ["privacy", "report", str(run)])
    assert alone.exit_code == 1 and "no readable ledger of 'south'" in said(alone)
    north = ledger(run, "north")
    same = north.parent / ".." / "north" / CLIENT_LEDGER  # the found one, spelt otherwise
    extra = [str(south), "--ledger", str(north), "--ledger", str(same)]
    added = CliRunner().invoke(app, ["privacy", "report", str(run), "--ledger", *extra])
    assert added.exit_code == 0, added.output
    data = report.build(run, [south, north])
    assert [x["signer"] for x in data["ledgers"]] == ["server", "north", "south"]


def test_the_headline_says_whether_keys_were_pinned(run: Path) -> None:
    runner = CliRunner()
    paths = [str(p) for p in report.find_ledgers(run)]
    pinned = runner.invoke(app, ["privacy", "verify", *paths, "--keys", str(run / "trusted")])
    assert pinned.exit_code == 0, pinned.output
    assert "all 3 ledgers verified against pinned keys" in said(pinned)
    sibling = runner.invoke(app, ["privacy", "verify", *paths])
    assert sibling.exit_code == 0, sibling.output
    assert "all 3 ledgers internally consistent, keys not pinned" in said(sibling)
    assert "verified against pinned keys" not in said(sibling)

    written = report.write(run)
    assert written["verified"] and not written["keys_pinned"]
    html = (run / PRIVACY_REPORT_HTML).read_text()
    assert "internally consistent, keys not pinned" in html
    written = report.write(run, keys=run / "trusted")
    assert written["keys_pinned"]
    assert "all 3 ledgers verified against pinned keys" in (run / PRIVACY_REPORT_HTML).read_text()

    server_only = runner.invoke(app, ["privacy", "verify", str(run / SERVER_LEDGER)])
    assert server_only.exit_code == 1 and "no readable ledger of 'north'" in said(server_only)


def test_a_run_folder_needs_its_server_record_and_all_its_rounds(run: Path) -> None:
    """Cutting the same rounds off every ledger leaves each one consistent: the server's
    record must be there, and reach the rounds the run completed (model_card.json)."""
    trusted = run / "trusted"
    (run / CARD).write_text(json.dumps({"rounds_completed": 4}))  # the record has 3 rounds
    cut = report.build(run, keys=trusted)
    assert not cut["verified"]
    assert "the record ends at round 3, but" in cut["verdict"]["problem"]
    (run / SERVER_LEDGER).unlink()
    gone = report.build(run, keys=trusted)
    assert (
        not gone["verified"] and "aggregation_ledger.jsonl: missing" in gone["verdict"]["problem"]
    )
    clients_only = Verdict.of(verify_paths([ledger(run, "north"), ledger(run, "south")], trusted))
    assert clients_only.ok and clients_only.headline.endswith("without the server's record")
    assert "entries cut from its end cannot be detected" in clients_only.problem


def test_one_client_has_one_ledger(run: Path, tmp_path_factory) -> None:
    spare = tmp_path_factory.mktemp("spare") / CLIENT_LEDGER
    spare.write_text(ledger(run, "north").read_text().splitlines()[0] + "\n")
    paths = [run / SERVER_LEDGER, ledger(run, "north"), ledger(run, "south"), spare]
    found = first_problem(paths, run / "trusted")
    assert f"a second ledger of client 'north' (the first: {ledger(run, 'north')})" in found


def first_problem(paths: list[Path], keys: Path) -> str:
    return Verdict.of(verify_paths(paths, keys)).problem


def test_central_dp_comes_from_the_signed_record_not_the_card(run: Path) -> None:
    card = {"privacy": {"central_dp": {"epsilon": 0.1}}}
    (run / CARD).write_text(json.dumps(card))
    assert report.build(run, keys=run / "trusted")["central_dp"] is None


def test_a_crafted_mechanism_is_a_finding_not_a_crash(run: Path) -> None:
    """A noise multiplier of 1e300 overflowed PLD and σ = 0.001 asked it for tens of GiB."""
    for sigma in (1e300, 1e-3):

        def noisy(bodies: Bodies, sigma=sigma) -> Bodies:
            bodies[1]["noise_multiplier"] = sigma
            return bodies

        edit_client(run, "north", noisy)
        reports = verify_paths([ledger(run, "north")], run / "trusted")
        assert not reports[0].ok and reports[0].entries[1].recomputed["pld"] is None


def test_damaged_side_files_and_odd_names_are_clear(run: Path, tmp_path_factory) -> None:
    runner = CliRunner()
    (run / CARD).write_text('{"privacy": ')
    damaged = runner.invoke(app, ["privacy", "report", str(run)])
    # Rich wraps long paths: compare without the spaces it may add
    flat = said(damaged).replace(" ", "")
    assert damaged.exit_code == 2 and f"{run / CARD}:notreadableJSON" in flat
    (run / CARD).unlink()
    (run / AUDIT).write_text("{}")
    no_runs = runner.invoke(app, ["privacy", "report", str(run)])
    assert no_runs.exit_code == 2 and "no list of audited runs" in said(no_runs)
    nowhere = runner.invoke(app, ["privacy", "report", str(run / "nosuch")])
    assert nowhere.exit_code == 2 and not (run / "nosuch").exists()
    # a path (or a client name) with Rich markup in it is printed as text
    odd = tmp_path_factory.mktemp("odd") / "a[" / "]b"
    odd.mkdir(parents=True)
    shutil.copy(ledger(run, "north"), odd / CLIENT_LEDGER)
    shutil.copy(run / "trusted" / "north.pub", odd / CLIENT_PUBLIC_KEY)
    printed = runner.invoke(app, ["privacy", "verify", str(odd / CLIENT_LEDGER)])
    assert printed.exit_code == 0 and "a[/]b" in said(printed), printed.output
    plotted = report_page._client_plot(
        {
            "client": "north$x$",
            "rounds": [{"round": 1, "epsilon_after": 1.0, "recomputed": {}}],
            "declined_rounds": [],
            "budget": {"epsilon": 3.0},
        }
    )
    assert "<svg" in plotted
