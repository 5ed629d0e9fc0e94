"""Bad input, fuzzed with hypothesis: event files, run configs, checkpoints, ledgers and exported
models that are malformed, damaged or made for something else.

Each is a clear error naming the file and what is wrong: exit status 2 at the CLI, never a
traceback, never half an output. `fedshop privacy verify` answers a damaged ledger with its
documented verdict instead: "verification FAILED", status 1, naming the file. Rows that are only
odd (times in the future or before 1970, non-finite numbers, repeated rows) do not stop a file:
they are rejected with a reason or noted, like every other bad row.

Fuzzing runs few examples so the file takes seconds; hypothesis keeps any failing example.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import typer
from flwr.app import ArrayRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ledger_factory import write_client, write_server
from safetensors.torch import save_file
from typer.testing import CliRunner

import simulations.simulate
from common.data.catalog import Catalog
from common.data.partition import plan
from common.learning.configs import ModelConfig
from common.learning.dataset import catalog_shape
from common.learning.model import BehaviorModel
from common.run_files import CARD, CATALOG, CHECKPOINT, MODEL
from common.runconfig import RunConfig
from server import checkpoint
from server.export import export as export_model
from simulations.cli import app
from simulations.cli.shared import check_federation

runner = CliRunner()
FUZZ = settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
FEW = settings(FUZZ, max_examples=8)


def squash(text: str) -> str:
    """Output without whitespace: Rich wraps long lines (and paths) wherever it likes."""
    return "".join(text.split())


def refused(result, *names: object, code: int = 2) -> str:
    """Exited with `code` through typer (no exception escaped), no traceback, every name said."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    for name in names:
        assert squash(str(name)) in squash(result.output), (name, result.output)
    return result.output


def no_traceback(result) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "Traceback" not in result.output


# --- event files -----------------------------------------------------------------------------

HEADER = "user_id,item_id,timestamp,region,category,quantity,price,event_type"
ROWS = [
    f"u{u},i{(3 * u + k) % 5},2024-03-0{k + 1} 1{u}:00,{'north' if u < 2 else 'south'},"
    f"0{k}.1,{k + 1},2.5,purchase"
    for u in range(4)
    for k in range(3)
]
GOOD = HEADER + "\n" + "\n".join(ROWS) + "\n"


def with_column(column: str, values: list[str]) -> str:
    frame = pd.read_csv(io.StringIO(GOOD), dtype=str)
    frame[column] = values[: len(frame)]
    return frame.to_csv(index=False)


def check(path: Path, out: Path, *extra: str):
    return runner.invoke(app, ["data", "check", str(path), "--out", str(out), *extra])


@pytest.mark.parametrize(
    ("name", "content", "extra", "problem"),
    [
        ("empty.csv", b"", [], "cannot be read"),
        ("blank.csv", b"\n\n\n", [], "cannot be read"),
        ("header.csv", (HEADER + "\n").encode(), [], "no data rows"),
        ("twice.csv", GOOD.replace(",region,", ",user_id,").encode(), [], "more than once"),
        ("binary.csv", b"\x00\x01PK\x03\x04,\x7f\n\x02,\x03\n", [], "not a text table"),
        ("ragged.csv", (GOOD + "u9,i1,2024-03-01,a,01,1,2,view,x,y\n").encode(), [], "line 14"),
        ("quote.csv", (GOOD + 'u9,"i1,2024\n').encode(), [], "cannot be read"),
        ("words.csv", with_column("quantity", ["many"] * 12).encode(), [], "'quantity'"),
        ("times.csv", with_column("timestamp", ["soon"] * 12).encode(), [], "no parseable"),
        ("short.csv", GOOD.replace(",item_id,", ",sku,").encode(), ["-f", "canonical"], "item_id"),
        (
            "mapped.csv",
            GOOD.encode(),
            ["--map", "user_id=buyer,item_id=item_id,timestamp=timestamp"],
            "buyer",
        ),
        ("cut.csv.gz", gzip.compress(GOOD.encode() * 50)[:300], [], "cannot be read"),
        ("gzip.csv.gz", b"\x1f\x8b\x08\x00" + bytes(64), [], "cannot be read"),
    ],
)
def test_broken_event_file_is_a_named_error_and_writes_nothing(
    tmp_path, name, content, extra, problem
):
    path = tmp_path / name
    path.write_bytes(content)
    out = tmp_path / "out"
    refused(check(path, out, *extra), path, problem)
    assert not out.exists()


def test_a_spec_with_an_unusable_time_format_names_the_file(tmp_path):
    path = tmp_path / "shop.csv"
    path.write_text(GOOD)
    spec = tmp_path / "shop.toml"
    spec.write_text(
        'timestamp_format = "%Q"\n[columns]\nuser_id = "user_id"\nitem_id = "item_id"\n'
        'timestamp = "timestamp"\n'
    )
    refused(check(path, tmp_path / "out", "--spec", str(spec)), path, "'%Q'", "bad directive")


