"""The receivers' helper: signature check against an independent computation, and the aiohttp
middleware / handler on a real server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from bridge import payload
from bridge.signing import Signer
from bridge.verify import (
    SIGNATURE_HEADER,
    VERIFIED_KEY,
    signature_middleware,
    verify_signature,
    webhook_handler,
)

SECRET = "s3cret-ключ"  # non-ASCII: the secret is UTF-8 encoded
BODY = '{"EventType":"license_activated","EventId":"e-1","LicenseInfo":{"Name":"Zoë"}}'.encode()


def independent(body: bytes, secret: str) -> str:
    return hashlib.sha256(body + secret.encode("utf-8")).hexdigest()


def test_verify_signature_matches_an_independent_computation() -> None:
    good = independent(BODY, SECRET)
    assert verify_signature(BODY, SECRET, good)
    assert verify_signature(BODY, SECRET, f"  {good.upper()}\n")  # case and space tolerated
    assert not verify_signature(BODY + b" ", SECRET, good)        # body changed
    assert not verify_signature(BODY, SECRET + "x", good)         # wrong secret
    assert not verify_signature(BODY, SECRET, good[:-1])          # truncated
    assert not verify_signature(BODY, SECRET, "")
    assert not verify_signature(BODY, SECRET, None)
    assert not verify_signature(BODY, SECRET, "é" * 64)            # non-ASCII header
    with pytest.raises(ValueError, match="empty secret"):
        verify_signature(BODY, "", good)


def test_verify_what_the_bridge_sends() -> None:
    event = payload.Event("0b6c8a5e-3f0e-4f4e-9d55-1f6a8e2c1a00", "customer_created",
                          datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), '{"CustomerID": 7}')
    body = payload.body(event)
    sent = payload.headers(event, body, Signer((SECRET,)))
    assert sent[SIGNATURE_HEADER] == independent(body, SECRET)
    assert verify_signature(body, SECRET, sent[SIGNATURE_HEADER])


Post = Callable[..., Awaitable[tuple[int, Any]]]


@asynccontextmanager
async def _serve(app: web.Application) -> AsyncIterator[Post]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with aiohttp.ClientSession() as session:

        async def post(path: str, body: bytes, signature: str | None) -> tuple[int, Any]:
            headers = {"Content-Type": "application/json"}
            if signature is not None:
                headers[SIGNATURE_HEADER] = signature
            async with session.post(f"http://127.0.0.1:{port}{path}", data=body,
                                    headers=headers) as resp:
                text = await resp.text()
                return resp.status, (json.loads(text) if text else None)

        try:
            yield post
        finally:
            await runner.cleanup()


def test_middleware_rejects_bad_signatures_with_401() -> None:
    asyncio.run(_middleware())


async def _middleware() -> None:
    seen: list[tuple[bytes, bool]] = []

    async def hook(request: web.Request) -> web.Response:
        seen.append((await request.read(), request.get(VERIFIED_KEY, False)))
        return web.json_response({"ok": True})

    async def open_route(request: web.Request) -> web.Response:
        return web.json_response({"open": True})

    app = web.Application(middlewares=[signature_middleware([SECRET, "old"], paths=["/qlm"])])
    app.add_routes([web.post("/qlm", hook), web.post("/other", open_route)])
    async with _serve(app) as post:
        assert await post("/qlm", BODY, independent(BODY, SECRET)) == (200, {"ok": True})
        assert await post("/qlm", BODY, independent(BODY, "old")) == (200, {"ok": True})
        status, answer = await post("/qlm", BODY, independent(BODY, "wrong"))
        assert status == 401 and "X-QLM-Signature" in answer["error"]
        assert (await post("/qlm", BODY, None))[0] == 401
        assert (await post("/qlm", BODY + b"\n", independent(BODY, SECRET)))[0] == 401
        assert await post("/other", b"{}", None) == (200, {"open": True})  # not checked
    assert seen == [(BODY, True), (BODY, True)]  # the handler still reads the raw body


def test_handler_verifies_parses_and_dispatches() -> None:
    asyncio.run(_handler())


async def _handler() -> None:
    events: list[dict[str, Any]] = []

    async def on_event(request: web.Request, event: dict[str, Any]) -> web.Response | None:
        events.append(event)
        return web.json_response({"got": event["EventId"]}) if event["EventId"] == "e-1" else None

    app = web.Application()
    app.add_routes([web.post("/qlm", webhook_handler(SECRET, on_event))])
    other = b'{"EventType":"customer_created","EventId":"e-2"}'
    async with _serve(app) as post:
        assert await post("/qlm", BODY, independent(BODY, SECRET)) == (200, {"got": "e-1"})
        assert await post("/qlm", other, independent(other, SECRET)) == (204, None)
        assert (await post("/qlm", BODY, independent(BODY, "nope")))[0] == 401
        junk = b"[1, 2]"
        assert (await post("/qlm", junk, independent(junk, SECRET)))[0] == 400
        junk = b"\xff\xfe not json"
        assert (await post("/qlm", junk, independent(junk, SECRET)))[0] == 400
    assert [e["EventId"] for e in events] == ["e-1", "e-2"]
    assert events[0]["LicenseInfo"]["Name"] == "Zoë"


def test_factories_refuse_empty_secrets() -> None:
    with pytest.raises(ValueError):
        signature_middleware("")
    with pytest.raises(ValueError):
        signature_middleware([])

    async def on_event(request: web.Request, event: dict[str, Any]) -> None:
        return None

    with pytest.raises(ValueError):
        webhook_handler(["ok", ""], on_event)
