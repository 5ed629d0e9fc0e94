"""A full or read-only disk when a checkpoint, a ledger, the run tables or the privacy report is
written: the run stops with one clear message naming the file, every file keeps its last good
content, `privacy verify` passes, and resuming spends nothing twice and loses nothing.

The disk is simulated at the one place every writer goes through (`common.atomic`): "full"
fails the fsync of the new file's data (where a real ENOSPC surfaces on delayed allocation),
"read-only" fails creating it. Tests run as root here, so permissions could not stand in."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from ledger_factory import spend, write_client, write_server
from test_hostile_clients import SENT, _Grid, _record, reply
from typer.testing import CliRunner

from clients import client_app
from clients.rounds import _client
from common.atomic import StorageError, write_json
from common.learning.model import BehaviorModel
from common.messages import ARRAYS, CLIENT, CONFIG, LEDGER_HEADS, NAME, SERVER_ROUND
from common.run_files import (
    CHECKPOINT,
    CLIENT_LEDGER,
    CLIENTS,
    PRIVACY_REPORT_HTML,
    RESULTS,
    ROUNDS,
    SERVER_LEDGER,
)
from common.runconfig import RunConfig
from privacy.ledger import Aggregation, Spend, entries, read_lines
from privacy.signing import SERVER_PUBLIC_KEY, load_or_create, public_pem
from server import checkpoint, run_tables
from server.aggregation import make_strategy
from server.aggregation_ledger import AggregationLedger
from server.node_registry import Binding, NodeBinder, Registry
from server.rounds import RoundLoop
from simulations.cli import app

pytestmark = pytest.mark.usefixtures("task_identity")
HOW = {"full": errno.ENOSPC, "read-only": errno.EROFS}


class Disk:
    """`fail(name, how)`: from now on, writing a file called `name` fails like a disk that is
    `how` ("full" or "read-only"); other files are written as usual. `repair()` ends it."""

    def __init__(self, patch: pytest.MonkeyPatch) -> None:
        self.patch = patch

    def fail(self, name: str, how: str) -> None:
        code = HOW[how]
        fsync, mkstemp = os.fsync, tempfile.mkstemp

        def full(fd: int) -> None:
            if f".{name}." in os.readlink(f"/proc/self/fd/{fd}"):
                raise OSError(code, os.strerror(code))
            fsync(fd)

        def read_only(*args, **kwargs):
            if kwargs.get("prefix", "").startswith(f".{name}."):
                raise OSError(code, os.strerror(code))
            return mkstemp(*args, **kwargs)

        if how == "full":
            self.patch.setattr("common.atomic.os.fsync", full)
        else:
            self.patch.setattr("common.atomic.tempfile.mkstemp", read_only)

    def repair(self) -> None:
        self.patch.undo()


@pytest.fixture
def disk() -> Iterator[Disk]:
    with pytest.MonkeyPatch.context() as patch:
        yield Disk(patch)


NAMES = ("north", "south", "east")  # the clients of nodes 1, 2, 3


class _Clients(_Grid):
    """Three clients that record each training round and evaluation in their own real
    ledger, as a client does before its reply leaves, and cite that entry in their reply."""

    def __init__(self, tmp_path: Path, run_id: str) -> None:
        super().__init__({n: reply(n, name) for n, name in enumerate(NAMES, start=1)}, {})
        self.tmp, self.run_id = tmp_path, run_id

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        for asked, m in zip(messages, replies, strict=True):  # every node answers here
            name = str(m.content[CLIENT][NAME])
            rnd = int(asked.content[CONFIG][SERVER_ROUND])
            evaluated = m.metadata.message_type != "train"
            folder, keys = self.tmp / "clients", self.tmp / "keys"
            line = spend(folder, keys, name, rnd, self.run_id, evaluated)
            m.content[CLIENT] = _client(name, line)
        return replies


def _loop(tmp_path, rounds: int, first: int = 1, history: list | None = None) -> RoundLoop:
    cfg = RunConfig(min_clients=2, num_server_rounds=rounds)
    strategy = make_strategy(cfg)
    if first > 1:
        checkpoint.restore_strategy(strategy, checkpoint.load(tmp_path).strategy_state)
    history = [] if history is None else history
    key = load_or_create(tmp_path / "keys" / "server.key", publish=tmp_path / SERVER_PUBLIC_KEY)
    return RoundLoop(
        grid=_Clients(tmp_path, str(first)),
        strategy=strategy,
        shared={},
        out=tmp_path,
        ledger=AggregationLedger(tmp_path, key, str(first), "fedavg"),
        min_clients=2,
        last_round=rounds,
        history=history,
        on_round=lambda done: run_tables.write_tables(tmp_path, done),
    )


def _verified(run: Path) -> None:
    """`fedshop privacy verify` of the run's server ledger and every client ledger it names."""
    ledgers = [run / SERVER_LEDGER, *(run / "clients").glob(f"*/{CLIENT_LEDGER}")]
    keys = ["--keys", str(run / "keys")]
    result = CliRunner().invoke(app, ["privacy", "verify", *map(str, ledgers), *keys])
    assert result.exit_code == 0, result.output


