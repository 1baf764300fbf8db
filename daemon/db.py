"""The database layer: the only module that touches the asyncpg pool.

One async function per operation. Each returns plain dataclasses and turns asyncpg's errors into ours.
Timestamps are naive UTC `datetime`s, matching the seed's TIMESTAMP columns (every session runs in UTC).
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import asyncpg

from daemon import errors, ingest, logs, metrics, migrations, sessions, sql_files

PLATFORM = "chaturbate"
# The seed's exclusion rule: these people are excluded from every aggregate from the moment they are created.
EXCLUDED_USERNAMES = frozenset({"smk_lover"})
EXCLUDED_WATCHLIST = "Excluded"
ROLES = ("MODEL", "VIEWER", "BOTH", "UNKNOWN")

Pool = asyncpg.Pool
# A pooled connection or a plain one: both run the same queries.
Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


@dataclass(frozen=True)
class Person:
    id: uuid.UUID
    username: str
    platform: str
    role: str
    rid: int | None
    did: int | None
    first_seen_at: dt.datetime
    last_seen_at: dt.datetime
    is_excluded: bool


def utc_naive(moment: dt.datetime) -> dt.datetime:
    """A timezone-aware or naive-UTC datetime as the naive UTC value TIMESTAMP columns hold."""
    if moment.tzinfo is None:
        return moment
    return moment.astimezone(dt.UTC).replace(tzinfo=None)


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


# PostgreSQL refusals that heal by themselves: the write is retried (and pages spooled meanwhile), never
# dropped. Connection (08), insufficient resources: disk full, out of memory, too many connections (53),
# operator intervention: statement timeout, shutdown, cannot connect now (57), system/IO errors (58),
# serialization failures and deadlocks (40), a read-only server (25006), idle-transaction timeouts (25P03)
# and lock timeouts (55P03). Every other PostgreSQL error is the statement's own fault: a refusal.
_TRANSIENT_SQLSTATE_CLASSES = ("08", "53", "57", "58", "40")
_TRANSIENT_SQLSTATES = frozenset({"25006", "25P03", "55P03"})


def is_transient(error: asyncpg.PostgresError) -> bool:
    """True when PostgreSQL refused for a reason that passes (see `_TRANSIENT_SQLSTATES`)."""
    state = str(getattr(error, "sqlstate", "") or "")
    return state[:2] in _TRANSIENT_SQLSTATE_CLASSES or state in _TRANSIENT_SQLSTATES


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """asyncpg and socket errors become `DatabaseUnavailable` (transient: retry) or `StorageError`."""
    try:
        yield
    # InternalClientError: asyncpg's protocol state after the server killed the session mid-query.
    # TimeoutError: asyncpg's own command or connect timeout.
    except (OSError, asyncpg.InterfaceError, asyncpg.InternalClientError, TimeoutError) as error:
        raise errors.DatabaseUnavailable(f"database unavailable: {type(error).__name__}: {error}") from error
    except asyncpg.PostgresError as error:
        if is_transient(error):
            raise errors.DatabaseUnavailable(
                f"database unavailable: {type(error).__name__}: {error}"
            ) from error
        raise errors.StorageError(f"database error: {type(error).__name__}: {error}") from error


async def _init_connection(connection: asyncpg.Connection) -> None:
    for kind in ("json", "jsonb"):
        await connection.set_type_codec(kind, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


CONNECT_TIMEOUT_SECONDS = 10.0


async def connect(dsn: str, *, min_size: int = 1, max_size: int = 4) -> asyncpg.Pool:
    """Open the pool. Every session runs in UTC so NOW() defaults on TIMESTAMP columns are UTC too.

    With `min_size=0` nothing connects here: the pool opens while the database is down and each later
    operation connects (or fails with `DatabaseUnavailable`) on its own.
    """
    with translate_errors():
        pool: asyncpg.Pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            init=_init_connection,
            server_settings={"timezone": "UTC", "application_name": "mhc-daemon"},
            command_timeout=60,
            timeout=CONNECT_TIMEOUT_SECONDS,
        )
    return pool


@contextlib.asynccontextmanager
async def open_pool(dsn: str, *, min_size: int = 1, max_size: int = 4) -> AsyncIterator[asyncpg.Pool]:
    pool = await connect(dsn, min_size=min_size, max_size=max_size)
    try:
        yield pool
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def single_connection(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """One connection outside the pool, for migrations (a session-level advisory lock needs one session)."""
    with translate_errors():
        connection: asyncpg.Connection = await asyncpg.connect(
            dsn,
            server_settings={"timezone": "UTC", "application_name": "mhc-daemon-migrate"},
            timeout=CONNECT_TIMEOUT_SECONDS,
        )
    try:
        yield connection
    finally:
        await connection.close()


async def ping(pool: asyncpg.Pool) -> bool:
    """True when the database answers a trivial query."""
    try:
        with translate_errors():
            return bool(await pool.fetchval(sql_files.query("ping"), timeout=5))
    except errors.StorageError:
        return False


def _person(row: asyncpg.Record | None) -> Person:
    if row is None:
        raise errors.StorageError("the database returned no row where one was certain")
    return Person(
        id=row["id"],
        username=row["username"],
        platform=row["platform"],
        role=row["role"],
        rid=row["rid"],
        did=row["did"],
        first_seen_at=row["first_seen_at"],
        last_seen_at=row["last_seen_at"],
        is_excluded=bool(row["is_excluded"]),
    )


def normalize_username(username: str) -> str:
    """Chaturbate names are case-insensitive; we store and look them up lowercased."""
    return username.strip().lower()


async def find_person(pool: asyncpg.Pool, username: str, platform: str = PLATFORM) -> Person | None:
    """The person whose username or current alias is `username`."""
    with translate_errors():
        row = await pool.fetchrow(sql_files.query("find_person"), normalize_username(username), platform)
    return _person(row) if row else None


async def find_or_create_person(
    pool: asyncpg.Pool,
    username: str,
    *,
    seen_at: dt.datetime,
    role: str = "VIEWER",
    platform: str = PLATFORM,
) -> Person:
    """Find a person by username or current alias, or create one; `last_seen_at` only moves forward.

    A person created under an excluded name starts excluded and is put on the Excluded watchlist.
    The same batched statement serves the events writer, so the rule lives in one place.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    name = normalize_username(username)
    seen = utc_naive(seen_at)
    with translate_errors():
        async with pool.acquire() as connection, connection.transaction():
            return await _find_or_create(connection, name, seen, role, platform)


