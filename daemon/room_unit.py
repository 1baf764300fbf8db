"""One room's capture: a poller that fetches its feed and a writer that commits it, with its spool.

The poller hands pages to the writer through a small bounded queue, so the next long-poll is under way while
the current page is written. The read position only moves when a page is committed, so a crash at any instant
re-reads, and the writer's idempotency turns re-reads into "duplicates skipped". While the database is away,
pages go to the room's disk spool and are committed from there, in order, once it is back.

The supervisor starts a unit per room and stops it (its `stop` event) when the daemon stops or the room goes.
A unit handles every error its inputs can cause; it ends the daemon only through a bug.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import tenacity

from daemon import (
    config,
    db,
    errors,
    events_api,
    group_commit,
    ingest,
    logs,
    metrics,
    position_file,
    runtime_state,
    spool,
    systemd,
    waits,
)

log = logs.get_logger(__name__)
T = TypeVar("T")

HANDOFF_PAGES = 20  # pages fetched ahead of a room's writer; bounded so a stalled database stops polling
# Pages fetched and not yet committed, all rooms together: a full page is ~50 KB raw plus its parsed rows, so
# hundreds of rooms draining backlogs at once stay within the memory bound instead of holding 20 pages each.
PAGE_BUDGET = 200
# While a backlog drains, the writer takes every page already waiting (up to this many events) into one
# transaction: fewer commits and round trips. 20 pages / 2,000 events drained a backlog as fast as 50 / 5,000
# (bench/throughput.py) with some 40 MB less peak memory; 10 / 1,000 was about 8% slower.
MERGE_EVENTS = 2000
# Between attempts to reach or write to the database: from half a second, doubling, up to 30 s.
STORAGE_BACKOFF = waits.Backoff(0.5, 30.0)
# Before it falls back to the position saved on disk, the poller gives a starting database this long.
DATABASE_START_WAIT_SECONDS = 5.0
# Once caught up, requests start at most this often: the client's 2,000 requests per minute spread evenly
# (plus 5%). Unpaced, a busy live room (a request per event or two) used up the minute's allowance in ~10 s,
# then waited ~50 s with events piling up (bench/latency.py). A full page (a backlog) is not paced: the
# client's own limit then allows the burst.
LIVE_POLL_SPACING = 60.0 / 2000 * 1.05
FULL_PAGE = 100  # events in a full Events API response
# An idle writer wakes this often to tell the watchdog it is alive (far inside its stall limit, which is
# longer than a long-poll); more often, hundreds of idle rooms cost a core in wake-ups alone.
IDLE_WRITER_WAKE_SECONDS = 5.0


@dataclass(frozen=True)
class ParsedPage:
    """A fetched or spooled page with its events already sorted into rows (`batch`): the poller parses while
    the writer waits on PostgreSQL, so the writer's turn is database work only."""

    events: list[Any]
    next_event_id: str | None
    received_at: dt.datetime
    batch: ingest.Batch
    asked: ingest.Asked | None = None


class Stopping(Exception):  # a signal between our own functions, not an error
    """The unit stops while a task waits for the database: the work in hand is left uncommitted."""


@dataclass
class Shared:
    """What every unit of one daemon shares with the supervisor."""

    settings: config.Settings
    pool: db.Pool
    state: runtime_state.RuntimeState
    # Set once the schema is migrated and current: only then does a writer write.
    database_ready: asyncio.Event
    first_commit: asyncio.Event
    record_failures: Callable[[], Awaitable[None]]  # writes the failure rows that wait in memory
    failures_waiting: Callable[[], bool]
    group: group_commit.GroupCommit  # every room's writes go through it, to share transactions
    # One memory budget for the pages handed off across all rooms (a page holds one unit until committed).
    page_budget: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(PAGE_BUDGET))


