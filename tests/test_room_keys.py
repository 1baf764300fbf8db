"""Issue 11, keys: two rooms whose Events API ids coincide are both stored in full (writer, migration,
replay)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import asyncpg

from daemon import db, migrations
from tests import event_samples as sample
from tests.daemon_process import run_command

OTHER = "bob_cam"


def _in_room(items: list[dict[str, Any]], room: str) -> list[dict[str, Any]]:
    """The same envelopes (same ids) as `room`'s feed delivers them; a direct message keeps its empty room."""
    moved = copy.deepcopy(items)
    for item in moved:
        payload = item.get("object")
        if isinstance(payload, dict) and payload.get("broadcaster"):
            payload["broadcaster"] = room
    return moved


def _feed() -> list[dict[str, Any]]:
    direct = sample.envelope(
        "privateMessage",
        30,
        {
            "broadcaster": "",
            "message": {"message": "hi", "fromUser": "carol", "toUser": "x"},
            "user": sample.user("carol"),
        },
    )
    broken = {"id": sample.event_id(40), "method": "tip"}  # no object: quarantined under its id
    return [sample.start(0), sample.chat(10, "carol"), sample.tip(20, "dave"), direct, broken]


async def _counts(pool: asyncpg.Pool) -> dict[str, Any]:
    return {
        table: await pool.fetchval(f"SELECT count(*) FROM {table}")
        for table in ("events", "interactions", "quarantined_events")
    } | {"live": await pool.fetchval("SELECT count(*) FROM stream_sessions WHERE status = 'LIVE'")}


async def test_two_rooms_whose_event_ids_coincide_are_both_stored_in_full(pool: asyncpg.Pool) -> None:
    first, second = _feed(), _in_room(_feed(), OTHER)
    assert [item["id"] for item in first] == [item["id"] for item in second]
    results = []
    for _ in range(2):  # the second round re-delivers both feeds: nothing more is stored
        for items, room in ((first, sample.ROOM), (second, OTHER)):
            batch = sample.page(items, room=room)
            results.append(await db.write_batch(pool, batch, cursor_broadcaster=room, timeout_seconds=30))
    assert [(r.new_events, r.duplicates, r.quarantined) for r in results] == [(4, 0, 1), (4, 0, 1)] + [
        (0, 4, 0)
    ] * 2
    assert await _counts(pool) == {"events": 8, "interactions": 8, "quarantined_events": 2, "live": 2}
    rooms = await pool.fetch("SELECT broadcaster, count(*) FROM events GROUP BY 1 ORDER BY 1")
    assert [tuple(row) for row in rooms] == [(sample.ROOM, 4), (OTHER, 4)]
    # Each room's LIVE session is its own, and each room's events are linked to it.
    for room in (sample.ROOM, OTHER):
        live = await db.live_session_id(pool, room)
        linked = await pool.fetchval(
            "SELECT count(*) FROM interactions"
            " WHERE stream_session_id = $1 AND metadata->>'broadcaster' = $2",
            live,
            room,
        )
        assert linked == 3, room  # start, chat, tip (the direct message was sent in no room)
    direct = await pool.fetch(
        "SELECT metadata->>'broadcaster' AS b, metadata->>'room' AS r FROM interactions"
        " WHERE type = 'DIRECT_MESSAGE' ORDER BY 2"
    )
    assert [tuple(row) for row in direct] == [("", sample.ROOM), ("", OTHER)]


async def test_the_migration_rekeys_existing_rows_in_place(empty_database_url: str) -> None:
    """Data written under migration 014's keys: after 015 it is all there, a direct message knows its feed,
    the quarantined item its room, and a second room with the same ids is stored in full."""
    async with db.single_connection(empty_database_url) as connection:
        await migrations.migrate(connection, target=14)
        person = await connection.fetchval(
            "INSERT INTO persons (username, platform, role, first_seen_at, last_seen_at)"
            " VALUES ('carol', 'chaturbate', 'VIEWER', now(), now()) RETURNING id"
        )
        event_id = sample.event_id(30)
        await connection.execute(
            "INSERT INTO events (event_id, method, broadcaster, event_time, raw)"
            " VALUES ($1, 'privateMessage', $2, now(), '{}')",
            event_id,
            sample.ROOM,
        )
        metadata = json.dumps({"event_id": event_id, "broadcaster": "", "method": "privateMessage"})
        await connection.execute(
            "INSERT INTO interactions (person_id, type, content, timestamp, source, metadata)"
            " VALUES ($1, 'DIRECT_MESSAGE', 'hi', now(), 'cb_events', $2::jsonb)",
            person,
            metadata,
        )
        await connection.execute(
            "INSERT INTO quarantined_events (fingerprint, event_id, raw, reason)"
            " VALUES ($1, $1, '{}', 'old')",
            sample.event_id(40),
        )
        await connection.execute(
            "INSERT INTO ingest_cursor (broadcaster, last_event_id, timeout_seconds) VALUES ($1, $2, 30)",
            sample.ROOM,
            event_id,
        )
        await migrations.migrate(connection)
        assert await connection.fetchval("SELECT metadata->>'room' FROM interactions") == sample.ROOM
        assert await connection.fetchval("SELECT broadcaster FROM quarantined_events") == sample.ROOM
    async with db.open_pool(empty_database_url) as pool:
        batch = sample.page(_in_room(_feed(), OTHER), room=OTHER)
        result = await db.write_batch(pool, batch, cursor_broadcaster=OTHER, timeout_seconds=30)
        assert (result.new_events, result.duplicates, result.quarantined) == (4, 0, 1)
        again = sample.page(_feed()[3:], room=sample.ROOM)  # the old room's direct message and broken tip
        result = await db.write_batch(pool, again, cursor_broadcaster=sample.ROOM, timeout_seconds=30)
        assert (result.new_events, result.duplicates, result.quarantined) == (0, 1, 0)
        assert await _counts(pool) == {"events": 5, "interactions": 5, "quarantined_events": 2, "live": 1}


async def test_replaying_two_rooms_recordings_with_the_same_ids_stores_both(
    tmp_path: Path, database_url: str
) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MHC_")}
    env |= {"MHC_DATA_DIR": str(tmp_path / "data"), "MHC_DATABASE_URL": database_url}
    for room in (sample.ROOM, OTHER, sample.ROOM):
        recording = tmp_path / f"{room}.jsonl"
        recording.write_text(json.dumps({"events": _in_room(_feed(), room), "nextUrl": None}) + "\n")
        result = run_command(["replay", "--room", room, str(recording)], env, tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
    assert "0 events stored, 4 already stored" in result.stdout  # the first room again
    connection = await asyncpg.connect(database_url)
    try:
        rooms = await connection.fetch("SELECT broadcaster, count(*) FROM events GROUP BY 1 ORDER BY 1")
        assert [tuple(row) for row in rooms] == [(sample.ROOM, 4), (OTHER, 4)]
        assert await connection.fetchval("SELECT count(*) FROM interactions") == 8
        assert await connection.fetchval("SELECT count(*) FROM quarantined_events") == 2
    finally:
        await connection.close()
