"""What a region serves: its own transition-aware rule beside the shared model."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from common.data.catalog import Catalog
from common.learning.blend import MODEL_WEIGHTS, Blend, fit_blend, served_results
from common.learning.configs import ModelConfig
from common.learning.dataset import catalog_shape, prepare
from common.learning.inference import Exported, recommend
from common.learning.model import BehaviorModel
from common.learning.popularity import RepeatWeights, RuleInputs, choose_rule_weights
from common.learning.training import RankTally, evaluate_ranking
from simulations.central import pool_ranks

CYCLE = ["a", "b", "c", "d"]
TINY_MODEL = ModelConfig(hidden=16, layers=1, heads=2, intermediate=32, max_len=12)


def _model(events: pd.DataFrame) -> Exported:
    """An untrained model: the rule is all a region has to go on."""
    catalog = Catalog.build(events)
    torch.manual_seed(0)
    return Exported(BehaviorModel(TINY_MODEL, catalog_shape(catalog)).eval(), catalog, {})


def _prepared(events: pd.DataFrame, exp: Exported):
    return prepare(events, top_category_chars=None, history_len=12, catalog=exp.catalog)


@pytest.fixture(scope="module")
def cycling(tiny_events) -> pd.DataFrame:
    """The tiny log with every user walking the cycle a → b → c → d → a from their own start:
    only which item follows which predicts the next one."""
    events = tiny_events.sort_values(["user_id", "timestamp"], kind="stable").copy()
    step = events.groupby("user_id").cumcount().to_numpy()
    start = events["user_id"].str[1:].astype(int).to_numpy()
    events["item_id"] = pd.array([CYCLE[i] for i in (start + step) % 4], dtype="string")
    events["category"] = pd.array(["01.01"] * len(events), dtype="string")
    return events.reset_index(drop=True)


def test_the_served_blend_follows_the_regions_own_transitions(cycling):
    exp = _model(cycling)
    served = recommend(exp, cycling, k=1)
    last = cycling.groupby("user_id")["item_id"].last()
    expected = last.map(lambda item: CYCLE[(CYCLE.index(item) + 1) % 4])
    got = served.set_index("user_id")["item_id"]
    assert len(got) == cycling["user_id"].nunique()
    assert (got == expected.reindex(got.index)).all()
    # the untrained model alone gets the cycle wrong for many users, so the blend weighs it less
    prepared = _prepared(cycling, exp)
    alone = evaluate_ranking(exp.model, prepared.test, torch.device("cpu"), k=1)["full"]
    assert alone["hr@1"] < 0.5
    inputs = RuleInputs.of(prepared)
    _, (rule, _) = choose_rule_weights(prepared, inputs)
    assert fit_blend(exp.model, prepared, inputs, rule)[0].model_weight < math.inf


def test_the_blend_is_chosen_on_validation_and_never_below_model_or_rule_alone(tiny_events):
    exp = _model(tiny_events)
    prepared = _prepared(tiny_events, exp)
    inputs = RuleInputs.of(prepared)
    _, (rule, rule_valid) = choose_rule_weights(prepared, inputs)
    blend, valid = fit_blend(exp.model, prepared, inputs, rule)
    cpu = torch.device("cpu")
    model_valid = evaluate_ranking(exp.model, prepared.valid, cpu)["full"]
    assert blend.model_weight in MODEL_WEIGHTS
    assert valid["ndcg@10"] >= max(rule_valid["ndcg@10"], model_valid["ndcg@10"])
    results = served_results(exp.model, prepared, inputs, rule)
    assert results["model"]["full"] == evaluate_ranking(exp.model, prepared.test, cpu)["full"]
    assert results["served"]["users"] == len(prepared.test)
    assert results["served"]["valid"] == valid


def test_blend_scores_at_the_ends_of_the_weight_grid():
    rule = torch.tensor([[1.0, 2.0, 3.0]])
    log_p = torch.tensor([[-1.0, -math.inf, -0.5]])
    weights = RepeatWeights()
    assert torch.equal(Blend(weights, math.inf).scores(rule, log_p), log_p)
    assert torch.equal(Blend(weights, 0.0).scores(rule, log_p), rule)  # no NaN from 0 · −∞
    assert torch.equal(
        Blend(weights, 2.0).scores(rule, log_p), torch.tensor([[-1.0, -math.inf, 2.0]])
    )
    assert Blend(weights, math.inf).describe()["model_weight"] == "model alone"


def test_pooled_client_ranks_equal_the_ranks_of_all_users_at_once():
    gen = torch.Generator().manual_seed(1)
    clients = [(torch.randn(n, 40, generator=gen), torch.randint(0, 40, (n,))) for n in (7, 30)]
    each = []
    for scores, target in clients:
        tally = RankTally()
        tally.add(scores, target)
        each.append(tally.metrics())
    everyone = RankTally()
    everyone.add(torch.cat([s for s, _ in clients]), torch.cat([t for _, t in clients]))
    pooled, whole = pool_ranks(each), everyone.metrics()
    assert pooled["users"] == whole["users"] == 37
    for key, value in whole["full"].items():
        assert pooled["full"][key] == pytest.approx(value, rel=1e-12)
    assert pool_ranks([]) == {"users": 0, "full": {}, "sampled": {}}
    assert np.isfinite(pooled["sampled"]["hr@10"])
