"""Issue 11: per-key ordering and per-endpoint policies (secret, headers, rate limit, circuit
breaker), end to end against real PostgreSQL, real aiohttp receivers on 127.0.0.1 and, where it
matters, two daemons on one database.

Gaps and rates are read from the receiver's arrival times; bounds only go one way (a slow
machine makes gaps longer and rates lower, never the reverse), so load cannot make them flaky.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from bridge.config import Config
from tests.support.daemon import running, wait_until
from tests.support.receiver import Receiver
from tests.support.server import Db


def body_of(r: Any) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(r.body)
    return body


@contextlib.asynccontextmanager
async def daemons(cfg: Config, n: int) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(n):
            await stack.enter_async_context(running(cfg))
        yield


def license_lifecycle(db: Db, key: str) -> None:
    db.execute(f"INSERT INTO license_keys (activation_key, num_licenses, available_licenses) "
               f"VALUES ('{key}', 3, 3)")
    for pc in ("PC-1", None, "PC-2"):
        value = "NULL" if pc is None else f"'{pc}'"
        db.execute(f"UPDATE license_keys SET computer_id = {value} WHERE activation_key = '{key}'")


def test_per_key_keeps_commit_order_while_other_keys_flow(db: Db) -> None:
    asyncio.run(_per_key_keeps_commit_order_while_other_keys_flow(db))


async def _per_key_keeps_commit_order_while_other_keys_flow(db: Db) -> None:
    failed_once: list[bool] = []

    async def flaky_for_k1(request: web.Request, _: int) -> web.StreamResponse:
        body = json.loads(await request.read())
        if body["LicenseInfo"]["ActivationKey"] == "K-1" and not failed_once:
            failed_once.append(True)
            return web.Response(status=500, text="first attempt of K-1 fails")
        return web.Response(text="ok")

    rx = await Receiver(behaviours={"/hook": flaky_for_k1}).start()
    url = rx.url("/hook")
    events = {e: url for e in ("license_created", "license_activated", "license_released")}
    cfg = db.config(webhooks={"events": events, "ordering": "per_key", "retry_interval": 1.5,
                              "max_retries": 3})
    try:
        async with daemons(cfg, 2):
            license_lifecycle(db, "K-1")  # created fails once; the rest must wait behind it
            for i in range(2, 6):
                license_lifecycle(db, f"K-{i}")
            await rx.wait_for(lambda: len(rx.received) >= 4 * 5 + 1, timeout=30)
            await asyncio.sleep(0.5)  # nothing more may arrive (no duplicates)
    finally:
        await rx.stop()
    seen = [(b["LicenseInfo"]["ActivationKey"], b["EventType"])
            for b in map(body_of, rx.received)]
    assert len(seen) == 21
    lifecycle = ["license_created", "license_activated", "license_released",
                 "license_activated"]
    for i in range(1, 6):
        mine = [t for k, t in seen if k == f"K-{i}"]
        if i == 1:
            assert mine == ["license_created", *lifecycle], mine  # the failed try, then order
        else:
            assert mine == lifecycle, (i, mine)
    # other keys flowed during K-1's retry wait: all of them arrived before K-1 succeeded
    k1_success = [i for i, (k, _) in enumerate(seen) if k == "K-1"][1]
    assert sum(1 for k, _ in seen[:k1_success] if k != "K-1") == 16


def test_rate_limit_holds_across_two_daemons_and_spares_other_urls(db: Db) -> None:
    asyncio.run(_rate_limit_holds_across_two_daemons_and_spares_other_urls(db))


async def _rate_limit_holds_across_two_daemons_and_spares_other_urls(db: Db) -> None:
    rx = await Receiver().start()
    limited, free = rx.url("/limited"), rx.url("/free")
    cfg = db.config(webhooks={"events": {"license_created": [limited, free]},
                              "endpoints": {limited: {"rate_limit": 20}}})
    try:
        async with daemons(cfg, 2):
            db.execute("INSERT INTO license_keys (activation_key) "
                       "SELECT 'R-' || g FROM generate_series(1, 100) g")
            await rx.wait_for(lambda: len(rx.on("/limited")) >= 100, timeout=60)
            await asyncio.sleep(0.3)
    finally:
        await rx.stop()
    times = sorted(r.at for r in rx.on("/limited"))
    assert len(times) == 100
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert rate <= 22.0, f"{rate:.1f}/s over 100 requests, limit 20/s"
    # in any whole second, at most 20 requests plus the bucket (2) and 10 %
    for i, t in enumerate(times):
        assert sum(1 for u in times[i:] if u < t + 1.0) <= 24
    # the other URL was not held back: all of it arrived while the limited one was still going
    free_times = sorted(r.at for r in rx.on("/free"))
    assert len(free_times) == 100 and free_times[-1] < times[50]
    assert db.scalar("SELECT count(*) FROM qlm_bridge.delivery WHERE attempts <> 1") == 0


def test_circuit_breaker_opens_waits_then_probes(db: Db) -> None:
    asyncio.run(_circuit_breaker_opens_waits_then_probes(db))


async def _circuit_breaker_opens_waits_then_probes(db: Db) -> None:
    healthy: list[bool] = []

    async def down_until_fixed(_: web.Request, __: int) -> web.StreamResponse:
        return web.Response(text="ok") if healthy else web.Response(status=503, text="down")

    rx = await Receiver(behaviours={"/hook": down_until_fixed}).start()
    url = rx.url("/hook")
    cfg = db.config(webhooks={"events": {"license_created": url}, "retry_interval": 0.1,
                              "max_retries": 4, "per_url_concurrency": 1,
                              "endpoints": {url: {"circuit_breaker": {"failures": 3,
                                                                      "cooldown": 5}}}})
    try:
        async with daemons(cfg, 2):
            db.execute("INSERT INTO license_keys (activation_key) "
                       "SELECT 'B-' || g FROM generate_series(1, 5) g")
            await rx.wait_for(lambda: len(rx.received) >= 3, timeout=20)
            # open: the next request is one probe, at least `cooldown` after the failures
            await rx.wait_for(lambda: any(b.at - a.at >= 4.9 for a, b in
                                          zip(rx.received, rx.received[1:], strict=False)),
                              timeout=20)
            gap_at = next(i for i, (a, b) in enumerate(zip(rx.received, rx.received[1:],
                                                            strict=False))
                          if b.at - a.at >= 4.9)
            # three failures open it; another daemon may have had one more in flight
            assert 3 <= gap_at + 1 <= 4, gap_at + 1
            await asyncio.sleep(0.5)
            assert len(rx.received) == gap_at + 2, "more than one probe after the cooldown"
            healthy.append(True)  # the receiver is fixed; the next probe closes the breaker
            await rx.wait_for(lambda: db.scalar(
                "SELECT count(*) FROM qlm_bridge.delivery WHERE state = 'delivered'") == 5,
                timeout=30)
    finally:
        await rx.stop()
    assert db.scalar("SELECT count(*) FROM qlm_bridge.delivery WHERE state = 'failed'") == 0
    # waiting used up no retries: at most 1 + max_retries attempts for any delivery
    assert db.scalar("SELECT max(attempts) FROM qlm_bridge.delivery") <= 5
    state = db.query("SELECT failures, open_until FROM qlm_bridge.endpoint WHERE url = %s",
                     (url,))
    assert state == [(0, None)]


def test_endpoint_headers_and_secrets(db: Db, caplog: pytest.LogCaptureFixture) -> None:
    asyncio.run(_endpoint_headers_and_secrets(db, caplog))


async def _endpoint_headers_and_secrets(db: Db, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="bridge")
    rx = await Receiver().start()
    a, b = rx.url("/a"), rx.url("/b")
    cfg = db.config(webhooks={
        "secret_key": "global-secret-123", "events": {"license_created": [a, b]},
        "endpoints": {a: {"secret_key": "endpoint-secret-456",
                          "headers": {"Authorization": "Bearer api-token-789",
                                      "X-Tenant": "eu"}}}})
    try:
        async with running(cfg):
            db.execute("INSERT INTO license_keys (activation_key) VALUES ('H-1')")
            await rx.wait_for(lambda: len(rx.received) >= 2)
    finally:
        await rx.stop()
    (ra,), (rb,) = rx.on("/a"), rx.on("/b")
    expect_a = hashlib.sha256(ra.body + b"endpoint-secret-456").hexdigest()
    expect_b = hashlib.sha256(rb.body + b"global-secret-123").hexdigest()
    assert ra.headers["X-QLM-Signature"] == expect_a
    assert rb.headers["X-QLM-Signature"] == expect_b
    assert ra.headers["Authorization"] == "Bearer api-token-789" and ra.headers["X-Tenant"] == "eu"
    assert "Authorization" not in rb.headers and "X-Tenant" not in rb.headers
    logged = caplog.text + json.dumps(db.query("SELECT * FROM qlm_bridge.attempt_log"),
                                      default=str)
    for secret in ("global-secret-123", "endpoint-secret-456", "api-token-789"):
        assert secret not in logged


def test_status_shows_breaker_state(db: Db) -> None:
    asyncio.run(_status_shows_breaker_state(db))


async def _status_shows_breaker_state(db: Db) -> None:
    rx = await Receiver(behaviours={}).start()
    url = rx.url("/hook")
    cfg = db.config(webhooks={"events": {"license_created": url},
                              "endpoints": {url: {"circuit_breaker": {"failures": 2},
                                                  "rate_limit": 10}}})
    try:
        async with running(cfg) as d:
            await wait_until(lambda: db.scalar(
                "SELECT count(*) FROM qlm_bridge.endpoint") == 1, what="endpoint row")
            assert d.ready.is_set()
    finally:
        await rx.stop()
    db.execute("UPDATE qlm_bridge.endpoint SET failures = 2, open_until = now() + interval '1 min'")
    from bridge import ops

    text = ops.format_status(ops.status(db.dsn, cfg))
    assert "open" in text and url in text
