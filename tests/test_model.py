import pytest
import torch
import torch.nn.functional as F
from opacus.grad_sample import grad_sample_module
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, TensorDataset

from common.data.sequences import IGNORE, Batch
from common.learning.configs import ModelConfig
from common.learning.dataset import prepare
from common.learning.model import NEIGHBOUR_OFFSETS, Basket, BehaviorModel, Seen, per_user_loss
from common.learning.packed import BucketBias, UserRows, set_window_users, take_user_rows
from common.learning.training import (
    evaluate_ranking,
    loader,
    predict_demand,
    reduced_loss,
    train_epoch,
)
from privacy.engine import PrivacyEngine, _kept

# Two windows of 6 events: long histories span windows, so every path of the model is exercised.
TINY_MODEL = ModelConfig(
    hidden=16, layers=1, heads=2, intermediate=32, max_len=6, windows=2, item_dim=4, dropout=0.1
)


@pytest.fixture(scope="module")
def prepared(tiny_events):
    return prepare(tiny_events, top_category_chars=None, history_len=TINY_MODEL.history)


def _released(model: BehaviorModel) -> BehaviorModel:
    """`model` with a popularity as the server installs it: noisy, some counts negative."""
    with torch.no_grad():
        model.item_popularity.copy_(torch.rand(model.shape.items) * 40 - 5)
    return model


def _batch(prepared, n: int, start: int = 0) -> Batch:
    return Batch(*next(iter(loader(prepared.train.subset(range(start, start + n)), n, False))))


def test_losses_and_scores_have_one_value_per_user(prepared):
    model = BehaviorModel(TINY_MODEL, prepared.shape)
    batch = _batch(prepared, 8).trim()
    total, rec, dem = per_user_loss(model, batch, 0.5)
    assert total.shape == rec.shape == dem.shape == (8,)
    assert torch.isfinite(total).all()
    scores = model.eval().score_items(batch)
    assert scores.shape == (8, prepared.shape.items)
    # A mixture of two distributions; the repeat part's mass on unknown items is not in the
    # vocabulary, so the total is at most one.
    total = scores.exp().sum(1)
    assert (total <= 1 + 1e-4).all() and (total > 0.5).all()


def test_side_embeddings_start_at_the_item_scale(prepared):
    model = BehaviorModel(TINY_MODEL, prepared.shape)
    for module in (model.category, model.dow, model.hour, model.gap, model.region, model.item_code):
        assert module.weight.std().item() == pytest.approx(0.02, rel=0.25)


def test_output_weights_are_the_input_embeddings(prepared):
    model = BehaviorModel(TINY_MODEL, prepared.shape)
    assert model.category_out.weight is model.category.weight
    assert model.item_out.weight is model.item_code.weight
    state = model.state_dict()
    assert "category_out.weight" not in state and "item_out.weight" not in state
    again = BehaviorModel(TINY_MODEL, prepared.shape)
    again.load_state_dict(state)
    assert torch.equal(again.item_out.weight, model.item_code.weight)
    assert again.item_out.weight is again.item_code.weight


def test_released_popularity_travels_with_the_model_and_starts_as_its_prior(prepared):
    """The popularity buffer is in the exchanged state (never trained); with nothing else
    learned, p(item | category) is proportional to 1 + its released count."""
    model = _released(BehaviorModel(TINY_MODEL, prepared.shape).eval())
    state = model.state_dict()
    assert torch.equal(state["item_popularity"], model.item_popularity)
    assert "item_popularity" not in dict(model.named_parameters())
    with torch.no_grad():
        model.item_code.weight.zero_()
        model.popularity_weight.weight.zero_()
    nothing = torch.zeros(0, dtype=torch.long)
    empty = Basket(nothing, nothing, torch.zeros(1), torch.zeros(1))
    none_seen = Seen(nothing, nothing)
    log_p = model._explore_all(torch.zeros(1, TINY_MODEL.hidden), none_seen, empty)[0]
    members = (model.item_category == model.item_category[0]).nonzero().squeeze(1)
    prior = torch.log1p(model.item_popularity[members].clamp_min(0))
    within = log_p[members] - log_p[members].logsumexp(0)
    assert torch.allclose(within, prior - prior.logsumexp(0), atol=1e-5)


