"""The benchmark's surroundings: a PostgreSQL server (embedded by default), throwaway databases
cloned from a template, daemon/receiver subprocesses that are always killed, /proc readings.
The server, the base config, the receiver and the daemon process come from tests.support, which
the test suite uses too."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bridge import config as config_mod
from bridge.config import DaemonConfig
from tests.support.config import config_data
from tests.support.daemon import DaemonProcess
from tests.support.net import free_port
from tests.support.server import Server, install_bridge, install_sample_schema, provision

__all__ = ["Server", "free_port"]

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- processes -------------------------------------------------------------------------------

@dataclass
class Procs:
    """Every subprocess the harness starts; `close()` ends them all (TERM, then KILL)."""

    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spawn(self, args: list[str], log: Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        out = log.open("ab") if log is not None else subprocess.DEVNULL
        try:
            p = subprocess.Popen(args, stdout=subprocess.PIPE if log is None else out,
                                 stderr=out, stdin=subprocess.DEVNULL, cwd=ROOT,
                                 env={**os.environ, **(env or {})})
        finally:
            if log is not None and not isinstance(out, int):
                out.close()
        self.started.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes], timeout: float = 15.0) -> int | None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        with contextlib.suppress(ValueError):
            self.started.remove(p)
        return p.returncode

    def close(self) -> None:
        for p in list(self.started):
            with contextlib.suppress(Exception):
                self.stop(p, timeout=5)


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def postgres_cpu_seconds(postmaster_pid: int | None) -> float:
    """CPU of the postmaster and all its children (backends, walwriter, ...)."""
    if postmaster_pid is None:
        return 0.0
    total = cpu_seconds(postmaster_pid)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == postmaster_pid:
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


# --- HTTP helpers (stdlib, loopback only) ------------------------------------------------------

def http_json(url: str, method: str = "GET", timeout: float = 10.0) -> Any:
    assert urlsplit(url).hostname == "127.0.0.1"
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode()


def wait_http(url: str, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None
              ) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout} s ({last})")


# --- receiver -----------------------------------------------------------------------------------

@dataclass
class Receiver:
    port: int
    proc: subprocess.Popen[bytes]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stats(self) -> dict[str, Any]:
        return dict(http_json(self.url("/stats")))

    def reset(self) -> None:
        http_json(self.url("/reset"), "POST")

    def count(self, path: str) -> int:
        return int(self.stats()["paths"].get(path, {}).get("count", 0))

    def wait_count(self, path: str, n: int, timeout: float) -> dict[str, Any]:
        """Wait until `path` received n requests; return its stats (count may fall short)."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()["paths"].get(path, {"count": 0, "first": 0.0, "last": 0.0,
                                                  "body_bytes": 0})
            if s["count"] >= n or time.monotonic() > deadline:
                return dict(s)
            time.sleep(0.05)


def start_receiver(procs: Procs, workdir: Path) -> Receiver:
    port = free_port()
    p = procs.spawn([sys.executable, "-m", "tests.support.receiver", str(port)],
                    log=workdir / "receiver.log")
    wait_http(f"http://127.0.0.1:{port}/stats", proc=p)
    return Receiver(port, p)


# --- PostgreSQL ----------------------------------------------------------------------------------

@contextlib.contextmanager
def server(dsn: str | None) -> Iterator[Server]:
    """The server in `dsn`, else an embedded one (never Docker: figures need a local server)."""
    with provision(dsn, docker=False) as s:
        yield s


# The benchmark's policy over the one base config: production-like intervals and defaults.
BENCH: dict[str, dict[str, Any]] = {
    "webhooks": {"secret_key": "bench-secret", "timeout": 5, "max_retries": 3,
                 "retry_interval": 1},
    "daemon": {"poll_interval": 2.0, "heartbeat_interval": 1.0, "shutdown_timeout": 3,
               "reconnect_max_delay": 1.0, "lease": DaemonConfig().lease},
    "observe": {"log_level": "warning"},
    "retention": {"prune_interval": 0},
}


def base_config(dsn: str, **sections: Any) -> dict[str, Any]:
    merged = {k: {**BENCH.get(k, {}), **v} for k, v in sections.items()}
    return config_data(dsn, **{**BENCH, **merged})


@dataclass
class Databases:
    """Throwaway databases cloned from two templates (bridge installed / sample schema only)."""

    server: Server
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    created: list[str] = field(default_factory=list)

    @property
    def with_bridge(self) -> str:
        return f"bench_tpl_b_{self.run}"

    @property
    def without_bridge(self) -> str:
        return f"bench_tpl_p_{self.run}"

    def prepare(self) -> None:
        self.server.execute(f"CREATE DATABASE {self.with_bridge}")
        self.created.append(self.with_bridge)
        install_bridge(self.server.dsn(self.with_bridge))
        self.server.execute(f"CREATE DATABASE {self.without_bridge}")
        self.created.append(self.without_bridge)
        install_sample_schema(self.server.dsn(self.without_bridge))

    def clone(self, bridge: bool = True) -> str:
        name = f"bench_{self.run}_{len(self.created)}"
        tpl = self.with_bridge if bridge else self.without_bridge
        self.server.execute(f"CREATE DATABASE {name} TEMPLATE {tpl}")
        self.created.append(name)
        return self.server.dsn(name)

    def drop(self, dsn: str) -> None:
        name = urlsplit(dsn).path.lstrip("/")
        with contextlib.suppress(Exception):
            self.server.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        with contextlib.suppress(ValueError):
            self.created.remove(name)

    def close(self) -> None:
        for name in reversed(self.created):
            with contextlib.suppress(Exception):
                self.server.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        self.created.clear()


# --- daemons --------------------------------------------------------------------------------------

@dataclass
class Daemon:
    process: DaemonProcess
    port: int

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        assert self.process.proc is not None
        return self.process.proc

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log(self) -> Path:
        return self.process.log_path


def start_daemon(procs: Procs, workdir: Path, data: dict[str, Any], wait: bool = True,
                 name: str = "daemon") -> Daemon:
    port = free_port()
    data = {**data, "observe": {**data.get("observe", {}), "listen": f"127.0.0.1:{port}"}}
    config_mod.parse_sites(data, "<bench config>", env={})  # fail early on a bad config
    d = Daemon(DaemonProcess(workdir, data, name=f"{name}-{port}").start(), port)
    procs.started.append(d.proc)
    if wait:
        wait_http(f"http://127.0.0.1:{port}/readyz", timeout=30, proc=d.proc)
    return d
