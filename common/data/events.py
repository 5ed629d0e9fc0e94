"""The canonical event table every source is mapped onto, and row-level validation."""

from __future__ import annotations

from enum import StrEnum

import numpy as np
import pandas as pd

MIN_EVENTS = 3  # a user needs a training event, a validation and a test event

REQUIRED = ("user_id", "item_id", "timestamp")
OPTIONAL = ("region", "category", "quantity", "price", "event_type")
CANONICAL = (*REQUIRED, *OPTIONAL)
ROW = "source_row"  # 1-based data row in the source file (header excluded), kept for error reports


class EventType(StrEnum):
    VIEW = "view"
    CART = "cart"
    PURCHASE = "purchase"


class DataError(ValueError):
    """A fatal problem with an input file; the message names the file and the column or row."""


# E-commerce logs start after 1970; a later time than now (give or take a day of clocks and time
# zones) is a clock or unit error. Both are rejected rows, not silent outliers: they would
# stretch the demand calendar and the time-gap features.
EARLIEST = pd.Timestamp("1970-01-01")
CLOCK_SLACK = pd.Timedelta(days=1)


def _first_bad(frame: pd.DataFrame, values: pd.Series, bad: pd.Series) -> str:
    idx = bad.idxmax()
    value = values.loc[idx]
    value = value.item() if isinstance(value, np.generic) else value
    row = frame[ROW].loc[idx] if ROW in frame else idx + 1
    return f"{value!r} in row {row}"


def _coerce_numeric(frame: pd.DataFrame, col: str, source: str) -> pd.Series:
    raw = frame[col]
    if pd.api.types.is_datetime64_any_dtype(raw) or pd.api.types.is_timedelta64_dtype(raw):
        # to_numeric would read them as nanoseconds: a column mapped wrongly, not numbers
        raise DataError(f"{source}: column '{col}' holds {raw.dtype} values, not numbers")
    num = pd.to_numeric(raw, errors="coerce")
    present = raw.notna() & (raw.astype("string").str.strip() != "")
    if present.any() and num[present].isna().all():
        raise DataError(
            f"{source}: column '{col}' holds no numbers (e.g. {_first_bad(frame, raw, present)})"
        )
    # "1e400" and inf parse as numbers; as a quantity or price they are a broken cell.
    return num.where(np.isfinite(num.astype("float64")))


def _coerce_time(frame: pd.DataFrame, source: str, fmt: str | None) -> pd.Series:
    """Parsed times, tz-aware ones in UTC; NaT where unparseable. Any resolution: a year such
    as 9999 is out of nanosecond range, and must become a rejected row, not an overflow."""
    raw = frame["timestamp"]
    if pd.api.types.is_datetime64_any_dtype(raw):
        ts = raw
    else:
        text = raw.astype("string")
        try:
            try:
                ts = pd.to_datetime(text, errors="coerce", format=fmt or "mixed")
            except ValueError:  # naive times mixed with offsets, or several offsets
                ts = pd.to_datetime(text, errors="coerce", format=fmt or "mixed", utc=True)
        except ValueError as exc:  # only a bad `timestamp_format` gets here
            raise DataError(f"{source}: timestamp format {fmt!r} is not usable: {exc}") from exc
    if getattr(ts.dt, "tz", None) is not None:
        ts = ts.dt.tz_convert("UTC").dt.tz_localize(None)
    present = raw.notna()
    if present.any() and ts[present].isna().all():
        raise DataError(
            f"{source}: column 'timestamp' holds no parseable times "
            f"(e.g. {_first_bad(frame, raw, present)})"
        )
    return ts


def _as_id(series: pd.Series) -> pd.Series:
    """Ids as clean strings; integral floats (NaN-able ints, e.g. 13085.0) lose their '.0'.
    An infinite float is no id: NA, like a missing one (`_bad_id` says which it was)."""
    if pd.api.types.is_float_dtype(series):
        series = series.where(np.isfinite(series))
        whole = series.dropna()
        if ((whole == np.floor(whole)) & (whole.abs() < 2.0**63)).all():
            series = series.astype("Int64")
    out = series.astype("string").str.strip()
    return out.mask(out == "")


def _bad_id(raw: pd.Series) -> pd.Series:
    """Where an id cell holds an infinite float."""
    if not pd.api.types.is_float_dtype(raw):
        return pd.Series(False, index=raw.index)
    return np.isinf(raw)


