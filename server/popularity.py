"""The catalogue's item popularity: the sum of the histograms clients release (under DP each
once, with its first trained round, noised and accounted by the client), kept in the model's
popularity buffer so that every client reads it from the arrays it is sent."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from common.messages import CLIENT, ITEM_POPULARITY, NAME, POPULARITY

COUNTED = "popularity"  # a round table row's flag: this client's histogram is in the sum


class Popularity:
    """Which clients' histograms the sum holds; rebuilt from the round history on resume."""

    def __init__(self, history: list[dict]) -> None:
        self.counted = {
            row["client"] for record in history for row in record["clients"] if row.get(COUNTED)
        }

    def install(
        self, arrays: ArrayRecord, sent: ArrayRecord, trained: list[Message], rows: list[dict]
    ) -> ArrayRecord:
        """`arrays` with the popularity the round's request carried (`sent`) plus the
        histograms of clients not counted yet, whose rows are flagged. Averaging never
        touches it: a weighted mean of one value is that value only up to rounding, and
        central DP would noise it. Arrays without the buffer pass unchanged."""
        if ITEM_POPULARITY not in sent:
            return arrays
        before = sent[ITEM_POPULARITY].numpy()
        total, added = before.astype("float64"), set()
        for m in trained:
            name = str(m.content[CLIENT][NAME])
            if POPULARITY not in m.content or name in self.counted | added:
                continue
            total += np.asarray(m.content[POPULARITY][ITEM_POPULARITY], dtype="float64")
            added.add(name)
        self.counted |= added
        for row in rows:
            if row["client"] in added and row["status"] == "trained":
                row[COUNTED] = True
        installed = Array(total.astype(before.dtype))
        return ArrayRecord({**dict(arrays.items()), ITEM_POPULARITY: installed})
