"""`mhc-daemon stats`: rankings for a session and all time, watchlist counts, excluded persons left out."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import asyncpg

from daemon import db
from tests.test_snapshot_deltas import _cli

T0 = dt.datetime(2025, 8, 16, 20, 0, 0)


async def _session(pool: asyncpg.Pool, status: str, started: dt.datetime) -> uuid.UUID:
    ended = None if status == "LIVE" else started + dt.timedelta(hours=2)
    session_id: uuid.UUID = await pool.fetchval(
        "INSERT INTO stream_sessions (started_at, ended_at, status) VALUES ($1, $2, $3) RETURNING id",
        started,
        ended,
        status,
    )
    return session_id


async def _interaction(pool: asyncpg.Pool, name: str, kind: str, session: uuid.UUID, tokens: int = 0) -> None:
    person = await db.find_or_create_person(pool, name, seen_at=T0)
    await pool.execute(
        "INSERT INTO interactions (person_id, stream_session_id, type, content, timestamp, source, metadata)"
        " VALUES ($1, $2, $3, '', $4, 'cb_events', $5::jsonb)",
        person.id,
        session,
        kind,
        T0,
        {"tokens": tokens} if kind == "TIP_EVENT" else {},
    )


async def test_stats_leave_excluded_persons_out_unless_asked(pool: asyncpg.Pool, database_url: str) -> None:
    earlier = await _session(pool, "ENDED", T0 - dt.timedelta(days=1))
    live = await _session(pool, "LIVE", T0)
    await _interaction(pool, "carol", "TIP_EVENT", earlier, 500)
    for tokens in (600, 400):
        await _interaction(pool, "smk_lover", "TIP_EVENT", live, tokens)
    await _interaction(pool, "bob", "TIP_EVENT", live, 50)
    await _interaction(pool, "bob", "TIP_EVENT", live, 25)
    await _interaction(pool, "alice", "TIP_EVENT", live, 20)
    for name, count in (("smk_lover", 5), ("alice", 3), ("bob", 1)):
        for _ in range(count):
            await _interaction(pool, name, "CHAT_MESSAGE", live)

    code, out, err = await _cli(database_url, "stats", "--json")
    assert code == 0, err
    stats = json.loads(out)
    assert stats["session"] == {"id": str(live), "live": True}
    assert stats["session_top_tippers"] == [
        {"username": "bob", "tokens": 75, "tips": 2},
        {"username": "alice", "tokens": 20, "tips": 1},
    ]
    assert stats["session_top_chatters"] == [
        {"username": "alice", "messages": 3},
        {"username": "bob", "messages": 1},
    ]
    assert [t["username"] for t in stats["all_time_top_tippers"]] == ["carol", "bob", "alice"]
    assert stats["watchlists"]["Excluded"] == 0
    assert "smk_lover" not in out

    code, out, err = await _cli(database_url, "stats", "--json", "--include-excluded", "--limit", "2")
    assert code == 0, err
    stats = json.loads(out)
    assert stats["session_top_tippers"] == [
        {"username": "smk_lover", "tokens": 1000, "tips": 2},
        {"username": "bob", "tokens": 75, "tips": 2},
    ]
    assert stats["session_top_chatters"][0] == {"username": "smk_lover", "messages": 5}
    assert stats["watchlists"]["Excluded"] == 1

    code, out, err = await _cli(database_url, "stats", "--session", str(earlier), "--json")
    assert code == 0, err
    stats = json.loads(out)
    assert stats["session"] == {"id": str(earlier), "live": False}
    assert stats["session_top_tippers"] == [{"username": "carol", "tokens": 500, "tips": 1}]

    code, out, err = await _cli(database_url, "stats")
    assert code == 0, err
    assert "smk_lover" not in out and "bob" in out and "(live)" in out and "Excluded" in out
    assert "--include-excluded" in out
