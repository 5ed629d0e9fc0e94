import json

import pandas as pd
from typer.testing import CliRunner

from simulations.cli import app

runner = CliRunner()


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("data", "train-central", "baselines"):
        assert command in result.output
    data_help = runner.invoke(app, ["data", "--help"]).output
    assert "check" in data_help and "synth" in data_help


def test_synth_then_check_round_trip(tmp_path):
    events = tmp_path / "synth.parquet"
    result = runner.invoke(
        app, ["data", "synth", "--events", "3000", "--users", "100", "--out", str(events)]
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "checked"
    result = runner.invoke(app, ["data", "check", str(events), "--out", str(out), "--write"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "synth.summary.json").read_text())
    assert summary["rows_read"] == summary["accepted"] == 3000
    assert len(pd.read_parquet(out / "synth.events.parquet")) == 3000


def test_check_reports_rejections_and_a_fatal_error_keeps_earlier_output(tmp_path, canonical_csv):
    out = tmp_path / "out"
    assert (
        runner.invoke(app, ["data", "check", str(canonical_csv), "--out", str(out)]).exit_code == 0
    )
    quarantine = out / "events.rejected.csv"
    good = quarantine.read_text()
    assert "bad_timestamp" in good
    canonical_csv.write_text("user_id,timestamp\nu1,2024-01-01\n")  # now broken
    result = runner.invoke(
        app, ["data", "check", str(canonical_csv), "--out", str(out), "-f", "canonical"]
    )
    assert result.exit_code == 2
    assert "item_id" in result.output
    assert quarantine.read_text() == good
    assert not list(out.glob(".*.tmp"))


def test_bad_config_is_a_clear_error():
    result = runner.invoke(app, ["data", "synth", "--events", "5"])
    assert result.exit_code == 2
    assert "events" in result.output


def test_train_central_on_tiny_synthetic(tmp_path, tiny_events):
    data = tmp_path / "tiny.parquet"
    tiny_events.to_parquet(data)
    out = tmp_path / "run"
    args = ["--epochs", "1", "--hidden", "16", "--layers", "1", "--max-len", "12"]
    result = runner.invoke(app, ["train-central", "--data", str(data), *args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert {"most_popular", "most_popular_region", "own_history"} <= set(
        results["baselines"]["recommendation"]
    )
    assert 0 <= results["bert"]["test"]["full"]["hr@10"] <= 1
    assert "calibrated" in results["bert"]["forecast"]
    assert (out / "model.safetensors").stat().st_size > 0
    assert "full ranking" in result.output
