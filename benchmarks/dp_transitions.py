"""Can the clients release "who bought X next bought Y" under user-level DP? The transition-aware
rule (`fedshop baselines`) with its exact item-to-item counts, next to the same rule on a
table each client released with the Gaussian mechanism, as it would have to be to reach the
server or the model:

- each user's distinct (i, j) pairs weighted 1/√k (k of them), so one user moves the table by
  at most 1 in L2 norm, as the item-popularity release does;
- the domain: the client's M most popular items by its own noisy popularity release (σ = the
  policy's popularity noise), so that the domain itself is a DP output;
- Gaussian noise σ on every one of the M² cells, cells above τ kept, the clients' kept cells
  summed, as the server would.

The rule's weights are chosen on the validation split as `fedshop baselines` chooses them.

    python benchmarks/dp_transitions.py DATA_FILE [FORMAT] [--top 3000]
"""

import argparse

import numpy as np
import pandas as pd

from common.data.formats import load_events
from common.learning.dataset import Prepared, prepare
from common.learning.popularity import (
    TRANSITION_WEIGHTS,
    RuleInputs,
    Transitions,
    choose_rule_weights,
    item_transitions,
    repeat_scores,
    user_spread,
)
from common.learning.training import rank_metrics
from privacy.policy import PrivacyPolicy

RELEASES = ((3.0, 9.0), (3.0, 12.0), (5.0, 15.0))  # (σ, τ): τ at 3 and 4 σ


def rule(prep: Prepared, transitions: Transitions | None) -> dict[str, float]:
    """The repeat-aware rule plus t · log1p(followers), t chosen on validation (0 allowed)."""
    inputs = RuleInputs.with_table(prep, transitions)
    _, (chosen, _) = choose_rule_weights(prep, inputs, (0.0, *TRANSITION_WEIGHTS))
    scores = repeat_scores(prep.test, inputs.test, inputs.counts, prep.catalog, chosen)
    full = rank_metrics(scores)["full"]
    return {"hr@10": full["hr@10"], "ndcg@10": full["ndcg@10"], "t": chosen.transition}


def user_weighted_pairs(events: pd.DataFrame) -> pd.DataFrame:
    """(region, i, j, w): each user's distinct consecutive pairs, weighted 1/√k."""
    item, user = events["item_class"].to_numpy(), events["user"].to_numpy()
    ok = (user[1:] == user[:-1]) & (item[1:] >= 0) & (item[:-1] >= 0)
    pairs = pd.DataFrame(
        {
            "u": user[1:][ok],
            "r": events["region"].to_numpy()[1:][ok],
            "i": item[:-1][ok],
            "j": item[1:][ok],
        }
    ).drop_duplicates()
    pairs["w"] = 1 / np.sqrt(pairs.groupby("u")["i"].transform("size"))
    return pairs


def released(
    prep: Prepared, pairs: pd.DataFrame, sigma: float, tau: float, top: int, seed: int
) -> Transitions:
    rng, events, n = np.random.default_rng(seed), prep.train_events, len(prep.catalog.items)
    popularity_noise = PrivacyPolicy().popularity_noise
    kept = []
    for region, own in pairs.groupby("r"):
        mine = events[events["region"] == region]
        noisy = user_spread(mine, mine["user_id"].unique(), n) + rng.normal(0, popularity_noise, n)
        domain = np.sort(np.argsort(-noisy)[:top])
        at = np.full(n, -1)
        at[domain] = np.arange(len(domain))
        own = own[(at[own["i"]] >= 0) & (at[own["j"]] >= 0)]
        table = rng.normal(0, sigma, (len(domain), len(domain)))
        np.add.at(table, (at[own["i"]], at[own["j"]]), own["w"].to_numpy())
        a, b = np.nonzero(table > tau)
        kept.append(pd.DataFrame({"i": domain[a], "j": domain[b], "c": table[a, b]}))
    return Transitions.of(pd.concat(kept).groupby(["i", "j"])["c"].sum().sort_index(), n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data")
    parser.add_argument("format", nargs="?", default="auto")
    parser.add_argument("--top", type=int, default=3000, help="items in each client's domain")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    loaded = load_events(args.data, args.format)
    prep = prepare(loaded.events, top_category_chars=loaded.spec.top_category_chars)
    pairs = user_weighted_pairs(prep.train_events)
    strength = pairs.groupby(["i", "j"])["w"].sum()
    print(
        f"{prep.train_events['region'].nunique()} clients, {len(strength):,} distinct pairs; "
        f"user-weighted count: largest {strength.max():.1f}, above 9: {(strength > 9).sum()}, "
        f"above 3: {(strength > 3).sum()}"
    )
    print(f"{'table':32s} HR@10   NDCG@10  t")
    tables = {
        "none (repeat-aware rule)": None,
        "exact counts": item_transitions(prep.train_events, len(prep.catalog.items)),
    }
    for sigma, tau in RELEASES:
        table = released(prep, pairs, sigma, tau, args.top, args.seed)
        tables[f"DP σ={sigma:g} τ={tau:g} ({len(table.count):,} kept)"] = table
    for label, table in tables.items():
        r = rule(prep, table)
        print(f"{label:32s} {r['hr@10']:.4f}  {r['ndcg@10']:.4f}  {r['t']:g}", flush=True)


if __name__ == "__main__":
    main()