def _resume(tmp_path, rounds: int) -> str:
    """What the ServerApp does on a rerun: the loop from the checkpoint, then the tables."""
    saved = checkpoint.load(tmp_path)
    loop = _loop(tmp_path, rounds, saved.server_round + 1, saved.history)
    _, outcome = loop.run(saved.arrays, saved.server_round + 1)
    run_tables.write_tables(tmp_path, loop.history)
    return outcome


# The file that cannot be written in round 2 → the round the checkpoint then holds, and the
# aggregation ledger's rounds after the rerun (each with a training and an evaluation record):
# round 2's records are written before its checkpoint, so a stop at the checkpoint leaves them
# and the recomputed round adds its own (another run id); the tables are written after the
# checkpoint, so nothing is recomputed.
STOPS = {CHECKPOINT: (1, [1, 2, 2]), SERVER_LEDGER: (1, [1, 2]), ROUNDS: (2, [1, 2])}


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("name", STOPS)
def test_the_server_stops_cleanly_and_resumes_when_a_round_cannot_be_written(
    tmp_path, disk, name, how
):
    _loop(tmp_path, rounds=1).run(_record(SENT), 1)
    kept = (tmp_path / name).read_bytes()
    disk.fail(name, how)
    with pytest.raises(StorageError) as stop:
        _resume(tmp_path, rounds=2)
    assert str(stop.value) == (
        f"cannot write {tmp_path / name}: {os.strerror(HOW[how])}; "
        "its previous content is unchanged"
    )
    assert (tmp_path / name).read_bytes() == kept
    assert not list(tmp_path.glob(".*.tmp"))  # no half-written file left beside it
    saved_round, ledger_rounds = STOPS[name]
    assert checkpoint.load(tmp_path).server_round == saved_round  # readable, a finished round
    _verified(tmp_path)

    disk.repair()  # space freed: the rerun resumes
    assert _resume(tmp_path, rounds=2) == "completed"
    assert checkpoint.load(tmp_path).server_round == 2
    _verified(tmp_path)
    records = entries(tmp_path / SERVER_LEDGER, Aggregation)
    steps = {s: [r.server_round for r in records if r.step == s] for s in ("train", "evaluate")}
    assert steps == {"train": ledger_rounds, "evaluate": ledger_rounds}
    assert [r["round"] for r in json.loads((tmp_path / ROUNDS).read_text())] == [1, 2]


@pytest.mark.parametrize("how", HOW)
def test_a_client_that_cannot_record_its_spend_releases_nothing(tiny_run, disk, how):
    """The spend is recorded before the update leaves; when the ledger cannot be written the
    round fails (Flower sends the error as the reply) and no update, hence no privacy loss,
    leaves. The next round's spend starts from the ledger as it was."""
    cfg, shared, shape = tiny_run
    torch.manual_seed(0)
    sent = ArrayRecord(BehaviorModel(cfg.model, shape).state_dict())
    ledger = Path(cfg.out) / CLIENTS / "region-01" / CLIENT_LEDGER

    def train(server_round: int) -> Message:
        config = ConfigRecord(shared | {SERVER_ROUND: server_round})
        msg = Message(RecordDict({ARRAYS: sent, CONFIG: config}), dst_node_id=1,
                      message_type="train")  # fmt: skip
        context = Context(
            run_id=7, node_id=1, node_config={"partition-id": 0, "num-partitions": 3},
            state=RecordDict(), run_config=cfg.to_flower(),
        )  # fmt: skip
        return client_app.train(msg, context)

    disk.fail(CLIENT_LEDGER, how)
    with pytest.raises(StorageError, match=f"cannot write {ledger}: {os.strerror(HOW[how])}"):
        train(1)
    assert not ledger.exists()
    disk.repair()
    assert ARRAYS in train(2).content
    assert [s.server_round for s in entries(ledger, Spend)] == [2]