async def _find_or_create(
    connection: Connection, name: str, seen: dt.datetime, role: str, platform: str
) -> Person:
    people = await _find_or_create_many(connection, {name: _Sighting(role, seen, seen)}, platform)
    return people[name]


async def record_api_failure(pool: asyncpg.Pool, failure: errors.ApiFailure) -> None:
    """Append one failure row; the URL and excerpt are masked once more here, as a last line of defence."""
    excerpt = failure.body_excerpt[: errors.BODY_EXCERPT_CHARS] if failure.body_excerpt else None
    with translate_errors():
        await pool.execute(
            sql_files.query("record_api_failure"),
            failure.api,
            failure.operation,
            logs.mask(failure.url),
            failure.http_status,
            failure.error_kind,
            logs.mask(excerpt.replace("\x00", "")) if excerpt else None,
            failure.attempt,
            utc_naive(failure.occurred_at) if failure.occurred_at else utc_now(),
        )


async def recent_api_failures(pool: asyncpg.Pool, limit: int = 10) -> list[errors.ApiFailure]:
    with translate_errors():
        rows = await pool.fetch(sql_files.query("recent_api_failures"), limit)
    return [
        errors.ApiFailure(
            api=row["api"],
            operation=row["operation"],
            url=row["url"],
            error_kind=row["error_kind"],
            http_status=row["http_status"],
            body_excerpt=row["body_excerpt"],
            attempt=row["attempt"],
            occurred_at=row["occurred_at"],
        )
        for row in rows
    ]


# ----------------------------------------------------------------------------------------------------
# Events API ingestion: the cursor and the one-transaction-per-response writer.

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
    )


@dataclass
class _Sighting:
    """One person's appearances in a batch: the widest role, the earliest and the latest time."""

    role: str
    first: dt.datetime
    last: dt.datetime


def widen_role(current: str, seen_as: str) -> str:
    """VIEWER + MODEL = BOTH; UNKNOWN never narrows anything. The SQL of `upsert_persons` says the same."""
    if current == seen_as or seen_as == "UNKNOWN":
        return current
    if current == "UNKNOWN":
        return seen_as
    return "BOTH"