def standardize(
    frame: pd.DataFrame,
    source: str,
    *,
    timestamp_format: str | None = None,
    default_region: str = "all",
    default_event_type: EventType = EventType.PURCHASE,
    reasons: pd.Series | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Validate a frame already renamed to canonical columns.

    Returns (events, rejected). `rejected` keeps every column of the input plus `reason`;
    `reasons` carries rejections a source adapter decided before (first reason wins).
    """
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise DataError(f"{source}: required column(s) missing: {', '.join(missing)}")
    reason = (
        pd.Series(pd.NA, index=frame.index, dtype="string")
        if reasons is None
        else reasons.astype("string")
    )

    def reject(mask: pd.Series, why: str) -> None:
        reason[mask.fillna(False).astype(bool) & reason.isna()] = why

    out = pd.DataFrame(index=frame.index)
    out["user_id"] = _as_id(frame["user_id"])
    out["item_id"] = _as_id(frame["item_id"])
    ts = _coerce_time(frame, source, timestamp_format)
    reject(_bad_id(frame["user_id"]), "bad_user_id")
    reject(_bad_id(frame["item_id"]), "bad_item_id")
    reject(out["user_id"].isna(), "missing_user_id")
    reject(out["item_id"].isna(), "missing_item_id")
    reject(frame["timestamp"].isna(), "missing_timestamp")
    reject(ts.isna(), "bad_timestamp")
    reject(ts < EARLIEST, "timestamp_before_1970")
    reject(ts > pd.Timestamp.now("UTC").tz_localize(None) + CLOCK_SLACK, "future_timestamp")
    out["timestamp"] = ts.where(reason.isna()).astype("datetime64[ns]")

    out["region"] = (
        _as_id(frame["region"]).fillna(default_region) if "region" in frame else default_region
    )
    out["category"] = (
        _as_id(frame["category"]).fillna("unknown") if "category" in frame else "unknown"
    )
    if "quantity" in frame:
        qty = _coerce_numeric(frame, "quantity", source)
        reject(qty.isna(), "bad_quantity")
        reject(qty <= 0, "non_positive_quantity")
        out["quantity"] = qty.astype("float64")
    else:
        out["quantity"] = 1.0
    if "price" in frame:
        price = _coerce_numeric(frame, "price", source)
        reject(price.isna() & frame["price"].notna(), "bad_price")
        reject(price < 0, "negative_price")
        out["price"] = price.astype("float64")
    else:
        out["price"] = np.nan
    if "event_type" in frame:
        et = frame["event_type"].astype("string").str.strip().str.lower()
        reject(~et.isin([e.value for e in EventType]), "unknown_event_type")
        out["event_type"] = et
    else:
        out["event_type"] = default_event_type.value

    bad = reason.notna()
    rejected = frame[bad].copy()
    rejected.insert(0, "reason", reason[bad])
    events = out[~bad].copy()
    events["event_type"] = pd.Categorical(
        events["event_type"], categories=[e.value for e in EventType]
    )
    for col in ("user_id", "item_id", "region", "category"):
        events[col] = events[col].astype("string")
    events.insert(0, ROW, frame.loc[~bad, ROW].to_numpy() if ROW in frame else events.index + 1)
    return events.reset_index(drop=True), rejected.reset_index(drop=True)


def sort_events(events: pd.DataFrame) -> pd.DataFrame:
    """Per user, chronological; ties keep source order (stable), as the evaluation protocol asks."""
    return events.sort_values(["user_id", "timestamp", ROW], kind="stable").reset_index(drop=True)


def summarize(events: pd.DataFrame) -> dict[str, object]:
    if events.empty:
        return {"accepted": 0, "users": 0, "items": 0, "regions": 0, "first": None, "last": None}
    return {
        "accepted": len(events),
        "users": int(events["user_id"].nunique()),
        "items": int(events["item_id"].nunique()),
        "regions": int(events["region"].nunique()),
        "categories": int(events["category"].nunique()),
        "event_types": {
            str(k): int(v) for k, v in events["event_type"].value_counts().items() if v
        },
        "first": str(events["timestamp"].min()),
        "last": str(events["timestamp"].max()),
    }


def user_regions(events: pd.DataFrame) -> pd.Series:
    """A user's region is where most of their events happen (ties: first in sort order)."""
    counts = events.groupby(["user_id", "region"], observed=True).size().rename("n").reset_index()
    counts = counts.sort_values(["user_id", "n"], ascending=[True, False], kind="stable")
    return counts.drop_duplicates("user_id").set_index("user_id")["region"]