@dataclass
class RoomUnit:
    name: str
    directory: Path  # the room's spool and saved position live here
    client: events_api.EventsClient
    shared: Shared
    room: runtime_state.RoomState
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    # Set once the room's lease is this daemon's (`grant`): only then does the writer write, fenced by it.
    leased: asyncio.Event = field(default_factory=asyncio.Event)
    lost: bool = False  # the lease moved to another host: everything fetched was dropped (`give_up`)
    started: float = field(default_factory=time.monotonic)
    disk_spool: spool.Spool = field(init=False)
    position: position_file.PositionFile = field(init=False)
    # Pages handed to the writer and not yet committed, oldest first: when spooling starts they go to the
    # spool first, so the spool always begins at or before the committed cursor and a crash loses none.
    _in_memory: collections.deque[ParsedPage] = field(init=False, default_factory=collections.deque)
    _handoff: asyncio.Queue[ParsedPage] = field(init=False)

    def __post_init__(self) -> None:
        settings = self.shared.settings
        self.disk_spool = spool.Spool(self.directory / "spool", max_bytes=settings.spool_max_mb * 1024 * 1024)
        self.position = position_file.PositionFile(self.directory, self.name)
        self._handoff = asyncio.Queue(maxsize=HANDOFF_PAGES)

    async def run(self) -> None:
        """Poll and write until `stop`; then drain what was fetched (the supervisor bounds how long)."""
        try:
            async with asyncio.TaskGroup() as group:
                poller = group.create_task(self._poll(), name=f"poller:{self.name}")
                group.create_task(self._write(poller), name=f"writer:{self.name}")
        finally:
            self.position.flush()

    @property
    def pages_waiting(self) -> int:
        return self._handoff.qsize()

    def grant(self, epoch: int) -> None:
        """The room's lease is this daemon's at `epoch`."""
        self.room.epoch = epoch
        self.leased.set()

    def give_up(self, reason: str) -> None:
        """The room's lease is no longer this daemon's: stop polling and drop what was fetched and spooled and
        not committed (the new holder reads it from the API, after the committed cursor). Never retried."""
        if self.lost:
            return
        self.lost = True
        self.room.stopping = True
        self.stop.set()
        dropped = len(self._in_memory)
        for _ in range(dropped):
            self.shared.page_budget.release()
        self._in_memory.clear()
        while not self._handoff.empty():
            self._handoff.get_nowait()
        spooled = self.disk_spool.pending_bytes
        self.disk_spool.discard()
        self._spool_gauge()
        metrics.LEASES_LOST.inc()
        log.warning("room_lease_lost", room=self.name, reason=reason, pages=dropped, spooled_bytes=spooled)

    # -- the poller ------------------------------------------------------------------------------------------

    async def _poll(self) -> None:
        """Fetch pages from the last committed position onwards until told to stop."""
        try:
            position = await self._start_position()
        except Stopping:
            return
        client = self.client
        url = client.start_url(position)
        self._spool_gauge()
        log.info(
            "polling_started",
            room=self.name,
            resume_from=position,
            spooled_bytes=self.disk_spool.pending_bytes,
        )
        first = True
        loop = asyncio.get_running_loop()
        taken = loop.time()  # when the position of `url` was taken up: gap detection allows for all since
        stopped = asyncio.ensure_future(self.stop.wait())  # one waiter for the whole loop, not one a request
        try:
            while not self.stop.is_set():
                started = loop.time()
                fetch = asyncio.ensure_future(client.fetch(url))
                done, _ = await asyncio.wait({fetch, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if fetch not in done:
                    fetch.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await fetch
                    break
                page = fetch.result()
                answered = loop.time()
                if first:
                    systemd.ready()
                    first = False
                asked = ingest.Asked(page.request_event_id, answered - taken, page.continuation)
                if not await self._hand_off(self._parsed(page, asked)):
                    break
                url = page.next_url or client.start_url(page.next_event_id)
                taken = answered
                pause = started + LIVE_POLL_SPACING - loop.time()
                if len(page.events) < FULL_PAGE and pause > 0 and await waits.wait_for_stop(self.stop, pause):
                    break
        finally:
            stopped.cancel()

    async def _start_position(self) -> str | None:
        """Where to read from: after the newest spooled page, else the committed cursor; while the database
        is not ready, the position saved on disk after the last commit (a second behind at worst: re-read
        events are skipped as duplicates). With neither, only the database knows: wait for it."""
        if self.disk_spool.has_pages():
            # Spooled pages are newer than the committed cursor: resume after them; they are drained first.
            return self.disk_spool.last_position()
        if not await self._database_ready_within(DATABASE_START_WAIT_SECONDS):
            saved = self.position.load()
            if saved is not None:
                log.warning("resuming_from_saved_position", room=self.name, resume_from=saved.last_event_id)
                return saved.last_event_id
            log.warning(
                "waiting_for_database", room=self.name, reason="no read position saved on this host yet"
            )
            await self._database_ready_within(None)
        cursor = await retry_storage(
            self.shared.state, self.stop, "load_cursor", lambda: db.load_cursor(self.shared.pool, self.name)
        )
        return cursor.last_event_id if cursor else None

    async def _database_ready_within(self, seconds: float | None) -> bool:
        """Wait up to `seconds` (None: as long as it takes) for the database to be ready; `Stopping` when
        the unit stops meanwhile."""
        return await self._set_within(self.shared.database_ready, seconds)

    async def _set_within(self, event: asyncio.Event, seconds: float | None) -> bool:
        """Wait up to `seconds` (None: as long as it takes) for `event`; `Stopping` when the unit stops
        meanwhile. Waiting counts as progress for the watchdog."""
        loop = asyncio.get_running_loop()
        deadline = None if seconds is None else loop.time() + seconds
        state = self.shared.state
        while not event.is_set():
            if self.stop.is_set():
                raise Stopping
            if deadline is not None and loop.time() >= deadline:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout=0.5)
            state.write_progress += 1
            state.poll_progress += 1
        return True

    async def _hand_off(self, page: ParsedPage) -> bool:
        """Give a page to the writer, or to the disk spool while the database is away; False once stopping.

        Pages go to the spool whenever it already holds some, so that they are always committed in order.
        """
        full_logged = False
        state, settings = self.shared.state, self.shared.settings
        while not self.lost:
            if self.shared.database_ready.is_set() and state.database_up and not self.disk_spool.has_pages():
                budget = self.shared.page_budget
                try:
                    if budget.locked():  # (a timer only when waiting: one a page adds up over many rooms)
                        await asyncio.wait_for(budget.acquire(), timeout=1.0)
                    else:
                        await budget.acquire()
                except TimeoutError:
                    state.poll_progress += 1  # every room's writer is behind: back-pressure, not a stall
                    if self.stop.is_set():
                        return False
                    continue
                # Listed before the put: the writer may take and commit the page before this task resumes.
                self._in_memory.append(page)
                try:
                    if self._handoff.full():
                        await asyncio.wait_for(self._handoff.put(page), timeout=1.0)
                    else:
                        self._handoff.put_nowait(page)
                    return True
                except TimeoutError:
                    self._in_memory.pop()  # not queued (wait_for never returns a put that happened)
                    budget.release()
                    state.poll_progress += 1  # waiting for the writer (back-pressure) is not a stall
                    continue
            was_empty = not self.disk_spool.has_pages()
            # Uncommitted pages in memory are older than this one: spooled first (the writer still commits
            # them from the queue; their second write from the spool is a harmless "duplicates skipped").
            pages = [*self._in_memory, page] if was_empty else [page]
            try:
                self.disk_spool.append_many([_spooled(item) for item in pages])
            except (spool.SpoolFull, OSError) as error:
                # Full, or the disk refused (ENOSPC, EIO): polling waits on this page, the API keeps the rest.
                if not full_logged:
                    log.error(
                        "spool_full_polling_paused",
                        room=self.name,
                        spool_bytes=self.disk_spool.size,
                        limit_mb=settings.spool_max_mb,
                        error=logs.mask(str(error)),
                        hint="database unreachable; nothing is dropped: the API keeps what is not fetched",
                    )
                    full_logged = True
                state.poll_progress += 1
                if await waits.wait_for_stop(self.stop, 1.0):
                    return False
                continue
            if was_empty:
                log.warning(
                    "spooling_to_disk",
                    room=self.name,
                    path=str(self.disk_spool.path),
                    uncommitted=len(pages) - 1,
                )
            self._spool_gauge()
            return True
        return False

    # -- the writer ------------------------------------------------------------------------------------------

    async def _write(self, poller: asyncio.Task[None]) -> None:
        """Commit pages in order (queued ones are older than spooled ones); after a stop, drain, then end.
        Nothing is written before the database is ready; a stop while the database is away ends the writer
        with the pages uncommitted (spooled, or read again from the committed position at the next start)."""
        try:
            await self._database_ready_within(None)
            await self._set_within(self.leased, None)  # (a start without the database polls unleased)
            await self._write_pages(poller)
        except Stopping:
            if not self.lost:
                waiting = self.pages_waiting
                log.warning("writer_stopped_database_unavailable", room=self.name, pages_not_written=waiting)
        except errors.LeaseLost:
            self.give_up("a write was fenced: another host took the room")

    async def _write_pages(self, poller: asyncio.Task[None]) -> None:
        handoff = self._handoff
        # One waiting `get` at a time, kept across idle wake-ups; when it has a page, that page is older than
        # any still queued.
        getter: asyncio.Future[ParsedPage] | None = None
        try:
            while True:
                if getter is not None and getter.done():
                    page, getter = getter.result(), None
                    await self._commit_queued(self._waiting_pages(page))
                elif not handoff.empty():
                    await self._commit_queued(self._waiting_pages(handoff.get_nowait()))
                elif (spooled := self.disk_spool.next_page()) is not None:
                    end_offset, spooled_page = spooled
                    await self._commit([self._parsed(spooled_page, spooled_page.asked)])
                    self.disk_spool.committed(end_offset)
                    await self.shared.record_failures()  # damaged records met on the way
                    self._spool_gauge()
                    if not self.disk_spool.has_pages():
                        log.info("spool_drained", room=self.name)
                elif poller.done():
                    return
                else:
                    getter = getter or asyncio.ensure_future(handoff.get())
                    either: set[asyncio.Future[Any]] = {getter, poller}
                    done, _ = await asyncio.wait(
                        either, timeout=IDLE_WRITER_WAKE_SECONDS, return_when="FIRST_COMPLETED"
                    )
                    if not done:
                        self.shared.state.write_progress += 1  # idle is healthy, not a stall
        finally:
            if getter is not None:
                getter.cancel()

    async def _commit_queued(self, pages: list[ParsedPage]) -> None:
        await self._commit(pages)
        for page in pages:
            self.shared.page_budget.release()
            if self._in_memory and self._in_memory[0] is page:
                self._in_memory.popleft()

    def _waiting_pages(self, first: ParsedPage) -> list[ParsedPage]:
        """`first` and the pages queued behind it, up to `MERGE_EVENTS` events: one transaction for all."""
        pages = [first]
        events = len(first.events)
        while not self._handoff.empty() and events < MERGE_EVENTS:
            page = self._handoff.get_nowait()
            pages.append(page)
            events += len(page.events)
        return pages

    def _spool_gauge(self) -> None:
        self.room.spool_bytes = self.disk_spool.pending_bytes
        metrics.SPOOL_BYTES.set(self.shared.state.spool_total())

    def _parsed(self, page: events_api.Page | spool.SpooledPage, asked: ingest.Asked | None) -> ParsedPage:
        batch = ingest.parse_page(
            page.events,
            broadcaster=self.name,
            received_at=page.received_at,
            next_event_id=page.next_event_id,
            finite_numbers=isinstance(page, events_api.Page) and page.finite_numbers,
            asked=asked,
        )
        return ParsedPage(page.events, page.next_event_id, page.received_at, batch, asked)

    async def _commit(self, pages: list[ParsedPage]) -> None:
        batch = ingest.merge([page.batch for page in pages])
        result = await self._store(batch)
        self.shared.first_commit.set()
        self._account(result)
        self.position.committed(batch.next_event_id)
        if self.shared.failures_waiting():
            await self.shared.record_failures()
        if result.sessions_opened or result.sessions_closed:
            await self.refresh_live_session()

    async def refresh_live_session(self) -> None:
        """The room's LIVE session, as the database has it now."""
        pool = self.shared.pool
        live = await retry_storage(
            self.shared.state, self.stop, "live_session", lambda: db.live_session_id(pool, self.name)
        )
        self.room.live_session_id = str(live) if live else None
        if self.name == self.shared.settings.cb_username:
            self.shared.state.live_session_id = self.room.live_session_id

    async def _store(self, batch: ingest.Batch) -> db.WriteResult:
        """Commit `batch`, waiting out every transient refusal. A batch PostgreSQL refuses for what it holds
        is stored in halves until each refused event stands alone; that event goes to quarantine with the
        database's reason, and everything else is stored."""
        try:
            return await retry_storage(
                self.shared.state,
                self.stop,
                "write_batch",
                lambda: self.shared.group.write(self.name, self.room.epoch or 0, batch),
            )
        except errors.StorageError as error:
            if not batch.events and len(batch.quarantined) < 2:
                raise  # a quarantine row refused: a bug of ours, not of the event
            reason = logs.mask(f"refused by PostgreSQL: {error}")
        if len(batch.events) == 1 and not batch.quarantined:
            event = batch.events[0]
            log.error("event_refused_quarantined", event_id=event.event_id, method=event.method, error=reason)
            batch = dataclasses.replace(
                batch,
                events=[],
                interactions=[],
                session_changes=[],
                quarantined=[ingest.refused(event, reason)],
                unknown_methods=0,
                events_received_at=[],
            )
            return await self._store(batch)
        log.warning(
            "batch_refused_splitting",
            room=self.name,
            events=len(batch.events),
            quarantined=len(batch.quarantined),
            error=reason,
        )
        first, second = ingest.split(batch)
        return db.combined(await self._store(first), await self._store(second))

    def _account(self, result: db.WriteResult) -> None:
        """Keep the runtime state current with this room's part of the write (the writer already counted the
        metrics of the whole transaction and logged it)."""
        state, room, part = self.shared.state, self.room, result.rooms.get(self.name, db.RoomPart())
        state.write_progress += 1
        state.events_stored += part.new_events
        room.events_stored += part.new_events
        metrics.ROOM_EVENTS.labels(room=self.name).inc(part.new_events)
        state.duplicates_skipped += part.duplicates
        state.quarantined += part.quarantined
        if part.newest_event_time is not None:
            newest = part.newest_event_time.replace(tzinfo=dt.UTC).timestamp()
            room.last_event_time = newest
            state.last_event_time = max(state.last_event_time or newest, newest)


async def retry_storage(
    state: runtime_state.RuntimeState,
    stop: asyncio.Event,
    operation: str,
    attempt: Callable[[], Awaitable[T]],
) -> T:
    """Run `attempt` until the database takes it, retrying every transient refusal (unreachable, read-only,
    full, busy, timed out) with capped, jittered backoff. Each attempt is shielded, so a stop never cuts a
    commit halfway; a stop during a wait between attempts raises `Stopping`. Other storage errors (a refusal
    of the content) propagate."""

    async def pause(seconds: float) -> None:
        state.write_progress += 1  # retrying is alive, not wedged
        if await waits.wait_for_stop(stop, seconds):
            raise Stopping

    def unavailable(retry: tenacity.RetryCallState) -> None:
        state.database_up = False
        metrics.DATABASE_UP.set(0)
        error = retry.outcome.exception() if retry.outcome else None
        log.warning(
            "database_unavailable",
            operation=operation,
            attempt=retry.attempt_number,
            retry_in_s=round(retry.upcoming_sleep, 1),
            error=logs.mask(str(error)),
        )

    retrying = tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception_type(errors.DatabaseUnavailable),
        wait=STORAGE_BACKOFF,
        sleep=pause,
        before_sleep=unavailable,
        reraise=True,
    )
    async for try_ in retrying:
        with try_:
            result = await asyncio.shield(attempt())
            state.database_up = True
            return result
    raise AssertionError("tenacity stopped retrying, but it has no stop condition")  # pragma: no cover


def _spooled(page: ParsedPage) -> spool.SpooledPage:
    return spool.SpooledPage(page.events, page.next_event_id, page.received_at, page.asked)
