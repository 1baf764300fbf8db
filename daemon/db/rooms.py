"""Rooms (issue 11): the `rooms` table and the rooms the cursor knows."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import asyncpg

from daemon import ingest, logs, sql_files
from daemon.db.core import translate_errors

log = logs.get_logger(__name__)


@dataclass(frozen=True)
class Room:
    """A room of the `rooms` table, or one only the cursor knows (the single-room settings'): then `enabled`
    and `added_at` are None."""

    name: str
    enabled: bool | None
    added_at: dt.datetime | None
    last_event_id: str | None  # the committed read position
    polled_at: dt.datetime | None  # when that position last moved (naive UTC)
    holder: str | None = None  # the daemon whose lease on the room has not run out (`host id:pid`)
    epoch: int = 0  # of the room's lease: grows with every new holder

    @property
    def last_event_at(self) -> dt.datetime | None:
        """The server time the read position encodes: the newest event read (naive UTC)."""
        if self.last_event_id is None:
            return None
        at = ingest.event_time(self.last_event_id, dt.datetime.min)
        return None if at == dt.datetime.min else at


async def add_room(pool: asyncpg.Pool, name: str) -> bool:
    """Add `name` (enable it again when it is there); True when the row is new."""
    with translate_errors():
        added: bool = await pool.fetchval(sql_files.query("add_room"), name)
    return added


async def set_room_enabled(pool: asyncpg.Pool, name: str, enabled: bool) -> bool:
    """Enable or disable `name`; False when there is no such room."""
    with translate_errors():
        return await pool.fetchval(sql_files.query("set_room_enabled"), name, enabled) is not None


async def enabled_rooms(pool: asyncpg.Pool) -> list[str]:
    with translate_errors():
        return [row["name"] for row in await pool.fetch(sql_files.query("enabled_rooms"))]


async def list_rooms(pool: asyncpg.Pool) -> list[Room]:
    with translate_errors():
        rows = await pool.fetch(sql_files.query("list_rooms"))
    return [Room(**dict(row)) for row in rows]
