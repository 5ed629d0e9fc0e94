"""The behavior model: a from-scratch `transformers` BERT over event sequences, with a repeat and
an explore component for the next item and a per-user demand head.

Each event embeds its item, category, day-of-week, hour and log time-gap, plus the user's region.
The encoder runs causally over windows of `max_len` events; a user's history of up to
`windows × max_len` events sits in one row, split into windows aligned to its end. The encoder
sees only the windows that hold events (its per-sample gradients are summed per user), so every
target of a long history trains while the user stays one DP unit.

Next item = a mixture, gated per position (as in RepeatNet, Ren et al. 2019) by the state and
the user's repeat habit so far:
- **repeat**: attention from the current state over the user's own past events (any window),
  biased by how many days ago each happened; an item's probability is the attention mass on its
  occurrences, so counts and recency are learnable.
- **explore**: an exact factorised softmax, p(category) · p(item | category). Category vectors
  are tied to the input category embedding; items are tied low-rank codes plus a popularity bias.
  Training touches only the target's category, so its cost does not grow with the catalog.
- **catalog neighbours**, two parts: the items next to the current one in the catalog's ID
  order, and those next to any item of today's basket (each basket item alike), with one
  learned score per signed distance. Retailers number a product family's variants and a
  maker's lines together (Online Retail's 22726–22728 alarm clocks; Ta-Feng's EAN codes), and
  shoppers buy them one after the other; the catalog is platform data, so this costs no ε, and
  it is 2 × NEIGHBOURS parameters where learning each item pair under DP would be noise. An
  invoice's lines are ordered, so there the last line's neighbours count; a grocery day's
  basket is not, so there the whole basket's do: a learned split between the two parts.
  First the neighbour gate takes its share, then the repeat gate splits the rest.

Items already in today's basket are damped inside the repeat and explore parts, where each
part's own softmax renormalises them exactly (the neighbour parts leave them be: an item next to
one in the basket is what they predict): a learned bias on their occurrences in the repeat
attention, another on their scores within their category, and in p(category) a learned weight
on how many basket items each category holds plus the category's mass left once they are damped
(under the popularity prior).
Damping the mixture as a whole would need every basket item's explore probability, i.e. its
category's normaliser, at every position of the day: on Ta-Feng that was 87 % of a step's
(position, item) pairs.

Every parameter is shared across many users' signal, which matters under DP: an item's own
trainable coordinates are `item_dim + 1`, not `hidden`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers import BertConfig, BertModel

from common.data.sequences import GAP_BUCKETS, IGNORE, Batch
from common.learning.configs import ModelConfig
from common.learning.packed import (
    BucketBias,
    PackedEmbedding,
    PackedLinear,
    RowsLinear,
    SparseRowsEmbedding,
    pack,
    set_users,
    set_window_users,
)
from common.messages import ITEM_POPULARITY

HABIT_FEATURES = 2  # the gate's direct inputs: see `_habit_features`
# Per position, how today's basket is damped: β in the repeat attention, β within the item's
# category (both ≥ 0 after softplus), and the weight on log1p(basket items per category).
BASKET_TERMS = 3
RECENCY_BUCKETS = 10  # 0 = same day, b = 2^(b-1) ≤ days < 2^b, last = a year or more
NEIGHBOURS = 3  # catalog neighbours on each side of the current item (see the docstring)
# Signed catalog distances of the neighbour component, in the order of its learned scores.
NEIGHBOUR_OFFSETS = (*range(-NEIGHBOURS, 0), *range(1, NEIGHBOURS + 1))
NEIGHBOUR_GATE_START = -3.0  # p(neighbour) ≈ 5 % at the start: a prior, the data moves it
# Tied parameters under their second name: stored once (safetensors refuses shared tensors,
# and a federated update should carry each weight once), re-linked on load.
TIED = {"category_out.weight": "category.weight", "item_out.weight": "item_code.weight"}


class CatalogShape(BaseModel):
    """The catalog structure the model is built for (from the shared catalog)."""

    model_config = ConfigDict(extra="forbid")
    item_rows: int
    items: int
    categories: int
    top_categories: int
    regions: int
    # Category of each output item: the factorised softmax groups by it. Platform data.
    item_category: list[int] = Field(exclude=True, repr=False)

    @property
    def special_rows(self) -> int:
        return self.item_rows - self.items


class Seen(NamedTuple):
    """The categories a query state's user bought so far: one entry per past event."""

    state: torch.Tensor  # [E] the query state
    category: torch.Tensor  # [E] the event's category


