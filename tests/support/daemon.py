"""The daemon, two ways: in this event loop (`running`, a `bridge.daemon.Daemon`) or as a real
`python -m bridge run --config FILE` child process (`DaemonProcess`: its output in a log file,
signals, exit codes, SIGKILL, RSS)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from bridge.config import Config, Sites
from bridge.daemon import Daemon
from tests.support.config import write_config
from tests.support.server import query

ROOT = Path(__file__).resolve().parents[2]


async def wait_until(predicate: Callable[[], bool], timeout: float = 20.0,
                     what: str = "condition") -> None:
    """Poll `predicate` (every 50 ms) until it holds; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running(cfg: Config | Sites) -> AsyncIterator[Daemon]:
    """A daemon in this event loop; stopped (gracefully) on exit."""
    d = Daemon(cfg)
    task = asyncio.create_task(d.run())
    ready = asyncio.create_task(d.ready.wait())
    await asyncio.wait({task, ready}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    if task.done():
        task.result()  # raise what stopped it
    assert d.ready.is_set(), "daemon did not start"
    try:
        yield d
    finally:
        d.stop()
        await asyncio.wait_for(task, 20)


class DaemonProcess:
    """`python -m bridge run` in a child process; stdout and stderr go to `<name>.log`."""

    def __init__(self, workdir: Path, config: dict[str, Any] | str,
                 name: str = "daemon") -> None:
        self.workdir = workdir
        self.config_path = workdir / f"{name}.yaml"
        self.log_path = workdir / f"{name}.log"
        self.write_config(config)
        self.proc: subprocess.Popen[bytes] | None = None
        self.rss_samples: list[int] = []

    def write_config(self, config: dict[str, Any] | str) -> None:
        """(Re)write the config file atomically (then SIGHUP reloads it)."""
        write_config(self.config_path, config)

    def start(self) -> DaemonProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("QLM_BRIDGE_")}
        env["PYTHONPATH"] = str(ROOT)
        env["PYTHONUNBUFFERED"] = "1"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bridge", "run", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=str(ROOT))
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def count(self, text: str) -> int:
        """In how many log lines `text` appears."""
        return sum(text in line for line in self.log().splitlines())

    async def wait_log(self, text: str, timeout: float = 15.0, occurrences: int = 1) -> None:
        """Wait until `text` has appeared in `occurrences` log lines."""
        deadline = time.monotonic() + timeout
        while self.count(text) < occurrences:
            if time.monotonic() > deadline or not self.alive:
                if self.count(text) >= occurrences:
                    return
                raise AssertionError(f"no {text!r} in the daemon's log:\n{self.log()[-4000:]}")
            await asyncio.sleep(0.05)

    async def wait_ready(self, dsn: str, schema: str = "qlm_bridge", timeout: float = 20) -> None:
        """Wait until the daemon has registered itself in `<schema>.daemon`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                code = self.proc.returncode if self.proc is not None else None
                raise AssertionError(f"daemon exited ({code}): {self.log()[-4000:]}")
            with contextlib.suppress(Exception):
                rows = await asyncio.to_thread(
                    query, dsn, f'SELECT 1 FROM "{schema}".daemon WHERE pid = %s', (self.pid,))
                if rows:
                    return
            await asyncio.sleep(0.05)
        raise AssertionError(f"daemon not ready after {timeout:g} s: {self.log()[-4000:]}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL (no-op when it has exited)."""
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    async def wait(self, timeout: float = 20.0) -> int:
        """The exit code; fails the test (and kills it) if it does not exit in time."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(
                    f"daemon did not exit within {timeout:g} s:\n{self.log()[-4000:]}")
            await asyncio.sleep(0.05)
        return int(self.proc.returncode)

    async def terminate(self, timeout: float = 15) -> int:
        """SIGTERM, then SIGKILL after `timeout`; the exit code."""
        if self.proc is None:
            return 0
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.alive and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.kill()
        return int(self.proc.returncode or 0)

    def _status_kb(self, key: str) -> int:
        """A `VmRSS:`-style figure from /proc/PID/status, in kB (0 when gone)."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(key):
                    return int(line.split()[1])
        except (OSError, AssertionError):
            pass
        return 0

    def rss_kb(self) -> int:
        return self._status_kb("VmRSS:")

    def peak_rss_kb(self) -> int:
        """The kernel's high-water mark (VmHWM): no sampler can miss the peak."""
        return self._status_kb("VmHWM:")

    def open_fds(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return 0

    def sample(self) -> None:
        rss = self.rss_kb()
        if rss:
            self.rss_samples.append(rss)


async def sampling(daemons: Callable[[], list[DaemonProcess]], every: float = 0.2) -> None:
    """Sample the RSS of the daemons until cancelled."""
    while True:
        for d in daemons():
            d.sample()
        await asyncio.sleep(every)
