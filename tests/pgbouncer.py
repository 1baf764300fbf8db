"""PgBouncer in transaction mode in front of the test server, when Debian's package is installed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.tcp_proxy import TcpProxy

BINARY = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


@contextlib.asynccontextmanager
async def transaction_pooler(server_url: str, work: Path) -> AsyncIterator[str]:
    """PgBouncer (pool_mode = transaction) on a free 127.0.0.1 port in front of the server of `server_url`;
    yields `server_url` pointed at it. It reaches the server through a `TcpProxy` of ours (PgBouncer runs as
    `nobody`, which may not enter the embedded server's socket directory). Skips the test where PgBouncer is
    not installed."""
    async with TcpProxy(server_url) as upstream:
        config, port = _configure(upstream.port, work)
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
            parts = urlsplit(server_url)
            user = parts.username or "postgres"
            yield urlunsplit((parts.scheme, f"{user}@127.0.0.1:{port}", parts.path, "", ""))
        finally:
            process.terminate()
            await process.wait()


def _configure(upstream_port: int, work: Path) -> tuple[Path, int]:
    if not Path(BINARY).exists():
        pytest.skip("PgBouncer is not installed (Debian: apt install pgbouncer)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    work.mkdir(parents=True, exist_ok=True)
    config = work / "pgbouncer.ini"
    config.write_text(
        "[databases]\n"
        f"* = host=127.0.0.1 port={upstream_port} user=postgres\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        "auth_type = any\npool_mode = transaction\nmax_client_conn = 1000\ndefault_pool_size = 40\n"
        "ignore_startup_parameters = extra_float_digits\n"
        "idle_transaction_timeout = 10\n"  # as deploy/README.md asks: no frozen client holds row locks
    )
    config.chmod(0o644)
    return config, port
