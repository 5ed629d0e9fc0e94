"""Reading event logs from files: dataset specs, built-in adapters and the quarantine.

A dataset spec maps a source's columns onto the canonical event table, so a new data set needs
a small TOML/JSON file (or `--map field=column` on the command line), not code.
"""

from __future__ import annotations

import json
import tomllib
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.atomic import write_with
from common.data.events import (
    CANONICAL,
    REQUIRED,
    ROW,
    DataError,
    EventType,
    standardize,
    summarize,
)


class ColumnMap(BaseModel):
    """Source column name for each canonical field; optional fields fall back to defaults."""

    model_config = ConfigDict(extra="forbid")
    user_id: str
    item_id: str
    timestamp: str
    region: str | None = None
    category: str | None = None
    quantity: str | None = None
    price: str | None = None
    event_type: str | None = None


class DatasetSpec(BaseModel):
    """How one source's event log maps onto the canonical table."""

    model_config = ConfigDict(extra="forbid")
    name: str = "custom"
    columns: ColumnMap
    timestamp_format: str | None = Field(None, description="strptime format; None = infer")
    default_region: str = "all"
    default_event_type: EventType = EventType.PURCHASE
    top_category_chars: int | None = Field(
        None, ge=1, description="Top-level category = first N characters of `category`"
    )

    @classmethod
    def from_file(cls, path: str | Path) -> DatasetSpec:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
            return cls.model_validate(data)
        except (OSError, ValueError, ValidationError) as exc:
            raise DataError(f"{path}: not a valid dataset spec: {exc}") from exc


# A source-specific pass before generic validation: may add derived columns and reject rows.
Prepare = Callable[[pd.DataFrame], tuple[pd.DataFrame, pd.Series]]


def _no_reasons(frame: pd.DataFrame) -> pd.Series:
    return pd.Series(pd.NA, index=frame.index, dtype="string")


