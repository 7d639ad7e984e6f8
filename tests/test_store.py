"""Runtime statements (bridge/store.py, sql/queries.sql) called directly on a real database,
where a daemon could only reach the case by chance: a lease that ran out while its row was
still queued here, and the field map meeting a column added after install."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import asyncpg

from bridge.store import Store
from tests.support.server import Db

URL = "http://127.0.0.1:9/hook"
SUBS = [("license_created", URL)]


async def _store(db: Db, owner: str = "daemon-a") -> tuple[asyncpg.Pool, Store]:
    pool = await asyncpg.create_pool(db.dsn, min_size=1, max_size=2)
    store = Store(pool, db.config().database.schema_name, owner)
    await store.load_fields()
    return pool, store


def test_release_leaves_a_later_claim_of_the_same_row_alone(db: Db) -> None:
    db.execute("INSERT INTO license_keys (activation_key) VALUES ('K-1')")

    async def case() -> None:
        pool, store = await _store(db)
        try:
            first, _ = await store.produce(10, SUBS, True, {URL: 1}, [], ([], []), 30)
            assert [c.attempt for c in first] == [1]
            # its lease runs out while it is still queued here; this daemon claims it again
            later = await store.claim({URL: 1}, 30, now=datetime.now(UTC) + timedelta(minutes=5))
            assert [(c.id, c.attempt) for c in later] == [(first[0].id, 2)]
            await store.release([(first[0].id, 1)])  # the stale claim: nothing happens
            row = "SELECT attempts, locked_by FROM qlm_bridge.delivery"
            assert db.query(row) == [(2, "daemon-a")]
            await store.release([(later[0].id, 2)])
            assert db.query(row) == [(1, None)]
        finally:
            await pool.close()

    asyncio.run(case())


def test_a_column_added_after_install_is_named_by_the_rule_and_sent(db: Db) -> None:
    db.execute("ALTER TABLE license_keys ADD COLUMN seat_count_v2 numeric")
    db.execute("INSERT INTO license_keys (activation_key, seat_count_v2) VALUES ('K-2', 10.50)")

    async def case() -> None:
        pool, store = await _store(db)
        try:
            claimed, _ = await store.produce(10, SUBS, True, {URL: 1}, [], ([], []), 30)
            info = json.loads(claimed[0].event.info)
            assert info["ActivationKey"] == "K-2"
            assert claimed[0].event.info.endswith('"SeatCountV2":10.50}')  # last, every digit
        finally:
            await pool.close()

    asyncio.run(case())
