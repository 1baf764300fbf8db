"""The supervisor: one owner for every long-lived task of `mhc-daemon run`.

Resources open in dependency order (database → pool → HTTP session → health server) and close in reverse;
none of them needs PostgreSQL to answer: migrations wait for it in their own task while the poller fetches
into the disk spool. The poller fetches pages and hands them to the writer through a small bounded queue, so
the next long-poll is under way while the current page is written. The read position only moves when a page
is committed, so a crash at any instant re-reads, and the writer's idempotency turns re-reads into
"duplicates skipped".

The rule of failure: the event path (database preparation, poller, writer, watchdog) handles every error its
inputs can cause and ends the daemon only through a bug; every other task is isolated, its failures recorded
and the task restarted, so nothing on the snapshot or reporting side can stop event capture.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import itertools
import random
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import tenacity

from daemon import (
    api_http,
    config,
    credentials,
    database_server,
    db,
    errors,
    events_api,
    health,
    ingest,
    logs,
    metrics,
    migrations,
    position_file,
    runtime_state,
    sessions,
    snapshots,
    spool,
    systemd,
    waits,
)

log = logs.get_logger(__name__)
T = TypeVar("T")

HANDOFF_PAGES = 20  # pages fetched ahead of the writer; bounded so a stalled database stops polling
# While a backlog drains, the writer takes every page already waiting (up to this many events) into one
# transaction: fewer commits and round trips. 20 pages / 2,000 events drained a backlog as fast as 50 / 5,000
# (bench/throughput.py) with some 40 MB less peak memory; 10 / 1,000 was about 8% slower.
MERGE_EVENTS = 2000
DATABASE_CHECK_SECONDS = 5.0
SUMMARY_SECONDS = 60.0
STALENESS_CHECK_SECONDS = 60.0  # the staleness rule counts in minutes (MHC_SESSION_STALE_MINUTES)
# Between attempts to reach or write to the database: from half a second, doubling, up to 30 s.
STORAGE_BACKOFF = waits.Backoff(0.5, 30.0)
# Before it falls back to the position saved on disk, the poller gives a starting database this long.
DATABASE_START_WAIT_SECONDS = 5.0
# A task that must not stop capture (snapshots, health checks, the summary) restarts after a failure, waiting
# twice as long after each one, up to five minutes.
RESTART_BACKOFF = waits.Backoff(2.0, 300.0)
UNRECORDED_FAILURES_MAX = 10_000
FIRST_COMMIT_WAIT_SECONDS = 5.0  # how long the snapshot side lets the event path go first
STALL_MARGIN_SECONDS = 10.0  # beyond one long-poll, this long without progress is a stall
# Once caught up, requests start at most this often: the client's 2,000 requests per minute spread evenly
# (plus 5%). Unpaced, a busy live room (a request per event or two) used up the minute's allowance in ~10 s,
# then waited ~50 s with events piling up (bench/latency.py). A full page (a backlog) is not paced: the
# client's own limit then allows the burst.
LIVE_POLL_SPACING = 60.0 / 2000 * 1.05
FULL_PAGE = 100  # events in a full Events API response


@dataclass(frozen=True)
class ParsedPage:
    """A fetched or spooled page with its events already sorted into rows (`batch`): the poller parses while
    the writer waits on PostgreSQL, so the writer's turn is database work only."""

    events: list[Any]
    next_event_id: str | None
    received_at: dt.datetime
    batch: ingest.Batch
    asked: ingest.Asked | None = None


