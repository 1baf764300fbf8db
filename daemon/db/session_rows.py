"""Stream sessions: the LIVE ones, staleness ends, `sessions repair`, show summaries."""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg

from daemon import errors, logs, sessions, sql_files
from daemon.db.core import PLATFORM, Connection, translate_errors, utc_naive
from daemon.db.persons import normalize_username

log = logs.get_logger(__name__)


async def live_sessions(pool: asyncpg.Pool) -> list[sessions.Live]:
    """Every LIVE session with its last event and its broadcaster's newest Stats API report."""
    with translate_errors():
        rows = await pool.fetch(sql_files.query("live_sessions_for_staleness"))
    return [
        sessions.Live(
            id=row["id"],
            broadcaster=row["broadcaster"],
            started_at=row["started_at"],
            last_event_at=row["last_event_at"],
            report=sessions.StatsReport(row["report_at"], sessions.stats_room_state(row["report"]))
            if row["report_at"] is not None
            else None,
        )
        for row in rows
    ]


async def end_stale_sessions(pool: asyncpg.Pool, endings: list[sessions.Ended]) -> list[uuid.UUID]:
    """End these LIVE sessions as stale, each unless it got a newer event meanwhile; the ids ended."""
    if not endings:
        return []
    with translate_errors():
        rows = await pool.fetch(
            sql_files.query("end_stale_sessions"),
            [item.id for item in endings],
            [item.ended_at for item in endings],
        )
    return [row["id"] for row in rows]


@dataclass(frozen=True)
class RepairOutcome:
    changes: list[sessions.Repair]
    relinked: dict[tuple[uuid.UUID | None, uuid.UUID | None], int]  # (from, to) session -> interactions
    applied: bool  # False for a dry run: the same transaction, rolled back


class _DryRun(Exception):  # rolls the repair's transaction back after it ran
    pass


async def repair_sessions(
    pool: asyncpg.Pool, *, now: dt.datetime, stale_after: dt.timedelta, dry_run: bool
) -> RepairOutcome:
    """`sessions repair`: in one transaction, read the stored sessions, start/stop events, last events and
    Stats reports, apply `sessions.plan_repair`'s changes and relink every cb_events interaction to the
    session containing it. A dry run does all of it and rolls back: it reports exactly what would change."""
    outcome: RepairOutcome | None = None
    with translate_errors(), contextlib.suppress(_DryRun):
        async with pool.acquire() as connection, connection.transaction():
            data = await _repair_input(connection)
            changes = sessions.plan_repair(data, utc_naive(now), stale_after)
            # Ends first, then LIVE rows: one LIVE session per room at every step.
            for change in sorted(changes, key=lambda item: (item.insert, item.ended_at is None)):
                if change.insert:
                    await connection.execute(
                        sql_files.query("insert_sessions"),
                        PLATFORM,
                        [change.id],
                        [change.broadcaster],
                        [change.started_at],
                        [change.ended_at],
                        [change.end_reason],
                    )
                else:
                    await connection.execute(
                        sql_files.query("repair_update_session"),
                        change.id,
                        change.ended_at,
                        change.end_reason,
                        change.status,
                    )
            moves = await connection.fetch(sql_files.query("repair_relink"))
            relinked = collections.Counter((row["old_id"], row["new_id"]) for row in moves)
            outcome = RepairOutcome(changes, dict(relinked), applied=not dry_run)
            if dry_run:
                raise _DryRun
    if outcome is None:
        raise errors.StorageError("the session repair ended without an outcome")
    return outcome


