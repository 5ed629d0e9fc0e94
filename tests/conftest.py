from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from common.data.synth import SynthConfig, generate

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TAFENG = SHARED / "ta-feng" / "ta_feng.csv.zip"
RETAIL = SHARED / "online-retail-ii-2009-2010" / "online_retail_ii_2009_2010.parquet"

TINY = SynthConfig(events=6_000, users=200, items=150, regions=3, top_categories=4, days=56)


@pytest.fixture(scope="session")
def tiny_events() -> pd.DataFrame:
    return generate(TINY)


@pytest.fixture
def canonical_csv(tmp_path: Path) -> Path:
    path = tmp_path / "events.csv"
    path.write_text(
        "user_id,item_id,timestamp,region,category,quantity,price,event_type\n"
        "u1,a,2024-01-01 10:00,north,01.1,1,2.5,purchase\n"
        "u1,b,2024-01-02 10:00,north,01.2,2,3.0,view\n"
        "u2,a,2024-01-03 11:00,south,01.1,1,2.5,purchase\n"
        ",a,2024-01-03 12:00,south,01.1,1,2.5,purchase\n"
        "u3,c,not-a-date,south,02.1,1,1.0,purchase\n"
        "u3,c,2024-01-04 09:00,south,02.1,-1,1.0,purchase\n"
        "u3,c,2024-01-04 09:00,south,02.1,x,1.0,purchase\n"
        "u3,d,2024-01-05 09:00,south,02.1,1,1.0,wishlist\n"
    )
    return path


@pytest.fixture
def task_identity(monkeypatch):
    """Flower stamps messages with the running task's ids; tests that build messages outside a
    Flower runtime set them."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


@pytest.fixture
def tiny_run(tmp_path, tiny_events):
    """A tiny DP run's config, the config the server shares and the catalog's shape: enough to
    call the ClientApp's train and evaluate directly."""
    from common.learning.dataset import catalog_shape
    from common.run_files import CLIENTS, POLICY
    from common.runconfig import RunConfig
    from server.platform import platform_for
    from simulations.simulate import simulated_policy

    data = tmp_path / "tiny.parquet"
    tiny_events.to_parquet(data)
    cfg = RunConfig(
        data=str(data), out=str(tmp_path / "out"), hidden=16, layers=1, heads=2, max_len=12,
        batch_size=16, delta=1e-3, device="cpu",
    )  # fmt: skip
    platform = platform_for(cfg, Path(cfg.out))
    simulated_policy(cfg).write(Path(cfg.out) / CLIENTS / POLICY)
    shared = {"catalog": str(platform.catalog_path), "demand-start": platform.demand_start}
    return cfg, shared, catalog_shape(platform.catalog)