def _see(sightings: dict[str, _Sighting], name: str, role: str, at: dt.datetime) -> None:
    found = sightings.get(name)
    if found is None:
        sightings[name] = _Sighting(role, at, at)
        return
    found.role = widen_role(found.role, role)
    found.first = min(found.first, at)
    found.last = max(found.last, at)


async def _find_or_create_many(
    connection: Connection,
    sightings: dict[str, _Sighting],
    platform: str,
    aliases: list[asyncpg.Record] | None = None,
) -> dict[str, Person]:
    """Find or create every named person, honouring current aliases (rows of `resolve_aliases`, looked up
    here unless the caller already has them): one or two round trips, one more when an alias matches."""
    if aliases is None:
        aliases = await connection.fetch(sql_files.query("resolve_aliases"), list(sightings), platform)
    owner = {row["name"]: row["id"] for row in sorted(aliases, key=lambda row: row["at"])}
    touch: dict[uuid.UUID, _Sighting] = {}
    names_of: dict[uuid.UUID, list[str]] = {}
    creating: dict[str, _Sighting] = {}
    for name, sighting in sightings.items():
        target = owner.get(name)
        if target is None:
            creating[name] = sighting
            continue
        names_of.setdefault(target, []).append(name)
        merged = touch.get(target)
        if merged is None:
            touch[target] = _Sighting(sighting.role, sighting.first, sighting.last)
        else:
            merged.role = widen_role(merged.role, sighting.role)
            merged.first = min(merged.first, sighting.first)
            merged.last = max(merged.last, sighting.last)
    people: dict[str, Person] = {}
    if touch:
        # A separate statement from the upsert: a name in `creating` may be the original username of a
        # person touched here, and one statement must not modify a row twice.
        touched = await connection.fetch(
            sql_files.query("touch_persons"),
            list(touch),
            [s.last for s in touch.values()],
            [s.role for s in touch.values()],
            [s.first for s in touch.values()],
        )
        for row in touched:
            for name in names_of[row["id"]]:
                people[name] = _person(row)
    if creating:
        upserted = await connection.fetch(
            sql_files.query("upsert_persons"),
            list(creating),
            [s.role for s in creating.values()],
            [s.first for s in creating.values()],
            [s.last for s in creating.values()],
            platform,
            list(EXCLUDED_USERNAMES),
            EXCLUDED_WATCHLIST,
        )
        for row in upserted:
            people[row["username"]] = _person(row)
    return people


async def load_cursor(pool: asyncpg.Pool, broadcaster: str) -> Cursor | None:
    """The committed read position of `broadcaster`, or None before the first committed response."""
    with translate_errors():
        row = await pool.fetchrow(sql_files.query("load_cursor"), normalize_username(broadcaster))
    if row is None:
        return None
    return Cursor(row["broadcaster"], row["last_event_id"], row["timeout_seconds"])


# The unique indexes a repeated event violates on the writer's fast path (see write_batch).
_REPEAT_GUARDS = frozenset({"events_pkey", "uq_interactions_cb_event"})


def _first_by_event(rows: list[Any]) -> dict[str, Any]:
    """Rows keyed by event id; an id repeated within a page keeps its first row, as the events insert does."""
    found: dict[str, Any] = {}
    for row in rows:
        found.setdefault(row.event_id, row)
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
    new_ids = {row["event_id"] for row in inserted}
    fresh: list[ingest.StoredEvent] = []
    for event in events:
        if event.event_id in new_ids:
            new_ids.discard(event.event_id)
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
    mapped = [event for event in fresh if event.event_id in rows]
    if not mapped:
        return _Derived()
    sightings: dict[str, _Sighting] = {}
    for event in mapped:
        row = rows[event.event_id]
        _see(sightings, row.username, row.role, row.timestamp)
    rooms = list({event.broadcaster for event in mapped})
    times = [rows[event.event_id].timestamp for event in mapped]
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
    people = await _find_or_create_many(connection, sightings, PLATFORM, aliases)
    known = [
        sessions.Known(row["id"], row["name"], row["at"], row["ended_at"], row["last_at"])
        for row in context
        if row["kind"] == "session"
    ]
    walked = [
        sessions.Event(
            event.event_id,
            event.broadcaster,
            rows[event.event_id].timestamp,
            cast(sessions.Kind, change.kind) if (change := changes.get(event.event_id)) else None,
        )
        for event in mapped
    ]
    decisions = sessions.decide(walked, known)
    await _apply_sessions(connection, decisions)
    interactions = [rows[event.event_id] for event in mapped]
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
    return _Derived(_row_count(status), decisions)


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