class Basket(NamedTuple):
    """Today's basket at each query state (each basket item once) and how the states damp it."""

    state: torch.Tensor  # [K] the query state of each basket entry
    item: torch.Tensor  # [K] its vocabulary index
    beta: torch.Tensor  # [S] ≥ 0: log-factor on basket items within their category
    weight: torch.Tensor  # [S] weight on log1p(basket items per category) in p(category)


class BehaviorModel(nn.Module):
    def __init__(self, cfg: ModelConfig, shape: CatalogShape) -> None:
        super().__init__()
        if cfg.hidden % cfg.heads:
            raise ValueError(f"hidden ({cfg.hidden}) must be a multiple of heads ({cfg.heads})")
        if len(shape.item_category) != shape.items:
            raise ValueError("catalog shape: one category per item is required")
        self.cfg, self.shape = cfg, shape
        bert_cfg = BertConfig(
            vocab_size=1,  # items enter as inputs_embeds
            hidden_size=cfg.hidden,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            intermediate_size=cfg.intermediate,
            hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout,
            max_position_embeddings=cfg.max_len,
            type_vocab_size=1,
            pad_token_id=0,
            is_decoder=True,
            attn_implementation="sdpa",
        )
        self.bert = BertModel(bert_cfg, add_pooling_layer=False)
        self.bert.embeddings.word_embeddings.weight.requires_grad_(False)
        h, code = cfg.hidden, cfg.item_dim + 1
        self.item_code = SparseRowsEmbedding(shape.item_rows, code)
        self.item_in = nn.Linear(code, h)
        self.category = SparseRowsEmbedding(shape.categories, h)
        self.dow = nn.Embedding(8, h)
        self.hour = nn.Embedding(25, h)
        self.gap = nn.Embedding(GAP_BUCKETS, h)
        self.region = nn.Embedding(shape.regions, h)
        self.copy_query = nn.Linear(h, h)
        self.copy_key = nn.Linear(h, h)
        self.recency = BucketBias(RECENCY_BUCKETS)
        self.gate = nn.Linear(h, 1)
        self.neighbour_gate = nn.Linear(h, 1)
        self.neighbour_split = nn.Linear(h, 1)  # the last item's neighbours vs the basket's
        self.neighbour = BucketBias(len(NEIGHBOUR_OFFSETS))
        # The user's repeat habit read directly from the history (see `_habit_features`):
        # under DP a gate on the state alone stayed at one value for every Ta-Feng user
        # (0.09), while their repeat rate runs from 3 % to 23 % with exactly these features.
        self.repeat_habit = nn.Linear(HABIT_FEATURES, 1)
        self.basket = nn.Linear(h, BASKET_TERMS)  # damps today's basket: see BASKET_TERMS
        self.category_out = RowsLinear(h, shape.categories)
        self.habit = PackedLinear(h, 1)  # how much the user's own category counts weigh
        self.item_query = PackedLinear(h, cfg.item_dim, bias=False)
        # How much the released popularity weighs: of the item within its category, and of
        # the category (its items' sum); 1 at the start, i.e. p ∝ popularity, the count's MLE.
        self.popularity_weight = PackedLinear(h, 2)
        self.item_out = SparseRowsEmbedding(shape.item_rows, code)
        self.absence = PackedEmbedding(RECENCY_BUCKETS, h)  # days since the visit, for demand
        self.demand_head = PackedLinear(h, shape.top_categories)
        self.apply(self._init)
        nn.init.ones_(self.popularity_weight.bias)
        nn.init.constant_(self.neighbour_gate.bias, NEIGHBOUR_GATE_START)
        # Starts as the user's own smoothed repeat share: the prior a count alone gives.
        nn.init.zeros_(self.repeat_habit.weight)
        with torch.no_grad():
            self.repeat_habit.weight[0, 0] = 1.0
        # Tied after init: one parameter, two uses; Opacus sums both uses' per-user gradients.
        self.category_out.weight = self.category.weight
        self.item_out.weight = self.item_code.weight
        self._buffers_for(shape)
        # Noisy count of users buying each item, summed from the clients' DP releases by the
        # server (it travels with the model, but is never trained); 0 until released.
        self.register_buffer(ITEM_POPULARITY, torch.zeros(shape.items))
        self.register_state_dict_post_hook(_drop_tied)
        self.register_load_state_dict_pre_hook(_link_tied)

    def _init(self, module: nn.Module) -> None:
        # BERT's own scale for everything summed into its input, so no feature drowns the
        # item: PyTorch's N(0, 1) default embeddings would be 50× BERT's 0.02.
        std = self.bert.config.initializer_range
        if (
            isinstance(module, nn.Embedding | nn.Linear | BucketBias)
            and module not in self.bert.modules()
        ):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def _buffers_for(self, shape: CatalogShape) -> None:
        item_cat = torch.tensor(shape.item_category, dtype=torch.long)
        order = torch.argsort(item_cat, stable=True)
        sizes = torch.bincount(item_cat, minlength=shape.categories)
        # Derived from the catalog, not learned: kept out of the state dict that is exchanged.
        self.register_buffer("item_category", item_cat, persistent=False)
        self.register_buffer("items_by_category", order, persistent=False)
        self.register_buffer("category_size", sizes, persistent=False)
        self.register_buffer("category_start", torch.cumsum(sizes, 0) - sizes, persistent=False)
        # Categories without vocabulary items (e.g. <unknown>) must take no probability.
        empty = torch.where(sizes > 0, 0.0, float("-inf"))
        self.register_buffer("category_mask", empty, persistent=False)
        offsets = torch.tensor(NEIGHBOUR_OFFSETS, dtype=torch.long)
        self.register_buffer("neighbour_offsets", offsets, persistent=False)

    # encoder -------------------------------------------------------------------------------

    def _windows(
        self, length: torch.Tensor, width: int, span: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where each real event sits once the batch is cut into windows of `span` slots: (its
        index in the flat [B·L] batch, its index in the flat [W·span] windows, the user of each
        window [W]). A user's windows align to the end of their history. Window u < B is user
        u's last one (empty for a user without events) and the earlier ones follow, so summing
        a user's windows adds only the few extra ones (`set_window_users`)."""
        size, users = self.cfg.max_len, len(length)
        extra = (torch.div(length + size - 1, size, rounding_mode="floor") - 1).clamp_min(0)
        owner, slot = pack(length, width)
        back = torch.div(length[owner] - 1 - slot, size, rounding_mode="floor")  # 0 = the last
        start = (length[owner] - (back + 1) * size).clamp_min(0)
        first_extra = users + torch.cumsum(extra, 0) - extra
        row = torch.where(back == 0, owner, first_extra[owner] + back - 1)
        user = torch.arange(users, device=length.device)
        window_user = torch.cat([user, user.repeat_interleave(extra)])
        return owner * width + slot, row * span + slot - start, window_user

    def encode(self, b: Batch) -> torch.Tensor:
        """Hidden state per event, [B, L, H] (zero at padding); position i sees only events ≤ i
        of its window. The encoder runs on the windows that hold events, not on the padded
        rows: most Ta-Feng users fill a fraction of one window."""
        users, width = b.items.shape
        owner = torch.arange(users, device=b.items.device).repeat_interleave(width)
        embeds = (
            self.item_in(self.item_code(b.items.flatten(), owner).view(users, width, -1))
            + self.category(b.cats.flatten(), owner).view(users, width, -1)
            + self.dow(b.dow)
            + self.hour(b.hour)
            + self.gap(b.gap)
            + self.region(b.region)[:, None, :]
        ).flatten(0, 1)
        span = min(self.cfg.max_len, width)  # a narrow batch needs no wider windows
        at_batch, at_window, window_user = self._windows(b.length, width, span)
        windows = len(window_user)
        inputs = embeds.new_zeros(windows * span, embeds.shape[1])
        inputs = inputs.index_copy(0, at_window, embeds[at_batch]).view(windows, span, -1)
        set_window_users(self.bert, window_user, users)
        # Per-sample position/type ids of shape [W, span]: a broadcast [1, span] breaks
        # Opacus's per-sample gradients of those embeddings (opacus issue 841). Padding only
        # follows a window's events, so the causal mask alone keeps it out of them.
        position = torch.arange(span, device=b.items.device).expand(windows, span).contiguous()
        out = self.bert(
            inputs_embeds=inputs, position_ids=position, token_type_ids=torch.zeros_like(position)
        ).last_hidden_state.flatten(0, 1)
        h = torch.zeros_like(embeds).index_copy(0, at_batch, out[at_window])
        return h.view(users, width, -1)

    # repeat component ----------------------------------------------------------------------

    def _copy_attention(
        self, h: torch.Tensor, b: Batch, baskets: torch.Tensor, beta: torch.Tensor
    ) -> torch.Tensor:
        """log attention of each position over the user's events up to it, [B, L, L]; events
        whose item is in the position's basket (`_baskets`) are damped by `beta` [B, L]."""
        width = h.shape[1]
        scores = self.copy_query(h) @ self.copy_key(h).transpose(1, 2) / math.sqrt(h.shape[-1])
        scores = scores + self.recency(_days_bucket(b.day[:, :, None] - b.day[:, None, :]))[..., 0]
        same = (b.items[:, :, None] == b.items[:, None, :]).to(h.dtype)
        in_basket = (baskets.to(h.dtype) @ same) > 0
        scores = scores - beta[:, :, None] * in_basket
        i = torch.arange(width, device=h.device)
        key = i[None, None, :]
        allowed = (key <= i[None, :, None]) & (key < b.length[:, None, None])
        return scores.masked_fill(~allowed, float("-inf")).log_softmax(-1)

    def _gate(self, h: torch.Tensor, b: Batch) -> torch.Tensor:
        """Logit of p(repeat | not a catalog neighbour) at every position, [B, L]."""
        habit = _habit_features(b, self.shape.special_rows).to(h.dtype)
        return (self.gate(h) + self.repeat_habit(habit))[..., 0]

    def _mixture(
        self, h: torch.Tensor, b: Batch, near: torch.Tensor, has_basket: torch.Tensor
    ) -> torch.Tensor:
        """log weights of (repeat, explore, the last item's neighbours, the basket's
        neighbours) at every position, [B, L, 4]. A position whose item is outside the
        vocabulary (`near` all -1) gives its own neighbours nothing, one without a known item
        in today's basket (`has_basket` [B, L] false) neither kind."""
        repeat = self._gate(h, b)
        neighbour = self.neighbour_gate(h)[..., 0].masked_fill(~has_basket, float("-inf"))
        split = self.neighbour_split(h)[..., 0].masked_fill((near < 0).all(-1), float("-inf"))
        rest, near_mass = F.logsigmoid(-neighbour), F.logsigmoid(neighbour)
        return torch.stack(
            [
                rest + F.logsigmoid(repeat),
                rest + F.logsigmoid(-repeat),
                near_mass + F.logsigmoid(split),
                near_mass + F.logsigmoid(-split),
            ],
            -1,
        )

    # catalog-neighbour component -----------------------------------------------------------

    def _distance_scores(self, users: int, device: torch.device) -> torch.Tensor:
        """The learned score of each signed catalog distance, [B, N]: looked up once per user,
        so Opacus' per-user gradients of both neighbour parts stay exact."""
        distance = torch.arange(len(NEIGHBOUR_OFFSETS), device=device)
        return self.neighbour(distance.expand(users, -1))[..., 0]

    def _near(
        self, item: torch.Tensor, score: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The catalog neighbours of vocabulary items `item` [...]: (their indices [..., N],
        whether each is inside the catalog [..., N], their probabilities within the item's share
        by the distance scores `score` [..., N], 0 outside). An item outside the vocabulary
        (< 0) has none; a row without neighbours stays finite (uniform), and its gate or its
        count gives it no mass."""
        near = item[..., None] + self.neighbour_offsets
        exists = (item[..., None] >= 0) & (near >= 0) & (near < self.shape.items)
        score = score.masked_fill(~exists & exists.any(-1, keepdim=True), float("-inf"))
        return near, exists, score.softmax(-1) * exists

    def _neighbours(self, b: Batch, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the catalog neighbours of each position's item [B, L, N]: vocabulary indices, -1
        where the catalog ends or the item is outside it; their probabilities within the
        part [B, L, N], 0 at -1), from the distance scores `score` [B, N]."""
        item = b.items - self.shape.special_rows
        near, exists, prob = self._near(item, score[:, None, :].expand(*item.shape, -1))
        return near.masked_fill(~exists, -1), prob

    def _basket_neighbours(
        self, basket: Basket, user: torch.Tensor, score: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The catalog neighbours of every item in each query state's basket: (query, item,
        probability), one entry per (basket item, distance) inside the catalog. Each basket
        item spreads its share over its own neighbours by the distance scores `score` [B, N] of
        the query's user `user[query]`, as `_neighbours` does for the last item (so the
        catalog's ends cut it short), and every basket item with neighbours weighs alike."""
        near, exists, prob = self._near(basket.item, score[user[basket.state]])
        items = prob.new_zeros(len(user)).index_add(0, basket.state, exists.any(-1).to(prob.dtype))
        prob = prob / items.clamp_min(1)[basket.state, None]
        query = basket.state[:, None].expand_as(near)
        return query[exists], near[exists], prob[exists]

    # explore component ---------------------------------------------------------------------

    def _category_log_prob(
        self,
        state: torch.Tensor,
        owner: torch.Tensor,
        seen: Seen,
        prior: torch.Tensor,
        basket: Basket,
    ) -> torch.Tensor:
        """log p(category) [S, C]: the state's own scores, plus the popularity `prior` [S, C],
        plus terms on the (state, category) cells the user bought from so far:
        - a learned weight on log1p(the user's events in the category so far: their whole
          history, not one window);
        - a learned weight on log1p(basket items in the category);
        - log(1 − (1 − e^−β) · share): the category's mass left once its basket items are
          damped by e^−β, where share is their part of the category under the popularity
          prior. With the state's own item scores in place of the prior this would be the
          exact renormalisation, but it would need every basket category's normaliser.

        The cells are few against [S, C], so these terms are computed on them alone."""
        categories = self.shape.categories
        events = seen.state * categories + seen.category
        in_basket = basket.state * categories + self.item_category[basket.item]
        cell, at = torch.unique(torch.cat([events, in_basket]), return_inverse=True)
        cells = torch.zeros(3, len(cell), device=cell.device, dtype=state.dtype)
        share = self._popularity_share()[basket.item].to(state.dtype)
        cells[0].index_add_(0, at[: len(events)], torch.ones_like(events, dtype=state.dtype))
        cells[1].index_add_(0, at[len(events) :], torch.ones_like(share))
        cells[2].index_add_(0, at[len(events) :], share)
        s, c = torch.div(cell, categories, rounding_mode="floor"), cell % categories
        habit = F.softplus(self.habit(state, owner))[:, 0]
        term = (
            habit[s] * torch.log1p(cells[0])
            + basket.weight[s] * torch.log1p(cells[1])
            + torch.log1p(torch.expm1(-basket.beta[s]) * cells[2].clamp_max(1.0))
        )
        logits = self.category_out(state, owner) + prior + self.category_mask
        return logits.index_put((s, c), term, accumulate=True).log_softmax(-1)

    def _popularity_share(self) -> torch.Tensor:
        """[V]: each item's share of its category under the prior p ∝ 1 + released count."""
        prior = 1 + self.item_popularity.clamp_min(0)
        total = torch.zeros(self.shape.categories, device=prior.device, dtype=prior.dtype)
        return prior / total.index_add(0, self.item_category, prior)[self.item_category]

    def _popularity_prior(
        self, state: torch.Tensor, owner: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(each state's weight on an item's log popularity [S], log1p of the released
        popularity of each item [V], the categories' prior per state [S, C]); noise can make
        a count negative, read as 0."""
        weight = self.popularity_weight(state, owner)
        items = self.item_popularity
        categories = torch.zeros(self.shape.categories, device=items.device, dtype=items.dtype)
        categories = categories.index_add(0, self.item_category, items)
        category_prior = weight[:, 1:] * torch.log1p(categories.clamp_min(0))
        return weight[:, 0], torch.log1p(items.clamp_min(0)), category_prior

    def _seen(self, b: Batch, rows: torch.Tensor, upto: torch.Tensor) -> Seen:
        """The categories of row `rows[s]`'s events at slots ≤ `upto[s]`, per query s."""
        width = b.cats.shape[1]
        s, i = (torch.arange(width, device=rows.device)[None, :] <= upto[:, None]).nonzero(
            as_tuple=True
        )
        return Seen(s, b.cats[rows[s], i])

    def _explore_log_prob(
        self,
        state: torch.Tensor,
        owner: torch.Tensor,
        seen: Seen,
        item: torch.Tensor,
        basket: Basket,
    ) -> torch.Tensor:
        """log p_explore(item[s] | state[s]) = log p(category) + log p(item | category),
        normalised exactly over that category's items only; `owner` is each state's user."""
        weight, log_popularity, category_prior = self._popularity_prior(state, owner)
        log_cat = self._category_log_prob(state, owner, seen, category_prior, basket)
        query = F.pad(self.item_query(state, owner), (0, 1), value=1.0)
        cat = self.item_category[item]
        sizes = self.category_size[cat]
        pair = torch.repeat_interleave(torch.arange(len(item), device=item.device), sizes)
        first = torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)
        within = torch.arange(len(pair), device=item.device) - first
        member = self.items_by_category[self.category_start[cat][pair] + within]
        codes = self.item_out(member + self.shape.special_rows, owner[pair])
        score = (query[pair] * codes).sum(-1) + weight[pair] * log_popularity[member]
        items = self.shape.items
        damped = torch.isin(pair * items + member, basket.state * items + basket.item)
        score = score - basket.beta[pair] * damped
        top = torch.zeros(len(item), dtype=score.dtype, device=score.device).scatter_reduce(
            0, pair, score.detach(), "amax", include_self=False
        )
        norm = torch.zeros_like(top).index_add(0, pair, (score - top[pair]).exp()).log() + top
        hit = torch.zeros_like(top).index_add(0, pair, score * (member == item[pair]))
        return log_cat[torch.arange(len(item), device=item.device), cat] + hit - norm

    def _explore_all(self, state: torch.Tensor, seen: Seen, basket: Basket) -> torch.Tensor:
        """log p_explore of every item for each state [B, H] → [B, V] (evaluation).

        [B, V] is the catalog for every user, so the passes over it are what evaluation costs:
        the popularity term rides in the matmul and the category terms are joined per [B, C]."""
        owner = torch.arange(len(state), device=state.device)
        weight, log_popularity, category_prior = self._popularity_prior(state, owner)
        log_cat = self._category_log_prob(state, owner, seen, category_prior, basket)
        ones = torch.ones_like(weight)[:, None]
        query = torch.cat([self.item_query(state, owner), ones, weight[:, None]], 1)
        codes = self.item_code.weight[self.shape.special_rows :]
        score = query @ torch.cat([codes, log_popularity[:, None]], 1).T
        score[basket.state, basket.item] -= basket.beta[basket.state]
        index = self.item_category.expand_as(score)
        top = torch.full_like(log_cat, float("-inf")).scatter_reduce(1, index, score, "amax")
        top = top.nan_to_num(neginf=0.0)
        # In place where possible: fresh [B, V] tensors cost page faults.
        shifted = top.gather(1, index).neg_().add_(score).exp_()
        norm = torch.zeros_like(log_cat).scatter_add(1, index, shifted)
        norm = norm.clamp_min(torch.finfo(norm.dtype).tiny).log() + top
        return score.add_((log_cat - norm).gather(1, index))

    # training ------------------------------------------------------------------------------

    def losses(self, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-user next-item NLL and demand Poisson NLL, [B] each; positions are averaged per
        user, so every user weighs the same whatever their history length."""
        users, width = b.items.shape
        set_users(self, users)
        h = self.encode(b)
        owner, slot = pack(b.length, width)
        state = h[owner, slot]
        nll, t_owner = self._next_item_nll(h, b, state, owner, slot)
        rec = _per_user(nll, t_owner, users)
        log_rate = self._log_rate(state, owner, b.lag[owner, slot])
        nll = F.poisson_nll_loss(
            log_rate, b.demand[owner, slot].float(), log_input=True, full=False, reduction="none"
        ).mean(-1)
        dem = _per_user(nll, owner, users, b.demand_mask[owner, slot].float())
        return rec, dem

    def _next_item_nll(
        self,
        h: torch.Tensor,
        b: Batch,
        state: torch.Tensor,
        owner: torch.Tensor,
        slot: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """−log p(next item) at every packed position that has a target, and its user."""
        special = self.shape.special_rows
        target = b.next_item[owner, slot]
        at = (target != IGNORE).nonzero().squeeze(1)
        rows, cols, y = owner[at], slot[at], target[at]
        damp = self.basket(h)
        baskets = self._baskets(b)
        attention = self._copy_attention(h, b, baskets, F.softplus(damp[..., 0]))
        is_y = b.items[rows] == (y + special)[:, None]
        repeat_y = (attention[rows, cols].exp() * is_y).sum(-1)
        basket = self._basket_at(b, baskets, damp, rows, cols)
        log_explore = self._explore_log_prob(state[at], rows, self._seen(b, rows, cols), y, basket)
        score = self._distance_scores(len(h), h.device)
        near, p_near = self._neighbours(b, score)
        mix = self._mixture(h, b, near, baskets.any(-1))[rows, cols]
        near_y = (p_near[rows, cols] * (near[rows, cols] == y[:, None])).sum(-1)
        query, item, prob = self._basket_neighbours(basket, rows, score)
        basket_y = torch.zeros_like(near_y).index_add(0, query, prob * (item == y[query]))
        # Probability space for the repeat and neighbour parts: most targets have no term.
        tiny = torch.finfo(h.dtype).tiny
        log_y = torch.stack(
            [
                mix[:, 0] + repeat_y.clamp_min(tiny).log(),
                mix[:, 1] + log_explore,
                mix[:, 2] + near_y.clamp_min(tiny).log(),
                mix[:, 3] + basket_y.clamp_min(tiny).log(),
            ]
        ).logsumexp(0)
        return -log_y, rows

    def _basket_at(
        self,
        b: Batch,
        baskets: torch.Tensor,
        damp: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
    ) -> Basket:
        """The basket of each query position (row `rows[s]`, slot `cols[s]`), from `_baskets`
        and the basket head's output `damp` [B, L, BASKET_TERMS]."""
        query, slot = baskets[rows, cols].nonzero(as_tuple=True)
        damp = damp[rows, cols]
        item = b.items[rows[query], slot] - self.shape.special_rows
        return Basket(query, item, F.softplus(damp[:, 1]), damp[:, 2])

    def _baskets(self, b: Batch) -> torch.Tensor:
        """[B, L, L]: slot k holds a known item bought on the day of position t, at or before
        t, and not already earlier that day (each basket item counted once)."""
        width = b.items.shape[1]
        i = torch.arange(width, device=b.items.device)
        same_day = b.day[:, :, None] == b.day[:, None, :]
        earlier = i[None, None, :] < i[None, :, None]
        repeat_that_day = (same_day & earlier & (b.items[:, :, None] == b.items[:, None, :])).any(
            -1
        )
        kept = (b.items >= self.shape.special_rows) & ~repeat_that_day
        return same_day & (i[None, None, :] <= i[None, :, None]) & kept[:, None, :]

    # inference -----------------------------------------------------------------------------

    def last_state(self, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states [B, L, H], state after each user's last event [B, H])."""
        set_users(self, len(b.items))
        h = self.encode(b)
        return h, h[torch.arange(len(h), device=h.device), b.length - 1]

    def score_items(self, b: Batch) -> torch.Tensor:
        """log p(next item) for every vocabulary item, [B, V]."""
        h, last = self.last_state(b)
        rows = torch.arange(len(h), device=h.device)
        end = b.length - 1
        damp = self.basket(h)
        baskets = self._baskets(b)
        basket = self._basket_at(b, baskets, damp, rows, end)
        score = self._distance_scores(len(h), h.device)
        near, p_near = self._neighbours(b, score)
        mix = self._mixture(h, b, near, baskets.any(-1))[rows, end]
        near, p_near = near[rows, end], p_near[rows, end]
        seen = self._seen(b, rows, end)
        log_p = self._explore_all(last, seen, basket).add_(mix[:, 1, None])
        # The other parts touch only a few items per user: sparse updates.
        attention = self._copy_attention(h, b, baskets, F.softplus(damp[..., 0]))
        attention = attention[rows, end].exp()
        item = b.items - self.shape.special_rows
        known = (item >= 0) & (attention > 0)
        owner = rows[:, None].expand_as(item)
        _add_part(log_p, mix[:, 0], owner[known], item[known], attention[known])
        r, n = (near >= 0).nonzero(as_tuple=True)
        _add_part(log_p, mix[:, 2], r, near[r, n], p_near[r, n])
        _add_part(log_p, mix[:, 3], *self._basket_neighbours(basket, rows, score))
        return log_p

    def expected_units(self, b: Batch) -> torch.Tensor:
        """Expected units per top category over the demand horizon after each user's last
        event, [B, C]."""
        # The last state attends only over its own window, the last max_len events: the rest
        # of a long history would cost encoder time and change nothing.
        b = b.tail(self.cfg.max_len)
        _, last = self.last_state(b)
        rows = torch.arange(len(last), device=last.device)
        return self._log_rate(last, rows, b.lag[rows, b.length - 1]).exp()

    def _log_rate(
        self, state: torch.Tensor, owner: torch.Tensor, lag: torch.Tensor
    ) -> torch.Tensor:
        """log expected units per top category over the horizon starting `lag` days after."""
        return self.demand_head(state + self.absence(_days_bucket(lag), owner), owner)


def _add_part(
    log_p: torch.Tensor,
    log_weight: torch.Tensor,
    row: torch.Tensor,
    item: torch.Tensor,
    prob: torch.Tensor,
) -> None:
    """log_p[r, j] ⊕= log_weight[r] + log Σ prob over the entries (r, j), in place: a mixture
    part that puts probability `prob` on a few (row, item) entries, repeats summed."""
    items = log_p.shape[1]
    cell, at = torch.unique(row * items + item, return_inverse=True)
    summed = prob.new_zeros(len(cell)).index_add(0, at, prob)
    r, j = cell // items, cell % items
    log_p[r, j] = torch.logaddexp(log_p[r, j], log_weight[r] + summed.log())


def _days_bucket(days: torch.Tensor) -> torch.Tensor:
    days = days.clamp_min(0).float()
    bucket = torch.where(days > 0, 1 + torch.log2(days.clamp_min(1)).floor(), 0)
    return bucket.long().clamp_max(RECENCY_BUCKETS - 1)


def _habit_features(b: Batch, special: int) -> torch.Tensor:
    """[B, L, 2] per position, over the user's whole row up to it: the logit of their share of
    purchases that repeat an earlier one (Laplace-smoothed, so a short history says little),
    and log1p of the distinct items they bought."""
    width = b.items.shape[1]
    i = torch.arange(width, device=b.items.device)
    known = (b.items >= special) & (i[None, :] < b.length[:, None])
    earlier = (b.items[:, :, None] == b.items[:, None, :]) & (i[None, None, :] < i[None, :, None])
    repeats = (earlier.any(-1) & known).cumsum(1)
    events = known.cumsum(1)
    share = (repeats + 1) / (events + 2)
    return torch.stack([torch.logit(share), torch.log1p(events - repeats)], -1)


def _drop_tied(module: nn.Module, state: dict, prefix: str, _meta: object) -> None:
    for alias in TIED:
        state.pop(prefix + alias, None)


def _link_tied(module: nn.Module, state: dict, prefix: str, *_: object) -> None:
    for alias, name in TIED.items():
        if prefix + name in state:
            state[prefix + alias] = state[prefix + name]


def _per_user(
    values: torch.Tensor, owner: torch.Tensor, users: int, weight: torch.Tensor | None = None
) -> torch.Tensor:
    weight = torch.ones_like(values) if weight is None else weight
    total = torch.zeros(users, device=values.device, dtype=values.dtype)
    count = torch.zeros_like(total).index_add(0, owner, weight)
    return total.index_add(0, owner, values * weight) / count.clamp_min(1)


def per_user_loss(
    model: nn.Module, batch: Batch, demand_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss per user [B] (the DP unit): next-item NLL + weighted Poisson demand NLL.

    `model` may be wrapped (e.g. by Opacus' GradSampleModule, which forwards `losses`' hooks
    through the wrapped module). Returns (total, next_item, demand).
    """
    core = getattr(model, "_module", model)
    rec, dem = core.losses(batch)
    return rec + demand_weight * dem, rec, dem
