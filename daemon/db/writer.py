"""The events writer: one transaction per response (or merged responses) with its rows, session changes,
quarantine, gaps and the cursor.
"""

from __future__ import annotations

import collections
import datetime as dt
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import asyncpg

from daemon import errors, ingest, logs, metrics, sessions, sql_files
from daemon.db.core import (
    IDLE_IN_TRANSACTION_TIMEOUT,
    PLATFORM,
    Connection,
    row_count,
    translate_errors,
    utc_now,
)
from daemon.db.persons import Sighting, find_or_create_many, normalize_username, see

log = logs.get_logger(__name__)


@dataclass(frozen=True)
class Cursor:
    """The committed read position of one broadcaster's event stream."""

    broadcaster: str
    last_event_id: str | None
    timeout_seconds: int


@dataclass(frozen=True)
class WriteResult:
    """What one committed response changed. Counts cover this transaction only."""

    new_events: int  # events rows inserted (a re-delivered event is not new)
    duplicates: int  # delivered events whose id was already stored (or repeated within the page)
    interactions: int
    quarantined: int  # new quarantine rows (a bad event delivered again adds none)
    sessions_opened: int
    sessions_closed: int
    orphan_stops: int  # broadcastStop events with no session before or after them: logged, not an error
    unknown_methods: int  # new events of a method this version does not map
    newest_event_time: dt.datetime | None  # naive UTC server time of the newest new event
    new_by_method: dict[str, int] = field(default_factory=dict)  # new events per method (metrics, reports)
    gaps: list[ingest.Gap] = field(default_factory=list)  # gaps recorded by this transaction (not repeats)
    stale_stops: int = 0  # broadcastStop events older than the session they met: logged, counted, no change
    # By the room whose feed delivered the pages, for each room the write changed anything for.
    rooms: dict[str, RoomPart] = field(default_factory=dict)


@dataclass(frozen=True)
class RoomPart:
    """What one write changed for one room: a write may hold the pages of several rooms."""

    new_events: int = 0
    duplicates: int = 0
    quarantined: int = 0
    newest_event_time: dt.datetime | None = None  # naive UTC

    def __add__(self, other: RoomPart) -> RoomPart:
        times = [moment for moment in (self.newest_event_time, other.newest_event_time) if moment]
        return RoomPart(
            self.new_events + other.new_events,
            self.duplicates + other.duplicates,
            self.quarantined + other.quarantined,
            max(times, default=None),
        )


def combined(first: WriteResult, second: WriteResult) -> WriteResult:
    """What two consecutive writes changed together (a refused batch is stored in parts)."""
    times = [moment for moment in (first.newest_event_time, second.newest_event_time) if moment is not None]
    return WriteResult(
        new_events=first.new_events + second.new_events,
        duplicates=first.duplicates + second.duplicates,
        interactions=first.interactions + second.interactions,
        quarantined=first.quarantined + second.quarantined,
        sessions_opened=first.sessions_opened + second.sessions_opened,
        sessions_closed=first.sessions_closed + second.sessions_closed,
        orphan_stops=first.orphan_stops + second.orphan_stops,
        unknown_methods=first.unknown_methods + second.unknown_methods,
        newest_event_time=max(times, default=None),
        new_by_method=dict(
            collections.Counter(first.new_by_method) + collections.Counter(second.new_by_method)
        ),
        gaps=first.gaps + second.gaps,
        stale_stops=first.stale_stops + second.stale_stops,
        rooms={
            room: first.rooms.get(room, RoomPart()) + second.rooms.get(room, RoomPart())
            for room in first.rooms.keys() | second.rooms.keys()
        },
    )


async def load_cursor(pool: asyncpg.Pool, broadcaster: str) -> Cursor | None:
    """The committed read position of `broadcaster`, or None before the first committed response."""
    with translate_errors():
        row = await pool.fetchrow(sql_files.query("load_cursor"), normalize_username(broadcaster))
    if row is None:
        return None
    return Cursor(row["broadcaster"], row["last_event_id"], row["timeout_seconds"])


# The unique indexes a repeated event violates on the writer's fast path (see write_batch).
_REPEAT_GUARDS = frozenset({"events_pkey", "uq_interactions_cb_event"})


def _first_by_event(rows: list[Any]) -> dict[tuple[str, str], Any]:
    """Rows keyed by (broadcaster, event id); an id repeated within a page keeps its first row, as the events
    insert does."""
    found: dict[tuple[str, str], Any] = {}
    for row in rows:
        found.setdefault((row.broadcaster, row.event_id), row)
    return found


