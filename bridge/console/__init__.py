"""The web console: deliveries, events and replay in a browser, served beside /metrics.

`console_for(observe, sites)` is all the daemon calls; it returns None when no
`observe.console_token` is set (then no /console path exists). `sites` returns the daemon's
sites as they are at each request (sites come and go on reload, and connect later than the
listener starts); a selector appears when there is more than one.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable
from typing import Protocol

import asyncpg

from bridge.config import Config, ObserveConfig
from bridge.console.data import ConsoleSource
from bridge.console.web import Console

__all__ = ["Console", "ConsoleSource", "SiteView", "console_for"]

log = logging.getLogger("bridge.console")


class SiteView(Protocol):
    """What the console reads of a daemon site (bridge.engine.site.Site has these)."""

    name: str
    pool: asyncpg.Pool | None
    problem: str | None

    @property
    def config(self) -> Config: ...


def console_for(observe: ObserveConfig,
                sites: Callable[[], Iterable[SiteView]]) -> Console | None:
    """The console over the daemon's sites, or None without observe.console_token."""
    token = observe.console_token
    address = observe.address()
    if token is None or address is None:
        return None
    if not _loopback(address[0]):
        log.warning("console: served on %s over plain HTTP; put it behind a TLS proxy or bind "
                    "observe.listen to 127.0.0.1", observe.listen)

    def sources() -> list[ConsoleSource]:
        return [ConsoleSource(s.name, s.pool, s.config, s.problem) for s in sites()]

    return Console(sources, token, read_only=observe.console_read_only)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
