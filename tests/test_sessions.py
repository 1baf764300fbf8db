"""Stream-session rules (issue 10): the pure module, the writer applying it on a real PostgreSQL, the
staleness task and `sessions repair` as a child process over a database an earlier version wrote."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import os
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import hypothesis
import structlog
from hypothesis import strategies as st

from daemon import db, metrics, runtime_state, sessions, supervisor
from tests import event_samples as sample
from tests.daemon_process import run_command

ROOM = sample.ROOM
T0 = dt.datetime(2026, 1, 1, 20, 0)
MINUTE = dt.timedelta(minutes=1)
STALE = dt.timedelta(minutes=30)


def _ids() -> Any:
    counter = itertools.count(1)
    return lambda: uuid.UUID(int=next(counter))


def _at(minutes: float) -> dt.datetime:
    return T0 + minutes * MINUTE


def _event(minutes: float, kind: sessions.Kind = None, room: str = ROOM) -> sessions.Event:
    return sessions.Event(f"e{minutes}-{kind}", room, _at(minutes), kind)


# --- the pure rules ---------------------------------------------------------------------------------------


def test_a_start_while_live_ends_it_at_its_last_event_and_opens_the_next() -> None:
    live = sessions.Known(uuid.UUID(int=99), ROOM, _at(0), None, last_event_at=_at(40))
    out = sessions.decide([_event(45), _event(600, "start"), _event(601)], [live], _ids())
    assert out.ended == [sessions.Ended(live.id, _at(45), "next_start")]
    (opened,) = out.opened
    assert (opened.started_at, opened.ended_at, opened.end_reason) == (_at(600), None, None)
    assert out.links == [live.id, opened.id, opened.id]


def test_a_start_while_live_without_events_ends_it_at_its_start() -> None:
    live = sessions.Known(uuid.UUID(int=99), ROOM, _at(0), None)
    out = sessions.decide([_event(600, "start")], [live], _ids())
    assert out.ended == [sessions.Ended(live.id, _at(0), "next_start")]


def test_a_stop_ends_only_a_session_that_started_before_it() -> None:
    live = sessions.Known(uuid.UUID(int=99), ROOM, _at(100), None)
    out = sessions.decide([_event(50, "stop"), _event(120), _event(130, "stop")], [live], _ids())
    (stale,) = out.stale_stops
    assert (stale.at, stale.session_started_at, stale.why) == (_at(50), _at(100), "stale")
    assert out.ended == [sessions.Ended(live.id, _at(130), "broadcast_stop")]
    assert out.links == [None, live.id, live.id]


def test_a_stop_with_no_session_anywhere_is_an_orphan_and_a_repeated_stop_is_stale() -> None:
    ended = sessions.Known(uuid.UUID(int=7), ROOM, _at(0), _at(10))
    out = sessions.decide([_event(20, "stop"), _event(10, "stop")], [ended], _ids())
    assert [(stop.at, stop.why) for stop in out.ignored_stops] == [(_at(20), "orphan"), (_at(10), "stale")]
    assert out.ended == [] and out.opened == []
    assert out.links == [None, ended.id]


def test_old_events_link_to_the_old_session_and_leave_the_live_one_alone() -> None:
    old = sessions.Known(uuid.UUID(int=1), ROOM, _at(0), _at(60))
    live = sessions.Known(uuid.UUID(int=2), ROOM, _at(1000), None)
    replay = [_event(0, "start"), _event(5), _event(60, "stop"), _event(70), _event(1001)]
    out = sessions.decide(replay, [old, live], _ids())
    assert out.ended == [] and out.opened == []
    assert out.links == [old.id, old.id, old.id, None, live.id]
    assert [stop.why for stop in out.ignored_stops] == ["stale"]


def test_an_old_recording_before_every_session_opens_a_past_session_only() -> None:
    live = sessions.Known(uuid.UUID(int=2), ROOM, _at(1000), None)
    out = sessions.decide([_event(10, "start"), _event(11), _event(12)], [live], _ids())
    (past,) = out.opened
    assert (past.started_at, past.ended_at, past.end_reason) == (_at(10), _at(12), "next_start")
    assert out.ended == []
    assert out.links == [past.id, past.id, past.id]


def test_a_whole_show_and_the_next_start_in_one_batch() -> None:
    batch = [_event(0, "start"), _event(1), _event(2, "stop"), _event(3), _event(5, "start"), _event(6)]
    out = sessions.decide(batch, [], _ids())
    first, second = out.opened
    assert (first.ended_at, first.end_reason, second.ended_at) == (_at(2), "broadcast_stop", None)
    assert out.links == [first.id, first.id, first.id, None, second.id, second.id]


def test_rooms_are_independent() -> None:
    out = sessions.decide([_event(0, "start"), _event(1, "start", room="other")], [], _ids())
    assert [(item.broadcaster, item.ended_at) for item in out.opened] == [(ROOM, None), ("other", None)]


def test_the_stats_api_room_state() -> None:
    assert sessions.stats_room_state({"time_online": -1}) == "offline"
    assert sessions.stats_room_state({"time_online": "-1"}) == "offline"
    assert sessions.stats_room_state({"time_online": 12}) == "online"
    assert sessions.stats_room_state({"time_online": 0}) == "online"
    for payload in ({}, {"time_online": None}, {"time_online": True}, {"time_online": "x"}, None):
        assert sessions.stats_room_state(payload) == "unknown"


def test_the_staleness_rule() -> None:
    last = _at(0)
    offline = sessions.StatsReport(_at(10), "offline")
    online = sessions.StatsReport(_at(50), "online")
    assert not sessions.is_stale(last, _at(29), STALE, offline)
    assert sessions.is_stale(last, _at(30), STALE, offline)
    assert not sessions.is_stale(last, _at(59), STALE, None), "no Stats report: twice the setting"
    assert sessions.is_stale(last, _at(60), STALE, None)
    assert not sessions.is_stale(last, _at(70), STALE, online), "online, recently: a quiet show"
    assert sessions.is_stale(last, _at(90), STALE, online), "online, but the report is old too"
    before_last = sessions.StatsReport(_at(-1), "offline")
    assert not sessions.is_stale(last, _at(40), STALE, before_last), "a report older than the last event"


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(
    kinds=st.lists(st.sampled_from([None, None, None, "start", "stop"]), max_size=40),
    gaps=st.lists(st.integers(min_value=0, max_value=90), min_size=40, max_size=40),
    live_from=st.one_of(st.none(), st.integers(min_value=-50, max_value=50)),
)
def test_in_order_feeds_keep_the_session_invariants(
    kinds: list[sessions.Kind], gaps: list[int], live_from: int | None
) -> None:
    """Whatever an in-order feed holds: every link's session contains the event's time, no session ends
    before it starts, at most one session per room stays LIVE, and every stop is used or recorded."""
    moments = list(itertools.accumulate(gaps[: len(kinds)]))
    events = [_event(minute, kind) for minute, kind in zip(moments, kinds, strict=True)]
    known = [] if live_from is None else [sessions.Known(uuid.UUID(int=0), ROOM, _at(live_from), None)]
    out = sessions.decide(events, known, _ids())
    spans = {item.id: (item.started_at, item.ended_at) for item in out.opened}
    ends = {item.id: item.ended_at for item in out.ended}
    for item in known:
        spans[item.id] = (item.started_at, ends.get(item.id))
    for event, link in zip(events, out.links, strict=True):
        if link is not None:
            started, ended = spans[link]
            assert started <= event.at and (ended is None or event.at <= ended)
    assert all(ended is None or started <= ended for started, ended in spans.values())
    assert sum(1 for _started, ended in spans.values() if ended is None) <= 1
    stops = sum(1 for kind in kinds if kind == "stop")
    reasons = [item.end_reason for item in out.opened] + [item.end_reason for item in out.ended]
    used = reasons.count("broadcast_stop")
    assert used + len(out.ignored_stops) == stops


# --- the writer -------------------------------------------------------------------------------------------

TIMEOUT = 30


async def _write(pool: asyncpg.Pool, items: list[Any]) -> db.WriteResult:
    return await db.write_batch(pool, sample.page(items), cursor_broadcaster=ROOM, timeout_seconds=TIMEOUT)


async def _sessions(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pool.fetch(
        "SELECT id, status, started_at, ended_at, end_reason FROM stream_sessions ORDER BY started_at"
    )
    return rows


async def _session_of(pool: asyncpg.Pool, offset_ms: int) -> Any:
    return await pool.fetchval(
        "SELECT stream_session_id FROM interactions WHERE metadata->>'event_id' = $1",
        sample.event_id(offset_ms),
    )


HOUR_MS = 3_600_000


async def test_a_missed_stop_gives_two_sessions(pool: asyncpg.Pool) -> None:
    await _write(pool, [sample.start(0), sample.chat(1_000, "bob"), sample.tip(2_000, "carol")])
    # The show's broadcastStop never arrived; the next day's show starts.
    result = await _write(pool, [sample.start(24 * HOUR_MS), sample.chat(24 * HOUR_MS + 1, "bob")])
    assert (result.sessions_opened, result.sessions_closed) == (1, 1)
    first, second = await _sessions(pool)
    assert (first["status"], first["ended_at"], first["end_reason"]) == (
        "ENDED",
        sample.at(2_000),
        "next_start",
    )
    assert (second["status"], second["started_at"], second["ended_at"]) == (
        "LIVE",
        sample.at(24 * HOUR_MS),
        None,
    )
    assert await _session_of(pool, 2_000) == first["id"]
    assert await _session_of(pool, 24 * HOUR_MS + 1) == second["id"]


async def test_a_stale_stop_is_ignored_and_recorded(pool: asyncpg.Pool) -> None:
    await _write(pool, [sample.start(HOUR_MS), sample.chat(HOUR_MS + 1, "bob")])
    before = metrics.REGISTRY.get_sample_value("mhc_broadcast_stops_stale_total") or 0.0
    with structlog.testing.capture_logs() as captured:
        result = await _write(pool, [sample.stop(1_000), sample.chat(HOUR_MS + 2, "bob")])
    (line,) = [entry for entry in captured if entry["event"] == "broadcast_stop_stale"]
    assert (line["log_level"], line["event_id"]) == ("warning", sample.event_id(1_000))
    assert (result.stale_stops, result.sessions_closed, result.orphan_stops) == (1, 0, 0)
    assert metrics.REGISTRY.get_sample_value("mhc_broadcast_stops_stale_total") == before + 1
    (live,) = await _sessions(pool)
    assert (live["status"], live["ended_at"]) == ("LIVE", None)
    assert await _session_of(pool, HOUR_MS + 2) == live["id"], "the rest of the show keeps its session"
    assert await _session_of(pool, 1_000) is None


async def test_replaying_an_old_recording_leaves_the_current_session_alone(pool: asyncpg.Pool) -> None:
    old_show = [sample.start(0), sample.chat(1_000, "bob"), sample.stop(2_000)]
    await _write(pool, old_show)
    await _write(pool, [sample.start(5 * HOUR_MS), sample.chat(5 * HOUR_MS + 1, "carol")])
    old, live = await _sessions(pool)
    # The recording is replayed with events the first pass never stored (and its start/stop again).
    await pool.execute(
        "DELETE FROM events WHERE event_id = ANY($1)", [sample.event_id(0), sample.event_id(2_000)]
    )
    await pool.execute(
        "DELETE FROM interactions WHERE metadata->>'event_id' = ANY($1)",
        [sample.event_id(0), sample.event_id(2_000)],
    )
    result = await db.write_batch(
        pool,
        sample.page([sample.start(0), sample.chat(1_500, "dave"), sample.stop(2_000)]),
        cursor_broadcaster=None,
        timeout_seconds=TIMEOUT,
    )
    assert (result.sessions_opened, result.sessions_closed) == (0, 0)
    assert await _sessions(pool) == [old, live]
    for offset in (0, 1_500, 2_000):
        assert await _session_of(pool, offset) == old["id"], offset
    assert (live["status"], live["ended_at"]) == ("LIVE", None)


# --- staleness --------------------------------------------------------------------------------------------


async def _stats_snapshot(pool: asyncpg.Pool, at: dt.datetime, time_online: int) -> None:
    person = await db.find_or_create_person(pool, ROOM, seen_at=at, role="MODEL")
    await db.record_snapshot(
        pool,
        person_id=person.id,
        source="cb_stats",
        captured_at=at,
        raw_payload={"username": ROOM, "time_online": time_online},
        normalized_metrics={"time_online_minutes": None if time_online == -1 else time_online},
    )


async def test_a_stale_live_session_is_ended_by_the_staleness_rule(pool: asyncpg.Pool) -> None:
    await _write(pool, [sample.start(0), sample.chat(60_000, "bob")])
    last = sample.at(60_000)
    ended = await supervisor.check_session_staleness(pool, now=last + 29 * MINUTE, stale_after=STALE)
    assert ended == [] and (await _sessions(pool))[0]["status"] == "LIVE"
    await _stats_snapshot(pool, last + 5 * MINUTE, time_online=42)  # online: a quiet show
    assert await supervisor.check_session_staleness(pool, now=last + 31 * MINUTE, stale_after=STALE) == []
    await _stats_snapshot(pool, last + 20 * MINUTE, time_online=-1)  # offline
    with structlog.testing.capture_logs() as captured:
        ended = await supervisor.check_session_staleness(pool, now=last + 31 * MINUTE, stale_after=STALE)
    (session,) = await _sessions(pool)
    assert [item.id for item in ended] == [session["id"]]
    assert (session["status"], session["ended_at"], session["end_reason"]) == ("ENDED", last, "stale")
    assert [entry["event"] for entry in captured] == ["session_ended_stale"]


async def test_without_a_stats_report_staleness_waits_twice_as_long_and_checks_periodically(
    pool: asyncpg.Pool,
) -> None:
    await _write(pool, [sample.start(0), sample.chat(60_000, "bob")])
    last = sample.at(60_000)
    state = runtime_state.RuntimeState(live_session_id="x")
    stop = asyncio.Event()
    clock_values = [last + 59 * MINUTE, last + 61 * MINUTE]
    ticks = itertools.count()

    def clock() -> dt.datetime:
        return clock_values[min(next(ticks), len(clock_values) - 1)]

    # The first check (at start-up, 59 min) leaves it; a later one (61 min), 0.05 s apart, ends it.
    task = asyncio.create_task(
        supervisor.run_session_staleness(
            pool, state, stop, stale_after=STALE, clock=clock, period=0.05, jitter_seconds=0
        )
    )
    for _ in range(100):
        await asyncio.sleep(0.02)
        if (await _sessions(pool))[0]["status"] == "ENDED":
            break
    stop.set()
    await asyncio.wait_for(task, timeout=5)
    (session,) = await _sessions(pool)
    assert (session["status"], session["ended_at"], session["end_reason"]) == ("ENDED", last, "stale")
    assert next(ticks) >= 2, "not ended by the first check (59 min), ended by a later one (61 min)"
    assert state.live_session_id is None


async def test_the_staleness_task_ends_a_session_already_stale_at_start_up(pool: asyncpg.Pool) -> None:
    await _write(pool, [sample.start(0), sample.chat(60_000, "bob")])
    last = sample.at(60_000)
    state, stop = runtime_state.RuntimeState(live_session_id="x"), asyncio.Event()
    # An hour between checks: only the check at start-up can end it within this test.
    task = asyncio.create_task(
        supervisor.run_session_staleness(
            pool, state, stop, stale_after=STALE, clock=lambda: last + 2 * STALE, period=3600
        )
    )
    try:
        for _ in range(100):
            if (await _sessions(pool))[0]["status"] == "ENDED":
                break
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=5)
    (session,) = await _sessions(pool)
    assert (session["status"], session["ended_at"], session["end_reason"]) == ("ENDED", last, "stale")
    assert state.live_session_id is None


async def test_staleness_leaves_a_session_that_got_a_newer_event_meanwhile(pool: asyncpg.Pool) -> None:
    await _write(pool, [sample.start(0), sample.chat(60_000, "bob")])
    (session,) = await _sessions(pool)
    ending = sessions.Ended(session["id"], sample.at(60_000), "stale")
    await _write(pool, [sample.chat(120_000, "bob")])
    assert await db.end_stale_sessions(pool, [ending]) == []
    assert (await _sessions(pool))[0]["status"] == "LIVE"


# --- sessions repair --------------------------------------------------------------------------------------


def _env(tmp_path: Path, database_url: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MHC_")}
    env.update(MHC_DATA_DIR=str(tmp_path / "data"), MHC_DATABASE_URL=database_url, MHC_CB_USERNAME=ROOM)
    return env


def _repair(tmp_path: Path, database_url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_command(["sessions", "repair", *extra], _env(tmp_path, database_url), tmp_path)


async def _previous_version_wrote(pool: asyncpg.Pool) -> dict[str, uuid.UUID]:
    """What the earlier writer left: two shows merged into one session (the first show's stop was missed, the
    second's start ignored as "already live"), and a backwards session (a stale stop ended today's show
    before it started; its later events got no session). Written with plain SQL, end_reason NULL."""
    day = 24 * HOUR_MS
    # Events and interactions through today's writer, then sessions rewritten as the old one had them.
    await _write(pool, [sample.start(0), sample.chat(1_000, "bob"), sample.tip(2_000, "carol")])
    await _write(pool, [sample.start(day), sample.chat(day + 1_000, "bob"), sample.stop(day + 5_000)])
    await _write(pool, [sample.start(3 * day), sample.chat(3 * day + 1_000, "dave")])
    await _write(pool, [sample.stop(2 * day), sample.chat(3 * day + 2_000, "erin")])
    await pool.execute("UPDATE interactions SET stream_session_id = NULL")
    await pool.execute("DELETE FROM stream_sessions")
    merged, backwards = uuid.UUID(int=1), uuid.UUID(int=2)
    await pool.execute(
        "INSERT INTO stream_sessions (id, broadcaster, started_at, ended_at, status) VALUES"
        " ($1, $3, $4, $5, 'ENDED'), ($2, $3, $6, $7, 'ENDED')",
        merged,
        backwards,
        ROOM,
        sample.at(0),
        sample.at(day + 5_000),
        sample.at(3 * day),
        sample.at(2 * day),
    )
    await pool.execute(
        "UPDATE interactions SET stream_session_id = $1 WHERE timestamp BETWEEN $2 AND $3",
        merged,
        sample.at(0),
        sample.at(day + 5_000),
    )
    await pool.execute(
        "UPDATE interactions SET stream_session_id = $1 WHERE metadata->>'event_id' = $2",
        backwards,
        sample.event_id(3 * day),
    )
    return {"merged": merged, "backwards": backwards}


async def _snapshot_of_sessions(pool: asyncpg.Pool) -> list[tuple[Any, ...]]:
    rows = await pool.fetch(
        "SELECT id, status, started_at, ended_at, end_reason FROM stream_sessions ORDER BY started_at"
    )
    links = await pool.fetch(
        "SELECT metadata->>'event_id' AS id, stream_session_id FROM interactions ORDER BY 1"
    )
    return [tuple(row) for row in rows] + [tuple(row) for row in links]


async def test_sessions_repair_fixes_merged_shows_and_a_backwards_session(
    pool: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    ids = await _previous_version_wrote(pool)
    day = 24 * HOUR_MS
    before = await _snapshot_of_sessions(pool)

    dry = _repair(tmp_path, database_url, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "dry run: nothing was changed" in dry.stdout
    assert await _snapshot_of_sessions(pool) == before

    done = await asyncio.to_thread(_repair, tmp_path, database_url)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # A split's new session id is drawn afresh in each run; the ids written above are all 00000000-0000-...
    new_ids = re.compile(r"\b(?!00000000-0000)[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")
    assert [new_ids.sub("<new>", line) for line in lines[:-1]] == [
        new_ids.sub("<new>", line) for line in dry.stdout.splitlines()[:-1]
    ], "the dry run printed the same changes"
    first, second, third = await _sessions(pool)
    # The merged session is the first show again, ended at its last event by the next start.
    assert (first["id"], first["ended_at"], first["end_reason"]) == (
        ids["merged"],
        sample.at(2_000),
        "next_start",
    )
    # The second show gets its own session, ended by its stop.
    assert (second["started_at"], second["ended_at"], second["end_reason"]) == (
        sample.at(day),
        sample.at(day + 5_000),
        "broadcast_stop",
    )
    # The backwards session ends at its last event (stale: long ago, no Stats report).
    assert (third["id"], third["ended_at"], third["end_reason"]) == (
        ids["backwards"],
        sample.at(3 * day + 2_000),
        "stale",
    )
    assert any("merged show split" in line and str(ids["merged"]) in line for line in lines)
    assert any("split: the broadcastStart at" in line for line in lines)
    assert any("backwards session fixed" in line and str(ids["backwards"]) in line for line in lines)
    assert any(line.startswith("relinked 2 interactions: session none ->") for line in lines), lines
    for offset, session in (
        (1_000, first),
        (day + 1_000, second),
        (day + 5_000, second),
        (3 * day + 2_000, third),
    ):
        assert await _session_of(pool, offset) == session["id"], offset
    assert await _session_of(pool, 2 * day) is None, "the stale stop belongs to no show"

    again = _repair(tmp_path, database_url)
    assert again.stdout.strip() == "sessions repair: nothing to change", again.stdout
