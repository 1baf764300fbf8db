"""Leases in PostgreSQL: rooms on their cursor rows, hosts by heartbeat, and cluster-wide singletons.

Every time is the database's (`now()`): hosts' clocks may disagree, the server's is the one they share. See
migration 017 and `daemon/leases.py` for how a daemon uses these.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import asyncpg

from daemon import sql_files
from daemon.db.core import translate_errors


@dataclass(frozen=True)
class RoomLease:
    room: str
    holder: str | None
    epoch: int
    seconds_left: float | None  # negative: ran out; None: never leased
    last_event_id: str | None


async def heartbeat(pool: asyncpg.Pool, holder: str, live_within: float) -> list[str]:
    """Record that `holder` is alive; the holders heard from within `live_within` seconds, itself included."""
    with translate_errors():
        rows = await pool.fetch(sql_files.query("heartbeat"), holder, live_within)
    return [row["holder"] for row in rows]


async def local_holders(pool: asyncpg.Pool, host_id: str) -> list[str]:
    with translate_errors():
        rows = await pool.fetch(sql_files.query("local_holders"), host_id)
    return [row["holder"] for row in rows]


async def leave(pool: asyncpg.Pool, holder: str) -> None:
    with translate_errors():
        await pool.execute(sql_files.query("leave_hosts"), holder)


async def acquire(
    pool: asyncpg.Pool,
    holder: str,
    rooms: list[str],
    *,
    dead: list[str],
    limit: int,
    lease_seconds: float,
    timeout_seconds: int,
    orphans_only: bool = False,
) -> dict[str, int]:
    """Take up to `limit` of `rooms` (see the `acquire_leases` query); the rooms taken, with their epochs."""
    if not rooms or limit <= 0:
        return {}
    with translate_errors():
        async with pool.acquire() as connection, connection.transaction():
            await connection.execute(sql_files.query("ensure_cursors"), rooms, timeout_seconds)
            rows = await connection.fetch(
                sql_files.query("acquire_leases"), holder, rooms, dead, limit, lease_seconds, orphans_only
            )
    return {row["broadcaster"]: row["epoch"] for row in rows}


async def renew(pool: asyncpg.Pool, holder: str, held: Mapping[str, int], lease_seconds: float) -> set[str]:
    """Extend the leases of `held` (room → epoch); the rooms still this holder's."""
    if not held:
        return set()
    with translate_errors():
        rows = await pool.fetch(
            sql_files.query("renew_leases"), holder, list(held), list(held.values()), lease_seconds
        )
    return {row["broadcaster"] for row in rows}


async def release(pool: asyncpg.Pool, holder: str, held: Mapping[str, int]) -> None:
    if held:
        with translate_errors():
            await pool.execute(sql_files.query("release_leases"), holder, list(held), list(held.values()))


async def room_leases(pool: asyncpg.Pool) -> list[RoomLease]:
    with translate_errors():
        rows = await pool.fetch(sql_files.query("room_leases"))
    return [
        RoomLease(row["broadcaster"], row["holder"], row["epoch"], row["seconds_left"], row["last_event_id"])
        for row in rows
    ]


async def acquire_cluster_lease(
    pool: asyncpg.Pool, name: str, holder: str, lease_seconds: float
) -> int | None:
    """Take or renew the cluster lease `name`; its epoch, or None while another live holder has it."""
    with translate_errors():
        epoch: int | None = await pool.fetchval(
            sql_files.query("acquire_cluster_lease"), name, holder, lease_seconds
        )
    return epoch


async def release_cluster_lease(pool: asyncpg.Pool, name: str, holder: str) -> None:
    with translate_errors():
        await pool.execute(sql_files.query("release_cluster_lease"), name, holder)
