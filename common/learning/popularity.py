"""Popularity, repeat-purchase and item-to-item baselines, scored by the same ranking code as
the model.

Counts come from every event of the training part (not only the last L the model sees); a
user's own counts come from their whole history before the held-out event.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd
import torch

from common.data.catalog import Catalog
from common.data.sequences import Sequences
from common.learning.dataset import Prepared
from common.learning.metrics import full_ranks, hit_ndcg
from common.learning.training import rank_metrics, score_rows

TIE_BREAK = 1e-6  # global popularity orders the items a region or a user scores equally
BATCH = 1024  # users per batch of dense scores, at most (`score_rows`)

ScoreBatches = Iterator[tuple[torch.Tensor, torch.Tensor]]


def item_counts(events: pd.DataFrame, n_items: int) -> np.ndarray:
    """Occurrences of each vocabulary item in encoded events."""
    classes = events["item_class"].to_numpy()
    return np.bincount(classes[classes >= 0], minlength=n_items).astype(np.float64)


def user_spread(events: pd.DataFrame, users: np.ndarray, n_items: int) -> np.ndarray:
    """How many of `users` bought each vocabulary item, each user's distinct items weighted
    1/√k (k of them), so that one user moves the vector by at most 1 in L2 norm: the
    sensitivity a Gaussian release of it needs."""
    known = events[(events["item_class"] >= 0) & events["user_id"].isin(users)]
    pairs = known[["user_id", "item_class"]].drop_duplicates()
    k = pairs.groupby("user_id")["item_class"].transform("size").to_numpy()
    return np.bincount(pairs["item_class"].to_numpy(), 1 / np.sqrt(k), minlength=n_items)


def region_counts(events: pd.DataFrame, n_items: int, n_regions: int) -> np.ndarray:
    known = events[events["item_class"] >= 0]
    counts = np.zeros((n_regions, n_items))
    np.add.at(counts, (known["region"].to_numpy(), known["item_class"].to_numpy()), 1.0)
    return counts


def _targets(seqs: Sequences, s: slice) -> torch.Tensor:
    return torch.from_numpy(seqs.target[s].copy())


def global_scores(seqs: Sequences, counts: np.ndarray) -> ScoreBatches:
    row = torch.from_numpy(counts)[None]
    size = score_rows(len(counts), BATCH)
    for start in range(0, len(seqs), size):
        s = slice(start, start + size)
        yield row.expand(len(seqs.target[s]), -1), _targets(seqs, s)


def regional_scores(seqs: Sequences, counts: np.ndarray, by_region: np.ndarray) -> ScoreBatches:
    table = torch.from_numpy(by_region + TIE_BREAK * counts)
    size = score_rows(len(counts), BATCH, table.element_size())
    for start in range(0, len(seqs), size):
        s = slice(start, start + size)
        yield table[seqs.region[s]], _targets(seqs, s)


def own_history_scores(seqs: Sequences, history: pd.DataFrame, counts: np.ndarray) -> ScoreBatches:
    """A user's own most frequent items (whole history), then the globally popular ones."""
    known = history[history["item_class"] >= 0]
    row_of = pd.Series(np.arange(len(seqs)), index=pd.Index(seqs.users))
    user_row = row_of.reindex(known["user_id"].to_numpy()).to_numpy()
    pairs = pd.DataFrame({"row": user_row, "item": known["item_class"].to_numpy()}).dropna()
    pairs = pairs.astype(np.int64).value_counts().reset_index()
    pairs = pairs.sort_values("row", kind="stable")
    base = torch.from_numpy(TIE_BREAK * counts)
    size = score_rows(len(counts), BATCH, base.element_size())
    bounds = np.searchsorted(pairs["row"].to_numpy(), np.arange(0, len(seqs) + size, size))
    for b, start in enumerate(range(0, len(seqs), size)):
        s = slice(start, start + size)
        part = pairs.iloc[bounds[b] : bounds[b + 1]]
        scores = base.repeat(len(seqs.target[s]), 1)
        rows = torch.from_numpy(part["row"].to_numpy(copy=True) - start)
        scores[rows, torch.from_numpy(part["item"].to_numpy(copy=True))] += torch.from_numpy(
            part["count"].to_numpy(np.float64)
        )
        yield scores, _targets(seqs, s)