async def _insert_events(
    connection: Connection, batch: ingest.Batch, guarded: bool
) -> list[ingest.StoredEvent]:
    """Insert the raw events; return the events new in this transaction, first occurrence each, in page
    order. Unguarded, every event must be new (a repeat fails the statement with `UniqueViolationError`)."""
    events = batch.events
    columns = (
        [event.event_id for event in events],
        [event.method for event in events],
        [event.broadcaster for event in events],
        [event.event_time for event in events],
        batch.receipt_times(),
        [event.raw_json for event in events],
    )
    if not guarded:
        await connection.execute(sql_files.query("insert_new_events"), *columns)
        return events
    inserted = await connection.fetch(sql_files.query("insert_events"), *columns)
    new_keys = {(row["broadcaster"], row["event_id"]) for row in inserted}
    fresh: list[ingest.StoredEvent] = []
    for event in events:
        if (key := (event.broadcaster, event.event_id)) in new_keys:
            new_keys.discard(key)
            fresh.append(event)
    return fresh


@dataclass(frozen=True)
class _Derived:
    """What `_derive` wrote: the interactions and the session decisions it applied."""

    interactions: int = 0
    decisions: sessions.Decisions = field(default_factory=sessions.Decisions)


async def _derive(
    connection: Connection, batch: ingest.Batch, fresh: list[ingest.StoredEvent], guarded: bool
) -> _Derived:
    """Persons, sessions and interactions of the new events, in event order. Which session each event
    belongs to, and which sessions open and end, is `sessions.decide`'s; this applies it."""
    rows = _first_by_event(batch.interactions)
    changes = _first_by_event(batch.session_changes)
    keyed = [(event, key) for event in fresh if (key := (event.broadcaster, event.event_id)) in rows]
    if not keyed:
        return _Derived()
    sightings: dict[str, Sighting] = {}
    for _, key in keyed:
        row = rows[key]
        see(sightings, row.username, row.role, row.timestamp)
    rooms = list({event.broadcaster for event, _ in keyed})
    times = [rows[key].timestamp for _, key in keyed]
    context = await connection.fetch(
        sql_files.query("batch_context"),
        list(sightings),
        PLATFORM,
        rooms,
        min(times),
        max(times),
        any(change.kind == "start" for change in changes.values()),
    )
    aliases = [row for row in context if row["kind"] == "alias"]
    people = await find_or_create_many(connection, sightings, PLATFORM, aliases)
    known = [
        sessions.Known(row["id"], row["name"], row["at"], row["ended_at"], row["last_at"])
        for row in context
        if row["kind"] == "session"
    ]
    walked = [
        sessions.Event(
            event.event_id,
            event.broadcaster,
            rows[key].timestamp,
            cast(sessions.Kind, change.kind) if (change := changes.get(key)) else None,
        )
        for event, key in keyed
    ]
    decisions = sessions.decide(walked, known)
    await _apply_sessions(connection, decisions)
    interactions = [rows[key] for _, key in keyed]
    status = await connection.execute(
        sql_files.query("insert_interactions" if guarded else "insert_new_interactions"),
        ingest.SOURCE,
        [people[row.username].id for row in interactions],
        decisions.links,
        [row.type for row in interactions],
        [row.content for row in interactions],
        [row.timestamp for row in interactions],
        [row.metadata_json for row in interactions],
    )
    return _Derived(row_count(status), decisions)


async def _apply_sessions(connection: Connection, decisions: sessions.Decisions) -> None:
    """End, then open (a new LIVE session may replace the one it ends: one LIVE per room), then log."""
    if decisions.ended:
        ended = decisions.ended
        await connection.execute(
            sql_files.query("end_sessions"),
            [item.id for item in ended],
            [item.ended_at for item in ended],
            [item.end_reason for item in ended],
        )
    if decisions.opened:
        opened = decisions.opened
        await connection.execute(
            sql_files.query("insert_sessions"),
            PLATFORM,
            [item.id for item in opened],
            [item.broadcaster for item in opened],
            [item.started_at for item in opened],
            [item.ended_at for item in opened],
            [item.end_reason for item in opened],
        )
    for stop in decisions.ignored_stops:
        if stop.why == "orphan":
            log.warning(
                "broadcast_stop_without_session", broadcaster=stop.broadcaster, event_id=stop.event_id
            )
        else:
            log.warning(
                "broadcast_stop_stale",
                broadcaster=stop.broadcaster,
                event_id=stop.event_id,
                stop_at=stop.at.isoformat(),
                session_started_at=stop.session_started_at.isoformat() if stop.session_started_at else None,
            )


@dataclass(frozen=True)
class Fence:
    """Whose write this is: the holder and, per room, the epoch of the lease it holds."""

    holder: str
    epochs: Mapping[str, int]