def test_factorised_softmax_is_exact(prepared):
    """The training loss's explore term equals a full softmax over every item of the catalog
    scored as p(category) · p(item | category), today's basket damped within its categories
    and counted per category."""
    torch.manual_seed(0)
    model = _released(BehaviorModel(TINY_MODEL, prepared.shape).eval())
    state = torch.randn(5, TINY_MODEL.hidden)
    owner = torch.arange(5)
    target = torch.tensor([0, 3, 7, 11, prepared.shape.items - 1])
    model.category_out.max_batch_len = model.item_query.max_batch_len = 5
    model.item_out.max_batch_len = 5
    counts = torch.randint(0, 3, (5, prepared.shape.categories)).float()
    model.habit.max_batch_len = model.popularity_weight.max_batch_len = 5
    # The targets' own items and their category neighbours in some baskets, others elsewhere.
    neighbour = (model.item_category == model.item_category[3]).nonzero().squeeze(1)
    basket = Basket(
        torch.tensor([0, 1, 1, 2, 4, 4]),
        torch.tensor([0, 3, int(neighbour[-1]), 20, 5, 6]),
        torch.tensor([0.5, 2.0, 0.0, 1.0, 3.0]),
        torch.tensor([0.3, -1.0, 0.0, 2.0, 0.7]),
    )
    s, c = counts.nonzero(as_tuple=True)
    times = counts[s, c].long()
    seen = Seen(s.repeat_interleave(times), c.repeat_interleave(times))
    fast = model._explore_log_prob(state, owner, seen, target, basket)
    full = model._explore_all(state, seen, basket)
    assert torch.allclose(fast, full.gather(1, target[:, None]).squeeze(1), atol=1e-5)
    # … and it is a proper distribution over the whole catalog.
    assert torch.allclose(full.exp().sum(1), torch.ones(5), atol=1e-5)
    # Brute force, category by category.
    code = F.pad(model.item_query(state, owner), (0, 1), value=1.0)
    weight = model.popularity_weight(state, owner)
    popularity = model.item_popularity.clamp_min(0)
    in_category = torch.zeros(prepared.shape.categories)
    in_category = in_category.index_add(0, model.item_category, model.item_popularity)
    items = code @ model.item_code.weight[prepared.shape.special_rows :].T
    items = items + weight[:, :1] * torch.log1p(popularity)
    habit = F.softplus(model.habit(state, owner))
    logits = model.category_out(state, owner) + habit * torch.log1p(counts)
    logits = logits + weight[:, 1:] * torch.log1p(in_category.clamp_min(0))
    in_basket, share = torch.zeros_like(counts), torch.zeros_like(counts)
    for s, item in zip(basket.state.tolist(), basket.item.tolist(), strict=True):
        items[s, item] -= basket.beta[s]
        c = model.item_category[item]
        in_basket[s, c] += 1
        neighbours = model.item_category == c
        share[s, c] += (1 + popularity[item]) / (1 + popularity[neighbours]).sum()
    left = 1 - (1 - torch.exp(-basket.beta))[:, None] * share
    logits = logits + basket.weight[:, None] * torch.log1p(in_basket) + left.log()
    used = torch.tensor([c in set(model.item_category.tolist()) for c in range(logits.shape[1])])
    cats = logits - logits[:, used].logsumexp(1, keepdim=True)
    for i, t in enumerate(target.tolist()):
        c = model.item_category[t]
        members = (model.item_category == c).nonzero().squeeze(1)
        expected = cats[i, c] + items[i, t] - items[i, members].logsumexp(0)
        assert fast[i].item() == pytest.approx(expected.item(), abs=1e-5)


