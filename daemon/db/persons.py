"""Persons and their bookkeeping: find or create by name (aliases first), roles that widen, first and last
seen."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass

import asyncpg

from daemon import errors, logs, sql_files
from daemon.db.core import (
    EXCLUDED_USERNAMES,
    EXCLUDED_WATCHLIST,
    PLATFORM,
    ROLES,
    Connection,
    translate_errors,
    utc_naive,
)

log = logs.get_logger(__name__)


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
    The same batched statement serves the events writer, so the rule lives in one place.
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
    people = await find_or_create_many(connection, {name: Sighting(role, seen, seen)}, platform)
    return people[name]


@dataclass
class Sighting:
    """One person's appearances in a batch: the widest role, the earliest and the latest time."""

    role: str
    first: dt.datetime
    last: dt.datetime


def widen_role(current: str, seen_as: str) -> str:
    """VIEWER + MODEL = BOTH; UNKNOWN never narrows anything. The SQL of `upsert_persons` says the same."""
    if current == seen_as or seen_as == "UNKNOWN":
        return current
    if current == "UNKNOWN":
        return seen_as
    return "BOTH"


def see(sightings: dict[str, Sighting], name: str, role: str, at: dt.datetime) -> None:
    found = sightings.get(name)
    if found is None:
        sightings[name] = Sighting(role, at, at)
        return
    found.role = widen_role(found.role, role)
    found.first = min(found.first, at)
    found.last = max(found.last, at)


async def find_or_create_many(
    connection: Connection,
    sightings: dict[str, Sighting],
    platform: str,
    aliases: list[asyncpg.Record] | None = None,
) -> dict[str, Person]:
    """Find or create every named person, honouring current aliases (rows of `resolve_aliases`, looked up
    here unless the caller already has them): one or two round trips, one more when an alias matches."""
    if aliases is None:
        aliases = await connection.fetch(sql_files.query("resolve_aliases"), list(sightings), platform)
    owner = {row["name"]: row["id"] for row in sorted(aliases, key=lambda row: row["at"])}
    touch: dict[uuid.UUID, Sighting] = {}
    names_of: dict[uuid.UUID, list[str]] = {}
    creating: dict[str, Sighting] = {}
    for name, sighting in sightings.items():
        target = owner.get(name)
        if target is None:
            creating[name] = sighting
            continue
        names_of.setdefault(target, []).append(name)
        merged = touch.get(target)
        if merged is None:
            touch[target] = Sighting(sighting.role, sighting.first, sighting.last)
        else:
            merged.role = widen_role(merged.role, sighting.role)
            merged.first = min(merged.first, sighting.first)
            merged.last = max(merged.last, sighting.last)
    people: dict[str, Person] = {}
    if touch:
        # A separate statement from the upsert: a name in `creating` may be the original username of a
        # person touched here, and one statement must not modify a row twice.
        touched = await connection.fetch(
            sql_files.query("touch_persons"),
            list(touch),
            [s.last for s in touch.values()],
            [s.role for s in touch.values()],
            [s.first for s in touch.values()],
        )
        for row in touched:
            for name in names_of[row["id"]]:
                people[name] = _person(row)
    if creating:
        upserted = await connection.fetch(
            sql_files.query("upsert_persons"),
            list(creating),
            [s.role for s in creating.values()],
            [s.first for s in creating.values()],
            [s.last for s in creating.values()],
            platform,
            list(EXCLUDED_USERNAMES),
            EXCLUDED_WATCHLIST,
        )
        for row in upserted:
            people[row["username"]] = _person(row)
    return people


@dataclass(frozen=True)
class Alias:
    alias: str
    valid_from: dt.datetime
    valid_to: dt.datetime | None


async def person_aliases(pool: asyncpg.Pool, person_id: uuid.UUID) -> list[Alias]:
    with translate_errors():
        rows = await pool.fetch(sql_files.query("person_aliases"), person_id)
    return [Alias(alias=row["alias"], valid_from=row["valid_from"], valid_to=row["valid_to"]) for row in rows]