def test_odd_rows_are_rejected_or_noted_with_a_reason_not_fatal(tmp_path):
    odd = {
        "2099-01-01 10:00": "future_timestamp",
        "9999-12-31": "future_timestamp",  # past what a nanosecond clock holds, too
        "1969-12-31 23:59": "timestamp_before_1970",
        "1066-10-14": "timestamp_before_1970",
    }
    lines = [f"u0,i1,{when},north,01.1,1,2.5,purchase" for when in odd]
    lines += ["u1,i1,2024-03-02 10:00,north,01.1,1e400,2.5,view"]  # overflows to inf
    lines += ["u1,i1,2024-03-02 10:00,north,01.1,inf,2.5,view"]
    lines += ["u1,i1,2024-03-02 10:00,north,01.1,1,-inf,view"]
    lines += ["u2,i2,2024-03-02T10:00:00+02:00,south,01.1,1,2.5,cart"]  # offset among naive times
    lines += [ROWS[0]]  # a repeated row
    path = tmp_path / "odd.csv"
    path.write_text(GOOD + "\n".join(lines) + "\n")
    out = tmp_path / "out"
    result = check(path, out)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "odd.summary.json").read_text())
    assert summary["rejected_by_reason"] == {
        "bad_price": 1,
        "bad_quantity": 2,
        "future_timestamp": 2,
        "timestamp_before_1970": 2,
    }
    assert summary["accepted"] == len(ROWS) + 2
    assert summary["last"] == "2024-03-03 13:00:00"  # no odd time stretches the span
    assert any("1 row(s) repeat an earlier row" in note for note in summary["notes"])
    quarantine = pd.read_csv(out / "odd.rejected.csv", dtype=str)
    assert set(quarantine["reason"]) == set(summary["rejected_by_reason"])
    assert "9999-12-31" in set(quarantine["timestamp"])  # kept as it was in the file


def test_checks_of_two_files_of_one_stem_keep_both_outputs(tmp_path):
    out = tmp_path / "out"
    for year in ("2020", "2021"):
        path = tmp_path / f"shop.{year}.csv.gz"
        path.write_bytes(gzip.compress(GOOD.encode()))
        assert check(path, out).exit_code == 0
    assert sorted(p.name for p in out.glob("*.summary.json")) == [
        "shop.2020.summary.json",
        "shop.2021.summary.json",
    ]


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16", "utf-8-sig"])
def test_other_text_encodings_read_the_same(tmp_path, encoding):
    path = tmp_path / "shop.csv"
    path.write_bytes(GOOD.replace("north", "nörth").encode(encoding))
    out = tmp_path / "out"
    result = check(path, out)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "shop.summary.json").read_text())["accepted"] == len(ROWS)


def _parquet(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_parquet(path)
    return path


GOOD_FRAME = pd.read_csv(io.StringIO(GOOD), dtype=str)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"item_id": [[1, 2]] * 12}, "'item_id' holds list values"),
        ({"region": [{"a": 1}] * 12}, "'region' holds dict values"),
        ({"timestamp": list(range(12))}, "'timestamp' holds no parseable times"),
        ({"quantity": [True] * 12}, None),  # booleans are numbers: accepted
        # a date column mapped as quantities would read as nanoseconds: ~1.6e15 units a row
        ({"quantity": pd.date_range("2024-01-01", periods=12)}, "'quantity' holds datetime64"),
        ({"user_id": [b"u\xff"] * 6 + [b"v"] * 6}, None),  # binary text: decoded
    ],
)
def test_parquet_columns_of_the_wrong_type(tmp_path, change, problem):
    path = _parquet(GOOD_FRAME.assign(**change), tmp_path / "typed.parquet")
    result = check(path, tmp_path / "out")
    if problem is None:
        assert result.exit_code == 0, result.output
    else:
        refused(result, path, problem)


def test_float_ids_that_are_no_integers_are_rejected_or_kept_as_text(tmp_path):
    ids = [1.0] * 9 + [math.inf, 1e20, np.nan]  # inf is no id; 1e20 has no exact int64
    path = _parquet(GOOD_FRAME.assign(user_id=ids), tmp_path / "ids.parquet")
    out = tmp_path / "out"
    result = check(path, out)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "ids.summary.json").read_text())
    assert summary["rejected_by_reason"] == {"bad_user_id": 1, "missing_user_id": 1}
    assert summary["accepted"] == len(ROWS) - 2


