"""The payload renderer (bridge/render.py), without a database: field names and order, UTC
times, numbers kept digit for digit, Previous, version-1 rows. The delivery tests
(test_payload_times, test_bad_data, test_capture, test_upgrade) check the same through real
PostgreSQL rows and receivers."""

from __future__ import annotations

import json

import pytest

from bridge import render

FIELDS = render.Fields({"license": {
    "license_id": render.field_of("LicenseID", 1, "integer"),
    "activation_key": render.field_of("ActivationKey", 2, "text"),
    "expiry_date": render.field_of("ExpiryDate", 3, "timestamp with time zone"),
    "stamps": render.field_of("Stamps", 4, "timestamp with time zone[]"),
    "price": render.field_of("Price", 5, "numeric"),
    "note": render.field_of("Näme \"quoted\"", 6, "text"),
}})


def test_field_names_table_order_and_exact_numbers() -> None:
    row = ('{"price":12345678901234567890.1200,"activation_key":"K-1","license_id":7,'
           '"note":"é\\n"}')
    out = render.info(FIELDS, "license", row)
    assert out == ('{"LicenseID":7,"ActivationKey":"K-1","Price":12345678901234567890.1200,'
                   '"Näme \\"quoted\\"":"é\\n"}')
    assert json.loads(out)["ActivationKey"] == "K-1"


@pytest.mark.parametrize(("captured", "sent"), [
    ("2026-01-15T17:30:00+05:30", "2026-01-15T12:00:00.000000Z"),
    ("2026-07-01T23:30:00.000001-02:00", "2026-07-02T01:30:00.000001Z"),
    ("1900-01-01T00:19:32+00:19:32", "1900-01-01T00:00:00.000000Z"),
    ("2026-01-15T12:00:00.25+00", "2026-01-15T12:00:00.250000Z"),
    ("0044-03-15T00:00:00+00", "0044-03-15T00:00:00.000000Z"),
    ("infinity", "infinity"),  # anything that is no plain instant is left as captured
    ("12026-01-15T12:00:00+00", "12026-01-15T12:00:00+00"),
    ("0044-03-15T00:00:00+00 BC", "0044-03-15T00:00:00+00 BC"),
    ("0001-01-01T00:00:00+05", "0001-01-01T00:00:00+05"),  # before year 1 in UTC
])
def test_timestamptz_values_arrive_in_utc(captured: str, sent: str) -> None:
    out = render.info(FIELDS, "license", json.dumps({"expiry_date": captured}))
    assert json.loads(out) == {"ExpiryDate": sent}


def test_arrays_of_timestamptz_nested_and_with_nulls() -> None:
    row = '{"stamps":[["2026-01-15T12:00:00+01",null],["-infinity"]]}'
    assert json.loads(render.info(FIELDS, "license", row)) == {
        "Stamps": [["2026-01-15T11:00:00.000000Z", None], ["-infinity"]]}


def test_previous_holds_old_values_of_changed_columns_only() -> None:
    new = '{"license_id":7,"activation_key":"K","expiry_date":"2027-01-15T12:00:00+00","price":1.0}'
    old = new.replace("2027", "2026").replace("1.0}", "1.00}")
    assert render.previous(FIELDS, "license", new, old) == \
        '{"ExpiryDate":"2026-01-15T12:00:00.000000Z","Price":1.00}'  # 1.0 -> 1.00 is a change
    assert render.previous(FIELDS, "license", new, new) is None
    assert render.previous(FIELDS, "license", new, None) is None  # INSERT / DELETE


def test_version_1_rows_render_by_the_same_rules() -> None:
    row = '{"price": 2.50, "license_id": 7, "expiry_date": "2026-01-15T12:00:00+00:00"}'
    assert render.info(FIELDS, "license", row) == \
        '{"LicenseID":7,"ExpiryDate":"2026-01-15T12:00:00.000000Z","Price":2.50}'
    assert render.previous(FIELDS, "license", row, None, '{"price": 1, "license_id": 6}') == \
        '{"LicenseID":6,"Price":1}'


def test_unknown_columns_are_reported_then_named_and_go_last() -> None:
    row = '{"new_col":{"a": [1, 2.0]},"license_id":7}'
    with pytest.raises(render.UnknownColumn):
        render.info(FIELDS, "license", row)
    assert FIELDS.missing("license", [row, None]) == {"new_col"}
    fields = FIELDS.with_columns("license", {"new_col": "NewCol"})
    assert render.info(fields, "license", row) == '{"LicenseID":7,"NewCol":{"a":[1,2.0]}}'
    assert render.info(fields, "license", None) == "{}"
