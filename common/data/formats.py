"""Reading event logs from files: dataset specs, built-in adapters and the quarantine.

A dataset spec maps a source's columns onto the canonical event table, so a new data set needs
a small TOML/JSON file (or `--map field=column` on the command line), not code.
"""

from __future__ import annotations

import json
import tomllib
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow
import pyarrow.parquet
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.atomic import write_with
from common.data.events import (
    CANONICAL,
    REQUIRED,
    ROW,
    DataError,
    EventType,
    _as_id,
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
    products: Path | None = Field(
        None,
        description="Product table (CSV/Parquet) that mapped columns such as the category come "
        "from; relative to the spec file",
    )
    join: str | None = Field(
        None, description="Key column (e.g. the SKU) in both the event file and `products`"
    )

    @model_validator(mode="after")
    def _products_need_a_key(self) -> DatasetSpec:
        if (self.products is None) != (self.join is None):
            raise ValueError("`products` and `join` go together: the table and its key column")
        return self

    @classmethod
    def from_file(cls, path: str | Path) -> DatasetSpec:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
            spec = cls.model_validate(data)
        except (OSError, ValueError, ValidationError) as exc:
            raise DataError(f"{path}: not a valid dataset spec: {exc}") from exc
        # A spec travels with its product table, so its path means "next to the spec", not
        # "next to wherever the command happens to run".
        if spec.products is not None:
            spec = spec.model_copy(update={"products": path.parent / spec.products})
        return spec


# A source-specific pass before generic validation: may add derived columns and reject rows.
Prepare = Callable[[pd.DataFrame], tuple[pd.DataFrame, pd.Series]]


def _no_reasons(frame: pd.DataFrame) -> pd.Series:
    return pd.Series(pd.NA, index=frame.index, dtype="string")


def _prepare_tafeng(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    # SALES_PRICE is the line total; the canonical price is per unit.
    amount = pd.to_numeric(frame["AMOUNT"], errors="coerce")
    total = pd.to_numeric(frame["SALES_PRICE"], errors="coerce")
    frame = frame.assign(unit_price=(total / amount).where(amount > 0))
    reasons = _no_reasons(frame)
    # The unit price is NaN wherever the amount is bad too; only the total's own cell says why.
    reasons[total.isna() & frame["SALES_PRICE"].notna()] = "bad_price"
    return frame, reasons


def _prepare_online_retail(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    reasons = _no_reasons(frame)
    invoice = frame["Invoice"].astype("string").str.strip()
    customer = frame["Customer ID"]
    reasons[invoice.str.startswith("A").fillna(False)] = "adjustment"
    reasons[invoice.str.startswith("C").fillna(False) & reasons.isna()] = "cancellation"
    reasons[customer.isna() & reasons.isna()] = "no_customer"
    # StockCode has no category; its leading digits group product families (85123A, 85123B, …).
    stem = frame["StockCode"].astype("string").str.extract(r"^(\d{3})", expand=False)
    # The id column is float where it has gaps, so exports write "13085.0" for customer 13085.
    ids = customer.astype("string").str.replace(r"\.0$", "", regex=True)
    frame = frame.assign(product_family=stem.fillna("service"), **{"Customer ID": ids})
    return frame, reasons


@dataclass(frozen=True)
class Variant:
    """One published header of a data set, as differences from the adapter's reference names.

    Only renames are listed: case, spaces and underscores never matter (`CustomerID` is
    `Customer ID`), see `_header_key`.
    """

    label: str
    renames: Mapping[str, str] = field(default_factory=dict)  # reference name → this header's


@dataclass(frozen=True)
class Adapter:
    spec: DatasetSpec
    prepare: Prepare = lambda frame: (frame, _no_reasons(frame))
    signature: tuple[str, ...] = ()
    variants: tuple[Variant, ...] = ()  # the reference header first

    @property
    def columns(self) -> tuple[str, ...]:
        """The source columns this adapter reads, under their reference names."""
        mapped = (c for c in self.spec.columns.model_dump().values() if c is not None)
        return tuple(dict.fromkeys((*self.signature, *mapped)))


ADAPTERS: dict[str, Adapter] = {
    "canonical": Adapter(
        DatasetSpec(name="canonical", columns=ColumnMap(**{c: c for c in CANONICAL})),
        signature=("user_id", "item_id", "timestamp"),
        variants=(Variant("canonical columns"),),
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
        # The merged Kaggle file is the one published with a header; re-exports that lower-case
        # it (transaction_dt, customer_id, …) match it too.
        (Variant("Ta-Feng, Kaggle ta_feng_all_months_merged.csv"),),
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
        (
            Variant("UCI Online Retail II"),
            Variant(
                "UCI Online Retail, first release",
                {"Invoice": "InvoiceNo", "Price": "UnitPrice", "Customer ID": "CustomerID"},
            ),
        ),
    ),
}
FORMATS = ("auto", *ADAPTERS, "custom")


def _header_key(name: object) -> str:
    """`Customer ID`, `CustomerID` and `customer_id` are one column to a header match."""
    return "".join(ch for ch in str(name).casefold() if ch.isalnum())


@dataclass(frozen=True)
class HeaderMatch:
    """An adapter's variant found in a file's header, and how the file's columns are renamed."""

    adapter: str
    variant: Variant
    renames: dict[str, str]  # file column → reference name, only where they differ

    def describe(self) -> str:
        """`online-retail (UCI Online Retail, first release: InvoiceNo/UnitPrice/CustomerID)`."""
        spelled = "/".join(self.renames)
        return f"{self.adapter} ({self.variant.label}{': ' + spelled if spelled else ''})"


def _match(name: str, columns: pd.Index) -> tuple[HeaderMatch | None, list[str]]:
    """The first variant whose signature the header holds; else the closest one's missing names."""
    adapter = ADAPTERS[name]
    names = [str(c) for c in columns]
    present = {_header_key(c): c for c in reversed(names)}  # the first spelling wins
    closest: list[str] = list(adapter.signature)
    for variant in adapter.variants:
        found = {}  # file column → reference name
        for reference in adapter.columns:
            column = present.get(_header_key(variant.renames.get(reference, reference)))
            if column is not None:
                found[column] = reference
        missing = [variant.renames.get(c, c) for c in adapter.signature if c not in found.values()]
        if not missing:
            renames = {c: found[c] for c in names if found.get(c, c) != c}
            return HeaderMatch(name, variant, renames), []
        closest = min(closest, missing, key=len)
    return None, closest


def table_stem(path: Path) -> str:
    """A table file's name without its compression and table suffixes, and nothing more:
    `a.2020.csv.gz` → `a.2020`, so the outputs of two files never share a name."""
    name = path.name
    for suffixes in ((".gz", ".zip"), (".parquet", ".pq", ".csv", ".tsv", ".txt")):
        cut = next((s for s in suffixes if name.lower().endswith(s)), "")
        if cut and len(name) > len(cut):
            name = name[: -len(cut)]
    return name


def read_table(path: Path) -> pd.DataFrame:
    """Read CSV (also .gz/.zip) or Parquet; CSV cells stay strings so bad cells are row errors."""
    if not path.exists():
        raise DataError(f"{path}: no such file")
    name = path.name.lower()
    try:
        if name.endswith((".parquet", ".pq")):
            _check_header(path, pyarrow.parquet.read_schema(path).names)
            return pd.read_parquet(path)
        if name.endswith((".csv", ".csv.gz", ".tsv", ".txt", ".zip")):
            return _read_csv(path, "\t" if ".tsv" in name else ",")
    except (
        OSError,
        ValueError,
        EOFError,  # a cut .gz
        zlib.error,  # damaged compressed data, .gz or .zip
        KeyError,  # damaged pandas metadata in a Parquet file
        zipfile.BadZipFile,
        pd.errors.ParserError,
        pd.errors.EmptyDataError,
        pyarrow.ArrowException,
    ) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: cannot be read: {exc}") from exc
    raise DataError(f"{path}: unknown file type (expected .csv, .csv.gz, .zip or .parquet)")


def _read_csv(path: Path, sep: str) -> pd.DataFrame:
    with open(path, "rb") as fh:
        start = fh.read(2)
    # Excel's "Unicode text" export is UTF-16 and says so in a byte-order mark (a compressed
    # file's magic bytes never look like one). Older exports, such as the Kaggle CSV of the
    # first UCI Online Retail release, are Latin-1 (the £ in descriptions); ids, dates and
    # numbers are ASCII either way.
    utf16 = start in (b"\xff\xfe", b"\xfe\xff")
    encodings = ["utf-16"] if utf16 else ["utf-8", "latin-1"]
    for encoding in encodings:
        try:
            # pandas renames a repeated column to "name.1"; only the raw header shows it.
            header = pd.read_csv(path, header=None, nrows=1, dtype=str, sep=sep, encoding=encoding)
            frame = pd.read_csv(path, dtype=str, sep=sep, encoding=encoding)
            break
        except UnicodeDecodeError:
            if encoding == encodings[-1]:
                raise
    _check_header(path, [c for c in header.iloc[0] if isinstance(c, str)])
    return frame


def _check_header(path: Path, names: list[str]) -> None:
    """A repeated column would make the file say two things about one field; control characters
    mean binary data (or an encoding we do not read), which no header holds."""
    if any(ch < " " and ch != "\t" for name in names for ch in name):
        raise DataError(
            f"{path}: not a text table: the header holds control characters (binary or "
            "compressed data, or an unsupported text encoding)"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(
            f"{path}: column(s) {', '.join(map(repr, repeated))} appear more than once in the "
            "header; which one holds the data is ambiguous"
        )
    spellings: dict[str, list[str]] = {}
    for name in names:
        spellings.setdefault(_header_key(name), []).append(name)
    alike = [same for key, same in spellings.items() if key and len(same) > 1]
    if alike:
        raise DataError(
            f"{path}: columns {' and '.join(map(repr, alike[0]))} are one column to the header "
            "match (case, spaces and punctuation aside); which one holds the data is ambiguous"
        )


def _shown(names: object, most: int = 12, width: int = 40) -> str:
    """A header for an error message: a garbled file's header can be long and odd."""
    names = [str(n) for n in names]
    cut = [n if len(n) <= width else n[: width - 1] + "…" for n in names[:most]]
    return ", ".join(cut) + (f", … ({len(names)} columns)" if len(names) > most else "")


def detect_format(path: Path, columns: pd.Index) -> HeaderMatch:
    # Canonical last: a data set's own header may also hold generic names such as user_id.
    for name in sorted(ADAPTERS, key=lambda n: n == "canonical"):
        match, _ = _match(name, columns)
        if match is not None:
            return match
    raise DataError(
        f"{path}: cannot tell the format from the columns "
        f"({_shown(columns)}); pass --format or a column mapping"
    )


@dataclass
class LoadResult:
    path: Path
    format: str
    reason: str  # which adapter or spec read the file, and why, e.g. "detected tafeng (…)"
    spec: DatasetSpec
    rows_read: int
    events: pd.DataFrame
    rejected: pd.DataFrame
    ignored_columns: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what a reader should know, e.g. drops

    def rejected_by_reason(self) -> dict[str, int]:
        if not len(self.rejected):
            return {}
        counts = self.rejected["reason"].value_counts().sort_index()
        return {str(k): int(v) for k, v in counts.items()}

    def summary(self) -> dict[str, object]:
        return {
            "file": str(self.path),
            "format": self.format,
            "format_reason": self.reason,
            "rows_read": self.rows_read,
            "rejected": len(self.rejected),
            "rejected_by_reason": self.rejected_by_reason(),
            "ignored_columns": self.ignored_columns,
            "notes": self.notes,
            **summarize(self.events),
        }


def _join_products(
    path: Path,
    frame: pd.DataFrame,
    reasons: pd.Series,
    spec: DatasetSpec,
    source: Path,
    key: str,
) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Take the mapped columns the product table `source` has from it, matched on `key`.

    Returns the joined frame, the event file's columns the table replaced, and notes. Events
    whose product is missing from the table are marked `unknown_product` in `reasons`.
    """
    try:
        products = read_table(source)
    except DataError as exc:
        raise DataError(f"{exc} (the product table of dataset spec {spec.name!r})") from exc
    for table, where in ((frame, path), (products, source)):
        if key not in table.columns:
            have = ", ".join(str(c) for c in table.columns if c != ROW)
            raise DataError(f"{where}: join column {key!r} not found; the file has: {have}")
    product_key = _as_id(products[key])
    if product_key.isna().any():
        row = int(product_key.isna().to_numpy().argmax()) + 1
        raise DataError(f"{source}: row {row} has no {key!r}; every product needs its key")
    repeated = product_key[product_key.duplicated(keep=False)]
    if len(repeated):
        first = repeated.iloc[0]
        rows = ", ".join(str(i + 1) for i in repeated.index[repeated == first])
        raise DataError(
            f"{source}: {repeated.nunique()} product key(s) appear more than once in column "
            f"{key!r}, e.g. {first!r} in rows {rows}; the table needs one row per product"
        )
    wanted = {c for c in spec.columns.model_dump().values() if c is not None}
    taken = [str(c) for c in products.columns if c in wanted and c != key]
    event_key = _as_id(frame[key])
    known = event_key.isin(product_key)
    if event_key.notna().any() and not known.any():
        # Not one match means the wrong key or differently written keys (e.g. zero-padded), not
        # a few stale rows: rejecting every event would only hide that.
        raise DataError(
            f"{path}: no event's {key!r} is in {source} "
            f"(e.g. {event_key.dropna().iloc[0]!r} in the events, {product_key.iloc[0]!r} in "
            "the products); check the join column and how its keys are written"
        )
    # Some unmatched events are normal: product tables lag behind sales (discontinued items are
    # deleted), and one stale SKU should not stop a whole file. They are rejected like any bad
    # row, so the count is in the summary and each row, with its reason, in the quarantine.
    unknown = event_key.notna() & ~known
    notes = []
    if unknown.any():
        first = unknown.to_numpy().argmax()
        notes.append(
            f"{int(unknown.sum())} event(s) name a product not in {source.name} "
            f"(e.g. {key} {event_key.iloc[first]!r} in row {frame[ROW].iloc[first]}); "
            "rejected as unknown_product"
        )
        reasons[unknown & reasons.isna()] = "unknown_product"
    looked_up = products[taken].set_index(product_key).reindex(event_key)
    replaced = [c for c in taken if c in frame.columns]
    joined = frame.drop(columns=replaced).assign(**{c: looked_up[c].to_numpy() for c in taken})
    return joined, replaced, notes


def load_events(path: str | Path, fmt: str = "auto", spec: DatasetSpec | None = None) -> LoadResult:
    """Load an event log into the canonical table; rejected rows come back with their reason.

    With a spec, its mapping (and product table) reads the file; otherwise `fmt` names a
    built-in adapter or `auto` picks one from the header. `LoadResult.reason` says which.
    """
    path = Path(path)
    raw = read_table(path)
    notes: list[str] = []
    if spec is not None:
        fmt, adapter, renames = "custom", Adapter(spec), {}
        reason = f"dataset spec {spec.name!r}"
        if spec.products is not None:
            reason += f", product columns from {spec.products.name} joined on {spec.join!r}"
    else:
        if fmt == "custom":
            raise DataError(f"{path}: format 'custom' needs a dataset spec or a column mapping")
        if fmt == "auto":
            match = detect_format(path, raw.columns)
            reason = f"detected {match.describe()}"
        elif fmt in ADAPTERS:
            match, missing = _match(fmt, raw.columns)
            if match is None:
                raise DataError(f"{path}: not a {fmt} file: missing column(s) {', '.join(missing)}")
            reason = f"as asked: {match.describe()}"
        else:
            raise DataError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
        fmt, adapter, renames = match.adapter, ADAPTERS[match.adapter], match.renames
    if ROW in raw.columns:  # a canonical export of ours: row numbers restart for this file
        raw = raw.drop(columns=ROW)
    raw.insert(0, ROW, range(1, len(raw) + 1))
    frame, reasons = adapter.prepare(raw.rename(columns=renames))
    mapping = {k: v for k, v in adapter.spec.columns.model_dump().items() if v is not None}
    replaced: list[str] = []
    if adapter.spec.products is not None and adapter.spec.join is not None:
        frame, replaced, notes = _join_products(
            path, frame, reasons, adapter.spec, adapter.spec.products, adapter.spec.join
        )
    if fmt == "canonical":  # optional canonical columns may simply be absent
        mapping = {k: v for k, v in mapping.items() if k in REQUIRED or v in frame.columns}
    unknown = [f"{k}={v!r}" for k, v in mapping.items() if v not in frame.columns]
    if unknown:
        products = f" or in {adapter.spec.products}" if adapter.spec.products else ""
        raise DataError(
            f"{path}: mapped column(s) not in the file{products}: {', '.join(unknown)}; "
            f"the file has: {', '.join(map(str, raw.columns[1:]))}"
        )
    if raw.empty:  # after the header's checks: a wrong header is the first thing to fix
        raise DataError(f"{path}: no data rows (a header of {len(raw.columns) - 1} column(s) only)")
    for field_name, column in mapping.items():
        frame[column] = _plain(path, frame[column], column, field_name)
    notes += _repeated_rows(raw)
    used = set(mapping.values()) - set(replaced)
    ignored = [str(c) for c in raw.columns[1:] if renames.get(c, c) not in used]
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
        path=path,
        format=fmt,
        reason=reason,
        spec=adapter.spec,
        rows_read=len(raw),
        events=events,
        rejected=rejected.reset_index(drop=True),
        ignored_columns=ignored,
        notes=notes,
    )


def _plain(path: Path, column: pd.Series, name: str, field_name: str) -> pd.Series:
    """One value per cell. Parquet can hold lists or structs, which are not ids or numbers; and
    binary columns, which some writers use for text."""
    if column.dtype != object:
        return column
    kinds = column.dropna().map(type)
    nested = kinds[kinds.map(lambda k: issubclass(k, list | tuple | dict | set | np.ndarray))]
    if len(nested):
        kind = "list" if nested.iloc[0] is np.ndarray else nested.iloc[0].__name__
        mapped = "" if name == field_name else f" (mapped to {field_name})"
        raise DataError(
            f"{path}: column {name!r}{mapped} holds {kind} values (e.g. in row "
            f"{int(nested.index[0]) + 1}), not one value per cell"
        )
    if kinds.map(lambda k: issubclass(k, bytes)).any():
        return column.map(lambda v: v.decode("utf-8", "replace") if isinstance(v, bytes) else v)
    return column


def _repeated_rows(raw: pd.DataFrame) -> list[str]:
    """Exact repeats are counted, not dropped: a basket may list the same line twice."""
    repeated = raw.drop(columns=ROW).duplicated()
    if not repeated.any():
        return []
    first = int(repeated.to_numpy().argmax())
    return [
        f"{int(repeated.sum())} row(s) repeat an earlier row exactly (e.g. row {first + 1}); "
        "kept, as a basket may list one line twice"
    ]


def write_quarantine(result: LoadResult, target: str | Path) -> Path:
    return write_with(target, lambda p: result.rejected.to_csv(p, index=False))


def write_events(events: pd.DataFrame, target: str | Path) -> Path:
    return write_with(target, lambda p: events.to_parquet(p, index=False))
