import json
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from common.data.events import DataError
from common.data.formats import DatasetSpec, load_events, write_quarantine
from common.data.sources import spec_from_maps


def test_canonical_csv_accepts_good_rows_and_quarantines_bad_ones_with_reasons(canonical_csv):
    result = load_events(canonical_csv)
    assert result.format == "canonical"
    assert result.rows_read == 8
    assert list(result.events["source_row"]) == [1, 2, 3]
    rejected = dict(zip(result.rejected["source_row"], result.rejected["reason"], strict=True))
    assert rejected == {
        4: "missing_user_id",
        5: "bad_timestamp",
        6: "non_positive_quantity",
        7: "bad_quantity",
        8: "unknown_event_type",
    }
    summary = result.summary()
    assert summary["accepted"] == 3 and summary["rejected"] == 5
    assert summary["users"] == 2 and summary["items"] == 2 and summary["regions"] == 2


def test_quarantine_keeps_source_columns(canonical_csv, tmp_path):
    result = load_events(canonical_csv)
    out = write_quarantine(result, tmp_path / "q" / "rejected.csv")
    frame = pd.read_csv(out)
    assert {"source_row", "reason", "user_id", "item_id", "timestamp"} <= set(frame.columns)
    assert len(frame) == 5


def test_missing_required_column_is_fatal_and_named(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("user_id,timestamp\nu1,2024-01-01\n")
    with pytest.raises(DataError, match=r"e\.csv.*(format|item_id)"):
        load_events(path)
    with pytest.raises(DataError, match="item_id"):
        load_events(path, "canonical")


def test_whole_column_of_wrong_type_is_fatal(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text(
        "user_id,item_id,timestamp,quantity\nu1,a,2024-01-01,one\nu2,b,2024-01-02,two\n"
    )
    with pytest.raises(DataError, match=r"e\.csv: column 'quantity' holds no numbers.*row"):
        load_events(path)
    path.write_text("user_id,item_id,timestamp\nu1,a,yesterday\nu2,b,tomorrow\n")
    with pytest.raises(DataError, match="timestamp"):
        load_events(path)


@pytest.mark.parametrize(
    ("name", "content"),
    [("broken.zip", b"PK\x03\x04 not really a zip"), ("broken.parquet", b"PAR1garbage")],
)
def test_unreadable_file_is_a_clear_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=name):
        load_events(path)


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_events(tmp_path / "absent.csv")
    odd = tmp_path / "events.xlsx"
    odd.write_text("x")
    with pytest.raises(DataError, match="unknown file type"):
        load_events(odd)


def test_tafeng_adapter_reads_zipped_csv(tmp_path):
    rows = [
        "TRANSACTION_DT,CUSTOMER_ID,AGE_GROUP,PIN_CODE,PRODUCT_SUBCLASS,PRODUCT_ID,AMOUNT,ASSET,SALES_PRICE",
        "11/1/2000,1104905,45-49,115,110411,4710199010372,2,24,30",
        "11/2/2000,1104905,45-49,115,130315,4909978112950,1,48,46",
    ]
    path = tmp_path / "tf.csv.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("tf.csv", "\n".join(rows) + "\n")
    result = load_events(path)
    assert result.format == "tafeng"
    ev = result.events
    assert list(ev["region"]) == ["115", "115"]
    assert list(ev["category"]) == ["110411", "130315"]
    assert ev["price"].tolist() == [15.0, 46.0]  # SALES_PRICE is the line total
    assert ev["timestamp"].dt.strftime("%Y-%m-%d").tolist() == ["2000-11-01", "2000-11-02"]
    assert result.spec.top_category_chars == 2


def test_tafeng_line_total_that_is_no_number_rejects_its_row(tmp_path):
    path = tmp_path / "tf.csv"
    path.write_text(
        "TRANSACTION_DT,CUSTOMER_ID,AGE_GROUP,PIN_CODE,PRODUCT_SUBCLASS,PRODUCT_ID,AMOUNT,ASSET,"
        "SALES_PRICE\n11/1/2000,1104905,45-49,115,110411,4710199010372,2,24,30\n"
        "11/2/2000,1104905,45-49,115,130315,4909978112950,1,48,xyz\n"
    )
    result = load_events(path)
    assert len(result.events) == 1
    assert result.rejected["reason"].tolist() == ["bad_price"]


def test_online_retail_adapter_handles_cancellations_and_anonymous_rows(tmp_path):
    frame = pd.DataFrame(
        {
            "Invoice": ["489434", "C489449", "489435", "A506401", "489436"],
            "StockCode": ["85048", "22087", "79323P", "B", "POST"],
            "Description": ["x"] * 5,
            "Quantity": [12, -12, 6, 1, 1],
            "InvoiceDate": pd.to_datetime(["2009-12-01 07:45"] * 5),
            "Price": [6.95, 2.95, 6.75, -53594.36, 18.0],
            "Customer ID": [13085.0, 16321.0, None, None, 13085.0],
            "Country": [
                "United Kingdom",
                "Australia",
                "France",
                "United Kingdom",
                "United Kingdom",
            ],
        }
    )
    path = tmp_path / "retail.parquet"
    frame.to_parquet(path)
    result = load_events(path)
    assert result.format == "online-retail"
    assert result.events["user_id"].tolist() == ["13085", "13085"]  # no float '.0' ids
    assert result.events["category"].tolist() == ["850", "service"]
    reasons = dict(zip(result.rejected["Invoice"], result.rejected["reason"], strict=True))
    assert reasons == {"C489449": "cancellation", "489435": "no_customer", "A506401": "adjustment"}


def test_custom_mapping_without_code(tmp_path):
    path = tmp_path / "shop.csv"
    path.write_text(
        "cust,sku,when,store\nc1,s1,2024-03-01T10:00:00Z,berlin\nc1,s2,2024-03-02T10:00:00Z,berlin\n"
    )
    spec = spec_from_maps(["user_id=cust", "item_id=sku", "timestamp=when", "region=store"])
    result = load_events(path, spec=spec)
    assert result.format == "custom"
    assert result.events["region"].tolist() == ["berlin", "berlin"]
    assert result.events["event_type"].astype(str).tolist() == ["purchase", "purchase"]
    spec_file = tmp_path / "spec.toml"
    spec_file.write_text(
        'name = "shop"\n[columns]\nuser_id = "cust"\nitem_id = "sku"\ntimestamp = "when"\n'
    )
    assert len(load_events(path, spec=DatasetSpec.from_file(spec_file)).events) == 2


def test_mapping_to_a_column_the_file_lacks_is_named(tmp_path):
    path = tmp_path / "shop.csv"
    path.write_text("cust,sku,when\nc1,s1,2024-03-01\n")
    spec = spec_from_maps(["user_id=cust", "item_id=product", "timestamp=when"])
    with pytest.raises(DataError, match="item_id='product'"):
        load_events(path, spec=spec)
    with pytest.raises(DataError, match="FIELD=COLUMN"):
        spec_from_maps(["user_id"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"columns": {"user_id": "a"}}))
    with pytest.raises(DataError, match=r"bad\.json"):
        DatasetSpec.from_file(bad)


def test_ids_are_strings_and_time_is_naive(canonical_csv):
    ev = load_events(canonical_csv).events
    assert str(ev["user_id"].dtype) == "string"
    assert ev["timestamp"].dt.tz is None
    assert Path(canonical_csv).exists()
