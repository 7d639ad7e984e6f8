"""Issue 15: crash-restart findings. One attempt_log row per HTTP attempt across an ambiguous
acknowledgement commit; a SIGKILLed daemon leaves the list and its held deliveries are taken
over within seconds, not after the lease.

The ambiguous commit is made for real: the daemon talks to PostgreSQL through a small TCP proxy
that reads the wire protocol, lets the acknowledgement statement commit, and then cuts the
connection before the daemon sees the reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import struct
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from aiohttp import web

from tests.support.config import config_data
from tests.support.daemon import DaemonProcess, running, wait_until
from tests.support.receiver import Receiver
from tests.support.server import Db


class AckCutter:
    """A TCP proxy in front of PostgreSQL. Once armed, it lets the next statement that writes
    attempt_log run and commit (it waits for the server's ReadyForQuery), but drops the reply
    and closes the client's connection: the client cannot tell whether it committed."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.armed = False
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> AckCutter:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _client(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection(*self.target)
        ack_statements: set[bytes] = set()
        pending_ack = asyncio.Event()  # this connection just sent the ack statement

        async def upstream() -> None:
            startup = True
            while True:
                if startup:  # the startup message has no type byte
                    head = await cr.readexactly(4)
                    body = await cr.readexactly(struct.unpack("!I", head)[0] - 4)
                    startup = struct.unpack("!I", body[:4])[0] == 80877103  # SSLRequest
                    if startup:
                        cw.write(b"N")  # no TLS through this proxy
                    else:
                        sw.write(head + body)
                    continue
                kind = await cr.readexactly(1)
                head = await cr.readexactly(4)
                body = await cr.readexactly(struct.unpack("!I", head)[0] - 4)
                if kind == b"P" and b"attempt_log" in body:
                    ack_statements.add(body.split(b"\0", 1)[0])
                if kind == b"B" and self.armed:
                    statement = body.split(b"\0", 2)[1]
                    if statement in ack_statements:
                        self.armed = False
                        pending_ack.set()
                sw.write(kind + head + body)
                await sw.drain()

        async def downstream() -> None:
            while True:
                kind = await sr.readexactly(1)
                head = await sr.readexactly(4)
                body = await sr.readexactly(struct.unpack("!I", head)[0] - 4)
                if pending_ack.is_set():
                    if kind == b"Z":  # committed: the client never hears of it
                        self.cuts += 1
                        return
                    continue
                cw.write(kind + head + body)
                await cw.drain()

        tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
        for w in (cw, sw):
            w.close()
            with contextlib.suppress(Exception):
                await w.wait_closed()


def via(dsn: str, port: int) -> str:
    parts = urlsplit(dsn)
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0] + "@" if len(netloc) == 2 else ""
    return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{port}"))


def test_ambiguous_ack_commit_logs_each_attempt_once(db: Db) -> None:
    asyncio.run(_ambiguous_ack_commit_logs_each_attempt_once(db))


async def _ambiguous_ack_commit_logs_each_attempt_once(db: Db) -> None:
    target = urlsplit(db.dsn)
    proxy = await AckCutter(target.hostname or "127.0.0.1", target.port or 5432).start()
    rx = await Receiver().start()
    cfg = db.config(database={"dsn": via(db.dsn, proxy.port)},
                    webhooks={"events": {"license_created": rx.url("/hook")}})
    try:
        async with running(cfg):
            db.execute("INSERT INTO license_keys (activation_key) VALUES ('W-0')")
            await wait_until(lambda: db.scalar(
                "SELECT count(*) FROM qlm_bridge.attempt_log") == 1, what="first delivery")
            proxy.armed = True  # the next acknowledgement commits unseen
            db.execute("INSERT INTO license_keys (activation_key) "
                       "SELECT 'W-' || g FROM generate_series(1, 20) g")
            await wait_until(lambda: db.scalar(
                "SELECT count(*) FROM qlm_bridge.delivery WHERE state = 'delivered'") == 21,
                what="every delivery recorded")
            await asyncio.sleep(1.0)  # a late re-sent acknowledgement would land by now
    finally:
        await rx.stop()
        await proxy.stop()
    assert proxy.cuts == 1, "the proxy never cut an acknowledgement"
    rows = db.query("SELECT delivery_id, attempt, count(*) FROM qlm_bridge.attempt_log "
                    "GROUP BY 1, 2 HAVING count(*) > 1")
    assert rows == [], f"attempts logged twice: {rows}"
    # one log row per HTTP request the receiver got
    assert db.scalar("SELECT count(*) FROM qlm_bridge.attempt_log") == len(rx.received)


def test_sigkilled_daemon_is_taken_over_within_seconds(db: Db, tmp_path: Path) -> None:
    asyncio.run(_sigkilled_daemon_is_taken_over_within_seconds(db, tmp_path))


async def _sigkilled_daemon_is_taken_over_within_seconds(db: Db, tmp_path: Path) -> None:
    release = asyncio.Event()

    async def hold(_: web.Request, __: int) -> web.StreamResponse:
        await release.wait()
        return web.Response(text="ok")

    rx = await Receiver(behaviours={"/hook": hold}).start()
    data = config_data(db.dsn, webhooks={"events": {"license_created": rx.url("/hook")},
                                         "timeout": 30},
                       daemon={"lease": 120, "heartbeat_interval": 0.5})
    victim = DaemonProcess(tmp_path, data, name="victim")
    try:
        victim.start()
        await victim.wait_log("started")
        db.execute("INSERT INTO license_keys (activation_key) "
                   "SELECT 'T-' || g FROM generate_series(1, 5) g")
        await rx.wait_for(lambda: len(rx.received) >= 5)  # all five held by the victim
        victim_id = db.scalar("SELECT id FROM qlm_bridge.daemon")
        async with running(db.config(webhooks={"events": {"license_created": rx.url("/hook")},
                                               "timeout": 30},
                                     daemon={"lease": 120, "heartbeat_interval": 0.5})):
            assert db.scalar("SELECT count(*) FROM qlm_bridge.delivery "
                             "WHERE locked_by = %s", (victim_id,)) == 5
            victim.signal(signal.SIGKILL)
            assert await victim.wait() == -signal.SIGKILL
            release.set()  # the receiver answers again; the lease still has ~2 minutes to run
            await wait_until(lambda: db.scalar(
                "SELECT count(*) FROM qlm_bridge.delivery WHERE state = 'delivered'") == 5,
                timeout=30, what="take-over well before the 120 s lease")
            gone = db.query("SELECT gone_at IS NOT NULL FROM qlm_bridge.daemon WHERE id = %s",
                            (victim_id,))
            assert gone == [(True,)]
    finally:
        victim.kill()
        await rx.stop()
    from bridge import ops

    report = ops.format_status(ops.status(db.dsn, db.config()))
    assert "gone: missed heartbeats" in report

