"""The web console: deliveries, events and replay in a browser, served beside /metrics.

`console_for(config, pool)` is all the daemon calls; it returns None when no
`observe.console_token` is set (then no /console path exists). Several sites (license
databases) can be shown by building a `Console` from several `ConsoleSource`s.
"""

from __future__ import annotations

import ipaddress
import logging

import asyncpg

from bridge.config import Config
from bridge.console.data import ConsoleSource, EndpointState, source_from_config
from bridge.console.web import Console

__all__ = ["Console", "ConsoleSource", "EndpointState", "console_for", "source_from_config"]

log = logging.getLogger("bridge.console")


def console_for(config: Config, pool: asyncpg.Pool, site: str = "default") -> Console | None:
    """The console for one configured database, or None without observe.console_token."""
    token = config.observe.console_token
    address = config.observe.address()
    if token is None or address is None:
        return None
    if not _loopback(address[0]):
        log.warning("console: served on %s over plain HTTP; put it behind a TLS proxy or bind "
                    "observe.listen to 127.0.0.1", config.observe.listen)
    return Console([source_from_config(site, pool, config)], token,
                   read_only=config.observe.console_read_only)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
