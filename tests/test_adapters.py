"""Built-in adapters know their data set's published headers; specs join a product table."""

import pytest

from common.data.events import DataError
from common.data.formats import DatasetSpec, load_events
from common.data.sources import read_source, run_events, spec_from_maps
from common.runconfig import RunConfig

RETAIL_ROWS = [
    ("489434", "85048", "STAR", "12", "12/1/2010 8:26", "6.95", "13085.0", "United Kingdom"),
    ("C489449", "22087", "CARD", "-12", "12/1/2010 9:41", "2.95", "16321.0", "Australia"),
    ("489435", "POST", "POSTAGE", "1", "12/1/2010 9:45", "18.00", "", "France"),
]
RETAIL_II = ["Invoice", "StockCode", "Description", "Quantity", "InvoiceDate", "Price"]
RETAIL_II += ["Customer ID", "Country"]
RETAIL_FIRST = ["InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate", "UnitPrice"]
RETAIL_FIRST += ["CustomerID", "Country"]
TAFENG = [
    "TRANSACTION_DT",
    "CUSTOMER_ID",
    "AGE_GROUP",
    "PIN_CODE",
    "PRODUCT_SUBCLASS",
    "PRODUCT_ID",
    "AMOUNT",
    "ASSET",
    "SALES_PRICE",
]
TAFENG_ROWS = [("11/1/2000", "1104905", "45-49", "115", "110411", "4710199010372", "2", "24", "30")]


def write_csv(path, header, rows, encoding="utf-8"):
    lines = [",".join(header), *(",".join(row) for row in rows)]
    path.write_text("\n".join(lines) + "\n", encoding=encoding)
    return path


@pytest.mark.parametrize(
    ("header", "rows", "adapter", "reason"),
    [
        (RETAIL_II, RETAIL_ROWS, "online-retail", "detected online-retail (UCI Online Retail II)"),
        (
            RETAIL_FIRST,
            RETAIL_ROWS,
            "online-retail",
            "detected online-retail (UCI Online Retail, first release: "
            "InvoiceNo/UnitPrice/CustomerID)",
        ),
        (
            TAFENG,
            TAFENG_ROWS,
            "tafeng",
            "detected tafeng (Ta-Feng, Kaggle ta_feng_all_months_merged.csv)",
        ),
        (
            [c.lower() for c in TAFENG],
            TAFENG_ROWS,
            "tafeng",
            "detected tafeng (Ta-Feng, Kaggle ta_feng_all_months_merged.csv: transaction_dt/",
        ),
        (["User ID", "Item ID", "Timestamp"], [("u1", "a", "2024-01-01")], "canonical", None),
    ],
)
def test_published_headers_are_detected_and_named(tmp_path, header, rows, adapter, reason):
    result = load_events(write_csv(tmp_path / "e.csv", header, rows))
    assert result.format == adapter
    assert result.reason.startswith(reason or f"detected {adapter}")
    assert result.summary()["format_reason"] == result.reason
    assert len(result.events) >= 1


def test_first_online_retail_release_reads_like_the_second(tmp_path):
    # The Kaggle CSV of the first release is Latin-1 and writes customer ids as floats.
    rows = [(*RETAIL_ROWS[0][:2], "£1 STAR", *RETAIL_ROWS[0][3:]), *RETAIL_ROWS[1:]]
    first = load_events(write_csv(tmp_path / "data.csv", RETAIL_FIRST, rows, "latin-1"))
    second = load_events(write_csv(tmp_path / "ii.csv", RETAIL_II, RETAIL_ROWS), "online-retail")
    assert second.reason == "as asked: online-retail (UCI Online Retail II)"
    assert first.events.drop(columns="source_row").equals(second.events.drop(columns="source_row"))
    assert first.events["user_id"].tolist() == ["13085"]
    reasons = dict(zip(first.rejected["InvoiceNo"], first.rejected["reason"], strict=True))
    assert reasons == {"C489449": "cancellation", "489435": "no_customer"}
    assert first.ignored_columns == ["InvoiceNo", "Description"]  # named as in the file


def test_an_adapter_asked_for_names_the_columns_it_misses(tmp_path):
    path = write_csv(tmp_path / "e.csv", RETAIL_FIRST[:-1], [r[:-1] for r in RETAIL_ROWS])
    with pytest.raises(DataError, match=r"not a online-retail file: missing column\(s\) Country"):
        load_events(path, "online-retail")


