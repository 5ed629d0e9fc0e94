"""Where a run's events come from: a file (any supported format) or the embedded generator."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pandas as pd
from pydantic import ValidationError

from common.data.events import MIN_EVENTS, DataError
from common.data.formats import ColumnMap, DatasetSpec, LoadResult, load_events
from common.data.synth import SynthConfig, generate

SYNTH_TOP_CHARS = None  # synthetic categories look like "07.03": the top level is before the dot


@dataclass
class Source:
    name: str
    events: pd.DataFrame
    top_category_chars: int | None
    load: LoadResult | None = None


def spec_from_maps(maps: list[str]) -> DatasetSpec:
    """`["user_id=Customer", "item_id=SKU,timestamp=Date", ...]` → a custom dataset spec.

    An entry may hold several comma-separated pairs, so one string (the run config's `columns`)
    carries a whole mapping in the syntax `--map` takes.
    """
    pairs = {}
    for entry in (pair for text in maps for pair in text.split(",")):
        field, sep, column = entry.partition("=")
        if not sep or not field.strip() or not column.strip():
            raise DataError(f"--map {entry!r}: expected FIELD=COLUMN, e.g. user_id=customer")
        pairs[field.strip()] = column.strip()
    try:
        return DatasetSpec(name="column map", columns=ColumnMap(**pairs))
    except ValidationError as exc:
        raise DataError(f"--map: {exc.errors()[0]['loc'][-1]}: {exc.errors()[0]['msg']}") from exc


def read_source(
    data: Path | None,
    fmt: str = "auto",
    spec: Path | None = None,
    maps: list[str] | None = None,
    synth: SynthConfig | None = None,
) -> Source:
    """The events of `data` (read with a spec file, a column map or `fmt`), or synthetic ones.

    The one loader every command uses; `Source.load` says which adapter read the file and why
    (`LoadResult.reason`), what was rejected and what to note.
    """
    if data is None:
        cfg = synth or SynthConfig()
        return Source(
            f"synthetic(seed={cfg.seed}, events={cfg.events})", generate(cfg), SYNTH_TOP_CHARS
        )
    if spec and maps:
        raise DataError(f"{data}: give a dataset spec or a column map, not both")
    dataset_spec = DatasetSpec.from_file(spec) if spec else spec_from_maps(maps) if maps else None
    result = load_events(data, fmt, dataset_spec)
    return Source(str(data), result.events, result.spec.top_category_chars, result)


def require_history(events: pd.DataFrame, name: str, load: LoadResult | None = None) -> None:
    """Refuse events nothing can be trained or evaluated on, before any work starts."""
    if events.empty:
        why = ""
        if load is not None and len(load.rejected):
            counts = load.rejected["reason"].value_counts()
            why = " (" + ", ".join(f"{k}: {v:,}" for k, v in counts.items()) + ")"
        raise DataError(f"{name}: no usable events: every row was rejected{why}")
    per_user = events.groupby("user_id", observed=True).size()
    if not (per_user >= MIN_EVENTS).any():
        raise DataError(
            f"{name}: no user has {MIN_EVENTS} or more events ({len(per_user):,} users, at most "
            f"{per_user.max()} each); training and evaluation need a history per user"
        )


@lru_cache(maxsize=2)
def run_events(
    data: str, fmt: str, synth_json: str, spec: str = "", columns: str = ""
) -> tuple[pd.DataFrame, int | None]:
    """A run's whole event table (cached per process: simulated clients share it).

    Plain strings, as in the run config (`spec` a file path, `columns` "FIELD=COLUMN,…"; empty =
    none), so the arguments are the cache key.
    """
    src = read_source(
        Path(data) if data else None,
        fmt,
        Path(spec) if spec else None,
        [columns] if columns else None,
        SynthConfig.model_validate_json(synth_json),
    )
    return src.events, src.top_category_chars
