"""PgBouncer in transaction mode in front of the test server, when Debian's package is installed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

import pytest

BINARY = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


@contextlib.asynccontextmanager
async def transaction_pooler(server_url: str, work: Path) -> AsyncIterator[str]:
    """PgBouncer (pool_mode = transaction) on a free 127.0.0.1 port, forwarding every database to the server
    of `server_url`; yields `server_url` pointed at it. Skips the test where PgBouncer is not installed."""
    config, port, url = _configure(server_url, work)
    run_as = ["-u", "nobody"] if os.geteuid() == 0 else []  # it refuses to run as root
    with (work / "pgbouncer.log").open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            BINARY, *run_as, str(config), stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL
        )
    try:
        for _ in range(100):
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            await asyncio.sleep(0.05)
        yield url
    finally:
        process.terminate()
        await process.wait()


def _configure(server_url: str, work: Path) -> tuple[Path, int, str]:
    if not Path(BINARY).exists():
        pytest.skip("PgBouncer is not installed (Debian: apt install pgbouncer)")
    parts = urlsplit(server_url)
    socket_dir = parse_qs(parts.query).get("host", [None])[0]
    host = socket_dir or parts.hostname or "127.0.0.1"
    user = parts.username or "postgres"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    work.mkdir(parents=True, exist_ok=True)
    config = work / "pgbouncer.ini"
    config.write_text(
        "[databases]\n"
        f"* = host={host} port={parts.port or 5432} user={user}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        "auth_type = any\npool_mode = transaction\nmax_client_conn = 1000\ndefault_pool_size = 40\n"
        "ignore_startup_parameters = extra_float_digits\n"
        "idle_transaction_timeout = 10\n"  # as deploy/README.md asks: no frozen client holds row locks
    )
    config.chmod(0o644)
    return config, port, urlunsplit((parts.scheme, f"{user}@127.0.0.1:{port}", parts.path, "", ""))
