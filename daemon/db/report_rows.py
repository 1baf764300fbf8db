"""The read side of `stats`: top tippers and chatters, watchlist counts (exclusions applied)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import asyncpg

from daemon import logs, sql_files
from daemon.db.core import translate_errors

log = logs.get_logger(__name__)


@dataclass(frozen=True)
class Ranked:
    username: str
    total: float
    count: int


async def top_tippers(
    pool: asyncpg.Pool, *, session_id: uuid.UUID | None, include_excluded: bool, limit: int
) -> list[Ranked]:
    """Tip tokens per person in one session (or all time when `session_id` is None), excluded persons left out
    unless `include_excluded` (the seed's filtering rule)."""
    with translate_errors():
        rows = await pool.fetch(sql_files.query("top_tippers"), session_id, include_excluded, limit)
    return [Ranked(username=row["username"], total=float(row["total"]), count=row["tips"]) for row in rows]


async def top_chatters(
    pool: asyncpg.Pool, *, session_id: uuid.UUID | None, include_excluded: bool, limit: int
) -> list[Ranked]:
    with translate_errors():
        rows = await pool.fetch(sql_files.query("top_chatters"), session_id, include_excluded, limit)
    return [Ranked(username=row["username"], total=float(row["total"]), count=row["total"]) for row in rows]


async def watchlist_counts(pool: asyncpg.Pool, *, include_excluded: bool) -> dict[str, int]:
    with translate_errors():
        rows = await pool.fetch(sql_files.query("watchlist_counts"), include_excluded)
    return {row["name"]: row["members"] for row in rows}