def test_training_loss_is_the_served_distribution(prepared):
    """−log p(target) in training (basket damping included) equals what `score_items` serves
    for the same prefix."""
    torch.manual_seed(0)
    model = BehaviorModel(TINY_MODEL.model_copy(update={"dropout": 0.0}), prepared.shape).eval()
    _released(model)
    with torch.no_grad():
        model.basket.bias.copy_(torch.tensor([2.0, 1.0, -0.5]))
        model.neighbour_gate.bias.fill_(0.0)  # the catalog neighbours' part weighs too
        model.neighbour.weight.copy_(torch.randn_like(model.neighbour.weight))
    length = prepared.train.length
    short = ((length <= TINY_MODEL.max_len) & (length >= 4)).nonzero()[0][:6]
    batch = Batch(*loader(prepared.train.subset(short), 6, False).dataset.tensors).trim()
    assert model._baskets(batch).sum() > batch.length.sum()  # some days hold several items
    _, rec, _ = per_user_loss(model, batch, 0.0)
    for row in range(6):
        n = int(batch.length[row])
        targets = (batch.next_item[row, :n] != IGNORE).nonzero().squeeze(1)
        expected = []
        for t in targets.tolist():
            prefix = Batch(*(x[row : row + 1] for x in batch))
            prefix = prefix._replace(length=torch.tensor([t + 1])).trim()
            y = batch.next_item[row, t]
            expected.append(-model.score_items(prefix)[0, y])
        assert rec[row].item() == pytest.approx(torch.stack(expected).mean().item(), abs=1e-4)


def test_encoder_is_causal_within_windows(prepared):
    model = BehaviorModel(TINY_MODEL, prepared.shape).eval()
    batch = _batch(prepared, 4).trim()
    before = model.encode(batch)
    changed = batch.items.clone()
    changed[:, -1] = 7  # change only the last slot
    after = model.encode(batch._replace(items=changed))
    assert torch.allclose(before[:, :-1], after[:, :-1], atol=1e-5)


def test_encoder_reads_each_window_alone(prepared):
    """The encoder runs on windows, not padded rows: a user's last window encodes the same as
    those events alone (neither the earlier window nor other users reach it), and padding
    gets no state."""
    model = BehaviorModel(TINY_MODEL, prepared.shape).eval()
    long_user = int(prepared.train.length.argmax())
    batch = _batch(prepared, 5, start=max(long_user - 2, 0)).trim()
    states = model.encode(batch)
    size = TINY_MODEL.max_len
    long_rows = (batch.length > size).nonzero().flatten().tolist()
    assert long_rows and (batch.length < batch.items.shape[1]).any()
    for row in long_rows:
        end = int(batch.length[row])
        alone = Batch(*(t[row : row + 1] for t in batch)).tail(size).trim()
        assert torch.allclose(model.encode(alone)[0], states[row, end - size : end], atol=1e-5)
    padding = torch.arange(batch.items.shape[1])[None, :] >= batch.length[:, None]
    assert (states[padding] == 0).all()


def test_demand_reads_the_last_window_only_and_keeps_user_order(prepared):
    """expected_units encodes only each user's last max_len events, which give the same last
    state as the whole history; predict_demand batches users by length and returns them in
    their own order."""
    model = BehaviorModel(TINY_MODEL, prepared.shape).eval()
    seqs = prepared.forecast_inputs[0]
    batch = Batch(*seqs.tensors()).trim()
    assert (batch.length > TINY_MODEL.max_len).any() and (batch.length < TINY_MODEL.max_len).any()
    with torch.no_grad():
        _, last = model.last_state(batch)
        rows = torch.arange(len(last))
        whole = model._log_rate(last, rows, batch.lag[rows, batch.length - 1]).exp()
    served = torch.from_numpy(predict_demand(model, seqs, torch.device("cpu")))
    assert torch.allclose(served, whole, rtol=1e-4, atol=1e-6)


def test_repeat_component_scores_the_users_own_items(prepared):
    """A user's past items get the repeat mass; an item never seen gets explore mass only."""
    model = BehaviorModel(TINY_MODEL, prepared.shape).eval()
    with torch.no_grad():
        model.gate.bias.fill_(8.0)  # nearly all mass on repeating
        model.neighbour_gate.bias.fill_(-20.0)
        model.repeat_habit.weight.zero_()
    batch = _batch(prepared, 4).trim()
    scores = model.score_items(batch)
    for row in range(4):
        seen = batch.items[row, : batch.length[row]] - prepared.shape.special_rows
        seen = seen[seen >= 0].unique()
        assert scores[row].exp()[seen].sum() > 0.99


