"""Small and odd clients (issue 12): a client whose data cannot support a head trains what it
can, or declines with a one-line reason in the round table; never a traceback.

The ClientApp's train/evaluate functions run in-process on tiny data, as Flower would call them
(like tests/test_client_privacy.py), for a deployed client reading its own file.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from safetensors.torch import save_file

from clients import client_app
from clients.local_data import NO_USERS, UNREADABLE, CannotTakePart, load_client_data
from clients.rounds import NO_TRAINING_USER
from common.data.catalog import Catalog
from common.data.partition import audit_non_members
from common.data.sequences import leave_last_out
from common.data.sources import read_source
from common.learning.configs import ModelConfig
from common.learning.dataset import catalog_shape
from common.learning.inference import load_exported
from common.learning.metrics import sampled_ranks
from common.learning.model import BehaviorModel
from common.messages import (
    CLIENT,
    DEMAND_ACTUAL_SUM,
    DEMAND_ERROR_SUM,
    HITS_SUM,
    NAME,
    NDCG_SUM,
    REASON,
    REFUSED,
    USERS_SUM,
)
from common.run_files import CARD, CATALOG, CLIENT_LEDGER, MODEL
from common.runconfig import RunConfig
from privacy.verify import verify_paths
from server.platform import platform_for
from server.rounds import client_rows, triage
from simulations.simulate import simulated_policy
from tests.conftest import RETAIL

RANKING = {USERS_SUM, HITS_SUM, NDCG_SUM}


pytestmark = pytest.mark.usefixtures("task_identity")  # messages built outside Flower


@pytest.fixture
def deployed(tmp_path, tiny_events):
    """A deployed client's world: the platform's catalog and demand calendar (from the whole
    tiny data set, as in a simulation), the clients' policy, and a call that hands one message
    to a client reading its own file `events` (named `name`)."""
    data = tmp_path / "tiny.parquet"
    tiny_events.to_parquet(data)
    cfg = RunConfig(
        data=str(data), out=str(tmp_path / "out"), hidden=16, layers=1, heads=2, max_len=12,
        batch_size=16, delta=1e-3, epsilon=6.0, accountant="rdp",
    )  # fmt: skip
    platform = platform_for(cfg, Path(cfg.out))
    # A deployed client's policy is its own node config (here sharing demand sums)
    policy = {
        f"privacy-{k.replace('_', '-')}": v
        for k, v in simulated_policy(cfg).model_dump(mode="json").items()
    }
    model = BehaviorModel(cfg.model, catalog_shape(platform.catalog))

    def call(
        kind: str, events: pd.DataFrame | None, name: str, demand_start: str = "", **request
    ) -> Message:
        path = tmp_path / f"{name}.parquet"
        if events is not None and not path.exists():
            events.to_parquet(path)
        node = {
            "data-path": str(path),
            "client-name": name,
            "state-dir": str(tmp_path / f"{name}.state"),
            "catalog": str(platform.catalog_path),
            **policy,
        }
        shared = {"catalog": str(platform.catalog_path), "demand-start": demand_start}
        config = ConfigRecord(shared | {"server-round": 1})
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config})
        msg = Message(content=content, dst_node_id=1, message_type=kind)
        context = Context(
            run_id=7,
            node_id=1,
            node_config=node,
            state=RecordDict(),
            run_config=cfg.model_copy(update=request).to_flower(),
        )
        return getattr(client_app, kind)(msg, context)

    return call, platform.demand_start, tmp_path


def _last_days(events: pd.DataFrame, days: int) -> pd.DataFrame:
    return events[events["timestamp"] >= events["timestamp"].max() - pd.Timedelta(days, "D")]


def _demand(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith("demand")}


def test_ten_days_of_data_train_next_item_and_evaluate_without_demand(deployed, tiny_events):
    """Ten days on the client's own calendar (a deployment without `demand-start`): next-item
    trains and is evaluated, there is no demand series. On the platform's calendar the same
    days have weeks before them: the held-out weeks are forecast from nothing (no user has an
    event at any cut), not a traceback."""
    call, platform_start, tmp_path = deployed
    short = _last_days(tiny_events, 10)
    replies = {}
    for name, start in (("own-calendar", ""), ("platform-calendar", platform_start)):
        trained = call("train", short, name, start)
        assert "refused" not in trained.content, trained.content["refused"]
        assert "arrays" in trained.content and trained.content["metrics"]["declined"] == 0
        replies[name] = dict(call("evaluate", short, name, start).content["metrics"])
        assert set(replies[name]) >= RANKING and replies[name][USERS_SUM] > 0
        # Training and evaluation spent and recorded as usual, nothing else.
        ledger = tmp_path / f"{name}.state" / CLIENT_LEDGER
        assert all(r.ok for r in verify_paths([ledger]))
    own, platform = replies["own-calendar"], replies["platform-calendar"]
    # No demand series: its sums are over no series, so they add nothing to the pooled WAPE
    # and coverage, and the reply keeps the keys every other client sends (Flower's strategies
    # refuse to aggregate metric records whose keys differ).
    assert _demand(own) and set(_demand(own).values()) == {0.0}
    assert set(own) == set(platform)
    assert platform[DEMAND_ACTUAL_SUM] > 0
    assert platform[DEMAND_ERROR_SUM] == platform[DEMAND_ACTUAL_SUM]  # forecast 0


def test_a_client_without_a_user_of_three_events_declines_with_a_one_line_reason(
    deployed, tiny_events
):
    call, _, tmp_path = deployed
    twice = tiny_events.groupby("user_id", observed=True).head(2)
    replies = [call(kind, twice, "twice") for kind in ("train", "evaluate")]
    for reply in replies:
        assert not reply.has_error()
        assert set(reply.content) == {REFUSED, CLIENT}
        assert reply.content[REFUSED][REASON] == NO_USERS
        assert reply.content[CLIENT][NAME] == "twice"
    assert NO_USERS == "cannot take part: no user with 3 or more events"
    assert not (tmp_path / "twice.state").exists()  # no key, no ledger: nothing was spent
    rows = client_rows(1, triage([replies[0]]))
    assert [(r["client"], r["status"], r["error"]) for r in rows] == [
        ("twice", "refused", NO_USERS)
    ]


def test_a_client_whose_only_users_are_audit_non_members_declines_to_train(deployed, tiny_events):
    call, _, _ = deployed
    users = tiny_events["user_id"].astype(str).unique()
    outsider = users[audit_non_members(users, 0.3)][0]
    alone = tiny_events[tiny_events["user_id"].astype(str) == outsider]
    reply = call("train", alone, "alone", audit_holdout=0.3)
    assert set(reply.content) == {REFUSED, CLIENT}
    assert reply.content[REFUSED][REASON] == NO_TRAINING_USER


def test_a_client_whose_file_is_missing_or_damaged_declines_and_keeps_why_to_itself(
    deployed, tiny_events, caplog
):
    """The reply says only that the data cannot be read; the node's log says what (a data
    error can quote the file's rows, which must not reach the server)."""
    call, _, tmp_path = deployed
    (tmp_path / "damaged.parquet").write_bytes(b"PAR1 not really")
    for name in ("damaged", "missing"):
        path = tmp_path / f"{name}.parquet"
        for kind in ("train", "evaluate"):
            reply = call(kind, None, name)
            assert not reply.has_error() and reply.content[REFUSED][REASON] == UNREADABLE
            assert str(path) not in str(reply.content)
        assert str(path) in caplog.text
    assert UNREADABLE.startswith("cannot take part: ")