def test_two_spellings_of_one_column_are_refused_not_resolved_silently(tmp_path):
    path = tmp_path / "shop.csv"
    path.write_text(with_column("User ID", [f"v{i}" for i in range(len(ROWS))]))
    refused(check(path, tmp_path / "out"), path, "'user_id' and 'User ID'", "ambiguous")


def test_parquet_with_a_repeated_column_is_refused(tmp_path):
    table = pa.table(
        [pa.array(["u1"]), pa.array(["a"]), pa.array(["2024-01-01"]), pa.array(["u2"])],
        names=["user_id", "item_id", "timestamp", "user_id"],
    )
    path = tmp_path / "twice.parquet"
    pq.write_table(table, path)
    refused(check(path, tmp_path / "out"), path, "'user_id' appear more than once")


def outcome_is_clean(result, path: Path, out: Path) -> None:
    """The contract of every fuzzed file: read (with consistent counts) or a named error that
    wrote nothing; never a crash."""
    no_traceback(result)
    if result.exit_code == 0:
        summary = json.loads((out / f"{path.name.split('.')[0]}.summary.json").read_text())
        assert summary["accepted"] + summary["rejected"] == summary["rows_read"]
    else:
        refused(result, path)
        assert not out.exists() or not any(out.iterdir())


CELLS = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
    st.floats().map(str),
    st.integers(-(2**70), 2**70).map(str),
    st.datetimes().map(str),
    st.just(""),
)
COLUMN_CHANGE = st.sampled_from(["keep", "drop", "rename", "duplicate", "retype"])


@FUZZ
@given(
    changes=st.fixed_dictionaries({c: COLUMN_CHANGE for c in HEADER.split(",")}),
    cells=st.lists(CELLS, min_size=12, max_size=12),
    new_name=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=10),
    fmt=st.sampled_from(["auto", "canonical"]),
)
def test_fuzzed_columns_are_read_or_refused_by_name(
    tmp_path_factory, changes, cells, new_name, fmt
):
    frame = GOOD_FRAME.copy()
    for column, change in changes.items():
        if change == "drop":
            frame = frame.drop(columns=column)
        elif change == "rename":
            frame = frame.rename(columns={column: new_name})
        elif change == "duplicate":
            frame = pd.concat([frame, frame[[column]]], axis=1)
        elif change == "retype":
            frame[column] = cells
    folder = tmp_path_factory.mktemp("columns")
    path = folder / "fuzz.csv"
    frame.to_csv(path, index=False)
    out = folder / "out"
    outcome_is_clean(check(path, out, "-f", fmt), path, out)


DAMAGE = st.lists(
    st.tuples(
        st.sampled_from(["flip", "cut", "insert", "overwrite"]),
        st.floats(0, 1, exclude_max=True),
        st.binary(min_size=1, max_size=8),
    ),
    min_size=1,
    max_size=4,
)


def damaged(blob: bytes, damage: list[tuple[str, float, bytes]]) -> bytes:
    data = bytearray(blob)
    for kind, where, noise in damage:
        at = int(where * len(data)) if data else 0
        if kind == "flip" and data:
            data[at] ^= 1 << (noise[0] % 8)
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = noise
        elif data:
            data[at : at + len(noise)] = noise
    return bytes(data)


@FUZZ
@given(damage=DAMAGE, suffix=st.sampled_from([".csv", ".csv.gz", ".parquet"]))
def test_damaged_event_files_are_read_or_refused_by_name(tmp_path_factory, damage, suffix):
    if suffix == ".parquet":
        buffer = io.BytesIO()
        GOOD_FRAME.to_parquet(buffer)
        blob = buffer.getvalue()
    else:
        blob = gzip.compress(GOOD.encode()) if suffix == ".csv.gz" else GOOD.encode()
    folder = tmp_path_factory.mktemp("bytes")
    path = folder / f"fuzz{suffix}"
    path.write_bytes(damaged(blob, damage))
    out = folder / "out"
    outcome_is_clean(check(path, out), path, out)


# --- small regions and filtered clients ------------------------------------------------------


def events_with_odd_regions(tiny_events: pd.DataFrame) -> pd.DataFrame:
    """The tiny data set plus a region with one user and one whose users all have < 3 events."""
    solo = tiny_events[tiny_events["user_id"] == tiny_events["user_id"].iloc[0]].copy()
    solo["user_id"], solo["region"] = "solo-user", "solo"
    ghost = tiny_events.head(4).copy()
    ghost["user_id"] = ["ghost-1", "ghost-1", "ghost-2", "ghost-2"]
    ghost["region"] = "ghost"
    return pd.concat([tiny_events, solo, ghost], ignore_index=True)