DISTANCE_SCORES = torch.tensor([0.0, 1.0, 2.0, 3.0, 1.0, 0.0])  # distances −3, −2, −1, +1, +2, +3


def test_the_neighbour_component_scores_the_last_items_catalog_neighbours(prepared):
    """With its gate open, the mass sits on the items next to the last one in catalog order,
    split by the learned score of each signed distance; the catalog's ends cut it short."""
    model = BehaviorModel(TINY_MODEL, prepared.shape).eval()
    special, items = prepared.shape.special_rows, prepared.shape.items
    batch = _batch(prepared, 2).trim()
    end = batch.length - 1
    items_at = batch.items.clone()
    items_at[0, end[0]], items_at[1, end[1]] = special + 10, special + 1  # 1: item 0 is cut off
    batch = batch._replace(items=items_at)
    with torch.no_grad():
        model.neighbour_gate.bias.fill_(20.0)
        model.neighbour_split.bias.fill_(20.0)  # the last item's part, not the basket's
        model.neighbour.weight.copy_(DISTANCE_SCORES[:, None])
        p = model.score_items(batch).exp()
    near = {0: [7, 8, 9, 11, 12, 13], 1: [0, 2, 3, 4]}
    assert p[0, near[0]].tolist() == pytest.approx(DISTANCE_SCORES.softmax(0).tolist(), abs=1e-6)
    assert p[1, near[1]].tolist() == pytest.approx(
        DISTANCE_SCORES[2:].softmax(0).tolist(), abs=1e-6
    )
    assert items > 14 and p.sum(1).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)


def test_the_basket_neighbour_part_spreads_over_every_item_bought_that_day(prepared):
    """The basket's part gives each item bought that day (each once) the same share, spread
    over its catalog neighbours by the distance scores; overlapping neighbours add up, the
    catalog's start cuts an item's neighbours short, and an item bought on an earlier day
    takes no part."""
    model = BehaviorModel(TINY_MODEL, prepared.shape).eval()
    special = prepared.shape.special_rows
    batch = _batch(prepared, 1).trim()
    n = int(batch.length[0])
    assert n >= 5
    items, day = batch.items.clone(), torch.arange(batch.items.shape[1])[None, :].clone()
    # earlier day: 30; today: 10, 12, 1, 10 again (counted once)
    items[0, n - 5 : n] = torch.tensor([30, 10, 12, 1, 10]) + special
    day[0, n - 4 : n] = day[0, n - 4]
    batch = batch._replace(items=items, day=day)
    with torch.no_grad():
        model.neighbour_gate.bias.fill_(20.0)
        model.neighbour_split.bias.fill_(-20.0)
        model.neighbour.weight.copy_(DISTANCE_SCORES[:, None])
        p = model.score_items(batch).exp()[0]
    expected = torch.zeros_like(p)
    for item in (10, 12, 1):
        inside = [i for i, o in enumerate(NEIGHBOUR_OFFSETS) if item + o >= 0]
        for i, w in zip(inside, DISTANCE_SCORES[inside].softmax(0), strict=True):
            expected[item + NEIGHBOUR_OFFSETS[i]] += w / 3
    assert p.tolist() == pytest.approx(expected.tolist(), abs=1e-6)


def test_a_basket_item_at_the_catalogs_end_keeps_its_share_whatever_the_scores(prepared):
    """Each basket item renormalises over its own neighbours: one at the catalog's end whose
    only neighbours score far below the missing ones still gives them its whole share."""
    model = BehaviorModel(TINY_MODEL, prepared.shape)
    last = prepared.shape.items - 1
    empty = torch.zeros(1)
    basket = Basket(torch.tensor([0, 1, 1]), torch.tensor([last, last, 5]), empty, empty)
    score = torch.tensor([[-110.0] * 3 + [0.0] * 3] * 2)  # distances −3…−1 far below +1…+3
    query, item, prob = model._basket_neighbours(basket, torch.tensor([0, 1]), score)
    totals = torch.zeros(2).index_add(0, query, prob)
    assert torch.isfinite(prob).all() and totals.tolist() == pytest.approx([1.0, 1.0])
    assert prob[query == 0].tolist() == pytest.approx([1 / 3] * 3)
    assert set(item[query == 0].tolist()) == {last - 3, last - 2, last - 1}


