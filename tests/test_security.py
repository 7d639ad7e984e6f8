"""Security: the secret never leaks, TLS is verified, redirects are not followed, the private
address guard holds after DNS, stored response bodies are bounded, receivers cannot inject into
logs. (The application role's lack of rights on the bridge tables: tests/test_capture.py.)"""

from __future__ import annotations

import asyncio
import io
import logging
import uuid
from pathlib import Path
from typing import Any

import pytest

from bridge import config as config_mod
from bridge import ops
from bridge.daemon import Daemon
from bridge.dispatch import BlockedAddress, Dispatcher, GuardedResolver, sanitize
from bridge.errors import BridgeError
from bridge.observe import TextFormatter
from tests.support.campaign import campaign_config, insert_licenses, self_signed_cert, server_ssl
from tests.support.config import base_config
from tests.support.daemon import DaemonProcess
from tests.support.net import free_port
from tests.support.receiver import Receiver, big_body, redirect, status
from tests.support.server import Db, query


def _with_password(dsn: str, password: str) -> str:
    return dsn.replace("postgres@", f"postgres:{password}@", 1)


def _webhooks(**kw: Any) -> config_mod.WebhooksConfig:
    return base_config("postgresql://x@127.0.0.1/x", webhooks=kw).webhooks


async def _post(cfg: config_mod.WebhooksConfig, url: str) -> Any:
    d = Dispatcher(cfg)
    await d.start()
    try:
        return await d.post(url, b"{}", {"Content-Type": "application/json"})
    finally:
        await d.close()


# --- the secret --------------------------------------------------------------------------------


def test_secret_never_leaks(db: Db, tmp_path: Path) -> None:
    secret, dbpw = f"S3CRET-{uuid.uuid4().hex}", f"DBPW-{uuid.uuid4().hex}"

    async def run() -> tuple[str, str, bytes]:
        cert, key = self_signed_cert(tmp_path)
        rx = await Receiver(behaviours={"/500": status(500)}).start()
        tls = await Receiver(ssl_context=server_ssl(cert, key)).start()
        metrics_port = free_port()
        urls = [rx.url("/ok"), rx.url("/500"), tls.url("/tls"),
                f"http://127.0.0.1:{free_port()}/refused"]
        cfg = campaign_config(_with_password(db.dsn, dbpw), webhooks={
            "secret_key": secret, "events": {"license_created": urls}, "max_retries": 1,
            "retry_interval": 0.1}, observe={"listen": f"127.0.0.1:{metrics_port}",
                                             "log_level": "debug"})
        d = DaemonProcess(tmp_path, cfg).start()
        try:
            await d.wait_ready(db.dsn)
            cmdline = Path(f"/proc/{d.pid}/cmdline").read_bytes()
            await asyncio.to_thread(insert_licenses, db.dsn, "K", 0, 3)
            await rx.wait_for(lambda: len(rx.unique("/ok")) == 3, 15, "deliveries")
            await rx.wait_for(lambda: not query(db.dsn, "SELECT 1 FROM qlm_bridge.delivery "
                                                        "WHERE state = 'pending'"), 15, "settle")
            import aiohttp
            async with aiohttp.ClientSession() as s, \
                    s.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
                metrics = await r.text()
            await d.terminate()
        finally:
            d.kill()
            await rx.stop()
            await tls.stop()
        return d.log(), metrics, cmdline

    log, metrics, cmdline = asyncio.run(run())
    assert "attempt failed" in log  # the failures were logged
    table = " ".join(str(r) for r in db.query("SELECT * FROM qlm_bridge.attempt_log"))
    table += " ".join(str(r) for r in db.query("SELECT * FROM qlm_bridge.delivery"))
    table += " ".join(str(r) for r in db.query("SELECT * FROM qlm_bridge.daemon"))
    cfg = base_config(db.dsn, webhooks={"secret_key": secret})
    shown = ops.format_status(ops.status(db.dsn, cfg))
    for where, text in (("log", log), ("tables", table), ("metrics", metrics),
                        ("status", shown), ("process title", cmdline.decode())):
        assert secret not in text, where
        assert dbpw not in text, where


def test_secret_not_in_config_errors() -> None:
    secret = f"S3CRET-{uuid.uuid4().hex}"
    bad = {"database": {"dsn": "postgresql://u:pw@h/db"},
           "webhooks": {"secret_key": secret, "max_retries": "many", "timeout": secret,
                        "events": {"license_created": [f"http://u:{secret}@example.com/x"]}}}
    with pytest.raises(BridgeError) as err:
        config_mod.parse(bad, "<t>", env={})
    assert secret not in str(err.value)
    assert "webhooks.timeout" in str(err.value)


def test_database_password_not_in_daemon_errors(tmp_path: Path) -> None:
    """An unreachable database is logged by host and port, never with the password."""
    dbpw = f"DBPW-{uuid.uuid4().hex}"
    dsn = f"postgresql://postgres:{dbpw}@127.0.0.1:{free_port()}/nowhere"

    async def run() -> str:
        d = DaemonProcess(tmp_path, campaign_config(dsn)).start()
        try:
            await d.wait_log("database not reachable", occurrences=2)  # it retries, and says so
        finally:
            await d.terminate()
        return d.log()

    log = asyncio.run(run())
    assert dbpw not in log
    assert "Traceback" not in log


# --- TLS and redirects ---------------------------------------------------------------------------


