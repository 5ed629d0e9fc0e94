"""The shared item catalog: item → embedding row and category.

The catalog is platform data, not user data, so every party maps items to the same rows. Items
outside the vocabulary land in hashed out-of-vocabulary rows instead of being lost.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import TypeAdapter, ValidationError

from common.atomic import write_json

PAD = 0
UNKNOWN = "<unknown>"


def top_category(categories: pd.Series, chars: int | None) -> pd.Series:
    """Top level of a category: its first `chars` characters, else the part before the first '.'."""
    text = categories.astype("string")
    return text.str[:chars] if chars else text.str.split(".", n=1).str[0]


def _stable_bucket(values: np.ndarray, buckets: int) -> np.ndarray:
    # Python's hash() is salted per process; parties need the same bucket for the same item.
    return np.array(
        [
            int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8).digest(), "little") % buckets
            for v in values
        ],
        dtype=np.int64,
    )


@dataclass
class Catalog:
    items: list[str]
    item_category: list[int]  # index into categories, per item
    categories: list[str]  # categories[0] is UNKNOWN
    category_top: list[int]  # index into top_categories, per category
    top_categories: list[str]
    regions: list[str]  # regions[0] is UNKNOWN
    oov_buckets: int = 64
    top_category_chars: int | None = None  # the rule that made top_categories

    @property
    def n_special(self) -> int:
        return 1 + self.oov_buckets

    @property
    def n_rows(self) -> int:
        return self.n_special + len(self.items)

    @classmethod
    def build(
        cls,
        events: pd.DataFrame,
        top_category_chars: int | None = None,
        oov_buckets: int = 64,
        regions: list[str] | None = None,
    ) -> Catalog:
        """Vocabulary = the items in `events` (pass the training part) in ID order, which the
        model's catalog-neighbour part reads; category = most common."""
        counts = events.groupby(["item_id", "category"], observed=True).size().rename("n")
        modal = counts.reset_index().sort_values(["item_id", "n"], ascending=[True, False])
        modal = modal.drop_duplicates("item_id")
        cats = [UNKNOWN, *sorted(events["category"].astype(str).unique())]
        tops = top_category(pd.Series(cats[1:]), top_category_chars)
        top_names = [UNKNOWN, *sorted(tops.unique())]
        top_index = {t: i for i, t in enumerate(top_names)}
        cat_index = {c: i for i, c in enumerate(cats)}
        return cls(
            items=modal["item_id"].astype(str).tolist(),
            item_category=[cat_index[c] for c in modal["category"].astype(str)],
            categories=cats,
            category_top=[0, *(top_index[t] for t in tops)],
            top_categories=top_names,
            regions=[UNKNOWN, *sorted(regions or events["region"].astype(str).unique())],
            oov_buckets=oov_buckets,
            top_category_chars=top_category_chars,
        )

    def item_rows(self, item_ids: pd.Series) -> np.ndarray:
        """Embedding row per item id; unknown ids get a hashed OOV row in [1, oov_buckets]."""
        index = pd.Index(self.items)
        pos = index.get_indexer(item_ids.astype(str))
        rows = pos + self.n_special
        unknown = pos < 0
        if unknown.any():
            rows[unknown] = 1 + _stable_bucket(
                item_ids.astype(str).to_numpy()[unknown], self.oov_buckets
            )
        return rows.astype(np.int64)

    def item_classes(self, item_ids: pd.Series) -> np.ndarray:
        """Output class per item id (its index in `items`), -1 outside the vocabulary."""
        return pd.Index(self.items).get_indexer(item_ids.astype(str)).astype(np.int64)

    def category_index(self, categories: pd.Series) -> np.ndarray:
        pos = pd.Index(self.categories).get_indexer(categories.astype(str))
        return np.where(pos < 0, 0, pos).astype(np.int64)

    def region_index(self, regions: pd.Series) -> np.ndarray:
        pos = pd.Index(self.regions).get_indexer(regions.astype(str))
        return np.where(pos < 0, 0, pos).astype(np.int64)

    def top_of_category(self, category_idx: np.ndarray) -> np.ndarray:
        return np.asarray(self.category_top, dtype=np.int64)[category_idx]

    def save(self, path: str | Path) -> Path:
        return write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> Catalog:
        """The catalog saved at `path`; a ValueError naming the file and field if it is not one
        (every index inside the list it points into, one category per item and one top
        category per category)."""
        try:
            catalog = TypeAdapter(cls).validate_json(Path(path).read_bytes(), strict=True)
        except OSError as exc:
            raise ValueError(f"{path}: not a valid catalog: {exc}") from exc
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"{path}: not a valid catalog: '{field}': {first['msg']}") from exc
        for problem in catalog._problems():
            raise ValueError(f"{path}: not a valid catalog: {problem}")
        return catalog

    def _problems(self) -> list[str]:
        indexes = (
            ("item_category", self.item_category, self.items, self.categories),
            ("category_top", self.category_top, self.categories, self.top_categories),
        )
        problems = [
            f"'{name}' has {len(index)} entries for {len(owners)}"
            for name, index, owners, _ in indexes
            if len(index) != len(owners)
        ]
        problems += [
            f"'{name}' points outside its {len(targets)} entries ({bad})"
            for name, index, _, targets in indexes
            for bad in [i for i in index if not 0 <= i < len(targets)][:1]
        ]
        if self.oov_buckets < 1 or (self.top_category_chars or 1) < 1:
            problems.append("'oov_buckets' and 'top_category_chars' must be at least 1")
        return problems