@pytest.fixture
def shop(tmp_path):
    """An order export without categories, its product table and a spec joining the two."""
    write_csv(
        tmp_path / "orders.csv",
        ["customer", "sku", "ordered_at", "price"],
        [
            ("c1", "A1", "2024-03-01", "2.0"),
            ("c1", "B2", "2024-03-02", "3.0"),
            ("c2", "Z9", "2024-03-03", "1.0"),
            ("c2", "A1", "2024-03-04", "2.0"),
        ],
    )
    (tmp_path / "catalog").mkdir()
    write_csv(
        tmp_path / "catalog" / "products.csv",
        ["sku", "department", "price"],
        [("A1", "dairy", "9.0"), ("B2", "bakery", "9.0"), ("C3", "dairy", "9.0")],
    )
    spec = tmp_path / "shop.toml"
    spec.write_text(
        'name = "shop"\nproducts = "catalog/products.csv"\njoin = "sku"\n[columns]\n'
        'user_id = "customer"\nitem_id = "sku"\ntimestamp = "ordered_at"\n'
        'category = "department"\n'
    )
    return tmp_path


def test_spec_joins_categories_from_a_product_table(shop):
    result = read_source(shop / "orders.csv", spec=shop / "shop.toml").load
    assert result is not None
    assert result.format == "custom"
    assert "products.csv joined on 'sku'" in result.reason
    assert result.events["category"].tolist() == ["dairy", "bakery", "dairy"]
    # An unknown product is a rejected row with its reason, counted and noted, not a failure.
    assert result.summary()["rejected_by_reason"] == {"unknown_product": 1}
    assert result.rejected["sku"].tolist() == ["Z9"]
    assert result.notes == [
        "1 event(s) name a product not in products.csv (e.g. sku 'Z9' in row 3); "
        "rejected as unknown_product"
    ]


def test_product_table_supplies_the_mapped_columns_it_has(shop):
    spec = DatasetSpec.from_file(shop / "shop.toml")
    spec.columns.price = "price"  # in both files: the product table's is taken
    result = load_events(shop / "orders.csv", spec=spec)
    assert result.events["price"].tolist() == [9.0, 9.0, 9.0]
    assert result.ignored_columns == ["price"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: (d / "catalog" / "products.csv").unlink(), r"products\.csv: no such file"),
        (
            lambda d: write_csv(
                d / "catalog" / "products.csv", ["id", "department"], [("A1", "x")]
            ),
            r"products\.csv: join column 'sku' not found; the file has: id, department",
        ),
        (
            lambda d: write_csv(d / "orders.csv", ["customer", "item", "ordered_at"], []),
            r"orders\.csv: join column 'sku' not found",
        ),
        (
            lambda d: write_csv(
                d / "catalog" / "products.csv",
                ["sku", "department"],
                [("A1", "x"), ("B2", "y"), ("A1", "z")],
            ),
            r"products\.csv: 1 product key\(s\) appear more than once in column 'sku', "
            r"e\.g\. 'A1' in rows 1, 3",
        ),
        (
            lambda d: write_csv(
                d / "catalog" / "products.csv", ["sku", "department"], [("a1", "x")]
            ),
            r"orders\.csv: no event's 'sku' is in .*products\.csv \(e\.g\. 'A1' in the events",
        ),
    ],
)
def test_product_table_errors_name_the_file_column_or_row(shop, edit, message):
    edit(shop)
    with pytest.raises(DataError, match=message):
        read_source(shop / "orders.csv", spec=shop / "shop.toml")


def test_spec_needs_products_and_join_together(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text(
        'products = "p.csv"\n[columns]\nuser_id = "u"\nitem_id = "i"\ntimestamp = "t"\n'
    )
    with pytest.raises(DataError, match="`products` and `join` go together"):
        DatasetSpec.from_file(spec)


def test_column_map_string_and_run_config_fields(shop):
    mapping = "user_id=customer, item_id=sku,timestamp=ordered_at"
    assert spec_from_maps([mapping]) == spec_from_maps(mapping.split(","))
    cfg = RunConfig(data=str(shop / "orders.csv"), columns=mapping)
    assert RunConfig.from_flower(cfg.to_flower()) == cfg
    assert {"spec", "columns"} <= set(cfg.to_flower())
    events, _ = run_events(cfg.data, cfg.format, cfg.synth.model_dump_json(), cfg.spec, cfg.columns)
    assert len(events) == 4
    with pytest.raises(DataError, match="not both"):
        read_source(shop / "orders.csv", spec=shop / "shop.toml", maps=[mapping])
