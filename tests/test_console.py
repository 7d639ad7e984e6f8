"""Issue 12 (web console), over HTTP: authentication, CSRF, read-only, security headers,
escaping, filters, keyset pages, replay and the index plans. A real daemon (in this event loop)
serves the console; real aiohttp receivers answer; real PostgreSQL holds the data.

The browser half is tests/test_console_browser.py."""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import markupsafe
import pytest

from bridge import install, sql
from bridge.console import data
from bridge.console.auth import COOKIE
from bridge.errors import ConfigError
from tests.support.config import SECRET  # webhooks.secret_key of the base config
from tests.support.daemon import running, wait_until
from tests.support.net import free_port
from tests.support.receiver import Receiver, ok, status
from tests.support.server import Db
from tests.test_sites import sites_config

TOKEN = "console-token-0123456789abcdef"

XSS = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">'
CHECKBOX = r'type="checkbox" name="event_id" value="([0-9a-f-]{36})"'
PATHS = ("/console", "/console/deliveries", "/console/events/{event_id}")
ANSWER = '{"error": "<b>database is down</b>"}'


@dataclass
class Site:
    base: str
    db: Db
    rx: Receiver
    http: aiohttp.ClientSession

    def bearer(self, token: str = TOKEN) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    async def get(self, path: str, **kw: Any) -> tuple[aiohttp.ClientResponse, str]:
        async with self.http.get(self.base + path, allow_redirects=False, **kw) as resp:
            return resp, await resp.text()

    async def post(self, path: str, form: Any,
                   **kw: Any) -> tuple[aiohttp.ClientResponse, str]:
        async with self.http.post(self.base + path, data=form, allow_redirects=False,
                                  **kw) as resp:
            return resp, await resp.text()

    def state(self, event_id: str, url: str) -> str | None:
        return self.db.scalar(
            "SELECT d.state FROM qlm_bridge.delivery d JOIN qlm_bridge.event e "
            "ON e.id = d.event_id WHERE e.event_id = %s AND d.url = %s", (event_id, url))

    async def wait_state(self, event_id: str, url: str, want: str) -> None:
        await wait_until(lambda: self.state(event_id, url) == want, what=f"{want} delivery")


@contextlib.asynccontextmanager
async def console(db: Db, endpoints: dict[str, Any] | None = None,
                  **observe: Any) -> AsyncIterator[Site]:
    """A daemon serving the console; license_created goes to /hook (answers 500 at first).
    `endpoints`: webhooks.endpoints settings for /hook."""
    rx = await Receiver({"/hook": status(500)}).start()
    port = free_port()
    webhooks: dict[str, Any] = {"events": {"license_created": rx.url("/hook"),
                                           "customer_created": rx.url("/crm")},
                                "max_retries": 0}
    if endpoints is not None:
        webhooks["endpoints"] = {rx.url("/hook"): endpoints}
    cfg = db.config(webhooks=webhooks,
                    observe={"listen": f"127.0.0.1:{port}", "console_token": TOKEN, **observe})
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1
    try:
        async with running(cfg), aiohttp.ClientSession(cookie_jar=jar) as http:
            yield Site(f"http://127.0.0.1:{port}", db, rx, http)
    finally:
        await rx.stop()


async def failed_license(site: Site, key: str = "KEY-1") -> str:
    """A license_created whose delivery to /hook failed (HTTP 500); its event id."""
    site.db.execute("INSERT INTO license_keys (activation_key, user_data) VALUES (%s, %s)",
                    (key, XSS))
    event_id = str(site.db.scalar(
        "SELECT event_id FROM qlm_bridge.event WHERE row_data->>'activation_key' = %s", (key,)))
    await site.wait_state(event_id, site.rx.url("/hook"), "failed")
    return event_id


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert found, "no CSRF field in the page"
    return found.group(1)


def assert_headers(resp: aiohttp.ClientResponse, store: bool = False) -> None:
    csp = resp.headers["Content-Security-Policy"]
    assert "unsafe-inline" not in csp and "script-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    if not store:
        assert resp.headers["Cache-Control"] == "no-store"