def test_federation_checks_name_idle_and_small_clients_and_refuse_the_impossible(
    tiny_events, capsys
):
    events = events_with_odd_regions(tiny_events)
    parts = plan(events, events["region"].nunique())
    check_federation("shop.csv", events, parts, batch_size=8, min_clients=2)
    said = squash(capsys.readouterr().err)
    assert squash("ghost: no user with 3 or more events; these clients cannot train") in said
    assert squash("solo: fewer users than --batch-size 8") in said

    for batch, least, message in [
        (10_000, 1, "--batch-size 10000: more than the users of any client in shop.csv"),
        (8, len(parts), f"--min-clients {len(parts)}: only {len(parts) - 1} of the"),
    ]:
        with pytest.raises(typer.Exit) as stop:
            check_federation("shop.csv", events, parts, batch_size=batch, min_clients=least)
        assert stop.value.exit_code == 2
        assert squash(message) in squash(capsys.readouterr().err)
    nobody = events.drop_duplicates("user_id")
    with pytest.raises(typer.Exit):
        check_federation("shop.csv", nobody, plan(nobody, 2), batch_size=8, min_clients=1)
    assert "no user has 3 or more events" in " ".join(capsys.readouterr().err.split())


TINY_MODEL = ["--epochs", "1", "--hidden", "16", "--layers", "1", "--max-len", "12"]


