import numpy as np
import pandas as pd

from common.data.catalog import Catalog
from common.data.events import ROW
from common.data.sequences import (
    IGNORE,
    encode,
    history_sequences,
    leave_last_out,
    training_sequences,
)
from common.learning.dataset import prepare

DAY = 86_400


def _events(rows):
    frame = pd.DataFrame(
        rows, columns=["user_id", "item_id", "timestamp", "category", "event_type", "quantity"]
    )
    frame["timestamp"] = pd.to_datetime(frame["timestamp"])
    frame["region"] = "r1"
    frame["price"] = 1.0
    frame.insert(0, ROW, np.arange(1, len(frame) + 1))
    for col in ("user_id", "item_id", "region", "category"):
        frame[col] = frame[col].astype("string")
    return frame


EVENTS = _events(
    [
        ("u1", "a", "2024-01-01", "1.1", "purchase", 2),
        ("u1", "b", "2024-01-01", "2.1", "purchase", 1),  # same time: source order decides
        ("u1", "c", "2024-01-03", "1.1", "view", 1),
        ("u1", "a", "2024-01-05", "1.1", "purchase", 3),
        ("u1", "d", "2024-01-20", "2.1", "purchase", 1),
        ("u2", "b", "2024-01-02", "2.1", "purchase", 1),
        ("u2", "c", "2024-01-04", "1.1", "purchase", 1),
        ("u3", "a", "2024-01-02", "1.1", "purchase", 1),  # only 2 events: dropped
        ("u3", "b", "2024-01-03", "2.1", "purchase", 1),
        ("u2", "e", "2024-01-06", "2.1", "purchase", 1),
    ]
)


def test_leave_last_out_split_and_min_events():
    split = leave_last_out(EVENTS.sample(frac=1, random_state=3))
    assert set(split["user_id"]) == {"u1", "u2"}
    u1 = split[split["user_id"] == "u1"]
    assert u1["item_id"].tolist() == ["a", "b", "c", "a", "d"]
    assert u1["split"].tolist() == ["train", "train", "train", "valid", "test"]
    assert split.groupby("user_id")["split"].apply(lambda s: (s == "test").sum()).eq(1).all()


def test_training_sequences_one_row_per_user_with_next_item_targets():
    split = leave_last_out(EVENTS)
    train = split[split["split"] == "train"]
    catalog = Catalog.build(train, oov_buckets=4)
    enc = encode(split, catalog)
    is_train = (split["split"] == "train").to_numpy()
    seqs = training_sequences(
        enc[is_train].reset_index(drop=True), len(catalog.top_categories), 4, 7 * DAY
    )
    assert len(seqs) == 2 and list(seqs.users) == ["u1", "u2"]
    row = catalog.item_rows(pd.Series(["a", "b", "c"]))
    assert seqs.items[0].tolist() == [*row.tolist(), 0]
    cls = catalog.item_classes(pd.Series(["b", "c"])).tolist()
    assert seqs.next_item[0].tolist() == [*cls, IGNORE, IGNORE]
    assert seqs.length.tolist() == [3, 1]
    # u2 has a single training event: no next item inside its training part
    assert (seqs.next_item[1] == IGNORE).all()


def test_demand_labels_count_units_strictly_after_each_event_within_horizon():
    split = leave_last_out(EVENTS)
    catalog = Catalog.build(split, oov_buckets=4)
    enc = encode(split, catalog)
    u1 = enc[enc["user_id"] == "u1"].reset_index(drop=True)
    seqs = training_sequences(u1, len(catalog.top_categories), 8, 7 * DAY)
    top1 = catalog.top_categories.index("1")
    top2 = catalog.top_categories.index("2")
    demand, lag = seqs.demand[0], seqs.lag[0]
    # Each label starts `lag` days after its event, inside the quiet spell before the next one.
    assert lag[0] == lag[1] == 0  # a and b on day 1: no quiet day before the next event
    assert 0 <= lag[2] < 2 and 0 <= lag[3] < 15
    # After the first event (day 1): b is at the same time (excluded), a ×3 on day 5 counts.
    assert demand[0, top1] == 3 and demand[0, top2] == 0
    assert demand[2, top1] == 3  # after the view on day 3, wherever its lag starts
    # From day 5 + lag: d on day 20 counts only if the 7-day horizon reaches it.
    assert demand[3, top2] == (5 + lag[3] + 7 >= 20)
    # A horizon counts only when fully observed (before u1's last training event, day 20).
    assert seqs.demand_mask[0].tolist()[:5] == [True, True, True, 5 + lag[3] + 7 <= 20, False]


def test_forecast_inputs_know_how_long_each_user_has_been_away():
    split = leave_last_out(EVENTS)
    catalog = Catalog.build(split, oov_buckets=4)
    enc = encode(split, catalog)
    at = int(pd.Timestamp("2024-01-25").timestamp())
    seqs = history_sequences(enc, len(catalog.top_categories), 8, at=at)
    last = seqs.lag[np.arange(len(seqs)), seqs.length - 1]
    assert dict(zip(seqs.users, last.tolist(), strict=True)) == {"u1": 5, "u2": 19}


def test_unknown_items_map_to_stable_oov_rows():
    catalog = Catalog.build(EVENTS, oov_buckets=8)
    rows = catalog.item_rows(pd.Series(["zz-new", "zz-new", "a", "other"]))
    assert rows[0] == rows[1] and 1 <= rows[0] <= 8
    assert rows[2] >= catalog.n_special
    assert catalog.item_classes(pd.Series(["zz-new"])).tolist() == [-1]
    assert Catalog.build(EVENTS, oov_buckets=8).item_rows(pd.Series(["zz-new"]))[0] == rows[0]


def test_catalog_round_trip(tmp_path):
    catalog = Catalog.build(EVENTS)
    path = catalog.save(tmp_path / "catalog.json")
    assert Catalog.load(path) == catalog


def test_history_sequences_keep_the_most_recent_events():
    split = leave_last_out(EVENTS)
    catalog = Catalog.build(split)
    enc = encode(split, catalog)
    not_test = enc[(split["split"] != "test").to_numpy()].reset_index(drop=True)
    seqs = history_sequences(
        not_test, len(catalog.top_categories), 2, enc[(split["split"] == "test").to_numpy()]
    )
    assert seqs.items[0].tolist() == catalog.item_rows(pd.Series(["c", "a"])).tolist()
    assert seqs.target.tolist() == catalog.item_classes(pd.Series(["d", "e"])).tolist()


def test_prepare_builds_every_split(tiny_events):
    prepared = prepare(tiny_events, top_category_chars=None, history_len=20)
    users = tiny_events.groupby("user_id").size()
    assert len(prepared.train) == len(prepared.valid) == len(prepared.test) == (users >= 3).sum()
    assert prepared.train.items.shape[1] == 20
    assert prepared.demand.units.shape[1] == 8  # 56 days = 8 full weeks
    assert len(prepared.forecast_inputs) == 1 + 3  # weeks 1-3 calibrate; week 0 has no history


def test_a_forecast_counts_every_user_known_at_its_cut_not_only_those_who_come_back(
    tiny_events,
):
    """A shopper with one purchase before the cutoff and none after is in the cutoff's sum:
    whether a user reaches 3 events is only known from the future."""
    once = tiny_events.iloc[:1].assign(user_id="one-time", event_type="purchase")
    prepared = prepare(pd.concat([tiny_events, once]), top_category_chars=None, history_len=20)
    assert "one-time" not in set(prepared.train.users)
    assert "one-time" in set(prepared.forecast_inputs[0].users)
