"""For receivers written in Python: check ``X-QLM-Signature`` on an incoming webhook.

The signature is the lowercase hex SHA-256 of the raw body bytes followed by the shared secret
(UTF-8), as QLM documents it. Always verify the exact bytes received, before parsing JSON.

Plain use::

    from bridge.verify import verify_signature

    if not verify_signature(raw_body, secret, request_headers.get("X-QLM-Signature", "")):
        reject with 401

aiohttp, as a middleware (every route, or only some paths)::

    from aiohttp import web
    from bridge.verify import signature_middleware

    app = web.Application(middlewares=[signature_middleware(secret)])

or as a handler that receives the parsed event::

    from bridge.verify import webhook_handler

    async def on_event(request: web.Request, event: dict) -> None:
        print(event["EventType"], event["EventId"])

    app.add_routes([web.post("/qlm", webhook_handler(secret, on_event))])

While the sender rotates its secret, pass both (any of them is accepted): ``secret`` may be a
list, ``["whsec_new...", "whsec_old..."]``, everywhere here.

With ``webhooks.standard_webhooks: true`` the official ``standardwebhooks`` package verifies
the same requests (``Webhook(secret).verify(body, headers)``); so does, without it::

    from bridge.verify import verify_standard_webhook

    if not verify_standard_webhook(raw_body, secret, request_headers):
        reject with 401

Deliveries are at least once: de-duplicate on ``X-QLM-Event-Id`` (== ``EventId``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from aiohttp import web

from bridge.signing import (
    SW_ID,
    SW_SIGNATURE,
    SW_TIMESTAMP,
    constant_time_equal,
    qlm_signature,
    standard_webhooks_key,
    sw_sign,
)

SIGNATURE_HEADER = "X-QLM-Signature"
EVENT_ID_HEADER = "X-QLM-Event-Id"
# request[VERIFIED_KEY] is True once the middleware or handler has checked the signature.
VERIFIED_KEY: Any = (web.RequestKey("qlm_signature_verified", bool)  # aiohttp >= 3.13
                     if hasattr(web, "RequestKey") else "qlm_signature_verified")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
EventCallback = Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse | None]]


def verify_signature(body: bytes, secret: str | Iterable[str], header_value: str | None) -> bool:
    """True when `header_value` is the QLM signature of `body` with `secret`, or with any of
    several secrets (while rotating).

    Compares in constant time, checking every secret (which one matched does not show in the
    timing). Surrounding white space and hex case in the header are ignored. An empty secret
    is refused (anyone could compute that signature).
    """
    secrets = _secrets(secret)
    if not header_value:
        return False
    given = header_value.strip().lower()
    results = [constant_time_equal(qlm_signature(body, s), given) for s in secrets]
    return any(results)


def verify_standard_webhook(body: bytes, secret: str | Iterable[str],
                            headers: Mapping[str, str], tolerance: float = 300.0,
                            now: float | None = None) -> bool:
    """True when the Standard Webhooks headers (webhook-id, webhook-timestamp,
    webhook-signature) sign `body` with `secret` (or any of several secrets, while rotating)
    and the timestamp is within `tolerance` seconds. Any of several space-separated `v1,`
    signatures may match. Secrets are read as the official libraries read them (``whsec_``
    prefix optional, base64, padding optional); one they cannot use raises ValueError."""
    keys = [standard_webhooks_key(s) for s in _secrets(secret)]
    lowered = {k.lower(): v for k, v in headers.items()}
    msg_id = lowered.get(SW_ID)
    stamp = lowered.get(SW_TIMESTAMP, "")
    given = lowered.get(SW_SIGNATURE, "").split()
    if not msg_id or not (stamp.isascii() and stamp.isdigit()) or not given:
        return False
    if abs((time.time() if now is None else now) - int(stamp)) > tolerance:
        return False
    content = f"{msg_id}.{stamp}.".encode() + body
    # Every (key, signature) pair is compared: no early exit.
    results = [constant_time_equal(sw_sign(key, content), sig) for key in keys for sig in given]
    return any(results)


def _secrets(secret: str | Iterable[str]) -> tuple[str, ...]:
    """One secret, or several while rotating (any of them is accepted)."""
    secrets = (secret,) if isinstance(secret, str) else tuple(secret)
    if not secrets or not all(secrets):
        raise ValueError("an empty secret verifies nothing; configure the shared secret")
    return secrets


def _unauthorized() -> web.Response:
    return web.json_response({"error": "invalid or missing X-QLM-Signature"}, status=401)


def signature_middleware(secret: str | Iterable[str],
                         paths: Iterable[str] | None = None) -> Any:
    """An aiohttp middleware answering 401 to requests whose signature does not match.

    `paths`: only these request paths are checked (default: every request). The raw body is
    read once; handlers can still call ``await request.read()`` / ``request.json()``.
    """
    secrets = _secrets(secret)
    only = frozenset(paths) if paths is not None else None

    @web.middleware
    async def check_signature(request: web.Request, handler: Handler) -> web.StreamResponse:
        if only is not None and request.path not in only:
            return await handler(request)
        body = await request.read()
        if not verify_signature(body, secrets, request.headers.get(SIGNATURE_HEADER)):
            return _unauthorized()
        request[VERIFIED_KEY] = True
        return await handler(request)

    return check_signature


def webhook_handler(secret: str | Iterable[str], on_event: EventCallback) -> Handler:
    """An aiohttp handler: verifies the signature (401), parses the JSON body (400 if it is
    not a JSON object), then awaits ``on_event(request, event)``; answers what it returns, or
    204 No Content."""
    secrets = _secrets(secret)

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if not verify_signature(body, secrets, request.headers.get(SIGNATURE_HEADER)):
            return _unauthorized()
        try:
            event = json.loads(body)
        except (UnicodeDecodeError, ValueError):
            event = None
        if not isinstance(event, dict):
            return web.json_response({"error": "body is not a JSON object"}, status=400)
        request[VERIFIED_KEY] = True
        response = await on_event(request, event)
        return response if response is not None else web.Response(status=204)

    return handle