def test_train_local_with_a_one_user_region(tmp_path, tiny_events):
    events = events_with_odd_regions(tiny_events)
    events = events[events["region"] != "ghost"]
    data = _parquet(events, tmp_path / "odd.parquet")
    result = runner.invoke(
        app, ["train-local", "--data", str(data), *TINY_MODEL, "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.output
    clients = json.loads((tmp_path / "o" / "results.json").read_text())["clients"]
    assert clients["solo"]["users"] == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_device_this_machine_lacks_is_named_before_the_data_is_read(tmp_path):
    args = ["train-central", "--device", "cuda", "--data", str(tmp_path / "none.parquet")]
    refused(runner.invoke(app, args), "--device", "no CUDA device")


@pytest.mark.parametrize(
    ("start", "problem"),
    [("garbage", "not an ISO date"), ("2999-01-01", "between 1970 and today")],
)
def test_synthetic_data_starts_on_a_real_date_in_the_past(tmp_path, start, problem):
    out = tmp_path / "synth.parquet"
    result = runner.invoke(app, ["data", "synth", "--start", start, "--out", str(out)])
    refused(result, "--start", problem)
    assert not out.exists()


def test_registering_a_node_in_a_damaged_registry_names_it(tmp_path):
    registry, key = tmp_path / "registry.json", tmp_path / "north.pub"
    registry.write_text('{"clie')
    key.write_text("not a key")
    args = ["node", "register", "north", "--node-key", str(key), "--ledger-key", str(key)]
    result = runner.invoke(app, [*args, "--registry", str(registry)])
    refused(result, registry, "not a readable node registry")
    assert registry.read_text() == '{"clie'


@pytest.mark.parametrize("command", ["baselines", "train-central", "train-local"])
def test_training_on_users_all_filtered_out_is_a_named_error(tmp_path, tiny_events, command):
    data = _parquet(tiny_events.drop_duplicates("user_id"), tmp_path / "once.parquet")
    args = [] if command == "baselines" else TINY_MODEL
    result = runner.invoke(app, [command, "--data", str(data), *args, "--out", str(tmp_path / "o")])
    refused(result, data, "no user has 3 or more events")
    assert not (tmp_path / "o").exists()


def test_train_local_skips_a_region_whose_users_are_all_filtered_out(tmp_path, tiny_events):
    data = _parquet(events_with_odd_regions(tiny_events), tmp_path / "odd.parquet")
    result = runner.invoke(
        app, ["train-local", "--data", str(data), *TINY_MODEL, "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.output
    assert squash("skipped ghost: no user has 3 or more events") in squash(result.output)
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["skipped"] == {"ghost": "no user has 3 or more events"}
    assert "ghost" not in results["clients"]


@pytest.mark.parametrize("command", ["baselines", "train-central", "train-local"])
def test_three_weeks_of_data_train_the_next_item_head_and_say_why_no_forecast(
    tmp_path, tiny_events, command
):
    """Too short for a held-out month of demand, long enough for next-item: that head trains
    and is scored, the forecast is named as missing and why; never a traceback."""
    short = tiny_events[
        tiny_events["timestamp"] < tiny_events["timestamp"].min() + pd.Timedelta(21, "D")
    ]
    data = _parquet(short, tmp_path / "short.parquet")
    args = [] if command == "baselines" else TINY_MODEL
    result = runner.invoke(app, [command, "--data", str(data), *args, "--out", str(tmp_path / "o")])
    no_traceback(result)
    assert result.exit_code == 0, result.output
    assert squash("no demand forecast: 3 full weeks of purchases") in squash(result.output)
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    if command == "train-local":
        assert results["pooled"]["users"] > 0 and math.isnan(results["pooled"]["wape"])
        return
    assert results["baselines"]["recommendation"] and results["baselines"]["forecast"] == {}
    if command == "train-central":
        assert results["bert"]["test"]["users"] > 0 and results["bert"]["forecast"] == {}


# --- run configs -----------------------------------------------------------------------------


class Started(Exception):
    """Raised in place of Flower: the command got past every check."""


@pytest.fixture
def no_flower(monkeypatch):
    def started(*_args, **_kwargs):
        raise Started

    monkeypatch.setattr(simulations.simulate, "simulate", started)


# Enough users that every simulated client can fill the default batch (64).
SMALL = ["--synth-events", "6000", "--synth-users", "600"]


def simulate(tmp_path: Path, *args: str, config: str | bytes | None = None):
    extra = []
    if config is not None:
        path = tmp_path / "run.toml"
        path.write_bytes(config if isinstance(config, bytes) else config.encode())
        extra = ["--config", str(path)]
    return runner.invoke(app, ["simulate", *extra, *SMALL, *args, "--out", str(tmp_path / "run")])


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ("epsilon = -1.0", "--epsilon: Input should be greater than 0"),
        ("epsilon = 0", "--epsilon: Input should be greater than 0"),
        ("epsilon = nan", "--epsilon"),
        ("delta = 1.0", "--delta: Input should be less than 1"),
        ("delta = 3", "--delta"),
        ("central-delta = 1", "--central-delta"),
        (
            'strategy = "fedsgd"',
            "--strategy: Input should be 'fedavg', 'fedadam', 'fedprox', 'fedtrimmedavg', "
            "'fedmedian', 'krum', 'multikrum' or 'bulyan'",
        ),
        ("min-clients = 0", "--min-clients"),
        ("num-server-rounds = 0", "--num-server-rounds"),
        ("batch-size = 0", "--batch-size"),
        ("fraction-train = 0", "--fraction-train"),
        ('epsilon = "lots"', "--epsilon: Input should be a valid number"),
        ("epsilon = [1, 2]", "--epsilon"),
        ("epsilonn = 3", "--epsilonn: Extra inputs are not permitted"),
        ("[tool]\nx = 1", "--tool"),
        ("heads = 3", "hidden (64) must be a multiple of heads (3)"),
        ("windows = 1000000000", "--windows"),
        ("epsilon = = 3", "not a readable TOML run config"),
        ("batch-size = 5000", "--batch-size 5000: more than the users of any client"),
        ("min-clients = 50", "--min-clients 50: only"),
    ],
)
def test_bad_run_config_file_names_the_file_and_the_key(tmp_path, no_flower, config, problem):
    output = refused(simulate(tmp_path, config=config), tmp_path / "run.toml", problem)
    assert "--:" not in squash(output)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--epsilon", "-1"], "--epsilon"),
        (["--delta", "1"], "--delta"),
        (["--strategy", "fedsgd"], "'fedsgd' is not one of"),
        (["--num-server-rounds", "0"], "--num-server-rounds"),
    ],
)
def test_bad_run_config_option_is_named(tmp_path, no_flower, args, problem):
    refused(simulate(tmp_path, *args), problem)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("epsilon", -1.0),
        ("epsilon", 0.0),
        ("delta", 1.0),
        ("strategy", "fedsgd"),
        ("min-clients", 0),
        ("batch-size", 0),
        ("demand-start", "garbage"),
        ("device", "gpu"),
    ],
)
def test_flower_run_config_names_the_key(key, value):
    """What a ServerApp or ClientApp gets from `flwr run --run-config`."""
    with pytest.raises(ValueError, match=f"run config '{key}'"):
        RunConfig.from_flower({key: value})


@pytest.mark.parametrize(
    ("config", "args", "problem"),
    [
        pytest.param(
            b"\xff\xfe\x00 epsilon = 1",
            [],
            "run.toml",
            id="binary-toml",
        ),
        pytest.param("epsilon = inf", [], "--epsilon", id="infinite-budget"),
        pytest.param(None, ["--clients", "0"], "--clients", id="zero-clients"),
        pytest.param(None, ["--clients", "-1"], "--clients", id="negative-clients"),
        pytest.param(
            None,
            ["--batch-size", "5000"],
            "--batch-size 5000",
            id="batch-over-users",
        ),
        pytest.param(
            None,
            ["--min-clients", "50"],
            "--min-clients 50",
            id="min-clients-over-clients",
        ),
    ],
)
def test_run_config_checks_before_anything_starts(tmp_path, no_flower, config, args, problem):
    refused(simulate(tmp_path, *args, config=config), problem)


