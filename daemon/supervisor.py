"""The supervisor: one owner for every long-lived task of `mhc-daemon run`.

Resources open in dependency order (database → pool → HTTP session → health server) and close in reverse.
The poller fetches pages and hands them to the writer through a small bounded queue, so the next long-poll is
under way while the current page is written. The read position only moves when a page is committed, so a
crash at any instant re-reads, and the writer's idempotency turns re-reads into "duplicates skipped".
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import random
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp

from daemon import (
    api_http,
    config,
    database_server,
    db,
    errors,
    events_api,
    health,
    ingest,
    logs,
    metrics,
    migrations,
    runtime_state,
    snapshots,
    spool,
    systemd,
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
WRITE_RETRY_MAX_SECONDS = 30.0
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


@dataclass
class Supervisor:
    settings: config.Settings
    state: runtime_state.RuntimeState = field(default_factory=runtime_state.RuntimeState)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    # Retry pacing of the Events API client; tests and the demo shorten them.
    auth_retry_seconds: float = 300.0
    backoff_max: float = 60.0
    disk_spool: spool.Spool = field(init=False)
    # Pages handed to the writer and not yet committed, oldest first: when spooling starts they go to the
    # spool first, so the spool always begins at or before the committed cursor and a crash loses none.
    _in_memory: collections.deque[ParsedPage] = field(init=False, default_factory=collections.deque)

    def __post_init__(self) -> None:
        self.disk_spool = spool.Spool(
            self.settings.data_dir / "spool", max_bytes=self.settings.spool_max_mb * 1024 * 1024
        )

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT (exit 0) or until a task fails unexpectedly (the error propagates)."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop)
        try:
            async with self._resources() as (pool, session):
                await self._run_tasks(pool, session)
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            systemd.stopping()
        log.info("stopped")
        return 0

    def request_stop(self) -> None:
        if not self.stop.is_set():
            log.info("stop_requested")
            systemd.stopping()
            self.stop.set()

    @contextlib.asynccontextmanager
    async def _resources(self) -> AsyncIterator[tuple[db.Pool, aiohttp.ClientSession]]:
        settings = self.settings
        async with contextlib.AsyncExitStack() as stack:
            url = await stack.enter_async_context(database_server.open_url(settings))
            if settings.migrate_on_start:
                async with db.single_connection(url) as connection:
                    for line in await migrations.migrate(connection):
                        log.info("migration_applied", migration=line)
            pool = await stack.enter_async_context(db.open_pool(url, min_size=2, max_size=6))
            self.state.database_up = True
            self.state.migrations_current = await db.schema_is_current(pool)
            session = await stack.enter_async_context(
                aiohttp.ClientSession(headers={"User-Agent": "mhc-daemon"}, raise_for_status=False)
            )
            await stack.enter_async_context(health.serve(pool, settings, self.state))
            self.state.live_session_id = await self._live_session(pool)
            yield pool, session

    async def _run_tasks(self, pool: db.Pool, session: aiohttp.ClientSession) -> None:
        settings = self.settings
        token = settings.cb_events_token.get_secret_value() if settings.cb_events_token else ""
        client = events_api.EventsClient(
            session,
            base_url=settings.cb_events_base_url,
            username=settings.cb_username,
            token=lambda: token,
            timeout=settings.cb_events_timeout,
            on_failure=self._failure_recorder(pool),
            state=self.state,
            max_body_bytes=settings.api_max_body_bytes,
            backoff_max=self.backoff_max,
            auth_retry_seconds=self.auth_retry_seconds,
            sleep=self._poll_sleep,
        )
        handoff: asyncio.Queue[ParsedPage] = asyncio.Queue(maxsize=HANDOFF_PAGES)
        tasks = asyncio.ensure_future(self._task_group(pool, session, client, handoff))
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
        if not tasks.cancelled():
            tasks.result()  # an unexpected task failure propagates as the daemon's failure

    async def _task_group(
        self,
        pool: db.Pool,
        session: aiohttp.ClientSession,
        client: events_api.EventsClient,
        handoff: asyncio.Queue[ParsedPage],
    ) -> None:
        settings = self.settings
        async with asyncio.TaskGroup() as group:
            poller = group.create_task(self._poll(client, pool, handoff), name="poller")
            group.create_task(self._write(pool, handoff, poller), name="writer")
            group.create_task(
                health.run_checks(pool, self.state, self.stop, interval=DATABASE_CHECK_SECONDS),
                name="health_checks",
            )
            group.create_task(
                logs.run_summary(self.state, self.stop, interval=SUMMARY_SECONDS), name="summary"
            )
            interval = systemd.watchdog_interval()
            if interval is not None:
                # Longer than one long-poll: an idle room completes a poll only every `timeout` seconds.
                stall_after = max(settings.cb_events_timeout + STALL_MARGIN_SECONDS, 2 * interval)
                group.create_task(
                    systemd.run_watchdog(self.state, self.stop, interval=interval, stall_after=stall_after),
                    name="watchdog",
                )
            group.create_task(
                snapshots.run_scheduler(
                    pool=pool,
                    session=session,
                    settings=settings,
                    state=self.state,
                    stop=self.stop,
                    on_failure=self._failure_recorder(pool),
                ),
                name="snapshot_scheduler",
            )

    def _failure_recorder(self, pool: db.Pool) -> api_http.FailureRecorder:
        async def record(failure: errors.ApiFailure) -> None:
            self.state.failures += 1
            try:
                await db.record_api_failure(pool, failure)
            except errors.StorageError as error:
                # The failure is already in the log line the client wrote; say loudly that the row is missing.
                log.error(
                    "api_failure_not_recorded", api=failure.api, kind=failure.error_kind, error=str(error)
                )

        return record

    async def _poll(
        self, client: events_api.EventsClient, pool: db.Pool, handoff: asyncio.Queue[ParsedPage]
    ) -> None:
        """Fetch pages from the last committed position onwards until told to stop."""
        if self.disk_spool.has_pages():
            # Spooled pages are newer than the committed cursor: resume after them; they are drained first.
            position = self.disk_spool.last_position()
        else:
            cursor = await self._retry_storage(
                "load_cursor", lambda: db.load_cursor(pool, self.settings.cb_username)
            )
            position = cursor.last_event_id if cursor else None
        url = client.start_url(position)
        self._spool_gauge()
        log.info("polling_started", resume_from=position, spooled_bytes=self.disk_spool.pending_bytes)
        first = True
        loop = asyncio.get_running_loop()
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
            if first:
                systemd.ready()
                first = False
            if not await self._hand_off(self._parsed(page), handoff):
                break
            url = page.next_url or client.start_url(page.next_event_id)
            pause = started + LIVE_POLL_SPACING - loop.time()
            if len(page.events) < FULL_PAGE and pause > 0 and await self._wait_stop_exactly(pause):
                break

    async def _hand_off(self, page: ParsedPage, handoff: asyncio.Queue[ParsedPage]) -> bool:
        """Give a page to the writer, or to the disk spool while the database is away; False once stopping.

        Pages go to the spool whenever it already holds some, so that they are always committed in order.
        """
        full_logged = False
        while True:
            if self.state.database_up and not self.disk_spool.has_pages():
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
            except spool.SpoolFull:
                if not full_logged:
                    log.error(
                        "spool_full_polling_paused",
                        spool_bytes=self.disk_spool.size,
                        limit_mb=self.settings.spool_max_mb,
                        hint="database unreachable; nothing is dropped: the API keeps what is not fetched",
                    )
                    full_logged = True
                self.state.poll_progress += 1
                if await self._wait_stop(1.0):
                    return False
                continue
            if was_empty:
                log.warning("spooling_to_disk", path=str(self.disk_spool.path), uncommitted=len(pages) - 1)
            self._spool_gauge()
            return True

    async def _write(
        self, pool: db.Pool, handoff: asyncio.Queue[ParsedPage], poller: asyncio.Task[None]
    ) -> None:
        """Commit pages in order (queued ones are older than spooled ones); after a stop, drain, then end."""
        while True:
            if not handoff.empty():
                await self._commit_queued(pool, self._waiting_pages(handoff.get_nowait(), handoff))
            elif (spooled := self.disk_spool.next_page()) is not None:
                end_offset, spooled_page = spooled
                await self._commit(pool, [self._parsed(spooled_page)])
                self.disk_spool.committed(end_offset)
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

    def _parsed(self, page: events_api.Page | spool.SpooledPage) -> ParsedPage:
        batch = ingest.parse_page(
            page.events,
            broadcaster=self.settings.cb_username,
            received_at=page.received_at,
            next_event_id=page.next_event_id,
            finite_numbers=isinstance(page, events_api.Page) and page.finite_numbers,
        )
        return ParsedPage(page.events, page.next_event_id, page.received_at, batch)

    async def _commit(self, pool: db.Pool, pages: list[ParsedPage]) -> None:
        batch = ingest.merge([page.batch for page in pages])
        write = self._retry_storage(
            "write_batch",
            lambda: db.write_batch(
                pool,
                batch,
                cursor_broadcaster=self.settings.cb_username,
                timeout_seconds=self.settings.cb_events_timeout,
            ),
        )
        # Shielded: a stop never interrupts a commit halfway; a page not committed is simply read again.
        result = await asyncio.shield(write)
        self._account(result)
        if result.sessions_opened or result.sessions_closed:
            self.state.live_session_id = await self._retry_storage(
                "live_session", lambda: self._live_session(pool)
            )

    async def _retry_storage(self, operation: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Retry an operation while the database is unreachable; other storage errors propagate."""
        delay = 0.5
        while True:
            try:
                result = await attempt()
            except errors.DatabaseUnavailable as error:
                self.state.database_up = False
                self.state.write_progress += 1  # retrying is alive, not wedged
                metrics.DATABASE_UP.set(0)
                log.warning(
                    "database_unavailable", operation=operation, retry_in_s=round(delay, 1), error=str(error)
                )
                await asyncio.sleep(delay + random.uniform(0, delay / 4))  # noqa: S311  # jitter, not crypto
                delay = min(delay * 2, WRITE_RETRY_MAX_SECONDS)
                continue
            self.state.database_up = True
            return result

    async def _live_session(self, pool: db.Pool) -> str | None:
        session_id = await db.live_session_id(pool)
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
            await asyncio.sleep(min(left, 1.0))
            self.state.poll_progress += 1

    async def _wait_stop_exactly(self, seconds: float) -> bool:
        """Wait `seconds` (no jitter: a pacing interval) for the stop event; True when it is set."""
        try:
            await asyncio.wait_for(self.stop.wait(), timeout=seconds)
        except TimeoutError:
            return False
        return True

    async def _wait_stop(self, seconds: float) -> bool:
        """Wait up to `seconds` (with a little jitter) for the stop event; True when it is set."""
        jittered = seconds * random.uniform(0.95, 1.05)  # noqa: S311  # jitter, not crypto
        try:
            await asyncio.wait_for(self.stop.wait(), timeout=jittered)
        except TimeoutError:
            return False
        return True


def _spooled(page: ParsedPage) -> spool.SpooledPage:
    return spool.SpooledPage(page.events, page.next_event_id, page.received_at)
