"""Console authentication: the Bearer token, signed session cookies and CSRF tokens.

Stateless: a session cookie is ``expiry.nonce.signature``, signed with a key derived from the
console token, so a new token ends every session and a restart ends none. A CSRF token is an
HMAC of the session cookie. Every comparison is constant-time. Failed logins (form or Bearer)
are slowed down: one at a time, each held for `failure_delay` seconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

COOKIE = "qlm_console"
SESSION_SECONDS = 12 * 3600
FAILURE_DELAY = 1.0


def _sign(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Auth:
    token: str
    failure_delay: float = FAILURE_DELAY

    @property
    def _key(self) -> bytes:
        return hmac.new(self.token.encode(), b"qlm-bridge console session v1",
                        hashlib.sha256).digest()

    def token_matches(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.token.encode())

    def new_session(self, now: float | None = None) -> str:
        expiry = int((time.time() if now is None else now) + SESSION_SECONDS)
        body = f"{expiry}.{secrets.token_hex(16)}"
        return f"{body}.{_sign(self._key, body)}"

    def session_valid(self, cookie: str, now: float | None = None) -> bool:
        body, _, signature = cookie.rpartition(".")
        expiry, _, _nonce = body.partition(".")
        if not hmac.compare_digest(signature.encode(), _sign(self._key, body).encode()):
            return False
        return expiry.isdigit() and int(expiry) > (time.time() if now is None else now)

    def csrf_token(self, cookie: str) -> str:
        return _sign(self._key, "csrf." + cookie)

    def csrf_valid(self, cookie: str, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.csrf_token(cookie).encode())


class Throttle:
    """Failed attempts wait their turn and then `delay` seconds: at most one per `delay`."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self._lock = asyncio.Lock()

    async def failed(self) -> None:
        async with self._lock:
            await asyncio.sleep(self.delay)