def test_an_option_given_over_a_config_file_is_not_blamed_on_the_file(tmp_path, no_flower):
    output = refused(simulate(tmp_path, "--batch-size", "5000", config="batch-size = 8"))
    assert squash("--batch-size 5000: more than") in squash(output)
    assert "run.toml" not in squash(output)


FUZZED_KEYS = sorted(
    set(RunConfig.model_fields)
    - {"data", "spec", "columns", "catalog", "out", "server_key", "registry", "seed"}
    - {k for k in RunConfig.model_fields if k.startswith("synth_")}
)
TOML_VALUES = st.one_of(
    st.integers(-(2**63), 2**63 - 1).map(str),
    st.floats().map(lambda x: "nan" if math.isnan(x) else repr(x)),
    st.booleans().map(lambda b: str(b).lower()),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=8).map(json.dumps),
    st.lists(st.integers(-5, 5), max_size=2).map(str),
)


@FUZZ
@given(st.dictionaries(st.sampled_from(FUZZED_KEYS), TOML_VALUES, min_size=1, max_size=3))
def test_fuzzed_run_configs_start_or_name_the_key(tmp_path_factory, no_flower, table):
    folder = tmp_path_factory.mktemp("config")
    text = "\n".join(f"{key.replace('_', '-')} = {value}" for key, value in table.items())
    result = simulate(folder, config=text)
    if isinstance(result.exception, Started):
        return
    output = refused(result, folder / "run.toml")
    said = squash(output)
    assert (
        "not a readable TOML" in output
        or any(f"--{key.replace('_', '-')}" in said for key in table)
        or "mustbeamultipleof" in said
        or "central-dpneeds" in said
    ), output


def test_a_finished_run_whose_model_is_unusable_warns_instead_of_the_exact_table(tmp_path, capsys):
    from simulations.cli.train import _print_exact

    (tmp_path / MODEL).write_bytes(b"not safetensors")
    _print_exact(tmp_path, pd.DataFrame(), None, [], RunConfig())
    said = squash(capsys.readouterr().err)
    assert squash("no exact table beside the baselines") in said
    assert squash(str(tmp_path)) in said and "Traceback" not in said


# --- checkpoints -----------------------------------------------------------------------------


def small_model(hidden: int = 16) -> BehaviorModel:
    catalog = Catalog(
        ["a", "b", "c"],
        [1, 1, 2],
        ["<unknown>", "x", "y"],
        [0, 1, 1],
        ["<u>", "t"],
        ["<unknown>", "r"],
    )
    cfg = ModelConfig(hidden=hidden, layers=1, heads=2, intermediate=2 * hidden, max_len=4)
    torch.manual_seed(0)
    return BehaviorModel(cfg, catalog_shape(catalog))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint with FedAdam-like server state; its bytes and the state dict it holds."""
    folder = tmp_path_factory.mktemp("ckpt")
    arrays = ArrayRecord(small_model().state_dict())
    state = {"m_t": {k: v.numpy() * 0 + 1 for k, v in arrays.items()}}
    history = [{"round": 1, "clients": []}, {"round": 2, "clients": []}]
    checkpoint.save(folder, checkpoint.Checkpoint(2, arrays, state, history, None))
    return (folder / CHECKPOINT).read_bytes(), small_model().state_dict()


def test_a_checkpoint_of_the_same_model_resumes(tmp_path, saved):
    blob, like = saved
    (tmp_path / CHECKPOINT).write_bytes(blob)
    loaded = checkpoint.load(tmp_path, like)
    assert loaded.server_round == 2 and len(loaded.history) == 2
    assert set(loaded.arrays.keys()) == set(like)


@FUZZ
@given(cut=st.floats(0, 1, exclude_max=True))
def test_truncated_checkpoint_names_the_file(tmp_path_factory, saved, cut):
    blob, _ = saved
    folder = tmp_path_factory.mktemp("cut")
    (folder / CHECKPOINT).write_bytes(blob[: int(cut * len(blob))])
    with pytest.raises(ValueError, match=r"checkpoint\.safetensors: checkpoint is corrupt"):
        checkpoint.load(folder)


@FUZZ
@given(position=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_bit_flipped_checkpoint_is_refused_or_unchanged(tmp_path_factory, saved, position, bit):
    blob, like = saved
    data = bytearray(blob)
    data[int(position * len(data))] ^= 1 << bit
    folder = tmp_path_factory.mktemp("flip")
    (folder / CHECKPOINT).write_bytes(bytes(data))
    try:
        loaded = checkpoint.load(folder, like)
    except ValueError as exc:
        assert str(folder / CHECKPOINT) in str(exc)
        return
    # Only a flip that changes nothing the file means (e.g. JSON padding) may load.
    assert loaded.server_round == 2
    for name, value in like.items():
        assert np.array_equal(loaded.arrays[name].numpy(), value.numpy()), name


def test_checkpoint_of_another_model_shape_names_the_array(tmp_path, saved):
    blob, _ = saved
    (tmp_path / CHECKPOINT).write_bytes(blob)
    other = small_model(hidden=32).state_dict()
    with pytest.raises(
        ValueError,
        match=r"checkpoint\.safetensors: checkpoint is from another model shape.*"
        r"this run's model needs \(.*32",
    ):
        checkpoint.load(tmp_path, other)
    fewer = dict(list(small_model().state_dict().items())[:-2])
    with pytest.raises(ValueError, match="arrays unknown here"):
        checkpoint.load(tmp_path, fewer)


def test_a_foreign_safetensors_file_is_not_a_checkpoint(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / CHECKPOINT))  # e.g. an exported model
    with pytest.raises(ValueError, match=r"corrupt or incomplete.*round"):
        checkpoint.load(tmp_path)


# --- ledgers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ledgers(tmp_path_factory):
    """A real client ledger (3 rounds) with the server's record of it, and the pinned keys."""
    folder = tmp_path_factory.mktemp("ledgers")
    client = write_client(folder, folder / "keys")
    server = write_server(folder, folder / "keys", [client])
    return folder, client.read_bytes(), server.read_bytes()