async def _move_fenced_cursors(
    connection: Connection, fence: Fence, rooms: Mapping[str, ingest.Batch], timeout_seconds: int
) -> None:
    """Move each room's cursor where its lease is still the fence's holder's at its epoch, locking those rows
    until the commit; `LeaseLost` (the transaction rolls back) when any room moved on."""
    names = [normalize_username(room) for room in rooms]
    moved = await connection.fetch(
        sql_files.query("move_fenced_cursors"),
        names,
        [fence.epochs.get(room, -1) for room in rooms],
        [batch.next_event_id for batch in rooms.values()],
        fence.holder,
        timeout_seconds,
        IDLE_IN_TRANSACTION_TIMEOUT,
    )
    lost = set(names) - {row["broadcaster"] for row in moved}
    if lost:
        metrics.FENCED_WRITES.inc()
        raise errors.LeaseLost(lost)


async def _write(
    connection: Connection,
    batch: ingest.Batch,
    rooms: Mapping[str, ingest.Batch],
    timeout_seconds: int,
    guarded: bool,
    fence: Fence | None,
) -> WriteResult:
    """Store `batch`, the pages of `rooms` merged (none: a replay, which moves no cursor); with `fence`, its
    first statement moves the cursors only where the leases are still the fence's."""
    if fence is not None:
        await _move_fenced_cursors(connection, fence, rooms, timeout_seconds)
    fresh = await _insert_events(connection, batch, guarded)
    if rooms and fence is None:
        cursors = sorted((normalize_username(room), part.next_event_id) for room, part in rooms.items())
        await connection.execute(
            sql_files.query("move_cursors"),
            [room for room, _ in cursors],
            [position for _, position in cursors],
            timeout_seconds,
        )
    gaps = await _insert_gaps(connection, batch.gaps) if batch.gaps else []
    derived = await _derive(connection, batch, fresh, guarded)
    decisions = derived.decisions
    quarantined: list[str] = []  # the room of each new quarantine row
    if batch.quarantined:
        items = batch.quarantined
        stored = await connection.fetch(
            sql_files.query("insert_quarantined"),
            [item.room for item in items],
            [item.fingerprint for item in items],
            [item.event_id for item in items],
            [item.method for item in items],
            [item.raw_text for item in items],
            [item.reason for item in items],
        )
        quarantined = [row["broadcaster"] for row in stored]
    return WriteResult(
        new_events=len(fresh),
        duplicates=len(batch.events) - len(fresh),
        interactions=derived.interactions,
        quarantined=len(quarantined),
        sessions_opened=len(decisions.opened),
        sessions_closed=len(decisions.ended) + sum(1 for item in decisions.opened if item.ended_at),
        orphan_stops=len(decisions.orphan_stops),
        unknown_methods=sum(1 for event in fresh if event.method not in ingest.KNOWN_METHODS),
        newest_event_time=max((event.event_time for event in fresh), default=None),
        new_by_method=dict(collections.Counter(event.method for event in fresh)),
        gaps=gaps,
        stale_stops=len(decisions.stale_stops),
        rooms=_room_parts(rooms, fresh, collections.Counter(quarantined)),
    )


def _room_parts(
    rooms: Mapping[str, ingest.Batch], fresh: list[ingest.StoredEvent], quarantined: collections.Counter[str]
) -> dict[str, RoomPart]:
    """What the write changed for each room whose pages it held, where that is anything (events told apart
    by identity: two rooms' events may share an id)."""
    new = {id(event) for event in fresh}
    parts = {}
    for room, batch in rooms.items():
        stored = [event for event in batch.events if id(event) in new]
        part = RoomPart(
            new_events=len(stored),
            duplicates=len(batch.events) - len(stored),
            quarantined=quarantined[ingest.normalize_name(room)],
            newest_event_time=max((event.event_time for event in stored), default=None),
        )
        if part != RoomPart():
            parts[room] = part
    return parts


async def _insert_gaps(connection: Connection, gaps: tuple[ingest.Gap, ...]) -> list[ingest.Gap]:
    """Record `gaps`; return those not recorded before (a page stored a second time repeats its gap)."""
    rows = await connection.fetch(
        sql_files.query("insert_gaps"),
        [gap.broadcaster for gap in gaps],
        [gap.after_event_id for gap in gaps],
        [gap.resumed_event_id for gap in gaps],
        [gap.gap_from for gap in gaps],
        [gap.gap_to for gap in gaps],
        [gap.reason for gap in gaps],
        [gap.detected_at for gap in gaps],
    )
    new = {(row["broadcaster"], row["after_event_id"], row["resumed_event_id"]) for row in rows}
    return [gap for gap in gaps if (gap.broadcaster, gap.after_event_id, gap.resumed_event_id) in new]


async def write_batch(
    pool: asyncpg.Pool, batch: ingest.Batch, *, cursor_broadcaster: str | None, timeout_seconds: int
) -> WriteResult:
    """Store one room's responses (`write_rooms`); None as the room: a replay, which moves no cursor."""
    rooms = {} if cursor_broadcaster is None else {cursor_broadcaster: batch}
    return await _store(pool, batch, rooms, timeout_seconds, None)


