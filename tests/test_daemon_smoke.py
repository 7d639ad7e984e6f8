from __future__ import annotations

import asyncio
import hashlib
import json

from bridge.daemon import Daemon
from tests.support.receiver import Receiver, fail_first
from tests.support.server import Db


async def _run(db: Db) -> None:
    rx = await Receiver(behaviours={"/flaky": fail_first(2)}).start()
    cfg = db.config(webhooks={"events": {
        "license_created": rx.url("/a") + ";" + rx.url("/flaky"),
        "customer_created": [rx.url("/a")],
    }})
    d = Daemon(cfg)
    task = asyncio.create_task(d.run())
    await asyncio.wait_for(d.ready.wait(), 10)
    db.execute("INSERT INTO customers (full_name) VALUES ('Ann')")
    db.execute("INSERT INTO license_keys (activation_key, customer_id) VALUES ('K1', 1)")
    await rx.wait_for(lambda: len(rx.on("/a")) == 2 and len(rx.on("/flaky")) == 3)
    d.stop()
    await asyncio.wait_for(task, 10)
    await rx.stop()
    for r in rx.received:
        expected = hashlib.sha256(r.body + b"test-secret").hexdigest()
        assert r.headers["X-QLM-Signature"] == expected
        json.loads(r.body)
    states = db.query("SELECT url, state, attempts FROM qlm_bridge.delivery ORDER BY id")
    assert all(s == "delivered" for _, s, _ in states)
    assert db.scalar("SELECT count(*) FROM qlm_bridge.attempt_log") == 5


def test_end_to_end(db: Db) -> None:
    asyncio.run(_run(db))