def _row_count(status: str) -> int:
    """The row count of a command tag such as `INSERT 0 5`."""
    return int(status.rsplit(" ", 1)[-1])


async def _write(
    connection: Connection,
    batch: ingest.Batch,
    cursor_broadcaster: str | None,
    timeout_seconds: int,
    guarded: bool,
) -> WriteResult:
    fresh = await _insert_events(connection, batch, guarded)
    if cursor_broadcaster is not None:
        await connection.execute(
            sql_files.query("move_cursor"),
            normalize_username(cursor_broadcaster),
            batch.next_event_id,
            timeout_seconds,
        )
    gaps = await _insert_gaps(connection, batch.gaps) if batch.gaps else []
    derived = await _derive(connection, batch, fresh, guarded)
    decisions = derived.decisions
    quarantined = 0
    if batch.quarantined:
        items = batch.quarantined
        status = await connection.execute(
            sql_files.query("insert_quarantined"),
            [item.room for item in items],
            [item.fingerprint for item in items],
            [item.event_id for item in items],
            [item.method for item in items],
            [item.raw_text for item in items],
            [item.reason for item in items],
        )
        quarantined = _row_count(status)
    return WriteResult(
        new_events=len(fresh),
        duplicates=len(batch.events) - len(fresh),
        interactions=derived.interactions,
        quarantined=quarantined,
        sessions_opened=len(decisions.opened),
        sessions_closed=len(decisions.ended) + sum(1 for item in decisions.opened if item.ended_at),
        orphan_stops=len(decisions.orphan_stops),
        unknown_methods=sum(1 for event in fresh if event.method not in ingest.KNOWN_METHODS),
        newest_event_time=max((event.event_time for event in fresh), default=None),
        new_by_method=dict(collections.Counter(event.method for event in fresh)),
        gaps=gaps,
        stale_stops=len(decisions.stale_stops),
    )


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
    new = {(row["after_event_id"], row["resumed_event_id"]) for row in rows}
    return [gap for gap in gaps if (gap.after_event_id, gap.resumed_event_id) in new]


async def write_batch(
    pool: asyncpg.Pool, batch: ingest.Batch, *, cursor_broadcaster: str | None, timeout_seconds: int
) -> WriteResult:
    """Store one API response in one transaction: its new events, their rows, session changes, quarantined
    items, the gaps the read position moved over and the cursor after it (none when `cursor_broadcaster` is
    None: a replay never moves it). All or nothing; an event already stored is skipped with everything
    derived from it. Updates the ingest metrics (events, duplicates, quarantined, unknown methods, rows, gaps,
    write time, lag) and logs each new gap after the commit, so a rolled-back write counts nothing.

    The transaction first runs on the fast path, plain inserts that assume every event is new; a repeat
    fails it on a unique index, and it runs again guarded (ON CONFLICT DO NOTHING). Repeats are rare
    (re-deliveries, a drained spool's first pages), and conflict handling costs PostgreSQL about a fifth more
    per row (bench/)."""
    started = time.perf_counter()
    with translate_errors():
        try:
            result = await _write_transaction(pool, batch, cursor_broadcaster, timeout_seconds, guarded=False)
        except asyncpg.UniqueViolationError as error:
            if error.constraint_name not in _REPEAT_GUARDS:
                raise
            result = await _write_transaction(pool, batch, cursor_broadcaster, timeout_seconds, guarded=True)
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
    cursor_broadcaster: str | None,
    timeout_seconds: int,
    *,
    guarded: bool,
) -> WriteResult:
    async with pool.acquire() as connection, connection.transaction():
        return await _write(connection, batch, cursor_broadcaster, timeout_seconds, guarded)


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


# --- Snapshots (issue 4) ------------------------------------------------------------------------------------

SNAPSHOT_SOURCES = ("statbate_member", "statbate_model", "cb_stats")


@dataclass(frozen=True)
class DueMember:
    """A person whose Statbate member snapshot is due, under the name to ask for (the current alias wins)."""

    person_id: uuid.UUID
    name: str
    priority: int  # 0 tipped, 1 messaged, 2 on a watchlist, 3 the rest


