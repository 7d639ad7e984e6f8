"""`qlm-bridge run`: the process. It wires a site's services together (bridge/engine/site.py),
serves /metrics, /healthz and /readyz, handles signals (TERM/INT stop gracefully, HUP reloads
the config file) and runs the lifecycle. Delivery itself lives in bridge/engine/.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import secrets
import signal
import socket
from collections.abc import Coroutine
from typing import Any

import asyncpg

from bridge import config as config_mod
from bridge.config import DEFAULT_SITE, Config, Sites
from bridge.console import console_for
from bridge.engine.executor import describe
from bridge.engine.site import DB_ERRORS, Site
from bridge.errors import BridgeError
from bridge.listener import Listener, backoff
from bridge.observe import Metrics, current_site, serve, setup_logging

log = logging.getLogger("bridge.daemon")


class Daemon:
    """The process: one `Site` (its own services and connections) per license database."""

    def __init__(self, config: Config | Sites, config_path: str | None = None, *,
                 daemon_id: str | None = None, metrics: Metrics | None = None) -> None:
        self.sites_config = config if isinstance(config, Sites) else Sites({DEFAULT_SITE: config})
        self.config = self.sites_config.first()
        self.config_path = config_path
        self.id = daemon_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.metrics = metrics or Metrics()
        self.sites: dict[str, Site] = {name: self._new_site(name, cfg)
                                       for name, cfg in self.sites_config.configs.items()}
        self.ready = asyncio.Event()  # set once every site is connected and listening
        self.stopping = False
        self._stopped = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._reloads: set[asyncio.Future[None]] = set()

    def _new_site(self, name: str, config: Config) -> Site:
        return Site(name, config, self.id, self.metrics.site(name))

    @property
    def site(self) -> Site:
        """The first site (the only one of a config without `sites:`)."""
        return next(iter(self.sites.values()))

    @property
    def _listener(self) -> Listener | None:
        return self.site.listener

    # --- lifecycle ---------------------------------------------------------------------------

    async def run(self, install_signals: bool = False) -> None:
        if install_signals:
            self._install_signals()  # before connecting: SIGTERM must stop a daemon still waiting
        runner = None
        try:
            address = self.config.observe.address()
            if address is not None:
                runner = await serve(address[0], address[1], self.metrics, self.readiness,
                                     self.refresh_gauges,  # and the web console:
                                     console_for(self.config.observe, lambda: self.sites.values()))
            for site in self.sites.values():
                self._start(site)
            watcher = asyncio.create_task(self._watch_ready(), name="ready")
            try:
                while self._tasks:
                    done, _ = await asyncio.wait(set(self._tasks.values()),
                                                 return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        self._tasks = {n: t for n, t in self._tasks.items() if t is not task}
                        if not self.stopping:
                            self._site_ended(task)
            finally:
                watcher.cancel()
                self.stop()
                if self._tasks:
                    await asyncio.wait(set(self._tasks.values()))
        finally:
            if runner is not None:
                with contextlib.suppress(Exception):
                    await runner.cleanup()
            if install_signals:
                self._remove_signals()
            self._stopped.set()

    def _start(self, site: Site) -> None:
        self._tasks[site.name] = asyncio.create_task(self._run_site(site), name=site.name)

    def _site_ended(self, task: asyncio.Task[None]) -> None:
        """A site's task ended while the daemon runs: a config without `sites:` ends with
        it (its error is the daemon's); one of several sites never takes the others down."""
        exc = task.exception()
        if exc is not None:
            if not self.sites_config.explicit:
                raise exc
            log.error("site %s stopped: %s", task.get_name(), describe(exc))

    async def _run_site(self, site: Site) -> None:
        """Run one site. A database error while it starts (after the schema check, e.g. the
        connection lost during registration) is retried, always. With explicit sites, a site
        that cannot start (schema missing, bad credentials, ...) is retried and reported while
        the others deliver."""
        current_site.set(site.name if self.sites_config.explicit else None)
        failures = 0
        while True:
            try:
                await site.run()
                return
            except DB_ERRORS as exc:  # lost or refused while registering: it heals by waiting
                if site.stopping:
                    return
                delay = backoff(failures, base=1.0, cap=self.config.daemon.reconnect_max_delay)
                failures += 1
                site.problem = f"database error while starting: {describe(exc)}"
                log.warning("%s; retrying in %.1f s", site.problem, delay)
                if await site.sleep_unless_stopping(max(delay, 0.5)):
                    return
            except BridgeError as exc:
                if not self.sites_config.explicit or site.stopping:
                    raise
                delay = backoff(failures, base=1.0, cap=self.config.daemon.reconnect_max_delay)
                failures += 1
                site.problem = describe(exc) if not str(exc) else str(exc)
                log.error("site %s cannot start: %s; retrying in %.1f s", site.name, exc, delay)
                if await site.sleep_unless_stopping(max(delay, 0.5)):
                    return

    async def _watch_ready(self) -> None:
        await asyncio.gather(*(s.ready.wait() for s in self.sites.values()))
        self.ready.set()
        settle_garbage_collector()


    def stop(self) -> None:
        """Ask for a graceful stop (idempotent; safe from a signal handler)."""
        if not self.stopping:
            log.info("stopping: finishing in-flight deliveries (at most %g s)",
                     self.config.daemon.shutdown_timeout)
        self.stopping = True
        for site in self.sites.values():
            site.stop()

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

    # --- reload ------------------------------------------------------------------------------

    async def reload(self) -> None:
        """SIGHUP: re-read the config file; an invalid edit keeps the running config. A site
        added starts, a site removed stops gracefully, a site changed applies its change."""
        if self.config_path is None:
            log.warning("reload requested but the daemon has no config file")
            return
        try:
            new = config_mod.load_sites(self.config_path)
        except BridgeError as exc:
            log.error("reload failed, keeping the running config: %s", exc)
            return
        if new.first().observe != self.config.observe:
            log.warning("observe.* changes need a restart; applying the rest")
        removed = [n for n in self.sites if n not in new.configs]
        for name in removed:
            log.info("site %s removed from the config: stopping it", name)
            self.sites.pop(name).stop()
        for name, cfg in new.configs.items():
            site = self.sites.get(name)
            if site is None:
                log.info("site %s added to the config: starting it", name)
                self.sites[name] = site = self._new_site(name, cfg)
                self._start(site)
            else:
                await site.reload(cfg)
        self.sites_config = new
        self.config = new.first()

    # --- health ------------------------------------------------------------------------------

    async def readiness(self, name: str | None = None
                        ) -> tuple[bool, str, dict[str, tuple[bool, str]]] | None:
        """Every enabled site ready (or the one named): (ready, detail, per site)."""
        if name is not None and name not in self.sites:
            return None
        chosen = [self.sites[name]] if name is not None else list(self.sites.values())
        answers = await asyncio.gather(*(s.readiness() for s in chosen))
        per_site = {s.name: a for s, a in zip(chosen, answers, strict=True)}
        waiting = [f"{n}: {d}" for (n, (ok, d)), s in zip(per_site.items(), chosen, strict=True)
                   if not ok and s.config.webhooks.enabled]
        if len(per_site) == 1:
            ok, detail = next(iter(per_site.values()))
            return ok, detail, per_site
        if waiting:
            return False, "; ".join(waiting), per_site
        return True, f"{len(per_site)} site(s) ready", per_site

    async def refresh_gauges(self) -> None:
        for site in self.sites.values():
            with contextlib.suppress(Exception):  # a site that is down keeps its last values
                await site.refresh_gauges()


def settle_garbage_collector() -> None:
    """Exempt everything made while starting (modules, config, pools, sessions: about 70,000
    objects) from the cyclic garbage collector's full passes. Walking them took ~28 ms on the
    2-core machine, a pause that every delivery in flight then waited out (P3's worst
    latencies); they live as long as the daemon anyway."""
    gc.collect()
    gc.freeze()


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


def main(config: Config | Sites, config_path: str | None) -> None:
    """`qlm-bridge run`: log setup, the event loop, signals."""
    first = config.first() if isinstance(config, Sites) else config
    setup_logging(first.observe.log_format, first.observe.log_level)
    daemon = Daemon(config, config_path)
    try:
        run_loop(daemon.run(install_signals=True))
    except (OSError, asyncpg.PostgresError) as exc:
        raise BridgeError(f"cannot start: {describe(exc)}") from None