def verify(folder: Path, client: bytes, server: bytes | None = None):
    target = folder / "north" / "privacy_ledger.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(client)
    paths = [str(target)]
    if server is not None:
        (folder / "aggregation_ledger.jsonl").write_bytes(server)
        paths.append(str(folder / "aggregation_ledger.jsonl"))
    result = runner.invoke(app, ["privacy", "verify", *paths, "--keys", str(folder / "keys")])
    return result, target


def copy_keys(ledgers, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("verify")
    shutil.copytree(ledgers[0] / "keys", folder / "keys")
    return folder


def test_intact_ledgers_verify(ledgers, tmp_path_factory):
    result, _ = verify(copy_keys(ledgers, tmp_path_factory), ledgers[1], ledgers[2])
    assert result.exit_code == 0, result.output


@FEW
@given(cut=st.floats(0, 1, exclude_max=True))
def test_truncated_ledger_fails_verification_naming_it(ledgers, tmp_path_factory, cut):
    _, client, server = ledgers
    result, target = verify(
        copy_keys(ledgers, tmp_path_factory), client[: int(cut * len(client))], server
    )
    refused(result, "verification FAILED", target.name, code=1)


@FEW
@given(position=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_bit_flipped_ledger_fails_verification_naming_it(ledgers, tmp_path_factory, position, bit):
    _, client, _ = ledgers
    data = bytearray(client)
    data[int(position * len(data))] ^= 1 << bit
    result, target = verify(copy_keys(ledgers, tmp_path_factory), bytes(data))
    refused(result, "verification FAILED", target.name, code=1)


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ('"delta": 1e-05', '"delta": 1e-300', "entry altered"),  # and no accountant takes it
        ('"epsilon_after": ', '"epsilon_after": NaN, "x": ', "NaN is not valid JSON"),
    ],
)
def test_altered_numbers_fail_verification_not_the_verifier(
    ledgers, tmp_path_factory, old, new, problem
):
    _, client, _ = ledgers
    result, target = verify(
        copy_keys(ledgers, tmp_path_factory), client.decode().replace(old, new, 1).encode()
    )
    refused(result, "verification FAILED", target.name, problem, code=1)


def test_ledger_file_that_is_no_ledger(ledgers, tmp_path_factory):
    folder = copy_keys(ledgers, tmp_path_factory)
    for blob in (b"", b"\x00\xff\xfe binary", b"[1, 2, 3]\n", b'{"entry": 5}\n'):
        result, target = verify(folder, blob)
        refused(result, "verification FAILED", target.name, code=1)


# --- exported models (recommend / forecast) ----------------------------------------------------


@pytest.fixture(scope="module")
def export(tmp_path_factory, tiny_events):
    """A tiny exported model run folder and the events to serve from; the folder's good bytes."""
    folder = tmp_path_factory.mktemp("export")
    catalog = Catalog.build(tiny_events)
    catalog.save(folder / CATALOG)
    cfg = ModelConfig(hidden=16, layers=1, heads=2, intermediate=32, max_len=12)
    torch.manual_seed(0)
    model = BehaviorModel(cfg, catalog_shape(catalog))
    export_model(folder, ArrayRecord(model.state_dict()), cfg, catalog_shape(catalog), {})
    events = _parquet(tiny_events[tiny_events["region"] == "region-01"], folder / "events.parquet")
    good = {name: (folder / name).read_bytes() for name in (MODEL, CARD, CATALOG)}
    return folder, events, good, str(pd.read_parquet(events)["user_id"].iloc[0])