@dataclass(frozen=True)
class StoredSnapshot:
    """What storing one identified snapshot did."""

    person_id: uuid.UUID  # the person the snapshot belongs to (the did/rid owner)
    inserted: bool  # False when a snapshot with the same (person, source, captured_at) already existed
    renamed_from: str | None = None
    renamed_to: str | None = None
    other_person_id: uuid.UUID | None = None  # the asked-for person, when the did/rid belongs to someone else


@dataclass(frozen=True)
class Alias:
    alias: str
    valid_from: dt.datetime
    valid_to: dt.datetime | None


@dataclass(frozen=True)
class SnapshotDelta:
    source: str
    previous_captured_at: dt.datetime
    captured_at: dt.datetime
    delta: dict[str, object]


@dataclass(frozen=True)
class Ranked:
    username: str
    total: float
    count: int


async def newest_snapshot_at(pool: asyncpg.Pool, person_id: uuid.UUID, source: str) -> dt.datetime | None:
    with translate_errors():
        value: dt.datetime | None = await pool.fetchval(
            sql_files.query("newest_snapshot_at"), person_id, source
        )
    return value


async def newest_snapshot_miss_at(
    pool: asyncpg.Pool, person_id: uuid.UUID, source: str
) -> dt.datetime | None:
    with translate_errors():
        value: dt.datetime | None = await pool.fetchval(
            sql_files.query("newest_snapshot_miss_at"), person_id, source
        )
    return value


async def newest_api_failure_at(pool: asyncpg.Pool, api: str, kinds: tuple[str, ...]) -> dt.datetime | None:
    with translate_errors():
        value: dt.datetime | None = await pool.fetchval(
            sql_files.query("newest_api_failure_at"), api, list(kinds)
        )
    return value


async def due_member_lookups(
    pool: asyncpg.Pool,
    *,
    now: dt.datetime,
    stale_before: dt.datetime,
    missed_before: dt.datetime,
    broadcaster: str,
    limit: int,
    platform: str = PLATFORM,
) -> list[DueMember]:
    """Who needs a Statbate member snapshot now, most important first (see the query's comment)."""
    with translate_errors():
        rows = await pool.fetch(
            sql_files.query("due_member_lookups"),
            platform,
            normalize_username(broadcaster),
            utc_naive(stale_before),
            utc_naive(missed_before),
            limit,
            utc_naive(now),
        )
    return [DueMember(person_id=row["id"], name=row["name"], priority=row["priority"]) for row in rows]


async def record_snapshot(
    pool: asyncpg.Pool,
    *,
    person_id: uuid.UUID,
    source: str,
    captured_at: dt.datetime,
    raw_payload: object,
    normalized_metrics: dict[str, object] | None,
) -> bool:
    """Append one snapshot; False when the same (person, source, captured_at) is already stored."""
    with translate_errors():
        inserted = await pool.fetchval(
            sql_files.query("insert_snapshot"),
            person_id,
            source,
            utc_naive(captured_at),
            raw_payload,
            normalized_metrics,
        )
    return inserted is not None


async def record_snapshot_miss(
    pool: asyncpg.Pool, *, person_id: uuid.UUID, source: str, username: str, missed_at: dt.datetime
) -> None:
    """Remember that the API did not know this person (the api_failures row is written by the client)."""
    with translate_errors():
        await pool.execute(
            sql_files.query("record_snapshot_miss"), person_id, source, username, utc_naive(missed_at)
        )


