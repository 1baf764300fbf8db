"""Connections and errors: the pool, one-off connections, the error translation every query goes through, the
schema check and the time conventions (naive UTC).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import AsyncIterator, Iterator
from typing import cast

import asyncpg

from daemon import errors, migrations, sql_files

PLATFORM = "chaturbate"


# The seed's exclusion rule: these people are excluded from every aggregate from the moment they are created.
EXCLUDED_USERNAMES = frozenset({"smk_lover"})


EXCLUDED_WATCHLIST = "Excluded"


ROLES = ("MODEL", "VIEWER", "BOTH", "UNKNOWN")


Pool = asyncpg.Pool


# A pooled connection or a plain one: both run the same queries.
Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


def utc_naive(moment: dt.datetime) -> dt.datetime:
    """A timezone-aware or naive-UTC datetime as the naive UTC value TIMESTAMP columns hold."""
    if moment.tzinfo is None:
        return moment
    return moment.astimezone(dt.UTC).replace(tzinfo=None)


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


# PostgreSQL refusals that heal by themselves: the write is retried (and pages spooled meanwhile), never
# dropped. Connection (08), insufficient resources: disk full, out of memory, too many connections (53),
# operator intervention: statement timeout, shutdown, cannot connect now (57), system/IO errors (58),
# serialization failures and deadlocks (40), a read-only server (25006), idle-transaction timeouts (25P03)
# and lock timeouts (55P03). Every other PostgreSQL error is the statement's own fault: a refusal.
_TRANSIENT_SQLSTATE_CLASSES = ("08", "53", "57", "58", "40")


_TRANSIENT_SQLSTATES = frozenset({"25006", "25P03", "55P03"})


def is_transient(error: asyncpg.PostgresError) -> bool:
    """True when PostgreSQL refused for a reason that passes (see `_TRANSIENT_SQLSTATES`)."""
    state = str(getattr(error, "sqlstate", "") or "")
    return state[:2] in _TRANSIENT_SQLSTATE_CLASSES or state in _TRANSIENT_SQLSTATES


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """asyncpg and socket errors become `DatabaseUnavailable` (transient: retry) or `StorageError`."""
    try:
        yield
    # InternalClientError: asyncpg's protocol state after the server killed the session mid-query.
    # TimeoutError: asyncpg's own command or connect timeout.
    except (OSError, asyncpg.InterfaceError, asyncpg.InternalClientError, TimeoutError) as error:
        raise errors.DatabaseUnavailable(f"database unavailable: {type(error).__name__}: {error}") from error
    except asyncpg.PostgresError as error:
        if is_transient(error):
            raise errors.DatabaseUnavailable(
                f"database unavailable: {type(error).__name__}: {error}"
            ) from error
        raise errors.StorageError(f"database error: {type(error).__name__}: {error}") from error


async def _init_connection(connection: asyncpg.Connection) -> None:
    for kind in ("json", "jsonb"):
        await connection.set_type_codec(kind, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


CONNECT_TIMEOUT_SECONDS = 10.0
IDLE_IN_TRANSACTION_TIMEOUT = "10s"  # half the default lease


class _ProxiedConnection(asyncpg.Connection):
    """A connection through a transaction-pooling proxy: returned to the pool, it only ends its transaction.
    The default reset (RESET ALL and more) would run on a server session the proxy hands to another client
    next, and undo that client's time zone and name."""

    def get_reset_query(self) -> str:
        return ""


async def connect(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 4,
    application_name: str = "mhc-daemon",
    pooler: bool = False,
) -> asyncpg.Pool:
    """Open the pool. Every session runs in UTC so NOW() defaults on TIMESTAMP columns are UTC too.

    With `min_size=0` nothing connects here: the pool opens while the database is down and each later
    operation connects (or fails with `DatabaseUnavailable`) on its own.
    """
    with translate_errors():
        pool: asyncpg.Pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            init=_init_connection,
            server_settings={
                "timezone": "UTC",
                "application_name": application_name,  # pg_stat_activity tells the daemons apart
                # A daemon frozen inside any transaction (SIGSTOP, a stalled VM) would hold its row locks
                # (the rooms' cursor rows among them) for as long as it sleeps: the server ends it instead.
                # A transaction-pooling proxy refuses this at connect: its own idle_transaction_timeout
                # does the same there (deploy/README.md), and the fence sets it for the writer's transactions.
                **({} if pooler else {"idle_in_transaction_session_timeout": IDLE_IN_TRANSACTION_TIMEOUT}),
            },
            command_timeout=60,
            # Behind a transaction-pooling proxy (PgBouncer before 1.21) a named prepared statement does not
            # survive its transaction, and the server session belongs to whoever runs the next one.
            statement_cache_size=0 if pooler else 100,
            connection_class=_ProxiedConnection if pooler else asyncpg.Connection,
            timeout=CONNECT_TIMEOUT_SECONDS,
        )
    return pool


@contextlib.asynccontextmanager
async def open_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 4,
    application_name: str = "mhc-daemon",
    pooler: bool = False,
) -> AsyncIterator[asyncpg.Pool]:
    pool = await connect(
        dsn,
        min_size=min_size,
        max_size=max_size,
        application_name=application_name,
        pooler=pooler,
    )
    try:
        yield pool
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def single_connection(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """One connection outside the pool, for migrations: a few statements, never prepared by name, so that it
    works behind a transaction-pooling proxy too."""
    with translate_errors():
        connection: asyncpg.Connection = await asyncpg.connect(
            dsn,
            server_settings={"timezone": "UTC", "application_name": "mhc-daemon-migrate"},
            timeout=CONNECT_TIMEOUT_SECONDS,
            statement_cache_size=0,
        )
    try:
        yield connection
    finally:
        await connection.close()


async def ping(pool: asyncpg.Pool) -> bool:
    """True when the database answers a trivial query."""
    try:
        with translate_errors():
            return bool(await pool.fetchval(sql_files.query("ping"), timeout=5))
    except errors.StorageError:
        return False


def row_count(status: str) -> int:
    """The row count of a command tag such as `INSERT 0 5`."""
    return int(status.rsplit(" ", 1)[-1])


async def schema_is_current(pool: asyncpg.Pool) -> bool:
    """True when every known migration is applied and unchanged. Raises `StorageError` when the database
    cannot answer, so a caller can tell "behind" from "unknown".
    """
    with translate_errors():
        async with pool.acquire() as connection:
            # A pooled connection runs the same queries; migrations.py types its argument as a plain one.
            return await migrations.is_current(cast(asyncpg.Connection, connection))
