"""A TCP forwarder on 127.0.0.1 whose link can be cut: a network fault between one daemon and PostgreSQL.

Cut, it forwards nothing in either direction and new connections hang after the handshake, as a dead
route does (no reset: the client learns only from its own timeouts). Mended, it forwards again.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import parse_qs, urlsplit, urlunsplit


class TcpProxy:
    """Forwards 127.0.0.1:`port` to a PostgreSQL server's address: TCP, or the Unix socket a `?host=/dir`
    URL names (the embedded server listens on nothing else)."""

    def __init__(self, server_url: str) -> None:
        parts = urlsplit(server_url)
        socket_dir = parse_qs(parts.query).get("host", [None])[0]
        server_port = parts.port or 5432
        self._socket = f"{socket_dir}/.s.PGSQL.{server_port}" if socket_dir else None
        self._target = (parts.hostname or "127.0.0.1", server_port)
        self._user = parts.username or "postgres"
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def url(self, server_url: str) -> str:
        """`server_url` (same user and database) through this proxy."""
        path = urlsplit(server_url).path
        return urlunsplit(("postgresql", f"{self._user}@127.0.0.1:{self.port}", path, "", ""))

    def cut(self) -> None:
        self._flowing.clear()

    def mend(self) -> None:
        self._flowing.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._flowing.wait()
        try:
            if self._socket:
                upstream_reader, upstream_writer = await asyncio.open_unix_connection(self._socket)
            else:
                upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            task = asyncio.ensure_future(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                await self._flowing.wait()
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(ConnectionError, OSError):
                sink.close()