def test_the_gate_starts_as_the_users_smoothed_repeat_share(prepared):
    """The gate reads, at each position, the user's share of purchases so far that repeat an
    earlier one (Laplace-smoothed) and their distinct items so far; out-of-vocabulary events
    and padding count as nothing. At initialisation p(repeat) is that share."""
    model = BehaviorModel(TINY_MODEL, prepared.shape).eval()
    special = prepared.shape.special_rows
    with torch.no_grad():
        model.gate.weight.zero_()
    batch = _batch(prepared, 1)
    items = torch.tensor([[3, 5, 3, 3, 7, 0]]) + special
    items[0, 4] = 1  # an out-of-vocabulary bucket
    items[0, 5] = 0  # padding
    batch = batch._replace(**{k: getattr(batch, k)[:, :6] for k in ("cats", "dow", "hour", "gap")})
    batch = batch._replace(
        items=items,
        day=torch.zeros_like(items),
        lag=torch.zeros_like(items),
        next_item=torch.full_like(items, IGNORE),
        demand=batch.demand[:, :6],
        demand_mask=batch.demand_mask[:, :6],
        length=torch.tensor([5]),
    )
    repeats, events = torch.tensor([0, 0, 1, 2, 2]), torch.tensor([1, 2, 3, 4, 4])
    share = (repeats + 1) / (events + 2)
    with torch.no_grad():
        h = model.encode(batch)
        p_repeat = torch.sigmoid(model._gate(h, batch))
    assert p_repeat[0, :5].tolist() == pytest.approx(share.tolist(), abs=1e-6)
    with torch.no_grad():
        model.repeat_habit.weight.copy_(torch.tensor([[0.0, 1.0]]))
        gate = model._gate(h, batch)
    distinct = torch.log1p((events - repeats).float())
    assert gate[0, :5].tolist() == pytest.approx(distinct.tolist(), abs=1e-6)


def test_bucket_bias_is_an_embedding_with_bincount_gradients():
    """The days-ago bias looks up and differentiates exactly like `nn.Embedding(n, 1)`."""
    torch.manual_seed(0)
    bias, reference = BucketBias(10), torch.nn.Embedding(10, 1)
    with torch.no_grad():
        bias.weight.normal_()
        reference.weight.copy_(bias.weight)
    bucket = torch.randint(0, 10, (3, 7, 7))
    upstream = torch.randn(3, 7, 7, 1)
    (bias(bucket) * upstream).sum().backward()
    (reference(bucket) * upstream).sum().backward()
    assert torch.equal(bias(bucket), reference(bucket))
    assert torch.allclose(bias.weight.grad, reference.weight.grad, atol=1e-6)


def test_opacus_validator_accepts_the_model(prepared):
    assert ModuleValidator.validate(BehaviorModel(TINY_MODEL, prepared.shape), strict=False) == []