def test_tls_verified_by_default_and_ca_bundle_works(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)

    async def run() -> tuple[Any, Any]:
        tls = await Receiver(ssl_context=server_ssl(cert, key)).start()
        try:
            refused = await _post(_webhooks(), tls.url("/t"))
            trusted = await _post(_webhooks(ca_bundle=str(cert)), tls.url("/t"))
        finally:
            await tls.stop()
        assert tls.counts["/t"] == 1  # only the trusted attempt reached the handler
        return refused, trusted

    refused, trusted = asyncio.run(run())
    assert not refused.ok and "CERTIFICATE_VERIFY_FAILED" in (refused.error or "")
    assert trusted.ok and trusted.status == 200


def test_redirects_are_not_followed() -> None:
    async def run() -> tuple[Any, int]:
        rx = await Receiver(behaviours={"/r": redirect("/elsewhere")}).start()
        try:
            out = await _post(_webhooks(), rx.url("/r"))
        finally:
            await rx.stop()
        return out, len(rx.anything_but({"/r"}))  # a followed 301 arrives as a GET

    out, followed = asyncio.run(run())
    assert followed == 0
    assert not out.ok and out.status == 301 and "redirect not followed" in (out.error or "")


# --- the private address guard -------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "0.0.0.0",
                                  "[::1]", "169.254.169.254", "10.0.0.1", "[fe80::1]"])
def test_private_address_guard(host: str) -> None:
    async def run() -> tuple[Any, Any, int]:
        rx = await Receiver().start()
        url = f"http://{host}:{rx.port}/p"
        try:
            guarded = await _post(_webhooks(block_private_addresses=True, timeout=1), url)
            plain = await _post(_webhooks(timeout=1), rx.url("/p"))
        finally:
            await rx.stop()
        return guarded, plain, rx.counts["/p"]

    guarded, plain, hits = asyncio.run(run())
    assert not guarded.ok and (guarded.error or "").startswith("blocked"), guarded
    assert plain.ok and hits == 1  # only the unguarded request arrived


@pytest.mark.parametrize("host", ["2130706433", "127.1", "0x7f.1"])
def test_private_address_guard_resolves_odd_ipv4_spellings(host: str) -> None:
    """aiohttp refuses these spellings of 127.0.0.1 today; should it ever accept one, the guard's
    resolver must still see the loopback address behind it."""
    async def run() -> None:
        resolver = GuardedResolver()
        try:
            with pytest.raises(BlockedAddress, match=r"127\.0\.0\.1"):
                await resolver.resolve(host, 80)
        finally:
            await resolver.close()

    asyncio.run(run())


# --- bounded bodies, no log injection ------------------------------------------------------------


def test_sanitize_bounds_the_escaped_text() -> None:
    text = sanitize("\x1b" * 10_000, 100)
    assert len(text) <= 100 + len("…[truncated]")
    assert "\x1b" not in text
    assert sanitize("a\r\nb\x00", 100) == "a\\x0d\\x0ab\\x00"


def test_stored_response_bodies_are_bounded(db: Db) -> None:
    async def run() -> None:
        rx = await Receiver(behaviours={"/big": big_body(), "/esc": _escapes()}).start()
        cfg = db.config(webhooks={"events": {"license_created": [rx.url("/big"),
                                                                 rx.url("/esc")]},
                                  "max_response_body": 1000})
        d = Daemon(cfg)
        task = asyncio.create_task(d.run())
        await asyncio.wait_for(d.ready.wait(), 10)
        await asyncio.to_thread(insert_licenses, db.dsn, "B", 0, 2)
        await rx.wait_for(lambda: rx.counts["/big"] >= 2 and rx.counts["/esc"] >= 2, 15)
        await asyncio.sleep(0.5)
        d.stop()
        await asyncio.wait_for(task, 10)
        await rx.stop()

    asyncio.run(run())
    lengths = db.query("SELECT url, max(length(response_body)), count(*) "
                       "FROM qlm_bridge.attempt_log GROUP BY url")
    assert len(lengths) == 2
    for _, longest, _ in lengths:
        assert 0 < longest <= 1000 + len("…[truncated]")
    bodies = [r[0] for r in db.query("SELECT response_body FROM qlm_bridge.attempt_log")]
    assert not any(c in b for b in bodies for c in "\x1b\r\n\x00")


def _escapes() -> Any:
    from aiohttp import web

    async def handler(_: Any, __: int) -> Any:
        return web.Response(status=500, body=b"\x1b[31m\r\nFAKE INFO forged line\n" * 200)
    return handler


def test_receivers_cannot_inject_into_logs(db: Db) -> None:
    """A receiver answering garbage (newlines, ESC) yields one escaped log line per attempt."""
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(b"HTTP/1.1 2\x1b[0m00 OK\r\nFAKE ERROR injected\n\nbody\x1b\n")
        await writer.drain()
        writer.close()

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("bridge")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)

    async def run() -> None:
        server = await asyncio.start_server(garbage, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        cfg = db.config(webhooks={"events": {"license_created": [
            f"http://127.0.0.1:{port}/g"]}, "max_retries": 1, "retry_interval": 0.1})
        d = Daemon(cfg)
        task = asyncio.create_task(d.run())
        await asyncio.wait_for(d.ready.wait(), 10)
        await asyncio.to_thread(insert_licenses, db.dsn, "G", 0, 1)
        for _ in range(100):
            if db.scalar("SELECT count(*) FROM qlm_bridge.delivery WHERE state = 'failed'"):
                break
            await asyncio.sleep(0.1)
        d.stop()
        await asyncio.wait_for(task, 10)
        server.close()

    try:
        asyncio.run(run())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    out = stream.getvalue()
    assert "attempt failed" in out
    assert "\x1b" not in out
    for line in out.splitlines():
        assert line[:2] == "20", f"a line that is not a log record: {line!r}"
    errors = [r[0] for r in db.query("SELECT error FROM qlm_bridge.attempt_log")]
    assert errors and not any("\n" in e or "\x1b" in e for e in errors)