async def _repair_input(connection: Connection) -> sessions.RepairInput:
    stored = [
        sessions.Stored(
            row["id"],
            row["broadcaster"],
            row["started_at"],
            row["ended_at"],
            row["status"],
            row["end_reason"],
        )
        for row in await connection.fetch(sql_files.query("repair_sessions_stored"))
    ]
    edges = [
        sessions.Event(
            row["event_id"],
            row["broadcaster"],
            row["event_time"],
            "start" if row["method"] == "broadcastStart" else "stop",
        )
        for row in await connection.fetch(sql_files.query("repair_session_edges"))
    ]
    wanted = sorted(sessions.repair_marker_times(stored, edges))
    rows = await connection.fetch(
        sql_files.query("repair_last_before"), [room for room, _ in wanted], [at for _, at in wanted]
    )
    last_before = {(row["room"], row["at"]): row["last_at"] for row in rows}
    rooms = sorted({room for room, _ in wanted})
    reports: dict[str, sessions.StatsReport | None] = dict.fromkeys(rooms)
    for row in await connection.fetch(sql_files.query("repair_room_reports"), rooms):
        state = sessions.stats_room_state(row["raw_payload"])
        reports[row["room"]] = sessions.StatsReport(row["captured_at"], state)
    return sessions.RepairInput(stored, edges, last_before, reports)


async def live_session_id(pool: asyncpg.Pool, room: str | None) -> uuid.UUID | None:
    """The LIVE session of `room` (None: the newest LIVE session of any room)."""
    with translate_errors():
        value: uuid.UUID | None = await pool.fetchval(
            sql_files.query("live_session_id"), None if room is None else normalize_username(room)
        )
    return value


@dataclass(frozen=True)
class SessionSummary:
    """What one stream session came to (the `session_summaries_for` function of migration 014)."""

    session_id: uuid.UUID
    broadcaster: str
    status: str
    started_at: dt.datetime
    ended_at: dt.datetime | None
    duration_s: float
    end_reason: str | None
    tokens_tipped: int
    tips: int
    tokens_per_hour: float | None
    unique_chatters: int
    unique_tippers: int
    unique_visitors: int
    new_followers: int
    unfollows: int
    fan_club_joins: int
    media_purchases: int
    top_tippers: list[dict[str, Any]]  # [{"username", "tokens", "tips"}], at most five, most tokens first
    token_balance_before: float | None
    token_balance_after: float | None
    token_balance_change: float | None  # None unless cb_stats snapshots bracket the session
    tokens_not_in_events: float | None  # the balance change minus every tip: private and spy shows


def _optional_number(value: Any) -> float | None:
    return None if value is None else float(value)


async def session_summaries(
    pool: asyncpg.Pool, *, last: int, include_excluded: bool, room: str | None = None
) -> list[SessionSummary]:
    """The newest `last` sessions' summaries of `room` (None: every room), oldest first; excluded persons
    left out unless `include_excluded` (the seed's filtering rule)."""
    with translate_errors():
        rows = await pool.fetch(
            sql_files.query("session_summaries"),
            last,
            include_excluded,
            None if room is None else normalize_username(room),
        )
    return [
        SessionSummary(
            session_id=row["session_id"],
            broadcaster=row["broadcaster"],
            status=row["status"],
            started_at=row["started_at"],
            ended_at=row["ended_at"],
            duration_s=float(row["duration_s"]),
            end_reason=row["end_reason"],
            tokens_tipped=int(row["tokens_tipped"]),
            tips=int(row["tips"]),
            tokens_per_hour=_optional_number(row["tokens_per_hour"]),
            unique_chatters=row["unique_chatters"],
            unique_tippers=row["unique_tippers"],
            unique_visitors=row["unique_visitors"],
            new_followers=row["new_followers"],
            unfollows=row["unfollows"],
            fan_club_joins=row["fan_club_joins"],
            media_purchases=row["media_purchases"],
            top_tippers=list(row["top_tippers"]),
            token_balance_before=_optional_number(row["token_balance_before"]),
            token_balance_after=_optional_number(row["token_balance_after"]),
            token_balance_change=_optional_number(row["token_balance_change"]),
            tokens_not_in_events=_optional_number(row["tokens_not_in_events"]),
        )
        for row in rows
    ]
