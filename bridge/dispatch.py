"""HTTP delivery: one shared aiohttp session, timeouts, bounded response reads, outcome
classification. Concurrency limits are the daemon's (it claims only what it can start)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver

from bridge.config import WebhooksConfig
from bridge.retry import parse_retry_after


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one HTTP invocation came to."""

    ok: bool
    status: int | None
    error: str | None
    response_body: str | None
    duration_ms: float
    retry_after: float | None = None
    location: str | None = None  # a redirect's target (never followed), for send-test


_CONTROL = {i: f"\\x{i:02x}" for i in range(32) if i not in (9,)}
_CONTROL[127] = "\\x7f"


_MARK = "…[truncated]"
# Bodies from this size on are streamed from a buffer: aiohttp warns (ResourceWarning) that a
# large bytes body blocks the event loop, which an error filter turns into a failed attempt.
_LARGE = 512 * 1024


def sanitize(text: str, limit: int) -> str:
    """Escape control characters (no log injection), then bound the length: the result is at
    most `limit` characters plus the truncation mark, however many characters were escaped."""
    text = text[:limit + 1].translate(_CONTROL)  # escaping at most quadruples the length
    if len(text) <= limit:
        return text
    cut = text[:limit]
    tail = cut.rfind("\\x", max(0, limit - 3))
    if tail != -1:  # never leave half an escape sequence
        cut = cut[:tail]
    return cut + _MARK


class BlockedAddress(aiohttp.ClientError):
    pass


def _is_blocked(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return bool(ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                or ip.is_reserved or ip.is_unspecified)


class GuardedResolver(AbstractResolver):
    """Resolves, then refuses private, loopback and link-local addresses (opt-in guard)."""

    def __init__(self) -> None:
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[Any]:
        infos = await self._inner.resolve(host, port, family)
        for info in infos:
            if _is_blocked(info["host"]):
                raise BlockedAddress(f"{host} resolves to a blocked address {info['host']}")
        return list(infos)

    async def close(self) -> None:
        await self._inner.close()


def ssl_context(cfg: WebhooksConfig) -> ssl.SSLContext:
    """Certificates are always verified; `ca_bundle` adds a custom CA file."""
    return ssl.create_default_context(cafile=cfg.ca_bundle) if cfg.ca_bundle else \
        ssl.create_default_context()


class Dispatcher:
    def __init__(self, cfg: WebhooksConfig) -> None:
        self.cfg = cfg
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    async def start(self) -> None:
        resolver: AbstractResolver | None = GuardedResolver() if self.cfg.block_private_addresses \
            else None
        connector = aiohttp.TCPConnector(
            limit=self.cfg.max_concurrency + 8, limit_per_host=0, ssl=ssl_context(self.cfg),
            resolver=resolver, keepalive_timeout=30, enable_cleanup_closed=False,
        )
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, skip_auto_headers=("Accept-Encoding",),
            timeout=aiohttp.ClientTimeout(total=self.cfg.timeout),
            cookie_jar=aiohttp.DummyCookieJar(),  # a webhook sender keeps no cookies
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _timeout(self, seconds: float) -> aiohttp.ClientTimeout:
        found = self._timeouts.get(seconds)
        if found is None:
            found = self._timeouts[seconds] = aiohttp.ClientTimeout(total=seconds)
        return found

    async def post(self, url: str, body: bytes, headers: dict[str, str],
                   timeout: float | None = None) -> Outcome:
        """POST once; `timeout` (seconds) overrides webhooks.timeout for this request."""
        assert self._session is not None, "Dispatcher.start() first"
        limit = self.cfg.max_response_body
        seconds = self.cfg.timeout if timeout is None else timeout
        start = time.perf_counter()
        try:
            if self.cfg.block_private_addresses:
                host = urlsplit(url).hostname or ""
                if _is_blocked(host):
                    raise BlockedAddress(f"{host} is a blocked address")
            data: bytes | io.BytesIO = body if len(body) < _LARGE else io.BytesIO(body)
            async with self._session.post(url, data=data, headers=headers,
                                          allow_redirects=False,
                                          timeout=self._timeout(seconds)) as resp:
                raw = await resp.content.read(limit + 1) if limit else b""
                status = resp.status
                text = sanitize(raw.decode("utf-8", "replace"), limit) if raw else None
                retry_after = parse_retry_after(resp.headers.get("Retry-After")) \
                    if status in (429, 503) else None
                location = resp.headers.get("Location") if 300 <= status < 400 else None
        except TimeoutError:
            return self._fail(start, f"timeout after {seconds:g} s")
        except BlockedAddress as exc:
            return self._fail(start, f"blocked: {exc}")
        except aiohttp.ClientError as exc:
            return self._fail(start, f"{type(exc).__name__}: {exc}")
        except OSError as exc:
            return self._fail(start, f"{type(exc).__name__}: {exc}")
        duration = (time.perf_counter() - start) * 1000
        ok = 200 <= status < 300
        error = None if ok else (f"redirect not followed (HTTP {status})"
                                 if 300 <= status < 400 else f"HTTP {status}")
        return Outcome(ok, status, error, text, duration, retry_after, location)

    @staticmethod
    def _fail(start: float, error: str) -> Outcome:
        return Outcome(False, None, sanitize(error, 500), None,
                       (time.perf_counter() - start) * 1000)


async def close_quietly(dispatcher: Dispatcher) -> None:
    with contextlib.suppress(TimeoutError, OSError):
        await asyncio.wait_for(dispatcher.close(), 5)
