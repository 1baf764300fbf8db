"""db.write_batch on a real PostgreSQL: exactly-once storage, quarantine, sessions, persons, atomicity."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest
import structlog

from daemon import db, errors, ingest, json_depth, metrics
from tests import event_samples as sample
from tests.conftest import shared_path

TIMEOUT = 30


async def _write(pool: asyncpg.Pool, batch: ingest.Batch, room: str = sample.ROOM) -> db.WriteResult:
    return await db.write_batch(pool, batch, cursor_broadcaster=room, timeout_seconds=TIMEOUT)


async def _count(pool: asyncpg.Pool, table: str) -> int:
    value: int = await pool.fetchval(f"SELECT count(*) FROM {table}")
    return value


async def _interactions(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pool.fetch(
        "SELECT p.username, p.role AS person_role, i.type, i.content, i.timestamp, i.source, i.metadata,"
        " i.stream_session_id FROM interactions i JOIN persons p ON p.id = i.person_id"
        " ORDER BY i.timestamp, i.metadata->>'event_id'"
    )
    return rows


async def test_recorded_testbed_response_is_stored_as_a_reader_expects(pool: asyncpg.Pool) -> None:
    body = json.loads(shared_path("fixtures", "testbed-response-cb-events.json").read_text(encoding="utf-8"))
    next_id = parse_qs(urlsplit(body["nextUrl"]).query)["i"][0]
    batch = ingest.parse_page(
        body["events"], broadcaster="mrslaw", received_at=sample.RECEIVED, next_event_id=next_id
    )
    result = await _write(pool, batch, room="mrslaw")
    assert (result.new_events, result.duplicates, result.interactions, result.quarantined) == (8, 0, 8, 0)
    assert result.newest_event_time == dt.datetime(2025, 8, 16, 20, 44, 1, 589000)
    events = await pool.fetch("SELECT event_id, method, broadcaster, event_time, raw FROM events ORDER BY 1")
    assert [row["event_id"] for row in events] == sorted(item["id"] for item in body["events"])
    assert events[0]["raw"] == body["events"][0] and events[0]["broadcaster"] == "mrslaw"
    rows = await _interactions(pool)
    assert [(r["username"], r["type"], r["content"]) for r in rows] == [
        ("mountaingod2", "CHAT_MESSAGE", "hi"),
        ("mountaingod2", "PRIVATE_MESSAGE", "hi"),
        ("mountaingod2", "TIP_EVENT", "hi"),
        ("mountaingod2", "TIP_EVENT", "tipped 25 tokens"),
        ("mountaingod2", "TIP_EVENT", "hi"),
        ("mountaingod2", "UNFOLLOW", "unfollowed"),
        ("mountaingod2", "FOLLOW", "followed"),
        ("mrslaw", "ROOM_SUBJECT_CHANGE", "Welcome"),
    ]
    tips = [r["metadata"] for r in rows if r["type"] == "TIP_EVENT"]
    assert [(m["tokens"], m["isAnon"]) for m in tips] == [(25, False), (25, True), (25, True)]
    assert rows[0]["timestamp"] == dt.datetime(2025, 8, 16, 20, 41, 29, 458000)
    assert {r["source"] for r in rows} == {"cb_events"}
    assert all(r["metadata"]["broadcaster"] == "mrslaw" for r in rows)
    persons = await pool.fetch("SELECT username, role, first_seen_at, last_seen_at FROM persons ORDER BY 1")
    assert [(p["username"], p["role"]) for p in persons] == [("mountaingod2", "VIEWER"), ("mrslaw", "MODEL")]
    assert persons[0]["first_seen_at"] == dt.datetime(2025, 8, 16, 20, 41, 29, 458000)
    assert persons[0]["last_seen_at"] == dt.datetime(2025, 8, 16, 20, 41, 54, 913000)
    cursor = await db.load_cursor(pool, "MrsLaw")
    assert cursor == db.Cursor("mrslaw", "1755377041589-0", TIMEOUT)


async def test_null_next_url_response_keeps_the_committed_cursor(pool: asyncpg.Pool) -> None:
    assert await db.load_cursor(pool, "test_broadcaster") is None
    earlier = sample.page([sample.chat(1, "someone")], next_event_id="1708994000000-0")
    await _write(pool, earlier, room="test_broadcaster")
    body = json.loads(
        shared_path("fixtures", "testbed-response-nexturl-null.json").read_text(encoding="utf-8")
    )
    batch = ingest.parse_page(
        body["events"], broadcaster="test_broadcaster", received_at=sample.RECEIVED, next_event_id=None
    )
    result = await db.write_batch(pool, batch, cursor_broadcaster="test_broadcaster", timeout_seconds=89)
    assert (result.new_events, result.interactions) == (1, 1)
    row = await pool.fetchrow(
        "SELECT timestamp, content FROM interactions WHERE metadata->>'event_id' = $1",
        body["events"][0]["id"],
    )
    assert row is not None and row["timestamp"] == dt.datetime(2024, 2, 27, 0, 41, 24, 737000)
    cursor = await db.load_cursor(pool, "test_broadcaster")
    assert cursor == db.Cursor("test_broadcaster", "1708994000000-0", 89)


async def test_the_same_response_twice_is_stored_once(pool: asyncpg.Pool) -> None:
    items = [sample.chat(1, "bob"), sample.tip(2, "bob"), sample.plain("follow", 3, "carol")]
    duplicates_before = metrics.REGISTRY.get_sample_value("mhc_events_duplicate_total") or 0.0
    first = await _write(pool, sample.page(items))
    again = await _write(pool, sample.page(items))
    assert (first.new_events, first.interactions, first.duplicates) == (3, 3, 0)
    assert (again.new_events, again.interactions, again.duplicates, again.newest_event_time) == (
        0,
        0,
        3,
        None,
    )
    assert (await _count(pool, "events"), await _count(pool, "interactions")) == (3, 3)
    assert await _count(pool, "persons") == 2
    assert metrics.REGISTRY.get_sample_value("mhc_events_duplicate_total") == duplicates_before + 3


async def test_overlapping_redelivery_counts_duplicates_and_adds_no_rows(pool: asyncpg.Pool) -> None:
    items = [sample.chat(i, f"viewer{i % 3}", text=f"line {i}") for i in range(8)]
    first = await _write(pool, sample.page(items[:5]))
    second = await _write(pool, sample.page(items[3:]))
    assert (first.new_events, second.new_events, second.duplicates, second.interactions) == (5, 3, 2, 3)
    assert await _count(pool, "interactions") == 8
    contents = await pool.fetch("SELECT content FROM interactions ORDER BY timestamp")
    assert [r["content"] for r in contents] == [f"line {i}" for i in range(8)]


async def test_identical_content_with_distinct_ids_is_stored_twice(pool: asyncpg.Pool) -> None:
    one = sample.tip(5, "bob", note="| same")
    two = dict(one, id=sample.event_id(5, sequence=1))  # same millisecond, same tipper, same note
    result = await _write(pool, sample.page([one, two]))
    assert (result.new_events, result.interactions) == (2, 2)
    tips = await pool.fetch("SELECT content, metadata->>'tokens' AS tokens FROM interactions")
    assert [(r["content"], r["tokens"]) for r in tips] == [("same", "25"), ("same", "25")]


async def test_an_id_repeated_within_one_page_is_stored_once(pool: asyncpg.Pool) -> None:
    item = sample.chat(1, "bob")
    result = await _write(pool, sample.page([item, item, sample.chat(2, "bob")]))
    assert (result.new_events, result.duplicates, result.interactions) == (2, 1, 2)
    assert await _count(pool, "interactions") == 2


async def test_an_event_whose_events_row_was_deleted_by_hand_gets_no_second_interaction(
    pool: asyncpg.Pool,
) -> None:
    # The interactions guard index, not the events key, meets the repeat: the write is redone guarded.
    items = [sample.chat(1, "bob"), sample.tip(2, "carol")]
    await _write(pool, sample.page(items))
    await pool.execute("DELETE FROM events")
    again = await _write(pool, sample.page([*items, sample.chat(3, "dave")]))
    assert (again.new_events, again.duplicates, again.interactions) == (3, 0, 1)
    assert (await _count(pool, "events"), await _count(pool, "interactions")) == (3, 3)


async def test_malformed_items_are_quarantined_once_and_the_rest_is_stored(pool: asyncpg.Pool) -> None:
    no_text = sample.chat(3, "x")
    del no_text["object"]["message"]["message"]
    nameless = sample.plain("follow", 4, "x")
    del nameless["object"]["user"]["username"]
    items: list[Any] = [
        sample.chat(1, "good"),
        sample.tip(2, "x", tokens="lots"),
        no_text,
        nameless,
        sample.chat(5, "x", text="nul \x00 here"),
        ["not", "an", "event"],
        sample.chat(6, "also_good"),
    ]
    result = await _write(pool, sample.page(items))
    assert (result.new_events, result.interactions, result.quarantined) == (2, 2, 5)
    rows = await pool.fetch("SELECT fingerprint, event_id, method, raw, reason FROM quarantined_events")
    by_id = {r["event_id"]: r for r in rows}
    assert "tokens" in by_id[sample.event_id(2)]["reason"]
    assert "without text" in by_id[sample.event_id(3)]["reason"]
    assert "username" in by_id[sample.event_id(4)]["reason"]
    nul = by_id[sample.event_id(5)]
    assert "NUL" in nul["reason"] and "nul \\u0000 here" in nul["raw"] and nul["method"] == "chatMessage"
    assert json.loads(nul["raw"]) == items[4]
    assert by_id[None]["raw"] == '["not", "an", "event"]' and len(by_id[None]["fingerprint"]) == 64
    assert await pool.fetchval("SELECT count(*) FROM events WHERE event_id = ANY($1)", list(by_id)) == 0
    again = await _write(pool, sample.page(items))
    assert (again.quarantined, again.new_events) == (0, 0)
    assert await _count(pool, "quarantined_events") == 5


@pytest.mark.parametrize("finite_numbers", [True, False], ids=["orjson", "stdlib"])
async def test_an_event_nested_past_the_limit_is_quarantined_and_the_rest_stored(
    pool: asyncpg.Pool, finite_numbers: bool
) -> None:
    edge = sample.deep_chat(2, "edge", json_depth.MAX_DEPTH)
    items = [sample.chat(1, "before"), edge, sample.deep_chat(3, "deep", 1000), sample.chat(4, "after")]
    batch = ingest.parse_page(
        items,
        broadcaster=sample.ROOM,
        received_at=sample.RECEIVED,
        next_event_id=sample.event_id(4),
        finite_numbers=finite_numbers,
    )
    result = await _write(pool, batch)
    assert (result.new_events, result.interactions, result.quarantined) == (3, 3, 1)
    (row,) = await pool.fetch("SELECT event_id, reason, raw FROM quarantined_events")
    assert row["event_id"] == sample.event_id(3)
    assert row["reason"] == f"nested deeper than {json_depth.MAX_DEPTH} levels"
    assert json.loads(row["raw"])["object"]["message"]["message"] == "hello!"
    assert await pool.fetchval("SELECT raw FROM events WHERE event_id = $1", sample.event_id(2)) == edge
    cursor = await db.load_cursor(pool, sample.ROOM)
    assert cursor is not None and cursor.last_event_id == sample.event_id(4)


@pytest.mark.parametrize(
    "position", ["9" * 65, "1755376889458-0\x00", "\ud800"], ids=["long", "nul", "surrogate"]
)
async def test_a_position_the_cursor_cannot_hold_leaves_it_where_it_was(
    pool: asyncpg.Pool, position: str
) -> None:
    await _write(pool, sample.page([sample.chat(1, "bob")]))
    result = await _write(pool, sample.page([sample.chat(2, "bob")], next_event_id=position))
    assert result.new_events == 1
    assert await db.load_cursor(pool, sample.ROOM) == db.Cursor(sample.ROOM, sample.event_id(1), TIMEOUT)


async def test_unknown_method_is_stored_raw_without_interaction(pool: asyncpg.Pool) -> None:
    novel = sample.envelope("tokenRain", 1, {"amount": 3, "user": sample.user("bob")})
    result = await _write(pool, sample.page([novel, sample.chat(2, "bob")]))
    assert (result.new_events, result.unknown_methods, result.interactions) == (2, 1, 1)
    raw = await pool.fetchval("SELECT raw FROM events WHERE method = 'tokenRain'")
    assert raw == novel
    assert (
        await pool.fetchval("SELECT count(*) FROM interactions WHERE metadata->>'method' = 'tokenRain'") == 0
    )


async def _sessions(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pool.fetch(
        "SELECT id, broadcaster, status, started_at, ended_at, end_reason FROM stream_sessions"
        " ORDER BY started_at"
    )
    return rows


async def _session_of(pool: asyncpg.Pool, offset_ms: int) -> Any:
    return await pool.fetchval(
        "SELECT stream_session_id FROM interactions WHERE metadata->>'event_id' = $1",
        sample.event_id(offset_ms),
    )


async def test_broadcast_sessions_open_link_and_close(pool: asyncpg.Pool) -> None:
    before = await _write(pool, sample.page([sample.chat(0, "early")]))
    opened = await _write(pool, sample.page([sample.start(10), sample.chat(11, "bob")]))
    assert (before.sessions_opened, opened.sessions_opened) == (0, 1)
    (live,) = await _sessions(pool)
    assert (live["status"], live["broadcaster"], live["started_at"], live["ended_at"]) == (
        "LIVE",
        sample.ROOM,
        sample.at(10),
        None,
    )
    # Issue 10: a start while LIVE is the next show (its stop never came): the LIVE session ends at its last
    # event with `next_start` and a new one opens. (This test's earlier version expected "the show goes on".)
    again = await _write(pool, sample.page([sample.start(12), sample.tip(13, "carol")]))
    assert (again.sessions_opened, again.sessions_closed) == (1, 1)
    first, live = await _sessions(pool)
    assert (first["status"], first["ended_at"], first["end_reason"]) == ("ENDED", sample.at(11), "next_start")
    assert (live["status"], live["started_at"]) == ("LIVE", sample.at(12))
    closed = await _write(
        pool, sample.page([sample.chat(14, "bob"), sample.stop(20), sample.chat(21, "late")])
    )
    assert (closed.sessions_closed, closed.orphan_stops) == (1, 0)
    first, ended = await _sessions(pool)
    assert (ended["status"], ended["ended_at"], ended["end_reason"]) == (
        "ENDED",
        sample.at(20),
        "broadcast_stop",
    )
    assert await _session_of(pool, 0) is None
    for offset in (10, 11):
        assert await _session_of(pool, offset) == first["id"], offset
    for offset in (12, 13, 14, 20):
        assert await _session_of(pool, offset) == ended["id"], offset
    assert await _session_of(pool, 21) is None


async def test_a_whole_show_in_one_page_and_a_stop_without_session(pool: asyncpg.Pool) -> None:
    with structlog.testing.capture_logs() as captured:
        orphan = await _write(pool, sample.page([sample.stop(1)]))
    (warning,) = [line for line in captured if line["event"] == "broadcast_stop_without_session"]
    assert (warning["log_level"], warning["event_id"]) == ("warning", sample.event_id(1))
    assert (orphan.orphan_stops, orphan.sessions_closed, orphan.new_events, orphan.interactions) == (
        1,
        0,
        1,
        1,
    )
    assert await _sessions(pool) == []
    show = await _write(
        pool,
        sample.page(
            [
                sample.start(10),
                sample.chat(11, "bob"),
                sample.stop(12),
                sample.start(20),
                sample.chat(21, "x"),
            ]
        ),
    )
    assert (show.sessions_opened, show.sessions_closed, show.orphan_stops) == (2, 1, 0)
    first, second = await _sessions(pool)
    assert (first["status"], first["ended_at"], second["status"]) == ("ENDED", sample.at(12), "LIVE")
    assert await _session_of(pool, 11) == first["id"]
    assert await _session_of(pool, 21) == second["id"]
    assert await _session_of(pool, 1) is None


async def test_a_restarted_writer_keeps_linking_to_the_open_session(database_url: str) -> None:
    async with db.open_pool(database_url) as first_run:
        await _write(first_run, sample.page([sample.start(10), sample.chat(11, "bob")]))
    async with db.open_pool(database_url) as second_run:
        result = await _write(second_run, sample.page([sample.chat(12, "bob")]))
        assert result.sessions_opened == 0
        (live,) = await _sessions(second_run)
        assert live["status"] == "LIVE"
        assert await _session_of(second_run, 12) == live["id"]
        # An event older than the live session's start (a replayed backlog) is not put inside the show.
        await _write(second_run, sample.page([sample.chat(5, "replayed")]))
        assert await _session_of(second_run, 5) is None


async def test_a_failure_mid_transaction_stores_nothing_and_keeps_the_cursor(pool: asyncpg.Pool) -> None:
    await _write(pool, sample.page([sample.chat(1, "bob")]))
    # A real constraint of the database refuses the last interaction of the next page, after its events,
    # persons and session rows were already written inside the transaction.
    await pool.execute("ALTER TABLE interactions ADD CONSTRAINT test_refuses_boom CHECK (content <> 'boom')")
    doomed = sample.page(
        [
            sample.start(10),
            sample.chat(11, "newcomer"),
            sample.tip(12, "x", tokens=0),
            sample.chat(13, "bob", "boom"),
        ]
    )
    counts = [await _count(pool, t) for t in ("events", "interactions", "persons", "stream_sessions")]
    with pytest.raises(errors.StorageError, match="test_refuses_boom"):
        await _write(pool, doomed)
    assert [await _count(pool, t) for t in ("events", "interactions", "persons", "stream_sessions")] == counts
    assert await _count(pool, "quarantined_events") == 0
    assert await db.load_cursor(pool, sample.ROOM) == db.Cursor(sample.ROOM, sample.event_id(1), TIMEOUT)
    await pool.execute("ALTER TABLE interactions DROP CONSTRAINT test_refuses_boom")
    retried = await _write(pool, doomed)
    assert (retried.new_events, retried.interactions, retried.quarantined, retried.sessions_opened) == (
        3,
        3,
        1,
        1,
    )
    assert await db.load_cursor(pool, sample.ROOM) == db.Cursor(sample.ROOM, sample.event_id(13), TIMEOUT)


async def test_last_seen_moves_forward_and_first_seen_back_across_batches(pool: asyncpg.Pool) -> None:
    """Issue 10: an older event arriving later moves first_seen_at back; last_seen_at stays the newest."""
    await _write(pool, sample.page([sample.chat(5_000, "Bob"), sample.chat(9_000, "bob")]))
    await _write(pool, sample.page([sample.chat(1_000, "BOB")]))
    person = await db.find_person(pool, "bob")
    assert person is not None
    assert (person.first_seen_at, person.last_seen_at) == (sample.at(1_000), sample.at(9_000))
    assert await _count(pool, "persons") == 1


async def test_smk_lover_is_created_excluded_and_listed(pool: asyncpg.Pool) -> None:
    await _write(pool, sample.page([sample.tip(1, "SMK_Lover"), sample.chat(2, "smk_lover")]))
    person = await db.find_person(pool, "smk_lover")
    assert person is not None and person.is_excluded
    lists = await pool.fetch(
        "SELECT w.name FROM watchlist_members m JOIN watchlists w ON w.id = m.watchlist_id"
        " WHERE m.person_id = $1",
        person.id,
    )
    assert [r["name"] for r in lists] == ["Excluded"]
    other = await db.find_person(pool, "alice_cam")
    assert other is None, "no person for a broadcaster who did nothing"


async def test_current_alias_is_honoured_even_beside_the_original_name(pool: asyncpg.Pool) -> None:
    person = await db.find_or_create_person(pool, "oldname", seen_at=sample.at(0))
    await pool.execute(
        "INSERT INTO person_aliases (person_id, alias, valid_from) VALUES ($1, 'newname', $2)",
        person.id,
        sample.at(0),
    )
    result = await _write(pool, sample.page([sample.chat(10, "NewName"), sample.chat(20, "oldname")]))
    assert result.interactions == 2
    owners = await pool.fetch("SELECT DISTINCT person_id FROM interactions")
    assert [r["person_id"] for r in owners] == [person.id]
    assert await _count(pool, "persons") == 1
    found = await db.find_person(pool, "newname")
    assert found is not None and found.last_seen_at == sample.at(20)


async def test_roles_widen_when_one_name_is_seen_as_model_and_viewer(pool: asyncpg.Pool) -> None:
    elsewhere = sample.chat(2, sample.ROOM, text="visiting")
    elsewhere["object"]["broadcaster"] = "other_room"
    result = await _write(pool, sample.page([sample.start(1), elsewhere]))
    assert result.interactions == 2
    model = await db.find_person(pool, sample.ROOM)
    assert model is not None and model.role == "BOTH"
    await _write(pool, sample.page([sample.chat(3, "viewer_only")]))
    await _write(pool, sample.page([sample.chat(4, "viewer_only")]))
    viewer = await db.find_person(pool, "viewer_only")
    assert viewer is not None and viewer.role == "VIEWER"


async def test_an_empty_page_moves_only_the_cursor(pool: asyncpg.Pool) -> None:
    result = await _write(pool, sample.page([], next_event_id="1755376999999-0"))
    assert result == db.WriteResult(0, 0, 0, 0, 0, 0, 0, 0, None)
    assert await db.load_cursor(pool, sample.ROOM) == db.Cursor(sample.ROOM, "1755376999999-0", TIMEOUT)