# --- authentication ---------------------------------------------------------------------------


def test_no_data_without_authentication(db: Db) -> None:
    async def scenario() -> None:
        async with console(db) as site:
            event_id = await failed_license(site)
            paths = [p.format(event_id=event_id) for p in PATHS]
            for path in paths:
                resp, text = await site.get(path)
                assert resp.status == 401, path
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
                assert event_id not in text and "KEY-1" not in text
                assert site.rx.url("/hook") not in text
                assert_headers(resp)
                # a browser is sent to the login form instead, never shown data
                resp, text = await site.get(path, headers={"Accept": "text/html"})
                assert resp.status == 303
                assert resp.headers["Location"].startswith("/console/login?next=")
                assert event_id not in text
                # a wrong token: 401 as well
                resp, text = await site.get(path, headers=site.bearer(TOKEN[:-1] + "X"))
                assert resp.status == 401 and event_id not in text
            resp, _ = await site.get("/console/deliveries", headers={"Authorization": "Basic x"})
            assert resp.status == 401
            resp, _ = await site.post("/console/replay", {"event_id": event_id})
            assert resp.status == 401
            assert site.state(event_id, site.rx.url("/hook")) == "failed"
            # the Bearer token works on every path
            for path in paths:
                resp, text = await site.get(path, headers=site.bearer())
                assert resp.status == 200, (path, text)
                assert (event_id if path != "/console" else site.rx.url("/hook")) in text
                assert_headers(resp)
            # static assets need no login and carry the same headers
            resp, text = await site.get("/console/static/console.css")
            assert resp.status == 200 and ".pill" in text
            assert_headers(resp, store=True)
    asyncio.run(scenario())