def _dp_sgd(
    model: torch.nn.Module, data: DataLoader, clip: float, reduction: str = "mean"
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """`model` under the engine's DP-SGD with noise off: SGD, Poisson batches of `data`."""
    dp_model, optimizer, _ = PrivacyEngine(accountant="rdp").make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=data,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        loss_reduction=reduction,
    )
    return dp_model, optimizer


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_dp_sgd_clips_each_users_exact_gradient(prepared, reduction):
    """DP-SGD's clipped sum (noise off) equals Σ_u clip(g_u) over each user's own gradient
    computed alone: per-user gradients from Opacus (the packed heads, the encoder's windows
    summed per user, both uses of each tied weight) and the item and category tables' own
    records, clipped over all parameters together; from a summed loss (the clients') as from
    a mean, and with the update scaled by the expected batch size either way."""
    torch.manual_seed(0)
    cfg = TINY_MODEL.model_copy(update={"dropout": 0.0})
    model = _released(BehaviorModel(cfg, prepared.shape))
    long_user = int(prepared.train.length.argmax())
    batch = _batch(prepared, 5, start=max(long_user - 2, 0)).trim()
    assert batch.length.max() > cfg.max_len  # one user spans two windows
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    alone = []
    for user in range(5):
        model.zero_grad()
        single = Batch(*(t[user : user + 1] for t in batch)).trim()
        per_user_loss(model, single, 0.5)[0].sum().backward()
        alone.append({n: p.grad.clone() for n, p in trainable.items()})
    norms = torch.stack([torch.cat([g.flatten() for g in a.values()]).norm() for a in alone])
    clip = float(norms.median())  # some users clipped, some not
    dp_model, optimizer = _dp_sgd(model, loader(prepared.train, 8, shuffle=False), clip, reduction)
    for check_per_user in (True, False):
        optimizer.zero_grad()
        reduced_loss(dp_model, per_user_loss(dp_model, batch, 0.5)[0]).backward()
        if check_per_user:
            for name, param in trainable.items():
                recorded = take_user_rows(param)  # the item and category tables keep their own
                per_user = param.grad_sample if recorded is None else _dense(recorded, param, 5)
                assert per_user.shape == (5, *param.shape), name
                for user in range(5):
                    assert torch.allclose(
                        per_user[user], alone[user][name], atol=1e-5, rtol=1e-4
                    ), f"{name}, user {user}"
    optimizer.clip_and_accumulate()
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    for name, param in trainable.items():
        expected = sum(f * a[name] for f, a in zip(factor, alone, strict=True))
        assert torch.allclose(param.summed_grad, expected, atol=1e-5, rtol=1e-4), name
    optimizer.add_noise()  # σ = 0
    optimizer.scale_grad()
    for name, param in trainable.items():
        assert torch.equal(param.grad, param.summed_grad / optimizer.expected_batch_size), name
    dp_model.remove_hooks()


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_windows_sum_per_user_without_touching_the_gradient_that_flows_on(reduction):
    """On 2-D inputs Opacus' bias samplers return the layer's backprops themselves, which a
    summed loss hands over uncopied: adding a user's extra windows into them in place would
    change the gradient that reaches the layers below."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x, window_user = torch.randn(3, 3), torch.tensor([0, 1, 0])  # user 0 has two windows
    alone = []
    for user in (0, 1):
        net.zero_grad()
        net(x[window_user == user]).square().sum().backward()
        alone.append([p.grad.clone() for p in net.parameters()])
    dp_net, _ = _dp_sgd(net, DataLoader(TensorDataset(x), batch_size=2), 1e6, reduction)
    set_window_users(net, window_user, users=2)
    loss = dp_net(x).square().sum(1)
    per_user = torch.zeros(2).index_add_(0, window_user, loss)
    reduced_loss(dp_net, per_user).backward()
    for i, param in enumerate(net.parameters()):
        for user in (0, 1):
            assert torch.allclose(param.grad_sample[user], alone[user][i], atol=1e-6), (i, user)
    dp_net.remove_hooks()


def test_kept_per_user_gradients_pad_and_sum_without_touching_the_backprops():
    """What a grad sampler returns is kept as the parameter's per-user gradient: zero rows
    for users it has none for, as Opacus pads, and a second use added out of place, since
    the kept tensor may be the backprops autograd passes on."""
    layer = torch.nn.Linear(2, 1)
    layer.max_batch_len = 3
    backprops = torch.ones(2, 1)
    keep = _kept(lambda module, activations, grad: {module.bias: grad})
    assert keep(layer, [], backprops) == {}
    keep(layer, [], backprops)
    assert layer.bias._current_grad_sample.tolist() == [[2.0], [2.0], [0.0]]
    assert backprops.tolist() == [[1.0], [1.0]]


def test_a_summed_loss_trains_dp_sgd_on_the_batch_mean_gradient(prepared):
    """`train_epoch` sums the per-user losses of a model wrapped with loss_reduction="sum" (as
    the clients wrap theirs): with clipping and noise out of the way, the DP-SGD step takes
    the plain step's mean gradient."""
    torch.manual_seed(0)
    cfg = TINY_MODEL.model_copy(update={"dropout": 0.0})
    model = _released(BehaviorModel(cfg, prepared.shape))
    batch = _batch(prepared, 6)
    per_user_loss(model, batch.trim(), 0.5)[0].mean().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    dp_model, optimizer = _dp_sgd(
        model, loader(prepared.train, 8, shuffle=False), clip=1e6, reduction="sum"
    )
    optimizer.expected_batch_size = 6
    train_epoch(dp_model, [tuple(batch)], optimizer, torch.device("cpu"), 0.5)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.allclose(param.grad, plain[name], atol=1e-6, rtol=1e-4), name
    dp_model.remove_hooks()


