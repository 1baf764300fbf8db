"""Snapshots (issue 4): what is due, append-only snapshot rows, misses, identity by did/rid with renames,
deltas.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass

import asyncpg

from daemon import errors, logs, sql_files
from daemon.db.core import PLATFORM, Connection, translate_errors, utc_naive
from daemon.db.persons import normalize_username

log = logs.get_logger(__name__)


SNAPSHOT_SOURCES = ("statbate_member", "statbate_model", "cb_stats")


@dataclass(frozen=True)
class DueMember:
    """A person whose Statbate member snapshot is due, under the name to ask for (the current alias wins)."""

    person_id: uuid.UUID
    name: str
    priority: int  # 0 tipped, 1 messaged, 2 on a watchlist, 3 the rest


@dataclass(frozen=True)
class StoredSnapshot:
    """What storing one identified snapshot did."""

    person_id: uuid.UUID  # the person the snapshot belongs to (the did/rid owner)
    inserted: bool  # False when a snapshot with the same (person, source, captured_at) already existed
    renamed_from: str | None = None
    renamed_to: str | None = None
    other_person_id: uuid.UUID | None = None  # the asked-for person, when the did/rid belongs to someone else


@dataclass(frozen=True)
class SnapshotDelta:
    source: str
    previous_captured_at: dt.datetime
    captured_at: dt.datetime
    delta: dict[str, object]


async def newest_snapshot_at(pool: asyncpg.Pool, person_id: uuid.UUID, source: str) -> dt.datetime | None:
    with translate_errors():
        value: dt.datetime | None = await pool.fetchval(
            sql_files.query("newest_snapshot_at"), person_id, source
        )
    return value


async def newest_snapshot_miss_at(
    pool: asyncpg.Pool, person_id: uuid.UUID, source: str
) -> dt.datetime | None:
    with translate_errors():
        value: dt.datetime | None = await pool.fetchval(
            sql_files.query("newest_snapshot_miss_at"), person_id, source
        )
    return value


async def newest_api_failure_at(pool: asyncpg.Pool, api: str, kinds: tuple[str, ...]) -> dt.datetime | None:
    with translate_errors():
        value: dt.datetime | None = await pool.fetchval(
            sql_files.query("newest_api_failure_at"), api, list(kinds)
        )
    return value


async def due_member_lookups(
    pool: asyncpg.Pool,
    *,
    now: dt.datetime,
    stale_before: dt.datetime,
    missed_before: dt.datetime,
    broadcaster: str,
    limit: int,
    platform: str = PLATFORM,
) -> list[DueMember]:
    """Who needs a Statbate member snapshot now, most important first (see the query's comment)."""
    with translate_errors():
        rows = await pool.fetch(
            sql_files.query("due_member_lookups"),
            platform,
            normalize_username(broadcaster),
            utc_naive(stale_before),
            utc_naive(missed_before),
            limit,
            utc_naive(now),
        )
    return [DueMember(person_id=row["id"], name=row["name"], priority=row["priority"]) for row in rows]


async def record_snapshot(
    pool: asyncpg.Pool,
    *,
    person_id: uuid.UUID,
    source: str,
    captured_at: dt.datetime,
    raw_payload: object,
    normalized_metrics: dict[str, object] | None,
) -> bool:
    """Append one snapshot; False when the same (person, source, captured_at) is already stored."""
    with translate_errors():
        inserted = await pool.fetchval(
            sql_files.query("insert_snapshot"),
            person_id,
            source,
            utc_naive(captured_at),
            raw_payload,
            normalized_metrics,
        )
    return inserted is not None


async def record_snapshot_miss(
    pool: asyncpg.Pool, *, person_id: uuid.UUID, source: str, username: str, missed_at: dt.datetime
) -> None:
    """Remember that the API did not know this person (the api_failures row is written by the client)."""
    with translate_errors():
        await pool.execute(
            sql_files.query("record_snapshot_miss"), person_id, source, username, utc_naive(missed_at)
        )


async def record_identified_snapshot(
    pool: asyncpg.Pool,
    *,
    asked_person_id: uuid.UUID,
    source: str,
    external_id: int,
    reported_name: str | None,
    captured_at: dt.datetime,
    raw_payload: object,
    normalized_metrics: dict[str, object] | None,
    platform: str = PLATFORM,
) -> StoredSnapshot:
    """Store a member (`did`) or model (`rid`) snapshot, keeping identities straight, in one transaction.

    The snapshot goes to whoever already holds the did/rid, else to the asked-for person, who gets it.
    When the reported name differs from the owner's current name, the rename is recorded in person_aliases:
    the open alias is closed (the first time, the original username is recorded as a closed alias, so the
    history is complete) and the new name opened. A model snapshot also widens the owner's role with MODEL.
    """
    if source not in ("statbate_member", "statbate_model"):
        raise ValueError(f"{source!r} carries no did/rid")
    at = utc_naive(captured_at)
    by_model = source == "statbate_model"
    with translate_errors():
        async with pool.acquire() as connection, connection.transaction():
            owner = await connection.fetchval(
                sql_files.query("person_by_rid" if by_model else "person_by_did"), external_id, platform
            )
            owner_id: uuid.UUID = owner or asked_person_id
            if by_model:
                await connection.execute(sql_files.query("set_person_rid_model"), owner_id, external_id)
            elif owner is None:
                await connection.execute(sql_files.query("set_person_did"), owner_id, external_id)
            renamed = await _record_rename(connection, owner_id, reported_name, at, platform)
            inserted = await connection.fetchval(
                sql_files.query("insert_snapshot"), owner_id, source, at, raw_payload, normalized_metrics
            )
    return StoredSnapshot(
        person_id=owner_id,
        inserted=inserted is not None,
        renamed_from=renamed[0] if renamed else None,
        renamed_to=renamed[1] if renamed else None,
        other_person_id=asked_person_id if owner_id != asked_person_id else None,
    )


async def _record_rename(
    connection: Connection, person_id: uuid.UUID, reported_name: str | None, at: dt.datetime, platform: str
) -> tuple[str, str] | None:
    """(old, new) when `reported_name` is a new name for the person, after recording it; else None."""
    if not reported_name:
        return None
    new_name = normalize_username(reported_name)
    names = await connection.fetchrow(sql_files.query("person_names"), person_id)
    if names is None:
        raise errors.StorageError("the person of a snapshot vanished")
    current = names["current_alias"] or names["username"]
    if new_name == current:
        return None
    if not names["has_aliases"]:
        first = min(names["first_seen_at"], at)
        await connection.execute(
            sql_files.query("insert_alias"), person_id, names["username"], platform, first, at
        )
    await connection.execute(sql_files.query("close_current_aliases"), person_id, at)
    await connection.execute(sql_files.query("insert_alias"), person_id, new_name, platform, at, None)
    return current, new_name


async def snapshot_deltas(
    pool: asyncpg.Pool, person_id: uuid.UUID, source: str | None = None
) -> list[SnapshotDelta]:
    """Consecutive deltas of one person's snapshots (computed by the `snapshot_deltas` view, never stored)."""
    with translate_errors():
        rows = await pool.fetch(sql_files.query("snapshot_deltas"), person_id, source)
    return [
        SnapshotDelta(
            source=row["source"],
            previous_captured_at=row["previous_captured_at"],
            captured_at=row["captured_at"],
            delta=dict(row["delta"]),
        )
        for row in rows
    ]


@dataclass(frozen=True)
class SnapshotCount:
    source: str
    snapshots: int
    newest: dt.datetime


async def snapshot_counts(pool: asyncpg.Pool) -> list[SnapshotCount]:
    """Snapshots stored per source, with the newest capture time (for the demo and status output)."""
    with translate_errors():
        rows = await pool.fetch(sql_files.query("snapshot_counts"))
    return [
        SnapshotCount(source=row["source"], snapshots=row["snapshots"], newest=row["newest"]) for row in rows
    ]