async def record_identified_snapshot(
    pool: asyncpg.Pool,
    *,
    asked_person_id: uuid.UUID,
    source: str,
    external_id: int,
    reported_name: str | None,
    captured_at: dt.datetime,
    raw_payload: object,
    normalized_metrics: dict[str, object] | None,
    platform: str = PLATFORM,
) -> StoredSnapshot:
    """Store a member (`did`) or model (`rid`) snapshot, keeping identities straight, in one transaction.

    The snapshot goes to whoever already holds the did/rid, else to the asked-for person, who gets it.
    When the reported name differs from the owner's current name, the rename is recorded in person_aliases:
    the open alias is closed (the first time, the original username is recorded as a closed alias, so the
    history is complete) and the new name opened. A model snapshot also widens the owner's role with MODEL.
    """
    if source not in ("statbate_member", "statbate_model"):
        raise ValueError(f"{source!r} carries no did/rid")
    at = utc_naive(captured_at)
    by_model = source == "statbate_model"
    with translate_errors():
        async with pool.acquire() as connection, connection.transaction():
            owner = await connection.fetchval(
                sql_files.query("person_by_rid" if by_model else "person_by_did"), external_id, platform
            )
            owner_id: uuid.UUID = owner or asked_person_id
            if by_model:
                await connection.execute(sql_files.query("set_person_rid_model"), owner_id, external_id)
            elif owner is None:
                await connection.execute(sql_files.query("set_person_did"), owner_id, external_id)
            renamed = await _record_rename(connection, owner_id, reported_name, at, platform)
            inserted = await connection.fetchval(
                sql_files.query("insert_snapshot"), owner_id, source, at, raw_payload, normalized_metrics
            )
    return StoredSnapshot(
        person_id=owner_id,
        inserted=inserted is not None,
        renamed_from=renamed[0] if renamed else None,
        renamed_to=renamed[1] if renamed else None,
        other_person_id=asked_person_id if owner_id != asked_person_id else None,
    )


async def _record_rename(
    connection: Connection, person_id: uuid.UUID, reported_name: str | None, at: dt.datetime, platform: str
) -> tuple[str, str] | None:
    """(old, new) when `reported_name` is a new name for the person, after recording it; else None."""
    if not reported_name:
        return None
    new_name = normalize_username(reported_name)
    names = await connection.fetchrow(sql_files.query("person_names"), person_id)
    if names is None:
        raise errors.StorageError("the person of a snapshot vanished")
    current = names["current_alias"] or names["username"]
    if new_name == current:
        return None
    if not names["has_aliases"]:
        first = min(names["first_seen_at"], at)
        await connection.execute(
            sql_files.query("insert_alias"), person_id, names["username"], platform, first, at
        )
    await connection.execute(sql_files.query("close_current_aliases"), person_id, at)
    await connection.execute(sql_files.query("insert_alias"), person_id, new_name, platform, at, None)
    return current, new_name


async def person_aliases(pool: asyncpg.Pool, person_id: uuid.UUID) -> list[Alias]:
    with translate_errors():
        rows = await pool.fetch(sql_files.query("person_aliases"), person_id)
    return [Alias(alias=row["alias"], valid_from=row["valid_from"], valid_to=row["valid_to"]) for row in rows]


async def snapshot_deltas(
    pool: asyncpg.Pool, person_id: uuid.UUID, source: str | None = None
) -> list[SnapshotDelta]:
    """Consecutive deltas of one person's snapshots (computed by the `snapshot_deltas` view, never stored)."""
    with translate_errors():
        rows = await pool.fetch(sql_files.query("snapshot_deltas"), person_id, source)
    return [
        SnapshotDelta(
            source=row["source"],
            previous_captured_at=row["previous_captured_at"],
            captured_at=row["captured_at"],
            delta=dict(row["delta"]),
        )
        for row in rows
    ]


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


@dataclass(frozen=True)
class SnapshotCount:
    source: str
    snapshots: int
    newest: dt.datetime


async def snapshot_counts(pool: asyncpg.Pool) -> list[SnapshotCount]:
    """Snapshots stored per source, with the newest capture time (for the demo and status output)."""
    with translate_errors():
        rows = await pool.fetch(sql_files.query("snapshot_counts"))
    return [
        SnapshotCount(source=row["source"], snapshots=row["snapshots"], newest=row["newest"]) for row in rows
    ]


@dataclass(frozen=True)
class Room:
    """A room of the `rooms` table, or one only the cursor knows (the single-room settings'): then `enabled`
    and `added_at` are None."""

    name: str
    enabled: bool | None
    added_at: dt.datetime | None
    last_event_id: str | None  # the committed read position
    polled_at: dt.datetime | None  # when that position last moved (naive UTC)

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


async def schema_is_current(pool: asyncpg.Pool) -> bool:
    """True when every known migration is applied and unchanged. Raises `StorageError` when the database
    cannot answer, so a caller can tell "behind" from "unknown".
    """
    with translate_errors():
        async with pool.acquire() as connection:
            # A pooled connection runs the same queries; migrations.py types its argument as a plain one.
            return await migrations.is_current(cast(asyncpg.Connection, connection))