def test_sampled_ranking_of_a_catalog_of_a_hundred_items_or_fewer():
    rng = np.random.default_rng(0)
    for n_items in (1, 2, 50, 100, 101):
        scores = torch.arange(n_items, dtype=torch.float32).expand(3, -1)
        target = torch.tensor([n_items - 1, 0, -1])
        ranks = sampled_ranks(scores, target, rng)
        negatives = min(100, n_items - 1)
        assert ranks.tolist() == [0, negatives, negatives + 1]  # best, worst, a miss


def test_an_export_from_before_the_weights_checksum_still_loads(tmp_path, tiny_events):
    catalog = Catalog.build(tiny_events)
    catalog.save(tmp_path / CATALOG)
    cfg = ModelConfig(hidden=16, layers=1, heads=2, intermediate=32, max_len=12)
    model = BehaviorModel(cfg, catalog_shape(catalog))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / MODEL))
    (tmp_path / CARD).write_text(f'{{"config": {cfg.model_dump_json()}}}')
    loaded = load_exported(tmp_path).model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_every_country_of_online_retail_prepares_as_a_deployed_client(tmp_path):
    """One client per country, each reading its own rows of the raw file (the adapter runs on
    the client): each trains what its data supports or cannot take part, and none raises."""
    if not RETAIL.exists():
        pytest.skip("Online Retail II not in ../shared/data")
    started = time.perf_counter()
    source = read_source(RETAIL)  # the platform's catalog, as a deployment's `catalog` file
    split = leave_last_out(source.events)
    catalog = Catalog.build(split[split["split"] == "train"], source.top_category_chars)
    catalog_path = catalog.save(tmp_path / CATALOG)
    cfg = RunConfig(out=str(tmp_path / "out"))
    outcome = {}
    for country, rows in pd.read_parquet(RETAIL).groupby("Country"):
        path = tmp_path / f"{country}.parquet"
        rows.to_parquet(path)
        node = {
            "data-path": str(path),
            "client-name": country,
            "state-dir": str(tmp_path / f"{country}.state"),
        }
        try:
            prepared = load_client_data(node, cfg, str(catalog_path), ("", "")).prepared
        except CannotTakePart as why:
            outcome[country] = str(why)
            continue
        outcome[country] = "both heads" if prepared.demand is not None else "next-item only"
        assert len(prepared.train) > 0 and len(prepared.test) > 0
    assert len(outcome) == 40
    # Every row without a customer id: nothing the client could train or evaluate.
    assert {c for c, o in outcome.items() if o == NO_USERS} == {"Bermuda", "Hong Kong", "Lebanon"}
    # Purchases over 1 day (Brazil, RSA, West Indies) to 38 days (Iceland): under 6 weeks.
    assert {c for c, o in outcome.items() if o == "next-item only"} == {
        "Brazil", "Canada", "Iceland", "RSA", "Thailand", "West Indies",
    }  # fmt: skip
    assert time.perf_counter() - started < 60
