"""Run `qlm-bridge run --config FILE` as a real subprocess for tests: a YAML config written to a
temporary directory, stderr collected line by line, signals, exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml

# Short intervals, as in conftest.base_config.
_BASE: dict[str, Any] = {
    "webhooks": {"secret_key": "test-secret", "retry_interval": 0.2, "timeout": 2,
                 "max_retries": 2},
    "daemon": {"poll_interval": 0.5, "lease": 5, "heartbeat_interval": 0.5,
               "shutdown_timeout": 2, "reconnect_max_delay": 0.5},
}


def config_data(dsn: str, **sections: Any) -> dict[str, Any]:
    """The test config as plain data (sections merged one level deep)."""
    data: dict[str, Any] = {"database": {"dsn": dsn}, **{k: dict(v) for k, v in _BASE.items()}}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def write_config(path: Path, data: dict[str, Any] | str) -> Path:
    """Write a config atomically (a reload never reads half a file)."""
    text = data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


class DaemonProc:
    """One `python -m bridge run` subprocess."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.lines: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._new_line = asyncio.Event()

    async def start(self) -> DaemonProc:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("QLM_BRIDGE_CONFIG", None)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", "run", "--config", str(self.config_path),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env=env)
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while True:
            line = await self.proc.stderr.readline()
            if not line:
                self._new_line.set()
                return
            self.lines.append(line.decode("utf-8", "replace").rstrip("\n"))
            self._new_line.set()

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)

    async def wait_log(self, text: str, timeout: float = 15.0, occurrences: int = 1) -> None:
        """Wait until `text` has appeared in `occurrences` stderr lines."""
        deadline = time.monotonic() + timeout
        while self.count(text) < occurrences:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (self.proc is not None and self.proc.returncode is not None
                                  and self._reader is not None and self._reader.done()):
                raise AssertionError(f"no {text!r} in the daemon's stderr:\n{self.stderr}")
            self._new_line.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new_line.wait(), min(remaining, 0.2))

    def send(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 20.0) -> int:
        """The exit code (fails the test if the process does not exit in time)."""
        assert self.proc is not None
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise AssertionError(
                f"daemon did not exit within {timeout} s:\n{self.stderr}") from None
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 5)
        return code

    async def close(self) -> None:
        """Make sure the process is gone (test teardown)."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