def serve(export, command: str = "recommend", **files: bytes):
    """Run `command` with some of the export's files replaced; the good ones are put back."""
    folder, events, good, user = export
    try:
        for name, blob in files.items():
            (folder / name).write_bytes(blob)
        args = ["--user", user] if command == "recommend" else []
        return runner.invoke(app, [command, "--model", str(folder), "--events", str(events), *args])
    finally:
        for name, blob in good.items():
            (folder / name).write_bytes(blob)


@pytest.fixture(scope="module")
def served(export):
    result = serve(export)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize(
    ("name", "blob", "problem"),
    [
        (MODEL, b"", "header too small"),
        (MODEL, b"\xff" * 40, "not a usable exported model"),
        (CARD, b"{not json", "not a usable exported model"),
        (CARD, b"[1, 2]", "not a usable exported model"),
        (CARD, b'{"config": "hidden=16"}', "not a usable exported model"),
        (CARD, b"{}", "'config'"),
        (CATALOG, b'{"items": 3}', "not a valid catalog"),
        (CATALOG, b"\xff\xfe", "not a valid catalog"),
    ],
)
@pytest.mark.parametrize("command", ["recommend", "forecast"])
def test_damaged_export_names_the_model_folder(export, command, name, blob, problem):
    refused(serve(export, command, **{name: blob}), export[0], problem)


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda c: c["category_top"].__setitem__(1, 999), "'category_top' points outside"),
        (lambda c: c["item_category"].append(0), "'item_category' has"),
        (lambda c: c.update(top_category_chars="x"), "'top_category_chars'"),
        (lambda c: c.update(items=list(range(len(c["items"])))), "'items.0'"),
    ],
)
def test_a_catalog_that_points_nowhere_names_the_field(export, edit, problem):
    catalog = json.loads(export[2][CATALOG])
    edit(catalog)
    refused(serve(export, **{CATALOG: json.dumps(catalog).encode()}), export[0], problem)


@pytest.mark.parametrize("option", [["-k", "0"], ["-k", "-3"], ["--limit", "0"]])
def test_recommend_needs_at_least_one_item_and_one_user(export, option):
    folder, events, _, _ = export
    args = ["recommend", "--model", str(folder), "--events", str(events), *option]
    refused(runner.invoke(app, args), option[0])


def test_export_of_another_model_shape_is_refused(export):
    other = small_model(hidden=32).state_dict()
    buffer = export[0] / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.items()}, str(buffer))
    refused(serve(export, **{MODEL: buffer.read_bytes()}), export[0], "size mismatch")


@FEW
@given(cut=st.floats(0, 1, exclude_max=True))
def test_truncated_export_weights_are_refused(export, cut):
    blob = export[2][MODEL]
    refused(serve(export, **{MODEL: blob[: int(cut * len(blob))]}), export[0])


@FEW
@given(position=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_flipped_export_header_is_refused_or_changes_nothing(export, served, position, bit):
    blob = bytearray(export[2][MODEL])
    header = 8 + int.from_bytes(blob[:8], "little")
    blob[int(position * header)] ^= 1 << bit
    result = serve(export, **{MODEL: bytes(blob)})
    if result.exit_code == 0:
        assert result.output == served
    else:
        refused(result, export[0])


def test_flipped_export_weights_are_refused(export):
    blob = bytearray(export[2][MODEL])
    blob[-7] ^= 0x40  # an exponent bit of the last weight
    refused(serve(export, **{MODEL: bytes(blob)}), export[0])


# --- no partial output -----------------------------------------------------------------------


def test_commands_that_fail_leave_no_file_behind(tmp_path):
    target = tmp_path / "synth.parquet"
    refused(runner.invoke(app, ["data", "synth", "--events", "5", "--out", str(target)]), "events")
    assert not target.exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = runner.invoke(
        app,
        ["data", "synth", "--events", "200", "--users", "10", "--out", str(blocker / "s.parquet")],
    )
    refused(result, blocker / "s.parquet", "cannot write")
    good = tmp_path / "good.csv"
    good.write_text(GOOD)
    refused(check(good, blocker / "out"), blocker / "out", "cannot write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "good.csv"]


def test_markup_in_a_file_name_is_printed_not_interpreted(tmp_path):
    path = tmp_path / "[red]shop.csv"
    path.write_text(HEADER + "\n")
    refused(check(path, tmp_path / "out"), "[red]shop.csv", "no data rows")


def test_huge_finite_numbers_are_kept_as_they_are(tmp_path):
    path = tmp_path / "big.csv"
    path.write_text(with_column("quantity", ["1e300"] * 12))
    out = tmp_path / "out"
    assert check(path, out).exit_code == 0
    assert json.loads((out / "big.summary.json").read_text())["accepted"] == 12
