"""A real PgBouncer (the `pgbouncer` binary, Debian's package in CI) in front of the test
server: a generated ini on a free loopback port, its own temporary directory, stopped on exit.

As root it runs as the `postgres` OS user (PgBouncer refuses to run as root), else as the
current user. Clients authenticate with `trust`; PgBouncer logs in to the server as the client's
user, with the password of the test server's DSN when it has one.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import psycopg

from tests.support.net import free_port

RUN_AS = "postgres"  # the OS user PgBouncer runs as when the tests run as root


def binary() -> str | None:
    """The pgbouncer executable, if installed (Debian puts it in /usr/sbin)."""
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/bin")


@dataclass
class PgBouncer:
    port: int
    directory: Path
    server_dsn: str
    proc: subprocess.Popen[bytes]

    def dsn(self, database: str) -> str:
        """The test server's DSN for `database`, through PgBouncer."""
        parts = urlsplit(self.server_dsn)
        netloc = parts.netloc.rpartition("@")
        auth = netloc[0] + "@" if netloc[1] else ""
        return urlunsplit(parts._replace(netloc=f"{auth}127.0.0.1:{self.port}",
                                         path="/" + database))

    def log(self) -> str:
        return (self.directory / "pgbouncer.log").read_text(errors="replace")

    def warm(self, database: str, connections: int = 3) -> None:
        """Open `connections` server connections for `database` at once (each client holds a
        transaction), so PgBouncer has that many to hand out in turn afterwards."""
        with contextlib.ExitStack() as stack:
            for _ in range(connections):
                conn = stack.enter_context(psycopg.connect(self.dsn(database),
                                                           prepare_threshold=None))
                conn.execute("SELECT 1")  # psycopg opened a transaction: the server is held

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def _ini(server_dsn: str, port: int, directory: Path, pool_mode: str) -> str:
    parts = urlsplit(server_dsn)
    return f"""\
[databases]
* = host={parts.hostname or "127.0.0.1"} port={parts.port or 5432}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {directory / "userlist.txt"}
pool_mode = {pool_mode}
; hand idle server connections out in turn, not last-used first: a client's next transaction
; lands on another server whenever there is one, so lost prepared statements show at once
server_round_robin = 1
default_pool_size = 10
max_client_conn = 200
ignore_startup_parameters = extra_float_digits
"""


@contextlib.contextmanager
def running(server_dsn: str, pool_mode: str = "transaction",
            timeout: float = 15.0) -> Iterator[PgBouncer]:
    """Start PgBouncer in front of the server of `server_dsn`; stop it on exit."""
    exe = binary()
    if exe is None:
        raise RuntimeError("pgbouncer is not installed")
    directory = Path(tempfile.mkdtemp(prefix="qlmb-pgbouncer-"))
    port = free_port()
    parts = urlsplit(server_dsn)
    user, password = unquote(parts.username or "postgres"), unquote(parts.password or "")
    (directory / "pgbouncer.ini").write_text(_ini(server_dsn, port, directory, pool_mode))
    (directory / "userlist.txt").write_text(f'"{user}" "{password}"\n')
    command = [exe]
    if os.geteuid() == 0:
        account = pwd.getpwnam(RUN_AS)
        for path in (directory, *directory.iterdir()):
            os.chown(path, account.pw_uid, account.pw_gid)
        command += ["-u", RUN_AS]
    with open(directory / "pgbouncer.log", "wb") as log:
        proc = subprocess.Popen([*command, str(directory / "pgbouncer.ini")],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    bouncer = PgBouncer(port, directory, server_dsn, proc)
    try:
        _wait_listening(bouncer, timeout)
        yield bouncer
    finally:
        bouncer.stop()


def _wait_listening(bouncer: PgBouncer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if bouncer.proc.poll() is not None:
            raise RuntimeError(f"pgbouncer exited with {bouncer.proc.returncode}:\n"
                               f"{bouncer.log()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", bouncer.port),
                                                                     timeout=1):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"pgbouncer did not listen within {timeout} s:\n{bouncer.log()}")
        time.sleep(0.05)
