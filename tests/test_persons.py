"""Person bookkeeping in daemon/db: find-or-create, aliases, roles, last_seen_at, the exclusion rule."""

from __future__ import annotations

import datetime as dt

import asyncpg

from daemon import db

T0 = dt.datetime(2025, 8, 16, 20, 0, 0)


async def test_creates_once_last_seen_moves_forward_first_seen_back(pool: asyncpg.Pool) -> None:
    """Issue 10: an older sighting arriving later (a replayed recording) moves first_seen_at back."""
    first = await db.find_or_create_person(pool, "Bob42", seen_at=T0)
    assert (first.username, first.role, first.is_excluded) == ("bob42", "VIEWER", False)
    later = await db.find_or_create_person(pool, "bob42", seen_at=T0 + dt.timedelta(hours=1))
    earlier = await db.find_or_create_person(pool, "bob42", seen_at=T0 - dt.timedelta(hours=5))
    assert later.id == first.id == earlier.id
    assert earlier.first_seen_at == T0 - dt.timedelta(hours=5)
    assert earlier.last_seen_at == T0 + dt.timedelta(hours=1)
    assert await pool.fetchval("SELECT count(*) FROM persons") == 1


async def test_aware_datetimes_are_stored_as_utc(pool: asyncpg.Pool) -> None:
    plus_two = dt.timezone(dt.timedelta(hours=2))
    person = await db.find_or_create_person(pool, "carol", seen_at=T0.replace(tzinfo=plus_two))
    assert person.first_seen_at == T0 - dt.timedelta(hours=2)


async def test_roles_widen_to_both(pool: asyncpg.Pool) -> None:
    viewer = await db.find_or_create_person(pool, "alice_cam", seen_at=T0)
    model = await db.find_or_create_person(pool, "alice_cam", seen_at=T0, role="MODEL")
    assert (viewer.role, model.role) == ("VIEWER", "BOTH")
    unknown = await db.find_or_create_person(pool, "dave", seen_at=T0, role="UNKNOWN")
    assert unknown.role == "UNKNOWN"
    assert (await db.find_or_create_person(pool, "dave", seen_at=T0, role="MODEL")).role == "MODEL"


async def test_smk_lover_is_excluded_and_on_the_excluded_list(pool: asyncpg.Pool) -> None:
    person = await db.find_or_create_person(pool, "smk_lover", seen_at=T0)
    again = await db.find_or_create_person(pool, "SMK_LOVER", seen_at=T0 + dt.timedelta(days=1))
    assert person.is_excluded and again.is_excluded and again.id == person.id
    lists = await pool.fetch(
        "SELECT w.name FROM watchlist_members m JOIN watchlists w ON w.id = m.watchlist_id"
        " WHERE m.person_id = $1",
        person.id,
    )
    assert [row["name"] for row in lists] == ["Excluded"]
    other = await db.find_or_create_person(pool, "smk_lover2", seen_at=T0)
    assert not other.is_excluded


async def test_lookup_by_current_alias_finds_the_same_person(pool: asyncpg.Pool) -> None:
    person = await db.find_or_create_person(pool, "oldname", seen_at=T0)
    await pool.execute(
        "INSERT INTO person_aliases (person_id, alias, valid_from) VALUES ($1, 'newname', $2)", person.id, T0
    )
    by_alias = await db.find_or_create_person(pool, "newname", seen_at=T0 + dt.timedelta(minutes=5))
    assert by_alias.id == person.id
    assert by_alias.last_seen_at == T0 + dt.timedelta(minutes=5)
    assert (await db.find_person(pool, "NewName")) == by_alias
    assert await pool.fetchval("SELECT count(*) FROM persons") == 1
    await pool.execute(
        "UPDATE person_aliases SET valid_to = $1 WHERE alias = 'newname'", T0 + dt.timedelta(days=1)
    )
    assert await db.find_person(pool, "newname") is None, "a closed alias no longer names anyone"


async def test_ping(pool: asyncpg.Pool) -> None:
    assert await db.ping(pool)