def test_login_sets_a_strict_httponly_cookie_and_cookie_posts_need_csrf(db: Db) -> None:
    async def scenario() -> None:
        async with console(db) as site:
            event_id = await failed_license(site)
            resp, text = await site.get("/console/login")
            assert resp.status == 200 and 'name="token"' in text
            assert_headers(resp)
            resp, text = await site.post("/console/login", {"token": "not-the-token",
                                                            "next": "/console"})
            assert resp.status == 401 and "not right" in text
            assert COOKIE not in resp.cookies
            # an open redirect is refused: after login, only console paths
            resp, _ = await site.post("/console/login", {"token": TOKEN,
                                                         "next": "https://evil.example/"})
            assert resp.status == 303 and resp.headers["Location"] == "/console"
            cookie = resp.headers["Set-Cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
            assert "Path=/console" in cookie and TOKEN not in cookie
            resp, page = await site.get("/console/deliveries?state=failed")
            assert resp.status == 200 and event_id in page
            # a cookie POST without (or with a wrong) CSRF token is refused
            site.rx.behaviours["/hook"] = ok
            for form in ({"event_id": event_id}, {"event_id": event_id, "csrf": "0" * 64}):
                resp, text = await site.post("/console/replay", form)
                assert resp.status == 403 and "CSRF" in text
            assert site.state(event_id, site.rx.url("/hook")) == "failed"
            # with the page's token it replays and redirects to the list
            resp, _ = await site.post("/console/replay", {"event_id": event_id,
                                                          "csrf": csrf_of(page)})
            assert resp.status == 303
            assert resp.headers["Location"].startswith(f"/console/deliveries?event_id={event_id}")
            assert "replayed=" in resp.headers["Location"]
            await site.wait_state(event_id, site.rx.url("/hook"), "delivered")
            # logging out needs the CSRF token too, then the cookie is gone
            resp, _ = await site.post("/console/logout", {"csrf": csrf_of(page)})
            assert resp.status == 303
            resp, _ = await site.get("/console")
            assert resp.status == 401
    asyncio.run(scenario())


def test_bearer_replay_needs_no_csrf_and_answers_json(db: Db) -> None:
    async def scenario() -> None:
        async with console(db) as site:
            event_id = await failed_license(site)
            site.rx.behaviours["/hook"] = ok
            resp, text = await site.post("/console/replay", {"event_id": event_id},
                                         headers={**site.bearer(), "Accept": "application/json"})
            assert resp.status == 200, text
            assert json.loads(text) == {"requeued": 1, "created": 0, "unknown_event_ids": []}
            await site.wait_state(event_id, site.rx.url("/hook"), "delivered")
            # replay by the current filter (the same as `qlm-bridge replay --url ...`)
            site.rx.behaviours["/hook"] = status(500)
            second = await failed_license(site, "KEY-2")
            site.rx.behaviours["/hook"] = ok
            resp, text = await site.post(
                "/console/replay", {"scope": "filter", "state": "failed", "key": "KEY-2"},
                headers=site.bearer())
            assert resp.status == 303, text
            await site.wait_state(second, site.rx.url("/hook"), "delivered")
            resp, text = await site.post("/console/replay", {"scope": "filter"},
                                         headers=site.bearer())
            assert resp.status == 400 and "needs a filter" in text
            resp, text = await site.post("/console/replay", {"event_id": "<b>nope"},
                                         headers=site.bearer())
            assert resp.status == 400 and "not a UUID" in text
    asyncio.run(scenario())


def test_read_only_console_refuses_every_action(db: Db) -> None:
    async def scenario() -> None:
        async with console(db, console_read_only=True) as site:
            event_id = await failed_license(site)
            resp, page = await site.get(f"/console/events/{event_id}", headers=site.bearer())
            assert resp.status == 200 and "read-only" in page
            assert "Replay this event" not in page
            resp, _ = await site.post("/console/replay", {"event_id": event_id},
                                      headers=site.bearer())
            assert resp.status == 403
            resp, _ = await site.post("/console/replay", {"scope": "filter", "url": "x"},
                                      headers=site.bearer())
            assert resp.status == 403
            assert site.state(event_id, site.rx.url("/hook")) == "failed"
    asyncio.run(scenario())


def test_without_a_token_no_console_path_answers(db: Db) -> None:
    async def scenario() -> None:
        port = free_port()
        cfg = db.config(observe={"listen": f"127.0.0.1:{port}"})
        async with running(cfg), aiohttp.ClientSession() as http:
            for path in ("/console", "/console/deliveries", "/console/login",
                         "/console/static/console.css"):
                async with http.get(f"http://127.0.0.1:{port}{path}",
                                    headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                    assert resp.status == 404, path
            async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                assert resp.status == 200
    asyncio.run(scenario())


def test_console_token_is_checked_and_never_shown() -> None:
    from tests.support.config import base_config

    with pytest.raises(ConfigError) as err:
        base_config("postgresql://x@localhost/db", observe={"console_token": "short-secret"})
    assert "observe.console_token: is too short (12 characters)" in str(err.value)
    assert "short-secret" not in str(err.value)
    cfg = base_config("postgresql://x@localhost/db",
                      observe={"console_token": TOKEN, "listen": ":9187"})
    assert TOKEN not in repr(cfg) and SECRET not in repr(cfg)
    assert cfg.observe.address() == ("127.0.0.1", 9187)  # loopback unless configured


# --- pages: escaping, secrets, the payload as sent --------------------------------------------


def test_pages_escape_everything_and_never_show_secrets(db: Db) -> None:
    async def scenario() -> None:
        async with console(db) as site:
            site.rx.behaviours["/hook"] = status(500)
            site.rx.behaviours["/hook"] = _answer(500, ANSWER)
            event_id = await failed_license(site, "<i>KEY</i>")
            got = site.rx.on("/hook")[0].body
            pages = {}
            for path in (*(p.format(event_id=event_id) for p in PATHS),
                         "/console/deliveries?key=%3Ci%3EKEY%3C%2Fi%3E",
                         "/console/deliveries?event_type=<script>x</script>&since=<b>"):
                resp, text = await site.get(path, headers=site.bearer())
                assert resp.status == 200, (path, text)
                pages[path] = text
            for path, text in pages.items():
                assert SECRET not in text and TOKEN not in text, path
                assert "<script>window" not in text and "<i>KEY" not in text, path
                assert "<b>" not in text, path
            event_page = pages[f"/console/events/{event_id}"]
            assert "&lt;i&gt;KEY&lt;/i&gt;" in event_page
            assert str(markupsafe.escape(ANSWER)) in event_page  # the receiver's answer
            # the exact bytes the receiver got
            raw = re.search(r'<pre class="payload raw">(.*?)</pre>', event_page, re.S)
            assert raw and html.unescape(raw.group(1)).encode() == got
            assert "X-QLM-Signature" in event_page
            assert site.rx.on("/hook")[0].headers["X-QLM-Signature"] not in event_page
            problems = pages["/console/deliveries?event_type=<script>x</script>&since=<b>"]
            assert "unknown event type" in problems and "&lt;script&gt;x" in problems
            key_page = pages["/console/deliveries?key=%3Ci%3EKEY%3C%2Fi%3E"]
            assert event_id in key_page
            resp, text = await site.get(f"/console/events/{uuid.uuid4()}", headers=site.bearer())
            assert resp.status == 404 and "No event" in text
            resp, text = await site.get("/console/events/<x>", headers=site.bearer())
            assert resp.status == 404 and "<x>" not in text
    asyncio.run(scenario())


def _answer(code: int, text: str) -> Any:
    async def handler(_: Any, __: int) -> Any:
        from aiohttp import web

        return web.Response(status=code, text=text)
    return handler


def test_list_filters_and_keyset_pages(db: Db) -> None:
    async def scenario() -> None:
        async with console(db) as site:
            site.rx.behaviours["/hook"] = ok
            n = 2 * data.PAGE_SIZE + 7
            db.execute("INSERT INTO customers (full_name) SELECT 'c' || i "
                       f"FROM generate_series(1, {n}) i")
            failed = await _failed_after(site)
            await wait_until(lambda: db.scalar(
                "SELECT count(*) FROM qlm_bridge.delivery WHERE state = 'delivered'") == n,
                what="deliveries")
            seen: list[str] = []
            path: str | None = "/console/deliveries?event_type=customer_created"
            while path:
                resp, text = await site.get(path, headers=site.bearer())
                assert resp.status == 200
                seen += re.findall(CHECKBOX, text)
                older = re.search(r'href="(/console/deliveries\?before=[^"]+)"', text)
                path = html.unescape(older.group(1)) if older else None
            expected = [str(r[0]) for r in db.query(
                "SELECT e.event_id FROM qlm_bridge.delivery d JOIN qlm_bridge.event e "
                "ON e.id = d.event_id WHERE e.event_type = 'customer_created' "
                "ORDER BY d.id DESC")]
            assert seen == expected and len(seen) == n  # newest first, each once
            # a newer page goes back: the 50 deliveries after the older page's first row
            before = db.scalar("SELECT max(id) - 60 FROM qlm_bridge.delivery")
            resp, text = await site.get(f"/console/deliveries?before={before}",
                                        headers=site.bearer())
            newer = re.search(r'href="/console/deliveries\?after=(\d+)', text)
            assert newer
            resp, text = await site.get(f"/console/deliveries?after={newer.group(1)}",
                                        headers=site.bearer())
            want = [str(r[0]) for r in db.query(
                "SELECT event_id FROM (SELECT d.id, e.event_id FROM qlm_bridge.delivery d "
                "JOIN qlm_bridge.event e ON e.id = d.event_id WHERE d.id > %s "
                "ORDER BY d.id LIMIT 50) AS p ORDER BY id DESC", (int(newer.group(1)),))]
            assert re.findall(CHECKBOX, text) == want
            # each filter
            for query, want in (("state=failed", [failed]),
                                (f"event_id={failed}", [failed]),
                                ("key=KEY-1", [failed]),
                                (f"url={site.rx.url('/hook')}", [failed]),
                                ("state=skipped", []),
                                ("since=1h&state=failed", [failed])):
                resp, text = await site.get(f"/console/deliveries?{query}",
                                            headers=site.bearer())
                got = re.findall(CHECKBOX, text)
                assert got == want, query
    asyncio.run(scenario())


async def _failed_after(site: Site) -> str:
    site.rx.behaviours["/hook"] = status(500)
    return await failed_license(site)


def test_overview_counts_and_daemons(db: Db) -> None:
    async def scenario() -> None:
        async with console(db) as site:
            event_id = await failed_license(site)
            db.execute("INSERT INTO customers (full_name) VALUES ('Ada')")
            await wait_until(lambda: len(site.rx.on("/crm")) == 1, what="crm delivery")
            await wait_until(lambda: db.scalar(
                "SELECT count(*) FROM qlm_bridge.attempt_log WHERE http_status = 200") == 1)
            resp, text = await site.get("/console", headers=site.bearer())
            assert resp.status == 200
            rows = re.findall(r"<tr>(.*?)</tr>", text, re.S)
            hook = next(r for r in rows if "/hook" in r and "license_created" in r)
            assert re.search(r'data-label="failed"><a class="num bad"[^>]*>1</a>', hook)
            crm = next(r for r in rows if "/crm" in r and "customer_created" in r)
            assert re.search(r'data-label="delivered 1 h"><a class="num ok"[^>]*>1</a>', crm)
            daemon_id = db.scalar("SELECT id FROM qlm_bridge.daemon")
            assert daemon_id in text
            assert "Endpoints" not in text  # no endpoint data: no invented section
            assert event_id not in text
    asyncio.run(scenario())


def test_overview_shows_endpoint_breaker_and_rate_limit(db: Db) -> None:
    async def scenario() -> None:
        endpoint = {"rate_limit": 50, "circuit_breaker": {"failures": 1, "cooldown": 600},
                    "headers": {"Authorization": "Bearer receiver-credential"}}
        async with console(db, endpoints=endpoint) as site:
            event_id = await failed_license(site)
            await wait_until(lambda: db.scalar(
                "SELECT open_until > now() FROM qlm_bridge.endpoint") is True, what="open")
            resp, text = await site.get("/console", headers=site.bearer())
            assert resp.status == 200 and "Endpoints with limits" in text
            row = next(r for r in re.findall(r"<tr>(.*?)</tr>", text, re.S)
                       if "pill bad" in r and site.rx.url("/hook") in r)
            assert "open (" in row and "50/s" in row
            # the endpoint's own header is named on the event page, its value never shown
            resp, text = await site.get(f"/console/events/{event_id}", headers=site.bearer())
            assert "Authorization" in text and "receiver-credential" not in text
            assert site.rx.on("/hook")[0].headers["Authorization"].endswith("credential")
    asyncio.run(scenario())


# --- plans: every list query uses an index --------------------------------------------------


def _plan(conn: Any, statement: str, args: tuple[Any, ...]) -> str:
    """EXPLAIN of a console statement with its parameters as the custom plan sees them."""
    rows = conn.execute("EXPLAIN " + _inline(statement, args)).fetchall()
    return "\n".join(r[0] for r in rows)


def _inline(statement: str, args: tuple[Any, ...]) -> str:
    out = statement
    for i in range(len(args), 0, -1):
        value = args[i - 1]
        literal = "NULL" if value is None else (str(value) if isinstance(value, int)
                                                else sql.quote_literal(str(value)))
        out = out.replace(f"${i}", literal)
    return out


LIST_CASES: dict[str, tuple[Any, ...]] = {
    # state, url, event_type, key, event_id, since, before, after, limit
    "newest": (None, None, None, None, None, None, None, None, 51),
    "older page": (None, None, None, None, None, None, 20000, None, 51),
    "failed": ("failed", None, None, None, None, None, None, None, 51),
    "pending": ("pending", None, None, None, None, None, None, None, 51),
    "key": (None, None, None, "K-777", None, None, None, None, 51),
    "event id": (None, None, None, None, "00000000-0000-0000-0000-000000000001", None, None,
                 None, 51),
    "event type": (None, None, "license_created", None, None, None, None, None, 51),
    "url": (None, "https://b.example/hook", None, None, None, None, None, None, 51),
}


@pytest.mark.parametrize("legacy", [False, True])
def test_list_queries_use_indexes(db: Db, legacy: bool) -> None:
    """40,000 deliveries (installed indexes, ANALYZE): no sequential scan, no sort of the
    table; the plans are in docs/console.md for 1,000,000. Half the events have no event.key
    when `legacy` (captured before schema version 4: install indexes their JSON form)."""
    db.execute("""
        INSERT INTO qlm_bridge.event (event_type, kind, source_table, op, row_data, fanned_out,
                                      key)
        SELECT CASE WHEN i % 2 = 0 THEN 'license_created' ELSE 'customer_created' END,
               CASE WHEN i % 2 = 0 THEN 'license' ELSE 'customer' END, 'public.x', 'INSERT',
               CASE WHEN i % 2 = 0 THEN jsonb_build_object('activation_key', 'K-' || i)
                    ELSE jsonb_build_object('customer_id', i) END, true,
               CASE WHEN i % 2 = 0 THEN 'license:K-' || i ELSE 'customer:' || i END
          FROM generate_series(1, 20000) i;
        INSERT INTO qlm_bridge.delivery (event_id, url, state, attempts)
        SELECT e.id, u.url, CASE WHEN e.id % 500 = 0 THEN 'failed'
                                 WHEN e.id % 997 = 0 THEN 'pending' ELSE 'delivered' END, 1
          FROM qlm_bridge.event e,
               (VALUES ('https://a.example/hook'), ('https://b.example/hook')) AS u(url);
    """)
    if legacy:
        db.execute("UPDATE qlm_bridge.event SET key = NULL WHERE id % 2 = 0")
        install.install(db.config())  # an upgrade: events without key are there
    assert (db.scalar("SELECT count(*) FROM pg_indexes WHERE indexname LIKE 'event_key_v1_%'")
            == legacy)
    db.execute("ANALYZE qlm_bridge.event; ANALYZE qlm_bridge.delivery;")
    keys = (("license", ("activation_key",)), ("customer", ("customer_id",)))
    q = data.queries("qlm_bridge", keys)
    import psycopg

    with psycopg.connect(db.dsn, autocommit=True) as conn:
        for name, args in LIST_CASES.items():
            plan = _plan(conn, q["deliveries"], args)
            assert "Seq Scan" not in plan, f"{name}:\n{plan}"
            # only the few rows of one key or one event are sorted
            assert "Sort" not in plan or name in ("key", "event id"), f"{name}:\n{plan}"
        assert "delivery_open_idx" in _plan(conn, q["deliveries"], LIST_CASES["failed"])
        assert "event_key_" in _plan(conn, q["deliveries"], LIST_CASES["key"])
        for name in ("overview_open", "overview_unfanned"):
            plan = _plan(conn, q[name], (data.COUNT_CAP,))
            assert "Seq Scan on delivery" not in plan and "Seq Scan on event" not in plan, plan


# --- the demo --------------------------------------------------------------------------------


def test_demo_keep_prints_the_console_url_and_token(empty_db: Db) -> None:
    """`qlm-bridge demo --keep`: the printed console URL and token show the seven events."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "bridge", "demo", "--keep", "--dsn",
                             empty_db.dsn, "--timeout", "90"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.strip().startswith("console"):
                break
        found = re.search(r"console\s+(http://127\.0\.0\.1:\d+/console)\s+\(log in with the "
                          r"token (\S+)\)", "".join(lines))
        assert found, "".join(lines)
        url, token = found.groups()
        request = urllib.request.Request(url + "/deliveries",
                                         headers={"Authorization": f"Bearer {token}"})
        for _ in range(100):  # the last ack may still be on its way
            with urllib.request.urlopen(request, timeout=10) as resp:
                page = resp.read().decode()
            if len(re.findall(r'<tr data-state="delivered">', page)) == 7:
                break
            time.sleep(0.1)
        assert len(re.findall(r'<tr data-state="delivered">', page)) == 7, page
        assert len(re.findall(r"<tr data-state=", page)) == 7
        for event_type in ("customer_created", "license_activated", "customer_deleted"):
            assert event_type in page
        assert token not in page
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, out + err


# --- several sites -------------------------------------------------------------------------


def test_site_selector_only_with_several_sites(db: Db) -> None:
    """The console is handed sources: with two, a selector and ?site= on every link."""
    import asyncpg

    from bridge.console import Console, ConsoleSource
    from bridge.observe import Metrics, serve

    async def ready(_: str | None = None) -> tuple[bool, str, dict[str, tuple[bool, str]]]:
        return True, "ok", {}

    async def page(port: int, path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as http, http.get(
                f"http://127.0.0.1:{port}{path}", allow_redirects=False,
                headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            return resp.status, await resp.text()

    async def scenario() -> None:
        db.execute("INSERT INTO license_keys (activation_key) VALUES ('SITE-KEY')")
        pool = await asyncpg.create_pool(db.dsn, min_size=0, max_size=2)
        cfg = db.config(webhooks={"events": {"license_created": "https://eu.example/hook"}})
        sources = [ConsoleSource("default", pool, cfg),
                   ConsoleSource("eu", pool, cfg),
                   ConsoleSource("us", None, cfg, "password authentication failed")]
        runners = []
        try:
            ports = [free_port(), free_port()]
            for port, chosen in zip(ports, (sources[:1], sources), strict=True):
                runners.append(await serve("127.0.0.1", port, Metrics(), ready,
                                           console=Console(lambda c=chosen: c, TOKEN)))
            status_one, one = await page(ports[0], "/console")
            assert status_one == 200 and 'name="site"' not in one and "site=" not in one
            status_two, two = await page(ports[1], "/console?site=eu")
            assert status_two == 200 and 'name="site"' in two
            assert '<option value="eu" selected>eu</option>' in two
            assert "/console/deliveries?site=eu" in two
            assert "https://eu.example/hook" in two
            missing, text = await page(ports[1], "/console?site=<nope>")
            assert missing == 404 and "<nope>" not in text
            # a site that is not connected says why, and nothing else
            down, text = await page(ports[1], "/console/deliveries?site=us")
            assert down == 503 and "password authentication failed" in text
        finally:
            for runner in runners:
                await runner.cleanup()
            await pool.close()

    asyncio.run(scenario())


def test_console_over_a_daemon_with_two_sites(db: Db, db2: Db) -> None:
    """`sites:` in the config: one console, a selector, each site's own rows and URLs."""
    from bridge import config as config_mod

    async def scenario() -> None:
        rx = await Receiver().start()
        port = free_port()
        sites = config_mod.parse_sites(sites_config(
            db, db2, rx, observe={"listen": f"127.0.0.1:{port}", "console_token": TOKEN}),
            "<sites>", env={})
        try:
            async with running(sites), aiohttp.ClientSession() as http:
                site = Site(f"http://127.0.0.1:{port}", db, rx, http)
                db.execute("INSERT INTO license_keys (activation_key) VALUES ('EU-1')")
                db2.execute("INSERT INTO license_keys (activation_key) VALUES ('US-1')")
                await rx.wait_for(lambda: len(rx.received) == 2)
                pages = {}
                for name in ("eu", "us"):
                    resp, pages[name] = await site.get(f"/console/deliveries?site={name}",
                                                       headers=site.bearer())
                    assert resp.status == 200
                    assert '<option value="eu"' in pages[name]
                    assert f'<option value="{name}" selected>' in pages[name]
                    assert "/console/events/" in pages[name]
                assert "EU-1" in pages["eu"] and "US-1" not in pages["eu"]
                assert "US-1" in pages["us"] and "EU-1" not in pages["us"]
                assert rx.url("/us") in pages["us"] and rx.url("/us") not in pages["eu"]
                for text in pages.values():
                    assert "eu-secret" not in text and "us-secret" not in text
                resp, text = await site.get("/console?site=us", headers=site.bearer())
                assert resp.status == 200 and rx.url("/us") in text and "site=us" in text
        finally:
            await rx.stop()

    asyncio.run(scenario())