def test_dp_sgd_skips_the_summed_gradients_it_never_reads(prepared, monkeypatch):
    """Under the engine's hooks, autograd computes no batch-summed gradient: not for a layer
    fed by a gradient-carrying input, nor for an embedding whose indices carry none (its
    backprops still reach Opacus, through a hook on its output), and Opacus copies no per-user
    gradient into a tensor of its own; once the hooks are removed, none is left and plain
    training has the gradients back."""
    copies = []
    monkeypatch.setattr(
        grad_sample_module, "create_or_accumulate_grad_sample", lambda **kw: copies.append(kw)
    )
    model = BehaviorModel(TINY_MODEL, prepared.shape)
    trainable = [p.requires_grad for p in model.parameters()]
    dp_model, _ = _dp_sgd(model, loader(prepared.train, 8, shuffle=False), clip=1.0)
    # The backprops come from hooks on the layers' outputs: no full backward hook anywhere.
    assert not any(m._backward_hooks for m in model.modules())
    query = model.bert.encoder.layer[0].attention.self.query.weight
    batch = _batch(prepared, 4).trim()
    per_user_loss(dp_model, batch, 0.5)[0].mean().backward()
    assert query.grad is None and query.grad_sample.shape == (4, *query.shape)
    dow = model.dow.weight
    assert dow.grad is None and dow.grad_sample.shape == (4, *dow.shape)
    assert [n for n, p in model.named_parameters() if p.grad is not None] == []
    assert [p.requires_grad for p in model.parameters()] == trainable
    assert copies == []
    # A forward call that raises inside a layer leaves its weights out of the graph until the
    # layer's next call, which puts them back.
    dp_model.zero_grad()
    gap = model.gap
    with pytest.raises(IndexError):
        gap(torch.tensor([10**6]))
    assert not gap.weight.requires_grad
    per_user_loss(dp_model, batch, 0.5)[0].mean().backward()
    assert gap.weight.requires_grad and gap.weight.grad_sample.shape == (4, *gap.weight.shape)
    with pytest.raises(IndexError):
        gap(torch.tensor([10**6]))
    dp_model.remove_hooks()  # so does removing the hooks
    assert gap.weight.requires_grad
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    per_user_loss(model, batch, 0.5)[0].mean().backward()
    assert query.grad is not None and query.grad.abs().sum() > 0 and gap.weight.grad is not None


def _dense(recorded: UserRows, param: torch.Tensor, users: int) -> torch.Tensor:
    """The per-user gradient [users, rows, dim] that `recorded` stands for."""
    dense = torch.zeros(users, *param.shape) if recorded.dense is None else recorded.dense.clone()
    for key, grad in recorded.entries:
        dense.view(-1, param.shape[1]).index_add_(0, key, grad)
    return dense


def test_every_target_of_a_long_history_trains(prepared):
    longest = int(prepared.train.length.max())
    assert longest > TINY_MODEL.max_len
    row = int(prepared.train.length.argmax())
    targets = (prepared.train.next_item[row] != IGNORE).sum()
    assert targets >= longest - 2  # all but the last event (and any unknown item)


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
