"""ingest.merge: several consecutive responses written in one transaction store exactly what writing each in
turn stores (the writer merges the pages queued behind a backlog)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import asyncpg

from daemon import db, ingest
from daemon.simulator import traffic
from tests import event_samples as sample

TABLES = (
    "events, interactions, persons, stream_sessions, ingest_cursor, quarantined_events, watchlist_members"
)


def _pages() -> list[ingest.Batch]:
    """Two shows cut into pages with everything that crosses a page edge: a session that opens in one page
    and ends in another, a re-delivered tail, a malformed item, a null nextUrl, a repeated id in one page."""
    stream = traffic.build(120, seed=3, broadcaster=sample.ROOM, shows=2, malformed_rate=0.05).events
    cuts = [
        (stream[0:25], "last"),
        (stream[20:50], "last"),  # five events delivered again
        ([*stream[50:61], stream[55]], None),  # nextUrl null keeps the cursor; an id twice in one page
        (stream[61:90], "last"),
        (stream[90:120], "last"),
    ]
    pages = []
    for index, (items, next_id) in enumerate(cuts):
        ids = [item["id"] for item in items if isinstance(item.get("id"), str)]
        pages.append(
            ingest.parse_page(
                items,
                broadcaster=sample.ROOM,
                received_at=sample.RECEIVED + dt.timedelta(seconds=index),
                next_event_id=ids[-1] if next_id == "last" else None,
            )
        )
    return pages


async def _state(pool: asyncpg.Pool) -> dict[str, list[Any]]:
    """Every stored row, without the ids the writer generates (sessions are named by their start)."""
    queries = {
        "events": "SELECT event_id, method, broadcaster, event_time, received_at, raw FROM events ORDER BY 1",
        "interactions": "SELECT p.username, i.type, i.content, i.timestamp, i.metadata, s.started_at"
        " FROM interactions i JOIN persons p ON p.id = i.person_id"
        " LEFT JOIN stream_sessions s ON s.id = i.stream_session_id ORDER BY i.metadata->>'event_id'",
        "persons": "SELECT username, role, first_seen_at, last_seen_at, is_excluded FROM persons ORDER BY 1",
        "sessions": "SELECT broadcaster, started_at, ended_at, status FROM stream_sessions ORDER BY 2",
        "cursor": "SELECT broadcaster, last_event_id FROM ingest_cursor",
        "quarantined": "SELECT fingerprint, reason FROM quarantined_events ORDER BY 1",
    }
    return {name: [tuple(row) for row in await pool.fetch(query)] for name, query in queries.items()}


async def test_merged_pages_store_what_the_pages_one_by_one_store(pool: asyncpg.Pool) -> None:
    pages = _pages()
    one_by_one = [
        await db.write_batch(pool, page, cursor_broadcaster=sample.ROOM, timeout_seconds=30) for page in pages
    ]
    expected = await _state(pool)
    await pool.execute(f"TRUNCATE {TABLES} CASCADE")

    merged = await db.write_batch(
        pool, ingest.merge(pages), cursor_broadcaster=sample.ROOM, timeout_seconds=30
    )

    assert await _state(pool) == expected
    assert merged.new_events == sum(result.new_events for result in one_by_one) == 116
    assert merged.duplicates == sum(result.duplicates for result in one_by_one) == 6
    assert merged.quarantined == sum(result.quarantined for result in one_by_one) == 4
    assert (merged.sessions_opened, merged.sessions_closed) == (2, 2)
    assert expected["cursor"] == [(sample.ROOM, pages[-1].next_event_id)]


def test_merge_keeps_each_events_receipt_time_and_the_last_named_position() -> None:
    first = sample.page([sample.chat(0, "bob")], next_event_id="a")
    later = ingest.parse_page(
        [sample.chat(5, "eve"), sample.chat(6, "eve", sequence=1)],
        broadcaster=sample.ROOM,
        received_at=sample.RECEIVED + dt.timedelta(seconds=9),
        next_event_id=None,
    )
    merged = ingest.merge([first, later])
    assert [event.event_id for event in merged.events] == [
        sample.event_id(0),
        sample.event_id(5),
        sample.event_id(6, 1),
    ]
    assert merged.receipt_times() == [first.received_at, later.received_at, later.received_at]
    assert merged.next_event_id == "a"
    assert ingest.merge([first]) is first