def _prepare_tafeng(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    # SALES_PRICE is the line total; the canonical price is per unit.
    amount = pd.to_numeric(frame["AMOUNT"], errors="coerce")
    total = pd.to_numeric(frame["SALES_PRICE"], errors="coerce")
    frame = frame.assign(unit_price=(total / amount).where(amount > 0))
    return frame, _no_reasons(frame)


def _prepare_online_retail(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    reasons = _no_reasons(frame)
    invoice = frame["Invoice"].astype("string").str.strip()
    customer = frame["Customer ID"]
    reasons[invoice.str.startswith("A").fillna(False)] = "adjustment"
    reasons[invoice.str.startswith("C").fillna(False) & reasons.isna()] = "cancellation"
    reasons[customer.isna() & reasons.isna()] = "no_customer"
    # StockCode has no category; its leading digits group product families (85123A, 85123B, …).
    stem = frame["StockCode"].astype("string").str.extract(r"^(\d{3})", expand=False)
    frame = frame.assign(product_family=stem.fillna("service"))
    return frame, reasons


@dataclass(frozen=True)
class Adapter:
    spec: DatasetSpec
    prepare: Prepare = lambda frame: (frame, _no_reasons(frame))
    signature: tuple[str, ...] = ()


ADAPTERS: dict[str, Adapter] = {
    "canonical": Adapter(
        DatasetSpec(name="canonical", columns=ColumnMap(**{c: c for c in CANONICAL})),
        signature=("user_id", "item_id", "timestamp"),
    ),
    "tafeng": Adapter(
        DatasetSpec(
            name="tafeng",
            columns=ColumnMap(
                user_id="CUSTOMER_ID",
                item_id="PRODUCT_ID",
                timestamp="TRANSACTION_DT",
                region="PIN_CODE",
                category="PRODUCT_SUBCLASS",
                quantity="AMOUNT",
                price="unit_price",
            ),
            timestamp_format="%m/%d/%Y",
            top_category_chars=2,
        ),
        _prepare_tafeng,
        ("CUSTOMER_ID", "PRODUCT_ID", "TRANSACTION_DT", "PIN_CODE", "AMOUNT", "SALES_PRICE"),
    ),
    "online-retail": Adapter(
        DatasetSpec(
            name="online-retail",
            columns=ColumnMap(
                user_id="Customer ID",
                item_id="StockCode",
                timestamp="InvoiceDate",
                region="Country",
                category="product_family",
                quantity="Quantity",
                price="Price",
            ),
            top_category_chars=2,
        ),
        _prepare_online_retail,
        ("Invoice", "StockCode", "Quantity", "InvoiceDate", "Price", "Customer ID", "Country"),
    ),
}
FORMATS = ("auto", *ADAPTERS, "custom")


def read_table(path: Path) -> pd.DataFrame:
    """Read CSV (also .gz/.zip) or Parquet; CSV cells stay strings so bad cells are row errors."""
    if not path.exists():
        raise DataError(f"{path}: no such file")
    name = path.name.lower()
    try:
        if name.endswith((".parquet", ".pq")):
            return pd.read_parquet(path)
        if name.endswith((".csv", ".csv.gz", ".tsv", ".txt", ".zip")):
            sep = "\t" if ".tsv" in name else ","
            return pd.read_csv(path, dtype=str, sep=sep, keep_default_na=True)
    except (
        OSError,
        ValueError,
        UnicodeDecodeError,
        zipfile.BadZipFile,
        pd.errors.ParserError,
        pd.errors.EmptyDataError,
        pyarrow.ArrowException,
    ) as exc:
        raise DataError(f"{path}: cannot be read: {exc}") from exc
    raise DataError(f"{path}: unknown file type (expected .csv, .csv.gz, .zip or .parquet)")


def detect_format(path: Path, columns: pd.Index) -> str:
    present = set(columns)
    for name, adapter in ADAPTERS.items():
        if name != "canonical" and set(adapter.signature) <= present:
            return name
    if set(ADAPTERS["canonical"].signature) <= present:
        return "canonical"
    raise DataError(
        f"{path}: cannot tell the format from the columns "
        f"({', '.join(map(str, columns))}); pass --format or a column mapping"
    )


@dataclass
class LoadResult:
    path: Path
    format: str
    spec: DatasetSpec
    rows_read: int
    events: pd.DataFrame
    rejected: pd.DataFrame
    ignored_columns: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        by_reason = (
            self.rejected["reason"].value_counts().sort_index() if len(self.rejected) else {}
        )
        return {
            "file": str(self.path),
            "format": self.format,
            "rows_read": self.rows_read,
            "rejected": len(self.rejected),
            "rejected_by_reason": {str(k): int(v) for k, v in dict(by_reason).items()},
            "ignored_columns": self.ignored_columns,
            **summarize(self.events),
        }


def load_events(path: str | Path, fmt: str = "auto", spec: DatasetSpec | None = None) -> LoadResult:
    """Load an event log into the canonical table; rejected rows come back with their reason."""
    path = Path(path)
    raw = read_table(path)
    if spec is not None:
        fmt, adapter = "custom", Adapter(spec)
    else:
        if fmt == "custom":
            raise DataError(f"{path}: format 'custom' needs a dataset spec or a column mapping")
        fmt = detect_format(path, raw.columns) if fmt == "auto" else fmt
        if fmt not in ADAPTERS:
            raise DataError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
        adapter = ADAPTERS[fmt]
    if ROW in raw.columns:  # a canonical export of ours: row numbers restart for this file
        raw = raw.drop(columns=ROW)
    raw.insert(0, ROW, range(1, len(raw) + 1))
    if fmt != "custom":
        absent = [c for c in adapter.signature if c not in raw.columns]
        if absent:
            raise DataError(f"{path}: not a {fmt} file: missing column(s) {', '.join(absent)}")
    frame, reasons = adapter.prepare(raw)
    mapping = {k: v for k, v in adapter.spec.columns.model_dump().items() if v is not None}
    if fmt == "canonical":  # optional canonical columns may simply be absent
        mapping = {k: v for k, v in mapping.items() if k in REQUIRED or v in frame.columns}
    unknown = [f"{k}={v!r}" for k, v in mapping.items() if v not in frame.columns]
    if unknown:
        raise DataError(
            f"{path}: mapped column(s) not in the file: {', '.join(unknown)}; "
            f"the file has: {', '.join(map(str, raw.columns[1:]))}"
        )
    used = set(mapping.values())
    ignored = [str(c) for c in raw.columns[1:] if c not in used]
    renamed = frame[[ROW, *mapping.values()]].copy()
    renamed.columns = [ROW, *mapping.keys()]
    events, rejected_canonical = standardize(
        renamed,
        str(path),
        timestamp_format=adapter.spec.timestamp_format,
        default_region=adapter.spec.default_region,
        default_event_type=adapter.spec.default_event_type,
        reasons=reasons,
    )
    # Quarantine keeps the source's own columns, so a reviewer sees the row as it was in the file.
    rejected = raw.loc[raw[ROW].isin(rejected_canonical[ROW])].copy()
    rejected.insert(
        1, "reason", rejected_canonical.set_index(ROW)["reason"].reindex(rejected[ROW]).to_numpy()
    )
    return LoadResult(
        path, fmt, adapter.spec, len(raw), events, rejected.reset_index(drop=True), ignored
    )


def write_quarantine(result: LoadResult, target: str | Path) -> Path:
    return write_with(target, lambda p: result.rejected.to_csv(p, index=False))


def write_events(events: pd.DataFrame, target: str | Path) -> Path:
    return write_with(target, lambda p: events.to_parquet(p, index=False))
