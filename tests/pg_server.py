"""A throw-away PostgreSQL server for the tests (Debian's ``postgresql`` package).

``initdb`` runs into a fresh temporary directory as an unprivileged user (``postgres`` when the
tests run as root: PostgreSQL refuses to run as root), the server listens on a free loopback
port with its Unix socket inside that directory, and :meth:`PgServer.stop` stops it and removes
the directory. ``scripts/setup.sh --dev`` installs the package.
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path


def pg_bindir() -> Path | None:
    """``$METAALIGNER_PG_BINDIR`` (a folder holding ``initdb`` and ``pg_ctl``, for installs outside
    Debian's layout), else the newest ``/usr/lib/postgresql/N/bin``; None where there is none."""
    if os.environ.get("METAALIGNER_PG_BINDIR"):
        given = Path(os.environ["METAALIGNER_PG_BINDIR"])
        return given if (given / "initdb").is_file() else None
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3])
                   if Path(p).parts[-3].isdigit() else 0)
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PgServer:
    bindir: Path
    root: Path
    port: int
    user: str = "postgres"
    started: bool = False

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    def _run(self, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
        cmd = [str(a) for a in args]
        if os.geteuid() == 0:  # PostgreSQL will not run as root
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)

    @classmethod
    def start(cls) -> "PgServer":
        bindir = pg_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (scripts/setup.sh --dev installs Debian's postgresql)")
        root = Path(tempfile.mkdtemp(prefix="ma-pg-"))
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
        server = cls(bindir=bindir, root=root, port=_free_port())
        try:
            p = server._run(bindir / "initdb", "-D", server.datadir, "-U", server.user, "--auth=trust",
                            "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync")
            if p.returncode != 0:
                raise RuntimeError(f"initdb failed: {p.stderr.strip()[-500:]}")
            opts = (f"-c listen_addresses=127.0.0.1 -p {server.port} -k {root} -c fsync=off "
                    "-c max_connections=200 -c shared_buffers=32MB")
            p = server._run(bindir / "pg_ctl", "-D", server.datadir, "-o", opts, "-l", root / "server.log",
                            "-w", "-t", "60", "start")
            if p.returncode != 0:
                log = (root / "server.log").read_text(errors="replace")[-800:] if (root / "server.log").exists() else ""
                raise RuntimeError(f"pg_ctl start failed: {p.stderr.strip()[-300:]} {log}")
            server.started = True
        except BaseException:
            server.stop()
            raise
        return server

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres",
                             autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql)

    def create_database(self) -> str:
        name = "t_" + uuid.uuid4().hex[:12]
        self._admin(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        try:
            if self.started:
                self._run(self.bindir / "pg_ctl", "-D", self.datadir, "-m", "immediate", "-w", "stop", timeout=60)
                self.started = False
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