@dataclass
class Supervisor:
    settings: config.Settings
    state: runtime_state.RuntimeState = field(default_factory=runtime_state.RuntimeState)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    # Retry pacing of the Events API client; tests and the demo shorten them.
    auth_retry_seconds: float = 300.0
    backoff_max: float = 60.0
    disk_spool: spool.Spool = field(init=False)
    credentials: credentials.Credentials = field(init=False)
    position: position_file.PositionFile = field(init=False)
    # Set once the schema is migrated and current: only then does the writer write.
    database_ready: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    first_commit: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    # Failure rows not stored yet (the database was away); the oldest go first if an outage overflows it.
    _unrecorded: collections.deque[errors.ApiFailure] = field(
        init=False, default_factory=lambda: collections.deque(maxlen=UNRECORDED_FAILURES_MAX)
    )
    # The poller, the writer and the snapshot task all write those rows: one at a time, so none is written
    # twice and none is popped by a task that did not write it.
    _recording: asyncio.Lock = field(init=False, default_factory=asyncio.Lock)
    # Pages handed to the writer and not yet committed, oldest first: when spooling starts they go to the
    # spool first, so the spool always begins at or before the committed cursor and a crash loses none.
    _in_memory: collections.deque[ParsedPage] = field(init=False, default_factory=collections.deque)

    def __post_init__(self) -> None:
        self.disk_spool = spool.Spool(
            self.settings.data_dir / "spool", max_bytes=self.settings.spool_max_mb * 1024 * 1024
        )
        self.credentials = credentials.Credentials(self.settings)
        self.position = position_file.PositionFile(
            self.settings.data_dir, db.normalize_username(self.settings.cb_username)
        )

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT (exit 0) or until an event-path task fails unexpectedly (the error
        propagates). SIGHUP re-reads the token files and reopens logging."""
        loop = asyncio.get_running_loop()
        handlers = {
            signal.SIGTERM: self.request_stop,
            signal.SIGINT: self.request_stop,
            signal.SIGHUP: self.reload,
        }
        for signum, handler in handlers.items():
            loop.add_signal_handler(signum, handler)
        try:
            async with self._resources() as (url, pool, session):
                await self._run_tasks(url, pool, session)
        finally:
            for signum in handlers:
                loop.remove_signal_handler(signum)
            systemd.stopping()
        log.info("stopped")
        return 0

    def request_stop(self) -> None:
        if not self.stop.is_set():
            log.info("stop_requested")
            systemd.stopping()
            self.stop.set()

    def reload(self) -> None:
        """SIGHUP (a reload, a closed terminal): reopen logging, re-read the token files; never a stop."""
        logs.configure(self.settings.log_level, self.settings.log_format)
        log.info("reloaded", tokens_changed=self.credentials.reload())

    @contextlib.asynccontextmanager
    async def _resources(self) -> AsyncIterator[tuple[str, db.Pool, aiohttp.ClientSession]]:
        """Nothing here needs the database to answer: the pool connects on first use, and migrations wait
        for the database in their own task (`_prepare_database`) while polling goes on into the spool."""
        settings = self.settings
        async with contextlib.AsyncExitStack() as stack:
            url = await stack.enter_async_context(database_server.open_url(settings))
            pool = await stack.enter_async_context(db.open_pool(url, min_size=0, max_size=6))
            session = await stack.enter_async_context(
                aiohttp.ClientSession(headers={"User-Agent": "mhc-daemon"}, raise_for_status=False)
            )
            await stack.enter_async_context(health.serve(pool, settings, self.state))
            yield url, pool, session

    async def _prepare_database(self, url: str, pool: db.Pool) -> None:
        """Migrate (unless told not to) and check the schema, retrying until the database answers and the
        schema is current; then the writer may write. Until then readiness names the reason."""
        for attempt in itertools.count(1):
            try:
                if self.settings.migrate_on_start:
                    async with db.single_connection(url) as connection:
                        with db.translate_errors():
                            applied = await migrations.migrate(connection)
                    for line in applied:
                        log.info("migration_applied", migration=line)
                if not await db.schema_is_current(pool):
                    raise errors.MigrationError("the schema is behind this version: run `mhc-daemon migrate`")
                self.state.live_session_id = await self._live_session(pool)
            except (errors.StorageError, errors.MigrationError) as error:
                self.state.database_up = not isinstance(error, errors.DatabaseUnavailable)
                self.state.database_problem = logs.mask(str(error))
                delay = STORAGE_BACKOFF.delay(attempt)
                log.warning("database_not_ready", error=self.state.database_problem, retry_in_s=delay)
                if await waits.wait_for_stop(self.stop, delay):
                    return
                continue
            break
        self.state.database_up = self.state.migrations_current = True
        self.state.database_problem = None
        self.database_ready.set()
        log.info("database_ready")
        await self._record_failures(pool)

    async def _run_tasks(self, url: str, pool: db.Pool, session: aiohttp.ClientSession) -> None:
        settings = self.settings
        client = events_api.EventsClient(
            session,
            base_url=settings.cb_events_base_url,
            username=settings.cb_username,
            token=self.credentials.provider("cb_events_token"),
            on_auth_rejected=self._reload_tokens,
            timeout=settings.cb_events_timeout,
            on_failure=self._failure_recorder(pool),
            state=self.state,
            max_body_bytes=settings.api_max_body_bytes,
            backoff_max=self.backoff_max,
            auth_retry_seconds=self.auth_retry_seconds,
            sleep=self._poll_sleep,
        )
        handoff: asyncio.Queue[ParsedPage] = asyncio.Queue(maxsize=HANDOFF_PAGES)
        tasks = asyncio.ensure_future(self._task_group(url, pool, session, client, handoff))
        stopped = asyncio.ensure_future(self.stop.wait())
        await asyncio.wait({tasks, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not tasks.done():
            # Bounded: what is not written by then is re-read at the next start, never lost.
            try:
                await asyncio.wait_for(asyncio.shield(tasks), timeout=settings.shutdown_timeout)
            except TimeoutError:
                log.warning("shutdown_timeout_reached", pages_not_written=handoff.qsize())
                tasks.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await tasks
        self.position.flush()
        if not tasks.cancelled():
            tasks.result()  # an unexpected failure of the event path propagates as the daemon's failure

    async def _task_group(
        self,
        url: str,
        pool: db.Pool,
        session: aiohttp.ClientSession,
        client: events_api.EventsClient,
        handoff: asyncio.Queue[ParsedPage],
    ) -> None:
        """The event path (database preparation, poller, writer, watchdog) may end the daemon, and only
        through a bug; every other task is isolated (`_isolated`): its failures are recorded and it starts
        again, so nothing on the snapshot or reporting side can stop event capture."""
        settings = self.settings
        async with asyncio.TaskGroup() as group:
            group.create_task(self._prepare_database(url, pool), name="database")
            poller = group.create_task(self._poll(client, pool, handoff), name="poller")
            group.create_task(self._write(pool, handoff, poller), name="writer")
            interval = systemd.watchdog_interval()
            if interval is not None:
                # Longer than one long-poll: an idle room completes a poll only every `timeout` seconds.
                stall_after = max(settings.cb_events_timeout + STALL_MARGIN_SECONDS, 2 * interval)
                group.create_task(
                    systemd.run_watchdog(self.state, self.stop, interval=interval, stall_after=stall_after),
                    name="watchdog",
                )
            isolated: dict[str, Callable[[], Awaitable[None]]] = {
                "health_checks": lambda: health.run_checks(
                    pool, self.state, self.stop, interval=DATABASE_CHECK_SECONDS
                ),
                "summary": lambda: logs.run_summary(self.state, self.stop, interval=SUMMARY_SECONDS),
                "session_staleness": lambda: self._when_database_ready(
                    run_session_staleness(
                        pool,
                        self.state,
                        self.stop,
                        stale_after=dt.timedelta(minutes=settings.session_stale_minutes),
                        room=settings.cb_username,
                    )
                ),
                "snapshot_scheduler": lambda: self._when_database_ready(
                    snapshots.run_scheduler(
                        pool=pool,
                        session=session,
                        settings=settings,
                        state=self.state,
                        stop=self.stop,
                        on_failure=self._failure_recorder(pool),
                        tokens=self.credentials,
                    )
                ),
            }
            for name, run in isolated.items():
                group.create_task(self._isolated(name, run, pool), name=name)

    async def _isolated(self, name: str, run: Callable[[], Awaitable[None]], pool: db.Pool) -> None:
        """Run `run` until the daemon stops. Whatever it raises is logged with its traceback, recorded in
        `api_failures` (api = the task's name, kind `internal_error`), and the task starts again after a
        backoff that doubles with each failure."""
        for failures in itertools.count(1):
            try:
                await run()
                return
            except Exception as error:  # isolating every failure is this wrapper's one job
                delay = RESTART_BACKOFF.delay(failures)
                text = logs.mask(f"{type(error).__name__}: {error}")
                log.error("task_failed_restarting", task=name, error=text, restart_in_s=delay, exc_info=error)
                failure = errors.ApiFailure(
                    api=name, operation="run", url="-", error_kind="internal_error", body_excerpt=text[:200]
                )
                await self._failure_recorder(pool)(failure)
            if await waits.wait_for_stop(self.stop, delay):
                return

    async def _when_database_ready(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` once the schema is ready (never, if the daemon stops first), and after the writer's
        first commit or a few seconds: the event path goes first, and lookups then find the first viewers."""
        try:
            await self._database_ready_within(None)
        except _Stopping:
            work.close()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.first_commit.wait(), timeout=FIRST_COMMIT_WAIT_SECONDS)
        await work

    def _failure_recorder(self, pool: db.Pool) -> api_http.FailureRecorder:
        """Failure rows go to `api_failures` at once when the database takes them, else (it is down, or not
        migrated yet) they wait in memory, with the time they happened, until it does."""

        async def record(failure: errors.ApiFailure) -> None:
            self.state.failures += 1
            if failure.occurred_at is None:
                failure = dataclasses.replace(failure, occurred_at=db.utc_now())
            self._unrecorded.append(failure)
            if self.database_ready.is_set():
                await self._record_failures(pool)

        return record

    async def _record_failures(self, pool: db.Pool) -> None:
        """Write the failure rows that wait in memory, oldest first; those the database refuses wait on.
        Damaged spool records set aside meanwhile are among them."""
        async with self._recording:
            for damaged in self.disk_spool.take_damaged():
                self.state.failures += 1
                self._unrecorded.append(
                    errors.ApiFailure(
                        api="spool",
                        operation="drain",
                        url=str(damaged.path or self.disk_spool.path),
                        error_kind="damaged_record",
                        body_excerpt=f"offset {damaged.offset}, {damaged.length} bytes: {damaged.reason}",
                        occurred_at=damaged.found_at,
                    )
                )
            while self._unrecorded:
                # Taken off before the insert: a failure appended meanwhile to a full queue cannot push out
                # the row being written.
                failure = self._unrecorded.popleft()
                try:
                    await db.record_api_failure(pool, failure)
                except errors.StorageError as error:
                    # The failure is already in the log line the client wrote; the row follows when it can.
                    self._unrecorded.appendleft(failure)
                    log.warning("api_failure_recorded_later", waiting=len(self._unrecorded), error=str(error))
                    return

    async def _poll(
        self, client: events_api.EventsClient, pool: db.Pool, handoff: asyncio.Queue[ParsedPage]
    ) -> None:
        """Fetch pages from the last committed position onwards until told to stop."""
        try:
            position = await self._start_position(pool)
        except _Stopping:
            return
        url = client.start_url(position)
        self._spool_gauge()
        log.info("polling_started", resume_from=position, spooled_bytes=self.disk_spool.pending_bytes)
        first = True
        loop = asyncio.get_running_loop()
        taken = loop.time()  # when the position of `url` was taken up: gap detection allows for all since
        while not self.stop.is_set():
            started = loop.time()
            fetch = asyncio.ensure_future(client.fetch(url))
            stopped = asyncio.ensure_future(self.stop.wait())
            done, _ = await asyncio.wait({fetch, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if fetch not in done:
                fetch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await fetch
                break
            stopped.cancel()
            page = fetch.result()
            answered = loop.time()
            if first:
                systemd.ready()
                first = False
            asked = ingest.Asked(page.request_event_id, answered - taken, page.continuation)
            if not await self._hand_off(self._parsed(page, asked), handoff):
                break
            url = page.next_url or client.start_url(page.next_event_id)
            taken = answered
            pause = started + LIVE_POLL_SPACING - loop.time()
            if len(page.events) < FULL_PAGE and pause > 0 and await waits.wait_for_stop(self.stop, pause):
                break

    async def _start_position(self, pool: db.Pool) -> str | None:
        """Where to read from: after the newest spooled page, else the committed cursor; while the database
        is not ready, the position saved on disk after the last commit (a second behind at worst: re-read
        events are skipped as duplicates). With neither, only the database knows: wait for it."""
        if self.disk_spool.has_pages():
            # Spooled pages are newer than the committed cursor: resume after them; they are drained first.
            return self.disk_spool.last_position()
        if not await self._database_ready_within(DATABASE_START_WAIT_SECONDS):
            saved = self.position.load()
            if saved is not None:
                log.warning("resuming_from_saved_position", resume_from=saved.last_event_id)
                return saved.last_event_id
            log.warning("waiting_for_database", reason="no read position saved on this host yet")
            await self._database_ready_within(None)
        cursor = await self._retry_storage(
            "load_cursor", lambda: db.load_cursor(pool, self.settings.cb_username)
        )
        return cursor.last_event_id if cursor else None

    async def _database_ready_within(self, seconds: float | None) -> bool:
        """Wait up to `seconds` (None: as long as it takes) for the database to be ready; `_Stopping` when
        the daemon stops meanwhile. Waiting counts as progress for the watchdog."""
        loop = asyncio.get_running_loop()
        deadline = None if seconds is None else loop.time() + seconds
        while not self.database_ready.is_set():
            if self.stop.is_set():
                raise _Stopping
            if deadline is not None and loop.time() >= deadline:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.database_ready.wait(), timeout=0.5)
            self.state.write_progress += 1
            self.state.poll_progress += 1
        return True

    async def _hand_off(self, page: ParsedPage, handoff: asyncio.Queue[ParsedPage]) -> bool:
        """Give a page to the writer, or to the disk spool while the database is away; False once stopping.

        Pages go to the spool whenever it already holds some, so that they are always committed in order.
        """
        full_logged = False
        while True:
            if self.database_ready.is_set() and self.state.database_up and not self.disk_spool.has_pages():
                # Listed before the put: the writer may take and commit the page before this task resumes.
                self._in_memory.append(page)
                try:
                    await asyncio.wait_for(handoff.put(page), timeout=1.0)
                    return True
                except TimeoutError:
                    self._in_memory.pop()  # not queued (wait_for never returns a put that happened)
                    self.state.poll_progress += 1  # waiting for the writer (back-pressure) is not a stall
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
                        spool_bytes=self.disk_spool.size,
                        limit_mb=self.settings.spool_max_mb,
                        error=logs.mask(str(error)),
                        hint="database unreachable; nothing is dropped: the API keeps what is not fetched",
                    )
                    full_logged = True
                self.state.poll_progress += 1
                if await waits.wait_for_stop(self.stop, 1.0):
                    return False
                continue
            if was_empty:
                log.warning("spooling_to_disk", path=str(self.disk_spool.path), uncommitted=len(pages) - 1)
            self._spool_gauge()
            return True

    async def _write(
        self, pool: db.Pool, handoff: asyncio.Queue[ParsedPage], poller: asyncio.Task[None]
    ) -> None:
        """Commit pages in order (queued ones are older than spooled ones); after a stop, drain, then end.
        Nothing is written before the database is ready; a stop while the database is away ends the writer
        with the pages uncommitted (spooled, or read again from the committed position at the next start)."""
        try:
            await self._database_ready_within(None)
            await self._write_pages(pool, handoff, poller)
        except _Stopping:
            log.warning("writer_stopped_database_unavailable", pages_not_written=handoff.qsize())

    async def _write_pages(
        self, pool: db.Pool, handoff: asyncio.Queue[ParsedPage], poller: asyncio.Task[None]
    ) -> None:
        while True:
            if not handoff.empty():
                await self._commit_queued(pool, self._waiting_pages(handoff.get_nowait(), handoff))
            elif (spooled := self.disk_spool.next_page()) is not None:
                end_offset, spooled_page = spooled
                await self._commit(pool, [self._parsed(spooled_page, spooled_page.asked)])
                self.disk_spool.committed(end_offset)
                await self._record_failures(pool)  # damaged records met on the way
                self._spool_gauge()
                if not self.disk_spool.has_pages():
                    log.info("spool_drained")
            elif poller.done():
                return
            else:
                try:
                    page = await asyncio.wait_for(handoff.get(), timeout=0.5)
                except TimeoutError:
                    # Idle is healthy: the watchdog must not take it for a stall.
                    self.state.write_progress += 1
                    continue
                await self._commit_queued(pool, self._waiting_pages(page, handoff))

    async def _commit_queued(self, pool: db.Pool, pages: list[ParsedPage]) -> None:
        await self._commit(pool, pages)
        for page in pages:
            if self._in_memory and self._in_memory[0] is page:
                self._in_memory.popleft()

    @staticmethod
    def _waiting_pages(first: ParsedPage, handoff: asyncio.Queue[ParsedPage]) -> list[ParsedPage]:
        """`first` and the pages queued behind it, up to `MERGE_EVENTS` events: one transaction for all."""
        pages = [first]
        events = len(first.events)
        while not handoff.empty() and events < MERGE_EVENTS:
            page = handoff.get_nowait()
            pages.append(page)
            events += len(page.events)
        return pages

    def _spool_gauge(self) -> None:
        self.state.spool_bytes = self.disk_spool.pending_bytes
        metrics.SPOOL_BYTES.set(self.state.spool_bytes)

    def _parsed(self, page: events_api.Page | spool.SpooledPage, asked: ingest.Asked | None) -> ParsedPage:
        batch = ingest.parse_page(
            page.events,
            broadcaster=self.settings.cb_username,
            received_at=page.received_at,
            next_event_id=page.next_event_id,
            finite_numbers=isinstance(page, events_api.Page) and page.finite_numbers,
            asked=asked,
        )
        return ParsedPage(page.events, page.next_event_id, page.received_at, batch, asked)

    async def _commit(self, pool: db.Pool, pages: list[ParsedPage]) -> None:
        batch = ingest.merge([page.batch for page in pages])
        result = await self._store(pool, batch)
        self.first_commit.set()
        self._account(result)
        self.position.committed(batch.next_event_id)
        if self._unrecorded:
            await self._record_failures(pool)
        if result.sessions_opened or result.sessions_closed:
            self.state.live_session_id = await self._retry_storage(
                "live_session", lambda: self._live_session(pool)
            )

    async def _store(self, pool: db.Pool, batch: ingest.Batch) -> db.WriteResult:
        """Commit `batch`, waiting out every transient refusal. A batch PostgreSQL refuses for what it holds
        is stored in halves until each refused event stands alone; that event goes to quarantine with the
        database's reason, and everything else is stored."""
        try:
            return await self._retry_storage(
                "write_batch",
                lambda: db.write_batch(
                    pool,
                    batch,
                    cursor_broadcaster=self.settings.cb_username,
                    timeout_seconds=self.settings.cb_events_timeout,
                ),
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
            return await self._store(pool, batch)
        log.warning(
            "batch_refused_splitting",
            events=len(batch.events),
            quarantined=len(batch.quarantined),
            error=reason,
        )
        first, second = ingest.split(batch)
        return db.combined(await self._store(pool, first), await self._store(pool, second))

    async def _retry_storage(self, operation: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run `attempt` until the database takes it, retrying every transient refusal (unreachable,
        read-only, full, busy, timed out) with capped, jittered backoff. Each attempt is shielded, so a stop
        never cuts a commit halfway; a stop during a wait between attempts raises `_Stopping`. Other
        storage errors (a refusal of the content) propagate."""

        async def pause(seconds: float) -> None:
            self.state.write_progress += 1  # retrying is alive, not wedged
            if await waits.wait_for_stop(self.stop, seconds):
                raise _Stopping

        def unavailable(retry: tenacity.RetryCallState) -> None:
            self.state.database_up = False
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
                self.state.database_up = True
                return result
        raise AssertionError("tenacity stopped retrying, but it has no stop condition")  # pragma: no cover

    async def _live_session(self, pool: db.Pool) -> str | None:
        session_id = await db.live_session_id(pool, self.settings.cb_username)
        return str(session_id) if session_id else None

    def _account(self, result: db.WriteResult) -> None:
        """Keep the runtime state current (the writer already counted the metrics and logged the batch)."""
        state = self.state
        state.write_progress += 1
        state.events_stored += result.new_events
        state.duplicates_skipped += result.duplicates
        state.quarantined += result.quarantined
        if result.newest_event_time is not None:
            state.last_event_time = result.newest_event_time.replace(tzinfo=dt.UTC).timestamp()

    async def _poll_sleep(self, seconds: float) -> None:
        """The client's waits (backoff, Retry-After, a rejected token's slow retry) are deliberate, not a
        wedge: they count as poll progress every second, so only a request that never ends stops the pings."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while (left := end - loop.time()) > 0:
            if await waits.wait_for_stop(self.stop, min(left, 1.0)):
                return
            self.state.poll_progress += 1

    def _reload_tokens(self) -> bool:
        """After a 401/403: read the token files again; True when that gave the Events API a new token."""
        changed = self.credentials.reload()
        if changed:
            log.info("tokens_reloaded", tokens_changed=changed)
        return "cb_events_token" in changed


async def check_session_staleness(
    pool: db.Pool, *, now: dt.datetime, stale_after: dt.timedelta
) -> list[sessions.Ended]:
    """Apply the staleness rule once (`now`: naive UTC wall clock, compared with stored times only); the
    sessions it ended, each logged."""
    endings = sessions.stale_endings(await db.live_sessions(pool), now, stale_after)
    ended = set(await db.end_stale_sessions(pool, endings))
    done = [item for item in endings if item.id in ended]
    for item in done:
        log.warning(
            "session_ended_stale",
            session_id=str(item.id),
            ended_at=item.ended_at.isoformat(),
            quiet_minutes=round((now - item.ended_at).total_seconds() / 60, 1),
        )
    return done


async def run_session_staleness(
    pool: db.Pool,
    state: runtime_state.RuntimeState,
    stop: asyncio.Event,
    *,
    stale_after: dt.timedelta,
    room: str | None = None,
    clock: Callable[[], dt.datetime] = db.utc_now,
    monotonic: Callable[[], float] = time.monotonic,
    period: float = STALENESS_CHECK_SECONDS,
    jitter_seconds: float = 1.0,
) -> None:
    """The staleness task: a check at once (start-up), then one every `period` seconds (plus up to
    `jitter_seconds`) of the monotonic clock until `stop`. A database outage skips a check; the next one comes
    a period later. `state.live_session_id` follows `room`'s LIVE session."""
    while not stop.is_set():
        due = monotonic() + period + random.uniform(0, jitter_seconds)  # noqa: S311  # timing, not a secret
        try:
            if await check_session_staleness(pool, now=clock(), stale_after=stale_after):
                live = await db.live_session_id(pool, room)
                state.live_session_id = str(live) if live else None
        except errors.DatabaseUnavailable as error:
            log.warning("session_staleness_check_skipped", error=logs.mask(str(error)))
        if await waits.wait_for_stop(stop, max(0.0, due - monotonic())):
            return


class _Stopping(Exception):  # a signal between our own functions, not an error
    """The daemon stops while a task waits for the database: the work in hand is left uncommitted."""


def _spooled(page: ParsedPage) -> spool.SpooledPage:
    return spool.SpooledPage(page.events, page.next_event_id, page.received_at, page.asked)