@dataclass(frozen=True)
class Transitions:
    """How often item j came right after item i in one user's events, by i (CSR rows)."""

    start: np.ndarray  # [V + 1] row offsets
    follower: np.ndarray  # [pairs] j
    count: np.ndarray  # [pairs]

    @classmethod
    def of(cls, counted: pd.Series, n_items: int) -> Transitions:
        """From counts indexed by (i, j), sorted by i."""
        first = counted.index.get_level_values(0).to_numpy()
        return cls(
            np.searchsorted(first, np.arange(n_items + 1)),
            counted.index.get_level_values(1).to_numpy(),
            counted.to_numpy(np.float64),
        )

    def after(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(position in `items`, follower, count) of every pair starting at one of `items`;
        -1 (an unknown item) has none."""
        known = items >= 0
        lo = np.where(known, self.start[items.clip(0)], 0)
        n = np.where(known, self.start[items.clip(0) + 1], 0) - lo
        at = np.repeat(np.arange(len(items)), n)
        pair = np.arange(n.sum()) - np.repeat(n.cumsum() - n, n) + np.repeat(lo, n)
        return at, self.follower[pair], self.count[pair]


def item_transitions(events: pd.DataFrame, n_items: int) -> Transitions:
    """Consecutive pairs of known items in each user's encoded events (sorted by user, time)."""
    item, user = events["item_class"].to_numpy(), events["user"].to_numpy()
    pair = (user[1:] == user[:-1]) & (item[1:] >= 0) & (item[:-1] >= 0)
    counted = pd.DataFrame({"i": item[:-1][pair], "j": item[1:][pair]}).value_counts().sort_index()
    return Transitions.of(counted, n_items)


DAY_S = 86_400


@dataclass(frozen=True)
class RepeatWeights:
    """score = item·log1p(own count of the item) + category·log1p(own count of its fine
    category) + top·log1p(own count of its top-level category) + log1p(training popularity)
    − basket·[item in the user's last-day basket] + transition·log1p(how often the item came
    right after the user's last item, in anyone's training events)."""

    item: float = 4.0
    category: float = 2.0
    basket: float = 20.0
    transition: float = 0.0
    top: float = 0.0


ITEM_WEIGHTS = (4.0, 8.0, 16.0, 32.0)
CATEGORY_WEIGHTS = (0.0, 1.0, 2.0)
REPEAT_GRID = tuple(
    RepeatWeights(a, b, c) for a in ITEM_WEIGHTS for b in CATEGORY_WEIGHTS for c in (0.0, 5.0, 20.0)
)
# The transition-aware rule adds the last item's followers to the repeat-aware rule's weights.
TRANSITION_WEIGHTS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
# Then each rule may count the user's top-level categories too: where tastes live at that
# level and sub-categories split them (the synthetic default), fine counts miss them.
TOP_WEIGHTS = (0.0, 1.0, 2.0, 4.0)

Parts = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class RepeatFeatures:
    """Per user (row of a `Sequences`): pairs (row, key, count), sorted by row."""

    items: pd.DataFrame  # key = item class: how often the user bought it
    categories: pd.DataFrame  # key = fine category index: how often the user bought in it
    basket: pd.DataFrame  # key = item class bought on the day of the user's last event
    followed: pd.DataFrame  # key = item class that came right after the user's last item


def _pairs(seqs: Sequences, frame: pd.DataFrame, column: str) -> pd.DataFrame:
    row_of = pd.Series(np.arange(len(seqs)), index=pd.Index(seqs.users))
    rows = row_of.reindex(frame["user_id"].to_numpy()).to_numpy()
    pairs = pd.DataFrame({"row": rows, "key": frame[column].to_numpy()}).dropna()
    pairs = pairs.astype(np.int64).value_counts().reset_index()
    return pairs.sort_values("row", kind="stable").reset_index(drop=True)


def _followed(seqs: Sequences, history: pd.DataFrame, transitions: Transitions) -> pd.DataFrame:
    """(row, key, count): how often item `key` came right after the row's last item."""
    last = history.groupby("user_id", sort=False)["item_class"].last()
    last = last.reindex(seqs.users, fill_value=-1).to_numpy(np.int64)
    row, key, count = transitions.after(last)
    return pd.DataFrame({"row": row, "key": key, "count": count})


def repeat_features(
    seqs: Sequences, history: pd.DataFrame, transitions: Transitions | None = None
) -> RepeatFeatures:
    """Counts over the whole `history` (encoded events before each user's held-out event).

    The basket is the items of the events on the calendar day of the user's last event: on
    Ta-Feng most held-out items are bought that same day, and rarely the same item twice.
    Without `transitions` no item counts as a follower.
    """
    known = history[history["item_class"] >= 0]
    day = history["t"].to_numpy() // DAY_S
    last_day = pd.Series(day).groupby(history["user"].to_numpy()).transform("max").to_numpy()
    basket = history[(day == last_day) & (history["item_class"] >= 0).to_numpy()]
    none = pd.DataFrame({"row": [], "key": [], "count": []}, dtype=np.int64)
    return RepeatFeatures(
        items=_pairs(seqs, known, "item_class"),
        categories=_pairs(seqs, history[history["cat"] > 0], "cat"),
        basket=_pairs(seqs, basket, "item_class"),
        followed=none if transitions is None else _followed(seqs, history, transitions),
    )


def _dense(pairs: pd.DataFrame, start: int, stop: int, width: int) -> torch.Tensor:
    """log1p(count) of rows [start, stop) as a dense [stop - start, width] matrix."""
    lo, hi = np.searchsorted(pairs["row"].to_numpy(), [start, stop])
    part = pairs.iloc[lo:hi]
    out = torch.zeros(stop - start, width)
    rows = torch.from_numpy(part["row"].to_numpy(copy=True) - start)
    out[rows, torch.from_numpy(part["key"].to_numpy(copy=True))] = torch.from_numpy(
        np.log1p(part["count"].to_numpy(np.float32))
    )
    return out


def _part_batches(
    seqs: Sequences, feats: RepeatFeatures, catalog: Catalog, top: bool
) -> Iterator[tuple[Parts, torch.Tensor]]:
    """(own item, own category, own top category, basket, followers) as dense [B, V] matrices
    per batch, with targets. Without `top` (no weight reads it) the top-level part is a zero
    view: building it is a third of the rest's time on Ta-Feng."""
    n_items, n_cats = len(catalog.items), len(catalog.categories)
    item_category = torch.as_tensor(catalog.item_category)
    item_top = torch.as_tensor(catalog.category_top)[item_category]
    tops = _top_pairs(feats.categories, np.asarray(catalog.category_top)) if top else None
    size = score_rows(n_items, BATCH)
    for start in range(0, len(seqs), size):
        stop = min(start + size, len(seqs))
        own_item = _dense(feats.items, start, stop, n_items)
        own_category = _dense(feats.categories, start, stop, n_cats)[:, item_category]
        own_top = (
            _dense(tops, start, stop, len(catalog.top_categories))[:, item_top]
            if tops is not None
            else own_item.new_zeros(()).expand_as(own_item)
        )
        in_basket = (_dense(feats.basket, start, stop, n_items) > 0).float()
        followed = _dense(feats.followed, start, stop, n_items)
        parts = (own_item, own_category, own_top, in_basket, followed)
        yield parts, _targets(seqs, slice(start, stop))


def _top_pairs(categories: pd.DataFrame, category_top: np.ndarray) -> pd.DataFrame:
    """(row, key, count) of the users' fine-category counts summed by top-level category."""
    keyed = categories.assign(key=category_top[categories["key"].to_numpy()])
    summed = keyed.groupby(["row", "key"], as_index=False, sort=True)["count"].sum()
    return summed.reset_index(drop=True)


def _score(log_popularity: torch.Tensor, parts: Parts, w: RepeatWeights) -> torch.Tensor:
    """Elementwise, one correctly rounded operation at a time (never a fused multiply-add), so
    an item scores bit for bit the same in a dense [B, V] matrix and in a flat list of entries:
    ties must stay ties in both."""
    own_item, own_category, own_top, in_basket, followed = parts
    scores = own_item * w.item + log_popularity
    scores += own_category * w.category
    scores += own_top * w.top
    scores -= in_basket * w.basket
    scores += followed * w.transition
    return scores


def _combine(
    parts: Parts, log_popularity: torch.Tensor, w: RepeatWeights, target: torch.Tensor
) -> torch.Tensor:
    scores = _score(log_popularity, parts, w)
    # full_ranks counts only items scoring strictly higher; lowering the target's score by one
    # float32 step also puts every item that ties it ahead, so ties count against the target.
    # (rank_metrics casts to float32, so the step survives.)
    rows = (target >= 0).nonzero().squeeze(1)
    cols = target[rows]
    scores[rows, cols] = torch.nextafter(scores[rows, cols], torch.tensor(-torch.inf))
    return scores


def repeat_scores(
    seqs: Sequences,
    features: RepeatFeatures,
    counts: np.ndarray,
    catalog: Catalog,
    w: RepeatWeights,
) -> ScoreBatches:
    """The rule's scores of `seqs`' users from their `repeat_features`."""
    log_popularity = torch.from_numpy(np.log1p(counts).astype(np.float32))
    for parts, target in _part_batches(seqs, features, catalog, bool(w.top)):
        yield _combine(parts, log_popularity, w, target), target


@dataclass
class _Entries:
    """A batch's (user row, item) pairs with a non-zero user part, as flat lists."""

    rows: torch.Tensor  # [E]
    log_popularity: torch.Tensor  # [E]
    parts: Parts  # [E] each
    target: torch.Tensor  # [B]
    target_entry: torch.Tensor  # [B] the target's entry, -1 where it has no user part


def _entries(parts: Parts, log_popularity: torch.Tensor, target: torch.Tensor) -> _Entries:
    """Entries where the user part is non-zero for a weight of no top-level term: an item of
    a top category the user shopped in scores more than its popularity only with one."""
    own_item, own_category, _, in_basket, followed = parts
    user_part = (own_item > 0) | (own_category > 0) | (in_basket > 0) | (followed > 0)
    rows, cols = user_part.nonzero(as_tuple=True)
    width = own_item.shape[1]
    keys = rows * width + cols  # row-major, so sorted
    wanted = torch.arange(len(target)) * width + target.clamp_min(0)
    pos = torch.searchsorted(keys, wanted).clamp_max(max(len(keys) - 1, 0))
    found = keys[pos] == wanted if len(keys) else torch.zeros(len(target), dtype=torch.bool)
    return _Entries(
        rows,
        log_popularity[cols],
        tuple(part[rows, cols] for part in parts),
        target,
        torch.where(found, pos, -1),
    )


def _entry_ranks(e: _Entries, log_popularity: torch.Tensor, w: RepeatWeights) -> torch.Tensor:
    """The ranks full_ranks gives on `_combine`'s dense scores (items scoring at least the
    target, the target itself excluded), at the cost of the entries instead of the catalog.

    An item without a user part scores its log popularity, so: items whose popularity reaches
    the target's score, corrected on the entries for their real score."""
    scores = _score(e.log_popularity, e.parts, w)
    target_score = log_popularity[e.target.clamp_min(0)]
    if len(scores):
        has_part = e.target_entry >= 0
        target_score = torch.where(has_part, scores[e.target_entry.clamp_min(0)], target_score)
    ordered = torch.sort(log_popularity).values
    reach = len(ordered) - torch.searchsorted(ordered, target_score)
    at_row = target_score[e.rows]
    fix = (scores >= at_row).long() - (e.log_popularity >= at_row).long()
    ranks = reach + torch.zeros_like(reach).index_add_(0, e.rows, fix) - 1
    return torch.where(e.target >= 0, ranks, len(ordered))


def choose_repeat_weights(
    seqs: Sequences,
    features: RepeatFeatures,
    counts: np.ndarray,
    catalog: Catalog,
    grid: tuple[RepeatWeights, ...] = REPEAT_GRID,
) -> tuple[RepeatWeights, dict[str, float]]:
    """The grid point with the best full-ranking NDCG@10 on `seqs` (pass validation, with its
    `repeat_features`), and its metrics. NDCG, like the model's choice of epoch; the first grid
    point wins a tie.

    Without a top-level term the ranks come from the entries alone (fast); with one, every
    item of a top category the user shopped in moves, so they come from the dense scores."""
    log_popularity = torch.from_numpy(np.log1p(counts).astype(np.float32))
    ranks: dict[RepeatWeights, list[torch.Tensor]] = {w: [] for w in grid}
    dense = any(w.top for w in grid)
    for parts, target in _part_batches(seqs, features, catalog, dense):
        entries = None if dense else _entries(parts, log_popularity, target)
        for w in grid:
            ranks[w].append(
                full_ranks(_combine(parts, log_popularity, w, target), target)
                if entries is None
                else _entry_ranks(entries, log_popularity, w)
            )
    metrics = {w: hit_ndcg(torch.cat(r).numpy()) for w, r in ranks.items()}
    best = max(grid, key=lambda w: metrics[w]["ndcg@10"])
    return best, metrics[best]


@dataclass
class RuleInputs:
    """What the rules count over a prepared data set's training events, and the features of
    its validation and test users; the rules and the served blend read the same ones."""

    counts: np.ndarray
    valid: RepeatFeatures
    test: RepeatFeatures

    @classmethod
    def of(cls, prepared: Prepared) -> RuleInputs:
        """With the exact transition counts of the training events."""
        n_items = len(prepared.catalog.items)
        return cls.with_table(prepared, item_transitions(prepared.train_events, n_items))

    @classmethod
    def with_table(cls, prepared: Prepared, transitions: Transitions | None) -> RuleInputs:
        """With the given transition table (None: no item counts as a follower)."""
        # Both rules read the same features: with a transition weight of 0 the followers count
        # for nothing.
        return cls(
            item_counts(prepared.train_events, len(prepared.catalog.items)),
            repeat_features(prepared.valid, prepared.train_events, transitions),
            repeat_features(prepared.test, prepared.test_history, transitions),
        )


def choose_rule_weights(
    prepared: Prepared,
    inputs: RuleInputs,
    transition_grid: tuple[float, ...] = TRANSITION_WEIGHTS,
) -> tuple[tuple[RepeatWeights, dict[str, float]], tuple[RepeatWeights, dict[str, float]]]:
    """The repeat-aware rule's weights, then the transition-aware rule's (a transition weight
    from `transition_grid` beside them), each with its validation metrics. Each rule's
    top-level weight is chosen last, beside its other weights."""
    counts, catalog = inputs.counts, prepared.catalog

    def best(grid: tuple[RepeatWeights, ...]) -> tuple[RepeatWeights, dict[str, float]]:
        return choose_repeat_weights(prepared.valid, inputs.valid, counts, catalog, grid)

    def with_top(weights: RepeatWeights) -> tuple[RepeatWeights, dict[str, float]]:
        """The top-level weight beside `weights`; where one is taken, the item and category
        weights again beside it (counts of both levels share what they explain)."""
        chosen = best(tuple(replace(weights, top=t) for t in TOP_WEIGHTS))
        if not chosen[0].top:
            return chosen
        grid = (
            replace(chosen[0], item=a, category=b) for a in ITEM_WEIGHTS for b in CATEGORY_WEIGHTS
        )
        return best(tuple(grid))

    repeat = best(REPEAT_GRID)[0]
    followed = best(tuple(replace(repeat, transition=t) for t in transition_grid))[0]
    return with_top(repeat), with_top(followed)


def popularity_results(
    prepared: Prepared, inputs: RuleInputs | None = None
) -> dict[str, dict[str, object]]:
    """Most-popular (global, per region), own-history, repeat-aware and transition-aware
    baselines on the test split; the rules' weights are chosen on the validation split, the
    repeat-aware ones first, then the transition weight beside them."""
    inputs = inputs or RuleInputs.of(prepared)
    catalog, counts = prepared.catalog, inputs.counts
    by_region = region_counts(prepared.train_events, len(catalog.items), len(catalog.regions))
    (weights, valid), (followed, followed_valid) = choose_rule_weights(prepared, inputs)
    repeat = repeat_scores(prepared.test, inputs.test, counts, catalog, weights)
    transition = repeat_scores(prepared.test, inputs.test, counts, catalog, followed)
    return {
        "most_popular": rank_metrics(global_scores(prepared.test, counts)),
        "most_popular_region": rank_metrics(regional_scores(prepared.test, counts, by_region)),
        "own_history": rank_metrics(
            own_history_scores(prepared.test, prepared.test_history, counts)
        ),
        "repeat_aware": {
            **rank_metrics(repeat),
            "weights": asdict(weights),
            "valid": valid,
        },
        "transition_aware": {
            **rank_metrics(transition),
            "weights": asdict(followed),
            "valid": followed_valid,
        },
    }