async def write_rooms(
    pool: asyncpg.Pool, rooms: Mapping[str, ingest.Batch], *, timeout_seconds: int, fence: Fence | None = None
) -> WriteResult:
    """Store the responses of one or more rooms (each room's already merged) in one transaction: their new
    events, their rows, session changes, quarantined items, the gaps each read position moved over and each
    room's cursor after them. `WriteResult.rooms` tells each room its part. All or nothing; an event
    already stored is skipped with everything derived from it. Updates the ingest metrics (events,
    duplicates, quarantined, unknown methods, rows, gaps, write time, lag) and logs each new gap after the
    commit, so a rolled-back write counts nothing.

    The transaction first runs on the fast path, plain inserts that assume every event is new; a repeat
    fails it on a unique index, and it runs again guarded (ON CONFLICT DO NOTHING). Repeats are rare
    (re-deliveries, a drained spool's first pages), and conflict handling costs PostgreSQL about a fifth more
    per row (bench/).

    With `fence`, the transaction first checks that every room's lease is still the fence's (`LeaseLost`
    otherwise, and nothing is written)."""
    return await _store(pool, ingest.merge(list(rooms.values())), rooms, timeout_seconds, fence)


async def _store(
    pool: asyncpg.Pool,
    batch: ingest.Batch,
    rooms: Mapping[str, ingest.Batch],
    timeout_seconds: int,
    fence: Fence | None,
) -> WriteResult:
    started = time.perf_counter()
    with translate_errors():
        try:
            result = await _write_transaction(pool, batch, rooms, timeout_seconds, fence, guarded=False)
        except asyncpg.UniqueViolationError as error:
            if error.constraint_name not in _REPEAT_GUARDS:
                raise
            result = await _write_transaction(pool, batch, rooms, timeout_seconds, fence, guarded=True)
    metrics.WRITE_SECONDS.observe(time.perf_counter() - started)
    _count(result)
    for gap in result.gaps:
        log.warning(
            "ingest_gap",
            broadcaster=gap.broadcaster,
            after_event_id=gap.after_event_id,
            resumed_event_id=gap.resumed_event_id,
            gap_from=gap.gap_from.isoformat(),
            gap_to=gap.gap_to.isoformat(),
            gap_s=round((gap.gap_to - gap.gap_from).total_seconds(), 3),
            reason=gap.reason,
        )
    log.debug(
        "batch_stored",
        events=result.new_events,
        duplicates=result.duplicates,
        interactions=result.interactions,
        quarantined=result.quarantined,
    )
    return result


async def _write_transaction(
    pool: asyncpg.Pool,
    batch: ingest.Batch,
    rooms: Mapping[str, ingest.Batch],
    timeout_seconds: int,
    fence: Fence | None,
    *,
    guarded: bool,
) -> WriteResult:
    async with pool.acquire() as connection, connection.transaction():
        return await _write(connection, batch, rooms, timeout_seconds, guarded, fence)


def _count(result: WriteResult) -> None:
    for method, count in result.new_by_method.items():
        # A label per unknown method would let the API grow the metric without bound.
        label = method if method in ingest.KNOWN_METHODS else "other"
        metrics.EVENTS.labels(method=label).inc(count)
    metrics.DUPLICATES.inc(result.duplicates)
    metrics.QUARANTINED.inc(result.quarantined)
    metrics.UNKNOWN_METHODS.inc(result.unknown_methods)
    metrics.ROWS.labels(table="events").inc(result.new_events)
    metrics.ROWS.labels(table="interactions").inc(result.interactions)
    metrics.ROWS.labels(table="quarantined_events").inc(result.quarantined)
    metrics.ROWS.labels(table="stream_sessions").inc(result.sessions_opened)
    if result.gaps:
        metrics.INGEST_GAPS.inc(len(result.gaps))
        metrics.ROWS.labels(table="ingest_gaps").inc(len(result.gaps))
    metrics.STALE_STOPS.inc(result.stale_stops)
    if result.newest_event_time is not None:
        metrics.INGEST_LAG.set((utc_now() - result.newest_event_time).total_seconds())


async def ingest_gaps(pool: asyncpg.Pool, limit: int = 100, room: str | None = None) -> list[ingest.Gap]:
    """The recorded gaps of `room`'s feed (None: every room's), newest first."""
    with translate_errors():
        rows = await pool.fetch(
            sql_files.query("ingest_gaps"), limit, None if room is None else normalize_username(room)
        )
    return [
        ingest.Gap(
            broadcaster=row["broadcaster"],
            after_event_id=row["after_event_id"],
            resumed_event_id=row["resumed_event_id"],
            gap_from=row["gap_from"],
            gap_to=row["gap_to"],
            reason=row["reason"],
            detected_at=row["detected_at"],
        )
        for row in rows
    ]
