"""The database layer: the only module that touches the asyncpg pool.

One async function per operation. Each returns plain dataclasses and turns asyncpg's errors into ours.
Timestamps are naive UTC `datetime`s, matching the seed's TIMESTAMP columns (every session runs in UTC).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import cast

import asyncpg

from daemon import errors, logs, migrations, sql_files

PLATFORM = "chaturbate"
# The seed's exclusion rule: these people are excluded from every aggregate from the moment they are created.
EXCLUDED_USERNAMES = frozenset({"smk_lover"})
EXCLUDED_WATCHLIST = "Excluded"
ROLES = ("MODEL", "VIEWER", "BOTH", "UNKNOWN")

Pool = asyncpg.Pool
# A pooled connection or a plain one: both run the same queries.
Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


@dataclass(frozen=True)
class Person:
    id: uuid.UUID
    username: str
    platform: str
    role: str
    rid: int | None
    did: int | None
    first_seen_at: dt.datetime
    last_seen_at: dt.datetime
    is_excluded: bool


def utc_naive(moment: dt.datetime) -> dt.datetime:
    """A timezone-aware or naive-UTC datetime as the naive UTC value TIMESTAMP columns hold."""
    if moment.tzinfo is None:
        return moment
    return moment.astimezone(dt.UTC).replace(tzinfo=None)


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """asyncpg and socket errors become `StorageError` / `DatabaseUnavailable`."""
    try:
        yield
    # InternalClientError: asyncpg's protocol state after the server killed the session mid-query.
    except (
        OSError,
        asyncpg.InterfaceError,
        asyncpg.InternalClientError,
        asyncpg.CannotConnectNowError,
        TimeoutError,
    ) as error:
        raise errors.DatabaseUnavailable(f"database unavailable: {type(error).__name__}: {error}") from error
    except asyncpg.PostgresError as error:
        raise errors.StorageError(f"database error: {type(error).__name__}: {error}") from error


async def _init_connection(connection: asyncpg.Connection) -> None:
    for kind in ("json", "jsonb"):
        await connection.set_type_codec(kind, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def connect(dsn: str, *, min_size: int = 1, max_size: int = 4) -> asyncpg.Pool:
    """Open the pool. Every session runs in UTC so NOW() defaults on TIMESTAMP columns are UTC too."""
    with translate_errors():
        pool: asyncpg.Pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            init=_init_connection,
            server_settings={"timezone": "UTC", "application_name": "mhc-daemon"},
            command_timeout=60,
        )
    return pool


@contextlib.asynccontextmanager
async def open_pool(dsn: str, *, min_size: int = 1, max_size: int = 4) -> AsyncIterator[asyncpg.Pool]:
    pool = await connect(dsn, min_size=min_size, max_size=max_size)
    try:
        yield pool
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def single_connection(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """One connection outside the pool, for migrations (a session-level advisory lock needs one session)."""
    with translate_errors():
        connection: asyncpg.Connection = await asyncpg.connect(
            dsn, server_settings={"timezone": "UTC", "application_name": "mhc-daemon-migrate"}
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


def _person(row: asyncpg.Record | None) -> Person:
    if row is None:
        raise errors.StorageError("the database returned no row where one was certain")
    return Person(
        id=row["id"],
        username=row["username"],
        platform=row["platform"],
        role=row["role"],
        rid=row["rid"],
        did=row["did"],
        first_seen_at=row["first_seen_at"],
        last_seen_at=row["last_seen_at"],
        is_excluded=bool(row["is_excluded"]),
    )


def normalize_username(username: str) -> str:
    """Chaturbate names are case-insensitive; we store and look them up lowercased."""
    return username.strip().lower()


async def find_person(pool: asyncpg.Pool, username: str, platform: str = PLATFORM) -> Person | None:
    """The person whose username or current alias is `username`."""
    with translate_errors():
        row = await pool.fetchrow(sql_files.query("find_person"), normalize_username(username), platform)
    return _person(row) if row else None


async def find_or_create_person(
    pool: asyncpg.Pool,
    username: str,
    *,
    seen_at: dt.datetime,
    role: str = "VIEWER",
    platform: str = PLATFORM,
) -> Person:
    """Find a person by username or current alias, or create one; `last_seen_at` only moves forward.

    A person created under an excluded name starts excluded and is put on the Excluded watchlist.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    name = normalize_username(username)
    seen = utc_naive(seen_at)
    with translate_errors():
        async with pool.acquire() as connection, connection.transaction():
            return await _find_or_create(connection, name, seen, role, platform)


async def _find_or_create(
    connection: Connection, name: str, seen: dt.datetime, role: str, platform: str
) -> Person:
    found = await connection.fetchrow(sql_files.query("find_person"), name, platform)
    if found is not None and found["username"] != name:
        # Found through a current alias: the persons row keeps its original username.
        row = await connection.fetchrow(sql_files.query("touch_person"), found["id"], seen, role)
        return _person(row)
    row = await connection.fetchrow(
        sql_files.query("upsert_person"), name, platform, role, seen, name in EXCLUDED_USERNAMES
    )
    person = _person(row)
    if row is not None and row["inserted"] and person.is_excluded:
        await connection.execute(sql_files.query("add_to_watchlist"), EXCLUDED_WATCHLIST, person.id)
    return person


@dataclass(frozen=True)
class ApiFailure:
    """One failed call of an external API. `url` and `body_excerpt` must already be masked."""

    api: str  # cb_events | cb_stats | statbate
    operation: str  # e.g. poll, member_info, member_info_batch, model_info, stats
    url: str
    error_kind: str  # e.g. http_5xx, rate_limited, timeout, connection, bad_body, auth_rejected, not_found
    http_status: int | None = None
    body_excerpt: str | None = None
    attempt: int = 1
    occurred_at: dt.datetime | None = None


BODY_EXCERPT_CHARS = 200


async def record_api_failure(pool: asyncpg.Pool, failure: ApiFailure) -> None:
    """Append one failure row; the URL and excerpt are masked once more here, as a last line of defence."""
    excerpt = failure.body_excerpt[:BODY_EXCERPT_CHARS] if failure.body_excerpt else None
    with translate_errors():
        await pool.execute(
            sql_files.query("record_api_failure"),
            failure.api,
            failure.operation,
            logs.mask(failure.url),
            failure.http_status,
            failure.error_kind,
            logs.mask(excerpt.replace("\x00", "")) if excerpt else None,
            failure.attempt,
            utc_naive(failure.occurred_at) if failure.occurred_at else utc_now(),
        )


async def recent_api_failures(pool: asyncpg.Pool, limit: int = 10) -> list[ApiFailure]:
    with translate_errors():
        rows = await pool.fetch(sql_files.query("recent_api_failures"), limit)
    return [
        ApiFailure(
            api=row["api"],
            operation=row["operation"],
            url=row["url"],
            error_kind=row["error_kind"],
            http_status=row["http_status"],
            body_excerpt=row["body_excerpt"],
            attempt=row["attempt"],
            occurred_at=row["occurred_at"],
        )
        for row in rows
    ]


async def schema_is_current(pool: asyncpg.Pool) -> bool:
    """True when every known migration is applied and unchanged. Raises `StorageError` when the database
    cannot answer, so a caller can tell "behind" from "unknown".
    """
    with translate_errors():
        async with pool.acquire() as connection:
            # A pooled connection runs the same queries; migrations.py types its argument as a plain one.
            return await migrations.is_current(cast(asyncpg.Connection, connection))
