"""`qlm-bridge run`: the process. It wires a site's services together (bridge/engine/site.py),
serves /metrics, /healthz and /readyz, handles signals (TERM/INT stop gracefully, HUP reloads
the config file) and runs the lifecycle. Delivery itself lives in bridge/engine/.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
from collections.abc import Coroutine
from typing import Any

import asyncpg

from bridge import config as config_mod
from bridge.config import Config
from bridge.engine.executor import describe
from bridge.engine.site import Site
from bridge.errors import BridgeError
from bridge.listener import Listener
from bridge.observe import Metrics, serve, setup_logging

log = logging.getLogger("bridge.daemon")


class Daemon:
    def __init__(self, config: Config, config_path: str | None = None, *,
                 daemon_id: str | None = None, metrics: Metrics | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.id = daemon_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.metrics = metrics or Metrics()
        self.site = Site("default", config, self.id, self.metrics)
        self.ready = self.site.ready  # set once connected and listening
        self.stopping = False
        self._stopped = asyncio.Event()
        self._reloads: set[asyncio.Future[None]] = set()

    @property
    def _listener(self) -> Listener | None:
        return self.site.listener

    async def run(self, install_signals: bool = False) -> None:
        if install_signals:
            self._install_signals()  # before connecting: SIGTERM must stop a daemon still waiting
        runner = None
        try:
            address = self.config.observe.address()
            if address is not None:
                runner = await serve(address[0], address[1], self.metrics, self.site.readiness,
                                     self.site.refresh_gauges)
            await self.site.run()
        finally:
            if runner is not None:
                with contextlib.suppress(Exception):
                    await runner.cleanup()
            if install_signals:
                self._remove_signals()
            self._stopped.set()

    def stop(self) -> None:
        """Ask for a graceful stop (idempotent; safe from a signal handler)."""
        if not self.stopping:
            log.info("stopping: finishing in-flight deliveries (at most %g s)",
                     self.config.daemon.shutdown_timeout)
        self.stopping = True
        self.site.stop()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.add_signal_handler(signal.SIGINT, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload_soon)

    def _remove_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)

    def _reload_soon(self) -> None:
        future = asyncio.ensure_future(self.reload())  # keep a reference until it is done
        self._reloads.add(future)
        future.add_done_callback(self._reloads.discard)

    async def reload(self) -> None:
        """SIGHUP: re-read the config file; an invalid edit keeps the running config."""
        if self.config_path is None:
            log.warning("reload requested but the daemon has no config file")
            return
        try:
            new = config_mod.load(self.config_path)
        except BridgeError as exc:
            log.error("reload failed, keeping the running config: %s", exc)
            return
        if await self.site.reload(new):
            self.config = self.site.config


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where it is installed (a faster event loop and socket transport: the
    daemon spends most of its time in them), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def main(config: Config, config_path: str | None) -> None:
    """`qlm-bridge run`: log setup, the event loop, signals."""
    setup_logging(config.observe.log_format, config.observe.log_level)
    daemon = Daemon(config, config_path)
    try:
        run_loop(daemon.run(install_signals=True))
    except (OSError, asyncpg.PostgresError) as exc:
        raise BridgeError(f"cannot start: {describe(exc)}") from None
