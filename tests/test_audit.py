"""The membership-inference audit: its measurement, its members, its ε and its two attacks."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ArrayRecord
from ledger_factory import write_client

from common.data.partition import audit_non_members, plan, select
from common.learning.dataset import catalog_shape, prepare
from common.learning.model import BehaviorModel
from common.learning.training import loader, train_epoch
from common.run_files import AUDIT, CLIENT_LEDGER, CLIENTS, ROUNDS, SERVER_LEDGER
from common.runconfig import RunConfig
from privacy.audit import (
    audit,
    ledger_epsilon,
    lira_scores,
    out_losses,
    roc_summary,
    user_losses,
)
from privacy.ledger import Aggregation, Spend, append, entries
from privacy.report_page import _audit_section
from privacy.signing import CLIENT_PUBLIC_KEY
from server.export import export
from server.platform import platform_for

TINY_MODEL = dict(hidden=16, layers=1, heads=2, max_len=12, batch_size=16)


def test_roc_summary_separates_and_ties():
    rng = np.random.default_rng(0)
    low, high = rng.normal(0, 1, 2000), rng.normal(10, 1, 2000)
    perfect = roc_summary(high, low)
    assert perfect["auc"] == 1.0 and perfect["tpr_at_fpr"]["0.01"] == 1.0
    same = roc_summary(rng.normal(0, 1, 4000), rng.normal(0, 1, 4000))
    assert same["auc"] == pytest.approx(0.5, abs=0.03)
    assert same["tpr_at_fpr"]["0.01"] == pytest.approx(0.01, abs=0.01)
    assert roc_summary(low, high)["auc"] == 0.0


def test_non_members_are_stable_and_about_the_asked_share():
    users = np.array([f"u{i}" for i in range(20_000)])
    held = audit_non_members(users, 0.1)
    assert held.mean() == pytest.approx(0.1, abs=0.01)
    assert (audit_non_members(users[::-1], 0.1)[::-1] == held).all()
    assert not audit_non_members(users, 0.0).any()


def _fit(seqs, shape, cfg: RunConfig, seed: int, epochs: int) -> BehaviorModel:
    torch.manual_seed(seed)
    model = BehaviorModel(cfg.model, shape)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    for epoch in range(epochs):
        batches = loader(seqs, 32, shuffle=True, seed=seed * 100 + epoch)
        train_epoch(model, batches, optimizer, torch.device("cpu"), 0.0)
    return model


def test_lira_separates_an_overfit_models_members_better_than_the_loss_attack(tiny_events):
    cfg = RunConfig(**TINY_MODEL)
    prepared = prepare(tiny_events, top_category_chars=None, history_len=cfg.model.history)
    seqs = prepared.train
    member = np.random.default_rng(1).permutation(len(seqs)) < len(seqs) // 2
    overfit = _fit(seqs.subset(np.flatnonzero(member)), prepared.shape, cfg, 9, 6)
    target = user_losses(overfit, seqs)

    def reference(train, seed):
        return _fit(train, prepared.shape, cfg, seed, 6)

    out = out_losses(seqs, reference, 2, seed=0)
    assert out.shape == (1, len(seqs))
    loss = roc_summary(-target[member], -target[~member])
    lira = lira_scores(target, out)
    calibrated = roc_summary(lira[member], lira[~member])
    # the loss attack mostly finds users easy for any model; LiRA asks "easier than usual?"
    assert calibrated["auc"] > max(0.7, loss["auc"])
    with pytest.raises(ValueError, match="even"):
        out_losses(seqs, reference, 3, seed=0)


def _ledger(out: Path, client: str, rounds: int) -> float:
    """A client's real ledger in the run folder (`rounds` planned rounds, signed, its public
    key beside it, as a simulated client leaves it); the ε it ends at."""
    keys = out.parent / "keys"
    path = write_client(out / CLIENTS, keys, client, rounds)
    shutil.copy(keys / f"{client}.pub", path.parent / CLIENT_PUBLIC_KEY)
    return entries(path, Spend)[-1].epsilon_after


def test_members_are_users_of_used_clients_and_epsilon_is_the_ledgers(tiny_events, tmp_path):
    data = tmp_path / "tiny.parquet"
    tiny_events.to_parquet(data)
    out = tmp_path / "run"
    out.mkdir()
    cfg = RunConfig(data=str(data), out=str(out), audit_holdout=0.2, **TINY_MODEL)
    platform = platform_for(cfg, out)
    shape = catalog_shape(platform.catalog)
    used, declined, _ = [p.name for p in plan(tiny_events, 3)]
    card = {
        "run_config": cfg.to_flower(),
        "privacy": {"clients": {used: {"epsilon": 0.01}}},  # not what the ledger says
    }
    export(out, ArrayRecord(BehaviorModel(cfg.model, shape).state_dict()), cfg.model, shape, card)
    rows = [
        {"client": used, "status": "trained"},
        {"client": declined, "status": "declined"},
        {"client": "7", "status": "failed"},  # a failed client is named by its node id
    ]
    (out / ROUNDS).write_text(json.dumps([{"round": 1, "clients": rows}]))
    entry = {"seq": 0, "hash": "0" * 64}
    clients = [{"client": used, "status": "used", **entry}]
    clients.append({"client": declined, "status": "declined", **entry})
    fields = {"run_id": "1", "server_round": 1, "strategy": "fedavg", "clients": clients}
    append(out / SERVER_LEDGER, fields, Ed25519PrivateKey.generate(), Aggregation)
    spent = _ledger(out, used, rounds=1)
    assert _ledger(out, declined, rounds=3) > spent  # more, but never used: not counted

    result = audit([out])
    run = result["runs"][0]

    own = select(tiny_events, plan(tiny_events, 3)[0])["user_id"].astype(str)
    everyone = prepare(tiny_events, top_category_chars=None, history_len=cfg.model.history)
    held = audit_non_members(everyone.train.users[np.isin(everyone.train.users, own)], 0.2)
    assert run["clients"] == [used]
    assert (run["members"], run["non_members"]) == ((~held).sum(), held.sum())
    assert run["epsilon"] == round(spent, 3)  # the used client's ledger, not the card
    assert set(run["attacks"]) == {"loss", "lira"} and run["references"] == 2
    for attack in run["attacks"].values():
        assert 0 <= attack["auc"] <= 1 and set(attack["tpr_at_fpr"]) == {"0.01", "0.001"}
    assert json.loads((out / AUDIT).read_text())["runs"][0]["epsilon"] == round(spent, 3)
    # an altered ledger's ε is never reported
    path = out / CLIENTS / used / CLIENT_LEDGER
    line = json.loads(path.read_text())
    line["entry"]["epsilon_after"] = 0.01
    path.write_text(json.dumps(line) + "\n")
    with pytest.raises(ValueError, match="the audit takes ε only from ledgers that verify"):
        ledger_epsilon(out, {used})
    shown = _audit_section(result)
    assert shown.count("<td>loss threshold</td>") == shown.count("<td>offline LiRA</td>") == 1
