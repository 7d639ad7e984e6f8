from __future__ import annotations

from conftest import Db


def test_every_event_is_captured(db: Db) -> None:
    db.execute("INSERT INTO customers (full_name, email) VALUES ('Ann', 'ann@example.com')")
    db.execute("INSERT INTO license_keys (activation_key, customer_id) VALUES ('K1', 1)")
    db.execute("UPDATE license_keys SET computer_id = 'PC1', available_licenses = 0, "
               "activation_count = 1")
    db.execute("UPDATE license_keys SET computer_id = NULL, available_licenses = 1")
    db.execute("UPDATE customers SET email = 'ann@corp.example'")
    db.execute("DELETE FROM license_keys")
    db.execute("DELETE FROM customers")
    types = [r[0] for r in db.query("SELECT event_type FROM qlm_bridge.event ORDER BY id")]
    assert types == ["customer_created", "license_created", "license_activated",
                     "license_released", "customer_modified", "license_deleted",
                     "customer_deleted"]
