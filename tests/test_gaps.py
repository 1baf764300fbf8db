"""Gaps in the feed, never silent: the rule (ingest.find_gap), its storage with the cursor move, and the
daemon as a child process against the simulator's `jump` fault and every ordinary fault."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import yarl

from daemon import db, errors, ingest, metrics, room_unit, spool
from daemon.simulator import events, traffic
from tests import chaos_support as chaos
from tests import event_samples as sample
from tests.daemon_process import (
    BROADCASTER,
    TOKEN,
    DaemonProcess,
    daemon_env,
    run_command,
    running_daemon,
    wait_for_count,
)

COUNT_EVENTS = "SELECT count(*) FROM events"
MINUTE_MS = 60_000


def _gap(
    asked_offset: int | None,
    next_offset: int | None,
    *,
    waited: float = 1.0,
    continuation: bool = False,
    last_offset: int | None = None,
) -> ingest.Gap | None:
    asked = ingest.Asked(
        sample.event_id(asked_offset) if asked_offset is not None else None, waited, continuation
    )
    return ingest.find_gap(
        asked,
        sample.event_id(last_offset) if last_offset is not None else None,
        sample.event_id(next_offset) if next_offset is not None else None,
        broadcaster=sample.ROOM,
        received_at=sample.RECEIVED.replace(tzinfo=None),
    )


# -- the rule ------------------------------------------------------------------------------------------------


def test_a_continuation_minutes_past_the_position_asked_for_is_a_gap() -> None:
    gap = _gap(0, 5 * MINUTE_MS, continuation=True)
    assert gap == ingest.Gap(
        broadcaster=sample.ROOM,
        after_event_id=sample.event_id(0),
        resumed_event_id=sample.event_id(5 * MINUTE_MS),
        gap_from=sample.at(0),
        gap_to=sample.at(5 * MINUTE_MS),
        reason="continuation_jump",
        detected_at=sample.RECEIVED.replace(tzinfo=None),
    )
    assert _gap(0, 5 * MINUTE_MS, continuation=False).reason == "empty_page_jump"  # type: ignore[union-attr]


def test_an_empty_long_poll_may_move_the_position_by_its_wait_plus_the_margin() -> None:
    """Idling: the API may move `i` towards its own now, by at most what the request waited (plus margin)."""
    margin_ms = int(ingest.GAP_MARGIN_SECONDS * 1000)
    assert _gap(0, 0) is None  # the API kept the position
    assert _gap(0, 10_000, waited=10.0) is None
    assert _gap(0, 10_000 + margin_ms, waited=10.0) is None
    assert _gap(0, 10_000 + margin_ms + 1, waited=10.0) is not None
    # Ten minutes of retries (5xx, 429, a full spool) widen the allowance: the position waited all along.
    assert _gap(0, 10 * MINUTE_MS, waited=600.0) is None


def test_re_deliveries_null_next_urls_first_requests_and_timeless_ids_make_no_gap() -> None:
    assert _gap(5 * MINUTE_MS, 0) is None  # the position moved back: events come again
    assert _gap(0, None) is None  # null nextUrl and nothing to resume at
    assert _gap(None, 5 * MINUTE_MS) is None  # "all latest events": no position was asked for
    asked = ingest.Asked("not-a-time", 1.0)
    assert ingest.find_gap(asked, None, "also-not", broadcaster="r", received_at=sample.at(0)) is None
    huge = ingest.Asked("9" * 5_000 + "-0", 1.0)  # any `i` a nextUrl named: more digits than int() reads
    assert ingest.find_gap(huge, None, sample.event_id(0), broadcaster="r", received_at=sample.at(0)) is None


def test_a_page_of_events_covers_the_feed_up_to_its_last_event() -> None:
    # nextUrl at the last delivered event (the documented norm), however far that is from the request.
    assert _gap(0, 20 * MINUTE_MS, last_offset=20 * MINUTE_MS) is None
    gap = _gap(0, 20 * MINUTE_MS, last_offset=MINUTE_MS)
    assert gap is not None and gap.reason == "jump_after_events"
    assert (gap.after_event_id, gap.gap_from) == (sample.event_id(MINUTE_MS), sample.at(MINUTE_MS))


def test_parse_page_finds_the_gap_and_merge_and_split_keep_it_with_the_cursor() -> None:
    asked = ingest.Asked(sample.event_id(0), 0.5, continuation=True)
    jumped = ingest.parse_page(
        [],
        broadcaster=sample.ROOM,
        received_at=sample.RECEIVED,
        next_event_id=sample.event_id(7 * MINUTE_MS),
        asked=asked,
    )
    assert [gap.resumed_event_id for gap in jumped.gaps] == [sample.event_id(7 * MINUTE_MS)]
    following = ingest.parse_page(
        [sample.chat(7 * MINUTE_MS + 10, "bob"), sample.chat(7 * MINUTE_MS + 20, "carol")],
        broadcaster=sample.ROOM,
        received_at=sample.RECEIVED,
        next_event_id=sample.event_id(7 * MINUTE_MS + 20),
        asked=ingest.Asked(sample.event_id(7 * MINUTE_MS), 0.1),
    )
    assert following.gaps == ()
    merged = ingest.merge([jumped, following])
    assert merged.gaps == jumped.gaps
    first, second = ingest.split(merged)
    assert first.gaps == () and second.gaps == jumped.gaps and second.next_event_id == merged.next_event_id


def test_a_spooled_page_keeps_how_it_was_asked_for() -> None:
    asked = ingest.Asked(sample.event_id(0), 2.5, continuation=True)
    page = spool.SpooledPage([], sample.event_id(MINUTE_MS), sample.RECEIVED, asked)
    assert spool.decode(spool.encode(page)) == page
    older = dataclasses.replace(page, asked=None)  # a record an earlier version wrote
    assert spool.decode(spool.encode(older)) == older


# -- storage -------------------------------------------------------------------------------------------------


async def test_a_gap_is_stored_with_the_cursor_move_once_and_counted_once(pool: asyncpg.Pool) -> None:
    batch = ingest.parse_page(
        [],
        broadcaster=sample.ROOM,
        received_at=sample.RECEIVED,
        next_event_id=sample.event_id(5 * MINUTE_MS),
        asked=ingest.Asked(sample.event_id(0), 1.0, continuation=True),
    )
    counted = metrics.INGEST_GAPS._value.get()
    first = await db.write_batch(pool, batch, cursor_broadcaster=sample.ROOM, timeout_seconds=10)
    again = await db.write_batch(pool, batch, cursor_broadcaster=sample.ROOM, timeout_seconds=10)
    assert first.gaps == list(batch.gaps) and again.gaps == []
    assert metrics.INGEST_GAPS._value.get() == counted + 1
    assert await db.ingest_gaps(pool) == list(batch.gaps)
    cursor = await db.load_cursor(pool, sample.ROOM)
    assert cursor is not None and cursor.last_event_id == sample.event_id(5 * MINUTE_MS)


async def test_a_refused_gap_rolls_back_the_cursor_move(pool: asyncpg.Pool) -> None:
    """One transaction: when the gap row cannot be written, the position does not move past it either."""
    batch = ingest.parse_page(
        [],
        broadcaster=sample.ROOM,
        received_at=sample.RECEIVED,
        next_event_id=sample.event_id(5 * MINUTE_MS),
        asked=ingest.Asked(sample.event_id(0), 1.0),
    )
    await pool.execute("ALTER TABLE ingest_gaps ADD CONSTRAINT test_refuse CHECK (reason = 'nothing')")
    with pytest.raises(errors.StorageError):
        await db.write_batch(pool, batch, cursor_broadcaster=sample.ROOM, timeout_seconds=10)
    assert await db.load_cursor(pool, sample.ROOM) is None


# -- the daemon ----------------------------------------------------------------------------------------------


async def _until(condition: Callable[[], bool], child: DaemonProcess, *, within: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert child.process.returncode is None, child.log_text()[-3000:]
        assert loop.time() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.05)


def _key(event_id: str) -> tuple[int, int]:
    found = traffic.event_key(event_id)
    assert found is not None, event_id
    return found


@pytest.mark.slow
async def test_a_position_jump_gives_exactly_one_gap_row_the_metric_and_status_show(
    database_url: str, connection: asyncpg.Connection, tmp_path: Path
) -> None:
    # Paced (500 events a second, some 25 minutes of show time in 4 s), so the jump lands mid-show.
    generated = traffic.generate(2_000, seed=61, broadcaster=BROADCASTER)
    async with events.EventsSimulator(
        username=BROADCASTER, token=TOKEN, events=generated, page_size=100, rate=500
    ) as sim:
        env = daemon_env(database_url=database_url, events_base_url=sim.base_url, data_dir=tmp_path / "data")
        async with running_daemon(env, tmp_path / "daemon.log") as child:
            await wait_for_count(connection, COUNT_EVENTS, at_least=300, within=60, process=child)
            sim.schedule(events.Fault.jump(5))
            await _until(lambda: any(request.fault == "jump" for request in sim.requests), child)
            jump = next(request for request in sim.requests if request.fault == "jump")
            assert jump.event_id is not None
            after = _key(jump.event_id)
            resumed = f"{after[0] + 5 * MINUTE_MS}-0"
            skipped = {str(e["id"]) for e in generated if after < _key(str(e["id"])) <= _key(resumed)}
            assert len(skipped) > 100, "the jump must skip a real stretch of the show"
            expected = {str(e["id"]) for e in generated} - skipped
            await wait_for_count(connection, COUNT_EVENTS, at_least=len(expected), within=60, process=child)
            base = await chaos.health_url(child)
            endpoints = await chaos.endpoint_texts(base)
            child.signal(signal.SIGTERM)
            assert await child.wait(within=30) == 0
    rows = await connection.fetch("SELECT * FROM ingest_gaps")
    assert len(rows) == 1, rows
    row = rows[0]
    assert (row["broadcaster"], row["after_event_id"], row["resumed_event_id"], row["reason"]) == (
        BROADCASTER,
        jump.event_id,
        resumed,
        "continuation_jump",
    )
    epoch = dt.datetime(1970, 1, 1)
    assert row["gap_from"] == epoch + dt.timedelta(milliseconds=_key(jump.event_id)[0])
    assert row["gap_to"] - row["gap_from"] == dt.timedelta(minutes=5)
    stored = {record[0] for record in await connection.fetch("SELECT event_id FROM events")}
    assert stored == expected, "everything but the skipped stretch is stored"
    assert chaos.metric_value(endpoints["/metrics"], "mhc_ingest_gaps_total") == 1.0
    latest = json.loads(endpoints["/status"])["latest_gap"]
    assert (latest["after_event_id"], latest["resumed_event_id"], latest["gap_s"]) == (
        jump.event_id,
        resumed,
        300.0,
    )
    warnings = [r for r in chaos.log_records(child) if r.get("event") == "ingest_gap"]
    assert len(warnings) == 1 and warnings[0]["level"] == "warning", warnings
    print(f"\njump after {jump.event_id}: one gap row, {len(skipped)} events never delivered")


# A plain page (a relative nextUrl names the same position) between failures keeps each retry series short.
_PLAIN = events.Fault.relative_next_url()
ORDINARY_FAULTS = (
    events.Fault.rate_limited("1"),
    _PLAIN,
    events.Fault.server_error(503),
    _PLAIN,
    events.Fault.cloudflare(522),
    _PLAIN,
    events.Fault.drop(),
    events.Fault.drop(),
    _PLAIN,
    events.Fault.truncated(),
    events.Fault.redeliver(5),
    events.Fault.null_next_url(),
    events.Fault.missing_next_url(),
    events.Fault.empty_400(),
    events.Fault.server_error(500),
)


@pytest.mark.slow
@pytest.mark.parametrize("empty_status", [200, 400])
async def test_retries_redeliveries_429s_5xx_null_next_urls_and_idling_make_no_gap(
    database_url: str, connection: asyncpg.Connection, tmp_path: Path, empty_status: int
) -> None:
    """Every ordinary fault, then idle long-polls against an API whose position runs with its clock (an
    empty answer moves `i` on by the time since the position was handed out): no gap row."""
    generated = traffic.generate(1_000, seed=67, broadcaster=BROADCASTER)
    async with events.EventsSimulator(
        username=BROADCASTER,
        token=TOKEN,
        events=generated,
        page_size=50,
        empty_status=empty_status,
        advance_idle=True,
    ) as sim:
        # The first request (no position yet) gets a plain page (a relative nextUrl is the same position), so
        # the faults hit a real position; failed requests are retried on it.
        sim.schedule(_PLAIN, *ORDINARY_FAULTS)
        env = daemon_env(database_url=database_url, events_base_url=sim.base_url, data_dir=tmp_path / "data")
        async with running_daemon(env, tmp_path / "daemon.log") as child:
            await wait_for_count(connection, COUNT_EVENTS, at_least=len(generated), within=90, process=child)
            drained_at = sim.request_count  # from here on the daemon idles in 1 s long-polls
            await _until(lambda: sim.request_count >= drained_at + 4, child)
            sim.schedule(events.Fault.rate_limited("2"), events.Fault.server_error(502))  # retries while idle
            await _until(lambda: sim.request_count >= drained_at + 9, child)
            base = await chaos.health_url(child)
            endpoints = await chaos.endpoint_texts(base)
            child.signal(signal.SIGTERM)
            assert await child.wait(within=30) == 0
    faults = [request.fault for request in sim.requests if request.fault]
    idle = [r.event_id for r in sim.requests[drained_at:] if r.status == empty_status]
    moved = len(set(idle))
    print(f"\nfaults {faults}; {len(idle)} idle answers, the position moved {moved - 1} times while idle")
    assert len(faults) == len(ORDINARY_FAULTS) + 3, faults
    assert moved >= 3, "the simulated API must move the position on idle answers for this test to mean much"
    assert await connection.fetchval("SELECT count(*) FROM ingest_gaps") == 0
    assert chaos.metric_value(endpoints["/metrics"], "mhc_ingest_gaps_total") == 0.0
    assert json.loads(endpoints["/status"])["latest_gap"] is None
    assert not [r for r in chaos.log_records(child) if r.get("event") == "ingest_gap"]


def test_a_page_goes_to_the_spool_with_how_it_was_asked_for() -> None:
    """A page spooled during an outage finds its gap again when it drains."""
    asked = ingest.Asked(sample.event_id(0), 0.2, continuation=True)
    batch = ingest.parse_page(
        [], broadcaster=sample.ROOM, received_at=sample.RECEIVED, next_event_id=sample.event_id(MINUTE_MS)
    )
    parsed = room_unit.ParsedPage([], sample.event_id(MINUTE_MS), sample.RECEIVED, batch, asked)
    spooled = spool.decode(spool.encode(room_unit._spooled(parsed)))
    assert spooled is not None and spooled.asked == asked


async def test_the_gaps_command_lists_them(pool: asyncpg.Pool, database_url: str, tmp_path: Path) -> None:
    batch = ingest.parse_page(
        [],
        broadcaster=sample.ROOM,
        received_at=sample.RECEIVED,
        next_event_id=sample.event_id(5 * MINUTE_MS),
        asked=ingest.Asked(sample.event_id(0), 1.0, continuation=True),
    )
    await db.write_batch(pool, batch, cursor_broadcaster=sample.ROOM, timeout_seconds=10)
    env = {key: value for key, value in os.environ.items() if not key.startswith("MHC_")}
    env.update({"MHC_DATABASE_URL": database_url, "MHC_DATA_DIR": str(tmp_path / "data")})

    def run(*args: str) -> str:
        result = run_command(["gaps", *args], env, tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    listed = json.loads(await asyncio.to_thread(run, "--json"))
    assert listed == [
        {
            "broadcaster": sample.ROOM,
            "after_event_id": sample.event_id(0),
            "resumed_event_id": sample.event_id(5 * MINUTE_MS),
            "gap_from": sample.at(0).replace(tzinfo=dt.UTC).isoformat(),
            "gap_to": sample.at(5 * MINUTE_MS).replace(tzinfo=dt.UTC).isoformat(),
            "gap_s": 300.0,
            "reason": "continuation_jump",
            "detected_at": sample.RECEIVED.isoformat(),
        }
    ]
    table = await asyncio.to_thread(run)
    assert "5m00s" in table and sample.event_id(0) in table and "continuation_jump" in table


@pytest.mark.parametrize("status", [400, 200])
async def test_the_simulators_jump_skips_minutes_and_delivers_nothing(status: int) -> None:
    generated = traffic.generate(200, seed=3)
    asked = str(generated[10]["id"])
    async with (
        events.EventsSimulator(events=generated) as sim,
        aiohttp.ClientSession() as session,
    ):
        sim.schedule(events.Fault.jump(2, status=status))
        async with session.get(f"{sim.events_url}?i={asked}&timeout=0") as response:
            body = await response.json(content_type=None)
            assert response.status == status
    assert body["events"] == []
    resumed = yarl.URL(body["nextUrl"]).query["i"]
    assert resumed == f"{_key(asked)[0] + 2 * MINUTE_MS}-0"
    assert ("status" in body) == (status == 400)
