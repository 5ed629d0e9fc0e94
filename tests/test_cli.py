import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from simulations.cli import app

runner = CliRunner()


def _commands(group=app, prefix=()):
    """Every command path of the CLI, groups included, from Typer's own registry."""
    for info in group.registered_commands:
        yield (*prefix, info.name or info.callback.__name__)
    for sub in group.registered_groups:
        yield (*prefix, sub.name)
        yield from _commands(sub.typer_instance, (*prefix, sub.name))


def test_help_documents_every_command():
    commands = list(_commands())
    assert {("simulate",), ("monitor",), ("privacy", "audit"), ("data", "synth")} <= set(commands)
    top = runner.invoke(app, ["--help"]).output
    for path in commands:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert " ".join(path) + " [OPTIONS]" in " ".join(result.output.split())
        if len(path) == 1:
            assert path[0] in top


def test_simulate_options_are_the_run_config():
    from common.runconfig import RunConfig

    wide = runner.invoke(app, ["simulate", "--help"], env={"COLUMNS": "250"})
    text = " ".join(wide.output.split())
    for name in RunConfig.model_fields:
        assert f"--{name.replace('_', '-')}" in text
    bad = runner.invoke(app, ["simulate", "--epsilon", "-1"])
    assert bad.exit_code == 2 and "--epsilon" in bad.output


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
    assert results["bert"]["served"]["users"] == results["bert"]["test"]["users"]
    assert "(served)" in result.output
    assert "calibrated" in results["bert"]["forecast"]
    assert "full ranking" in result.output
    user = str(tiny_events["user_id"].iloc[0])  # served like a federated run's export
    served = ["recommend", "--model", str(out), "--events", str(data), "--user", user]
    assert runner.invoke(app, served).exit_code == 0


def test_train_local_on_a_mapped_file(tmp_path, tiny_events):
    data = tmp_path / "shop.csv"
    renamed = {"user_id": "customer", "item_id": "sku", "timestamp": "when"}
    tiny_events.rename(columns=renamed).to_csv(data, index=False)
    out = tmp_path / "local"
    args = ["--epochs", "1", "--hidden", "16", "--layers", "1", "--max-len", "12"]
    columns = ",".join(f"{k}={v}" for k, v in renamed.items())
    rest = ",".join(f"{c}={c}" for c in ("region", "category", "quantity", "price", "event_type"))
    mapped = ["--data", str(data), "--map", f"{columns},{rest}"]
    result = runner.invoke(app, ["train-local", *mapped, *args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    pooled, ranking = results["pooled"], results["ranking"]
    assert pooled["users"] > 0 and 0 <= pooled["hr@10"] <= 1
    # Each region's model beside its own rule, as the simulation scores a federated one.
    assert ranking["model"]["full"]["hr@10"] == pytest.approx(pooled["hr@10"])
    assert ranking["served"]["users"] == ranking["model"]["users"] == pooled["users"]
    assert {"own_history", "repeat_aware", "transition_aware"} <= set(ranking["rules_own_region"])
    assert "local model alone" in result.output and "(served)" in result.output
    assert "local-only, pooled over" in result.output


def test_pyproject_run_config_matches_the_pydantic_defaults():
    import tomllib
    from pathlib import Path

    from common.runconfig import RunConfig

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    flower = pyproject["tool"]["flwr"]["app"]
    assert flower["config"] == RunConfig().to_flower()
    assert flower["components"] == {
        "serverapp": "server.server_app:app",
        "clientapp": "clients.client_app:app",
    }


def test_recommend_and_forecast_from_an_exported_model(tmp_path, tiny_events):
    import torch
    from safetensors.torch import save_file

    from common.data.catalog import Catalog
    from common.learning.configs import ModelConfig
    from common.learning.dataset import catalog_shape
    from common.learning.model import BehaviorModel

    catalog = Catalog.build(tiny_events)
    catalog.save(tmp_path / "catalog.json")
    cfg = ModelConfig(hidden=16, layers=1, heads=2, intermediate=32, max_len=12)
    torch.manual_seed(0)
    model = BehaviorModel(cfg, catalog_shape(catalog))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(tmp_path / "model.safetensors"),
    )
    (tmp_path / "model_card.json").write_text(json.dumps({"config": cfg.model_dump()}))
    data = tmp_path / "events.parquet"
    tiny_events.to_parquet(data)

    result = runner.invoke(
        app,
        [
            "recommend",
            "--model",
            str(tmp_path),
            "--events",
            str(data),
            "--user",
            "u000001",
            "-k",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "user u000001: top 3" in result.output
    assert result.output.count(" i0") == 3

    result = runner.invoke(app, ["forecast", "--model", str(tmp_path), "--events", str(data)])
    assert result.exit_code == 0, result.output
    assert "region-01" in result.output and "4-week average" in result.output

    missing = runner.invoke(
        app, ["recommend", "--model", str(tmp_path), "--events", str(data), "--user", "nobody"]
    )
    assert missing.exit_code == 2 and "nobody" in missing.output
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_card.json").write_text("{not json")
    result = runner.invoke(app, ["forecast", "--model", str(broken), "--events", str(data)])
    assert result.exit_code == 2 and "not a usable exported model" in " ".join(
        result.output.split()
    )