def test_a_report_that_cannot_be_written_is_one_clear_error_and_the_old_one_stays(tmp_path, disk):
    keys = tmp_path / "keys"
    write_server(tmp_path, keys, [write_client(tmp_path / "clients", keys, "north")])
    report = ["privacy", "report", str(tmp_path), "--keys", str(keys)]
    assert CliRunner().invoke(app, report).exit_code == 0
    old = (tmp_path / PRIVACY_REPORT_HTML).read_bytes()
    disk.fail(PRIVACY_REPORT_HTML, "full")
    result = CliRunner().invoke(app, report)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "error: cannot write" in result.output and "No space left on device" in result.output
    assert (tmp_path / PRIVACY_REPORT_HTML).read_bytes() == old


def test_local_results_that_cannot_be_written_keep_the_old_ones(tmp_path, disk, tiny_events):
    data, out = tmp_path / "shop.parquet", tmp_path / "local"
    tiny_events.to_parquet(data)
    out.mkdir()
    (out / RESULTS).write_text('{"old": true}')
    disk.fail(RESULTS, "full")
    tiny = ["--epochs", "1", "--hidden", "16", "--layers", "1", "--max-len", "12"]
    result = CliRunner().invoke(app, ["train-local", "--data", str(data), *tiny, "--out", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "error: cannot write" in result.output
    assert (out / RESULTS).read_text() == '{"old": true}'


def test_the_new_content_and_then_its_rename_reach_the_disk(tmp_path, monkeypatch):
    synced, fsync = [], os.fsync

    def record(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr("common.atomic.os.fsync", record)
    write_json(tmp_path / "state.json", {"a": 1})
    assert ".state.json." in synced[0]  # the temporary file's data, before the rename
    assert synced[1:] == [str(tmp_path)]  # then the folder holding the renamed entry


@pytest.mark.parametrize("registry", [False, True])
def test_each_node_is_sent_only_its_own_clients_ledger_head(tmp_path, registry):
    """The heads go with training and evaluation alike. A node matched to a name (its first
    reply, or the registry) gets that client's head alone, never the others' (how often they
    took part); with a registry, a node not in it (east's, node 3) gets none."""
    loop = _loop(tmp_path, rounds=2)
    loop.binder = NodeBinder.for_run("")
    if registry:
        reg = Registry()
        for node, name in enumerate(NAMES[:2], start=1):
            ledger_key = load_or_create(tmp_path / "keys" / f"{name}.key").public_key()
            reg.add(
                name,
                Binding(node, f"ecdsa-sha2-nistp384 KEY{node}", public_pem(ledger_key).decode()),
            )
        reg.save(tmp_path / "registry.json")
        loop.binder = NodeBinder.for_run(str(tmp_path / "registry.json"))
    sent: list[tuple[str, int, int, dict]] = []
    answer = loop.grid.send_and_receive

    def recording(messages, *, timeout=None):
        messages = list(messages)
        for m in messages:
            heads = json.loads(m.content[CONFIG][LEDGER_HEADS])
            rnd = int(m.content[CONFIG][SERVER_ROUND])
            sent.append((m.metadata.message_type, rnd, m.metadata.dst_node_id, heads))
        return answer(messages, timeout=timeout)

    loop.grid.send_and_receive = recording
    assert loop.run(_record(SENT), 1)[1] == "completed"
    hashes = {
        n: [x.hash for x in read_lines(tmp_path / "clients" / n / CLIENT_LEDGER)] for n in NAMES
    }
    expected = []
    for rnd in (1, 2):
        for step, seq in (("train", 2 * rnd - 3), ("evaluate", 2 * rnd - 2)):
            # training: the previous round's evaluated entry (none before round 1);
            # evaluation: this round's trained entry
            for node, name in enumerate(NAMES, start=1):
                heads = {name: [seq, hashes[name][seq]]} if seq >= 0 else {}
                expected.append((step, rnd, node, {} if registry and node == 3 else heads))
    assert sorted(sent, key=lambda s: (s[1], s[0] != "train", s[2])) == expected
