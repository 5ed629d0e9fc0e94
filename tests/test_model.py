import pytest
import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator

from common.dataset import prepare
from common.model import BehaviorModel, ModelConfig, per_user_loss, trim
from common.training import evaluate_ranking, loader, predict_demand, train_epoch

TINY_MODEL = ModelConfig(hidden=16, layers=1, heads=2, intermediate=32, max_len=12, dropout=0.1)


@pytest.fixture(scope="module")
def prepared(tiny_events):
    return prepare(tiny_events, top_category_chars=None, max_len=TINY_MODEL.max_len)


def test_shapes(prepared):
    model = BehaviorModel(TINY_MODEL, prepared.shape)
    batch = trim(next(iter(loader(prepared.train, 8, shuffle=False))))
    logits, log_rate = model(*batch[:6])
    width = batch[0].shape[1]
    assert logits.shape == (8, width, prepared.shape.items)
    assert log_rate.shape == (8, width, prepared.shape.top_categories)
    total, rec, dem = per_user_loss(model, batch, 0.5)
    assert total.shape == rec.shape == dem.shape == (8,)
    assert torch.isfinite(total).all()


def test_encoder_is_causal(prepared):
    model = BehaviorModel(TINY_MODEL, prepared.shape).eval()
    batch = [t.clone() for t in next(iter(loader(prepared.train, 4, shuffle=False)))]
    before = model.encode(*batch[:6])
    batch[0][:, -1] = 7  # change only the last event
    after = model.encode(*batch[:6])
    assert torch.allclose(before[:, :-1], after[:, :-1], atol=1e-5)


def test_opacus_validator_accepts_the_model(prepared):
    assert ModuleValidator.validate(BehaviorModel(TINY_MODEL, prepared.shape), strict=False) == []


def test_dp_sgd_step_with_per_sample_gradients(prepared):
    torch.manual_seed(0)
    model = BehaviorModel(TINY_MODEL, prepared.shape)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine(accountant="rdp")
    dp_model, dp_opt, dp_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader(prepared.train, 16, shuffle=False),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=True,
    )
    batch = trim(next(b for b in dp_loader if len(b[0]) > 1))
    weights = model.bert.embeddings.position_embeddings.weight
    before = weights.detach().clone()
    total, _, _ = per_user_loss(dp_model, batch, 0.5)
    total.mean().backward()
    # One gradient per user for the position embedding (opacus issue 841 would break this).
    assert weights.grad_sample.shape == (len(batch[0]), *weights.shape)
    dp_opt.step()
    assert not torch.equal(before, weights.detach())
    assert engine.get_epsilon(1e-5) > 0


def test_training_improves_loss_and_evaluates(prepared):
    torch.manual_seed(0)
    model = BehaviorModel(TINY_MODEL, prepared.shape)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    device = torch.device("cpu")
    first = train_epoch(model, loader(prepared.train, 32, True), opt, device, 0.5)
    for _ in range(4):
        last = train_epoch(model, loader(prepared.train, 32, True), opt, device, 0.5)
    assert last["loss"] < first["loss"]
    metrics = evaluate_ranking(model, prepared.test, device)
    assert metrics["users"] == len(prepared.test)
    assert 0 <= metrics["full"]["hr@10"] <= metrics["sampled"]["hr@10"] <= 1
    demand = predict_demand(model, prepared.forecast_inputs[0], device)
    assert demand.shape == (len(prepared.forecast_inputs[0]), prepared.shape.top_categories)
    assert (demand >= 0).all()


def test_client_rounds_accumulate_epsilon_and_decline_at_the_budget(prepared):
    from clients.local_training import train_private
    from common.runconfig import RunConfig
    from privacy.accounting import Budget, PrivacyState

    cfg = RunConfig(
        num_server_rounds=2,
        hidden=16,
        layers=1,
        max_len=TINY_MODEL.max_len,
        batch_size=16,
        delta=1e-3,
        epsilon=4.0,
    )
    torch.manual_seed(0)
    model = BehaviorModel(cfg.model, prepared.shape)
    state = PrivacyState(client="all", budget=Budget(epsilon=cfg.epsilon, delta=cfg.delta))
    device = torch.device("cpu")
    results = [train_private(model, prepared.train, cfg, state, rnd, device) for rnd in (1, 2, 3)]
    assert [r.trained for r in results] == [True, True, False]
    eps = [r.spend.epsilon_after for r in results]
    assert 0 < eps[0] < eps[1] <= 4.0 and eps[2] == eps[1]
    assert results[0].spend.steps == state.mechanism.steps_per_round
    assert state.epsilon() == pytest.approx(eps[1])
