"""The supervisor: one owner for every long-lived task of `mhc-daemon run`.

Resources open in dependency order (database → pool → HTTP session → health server) and close in reverse;
none of them needs PostgreSQL to answer: migrations wait for it in their own task while the room units poll
into their disk spools. Each room's capture is a unit (`room_unit`: a poller, a writer, a spool) that the
supervisor starts and stops as rooms come and go (`rooms`): at start, on SIGHUP and every minute.

The rule of failure: the event path (database preparation, the rooms and their units, the watchdog) handles
every error its inputs can cause and ends the daemon only through a bug; every other task is isolated, its
failures recorded and the task restarted, so nothing on the snapshot or reporting side can stop event capture.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import functools
import itertools
import math
import random
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from daemon import (
    api_http,
    config,
    credentials,
    database_server,
    db,
    errors,
    events_api,
    group_commit,
    health,
    leases,
    logs,
    migrations,
    room_unit,
    rooms,
    runtime_state,
    sessions,
    snapshots,
    systemd,
    waits,
)

log = logs.get_logger(__name__)

DATABASE_CHECK_SECONDS = 5.0
SUMMARY_SECONDS = 60.0
STALENESS_CHECK_SECONDS = 60.0  # the staleness rule counts in minutes (MHC_SESSION_STALE_MINUTES)
STORAGE_BACKOFF = room_unit.STORAGE_BACKOFF
ROOMS_SCAN_SECONDS = 60.0  # token files and the rooms table are read again this often (and on SIGHUP)
# A task that must not stop capture (snapshots, health checks, the summary) restarts after a failure, waiting
# twice as long after each one, up to five minutes.
RESTART_BACKOFF = waits.Backoff(2.0, 300.0)
UNRECORDED_FAILURES_MAX = 10_000
FIRST_COMMIT_WAIT_SECONDS = 5.0  # how long the snapshot side lets the event path go first
STALL_MARGIN_SECONDS = 10.0  # beyond one long-poll, this long without progress is a stall


@dataclass
class Supervisor:
    settings: config.Settings
    state: runtime_state.RuntimeState = field(default_factory=runtime_state.RuntimeState)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    # Retry pacing of the Events API client; tests and the demo shorten them.
    auth_retry_seconds: float = 300.0
    backoff_max: float = 60.0
    credentials: credentials.Credentials = field(init=False)
    token_files: rooms.TokenFiles = field(init=False)
    units: dict[str, room_unit.RoomUnit] = field(init=False, default_factory=dict)
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
    _rescan: asyncio.Event = field(init=False, default_factory=asyncio.Event)  # read the rooms again now
    _table_rooms: set[str] = field(init=False, default_factory=set)  # enabled rows, as last read
    # Set when a room's token changed: a room waiting out a rejected token asks again at once.
    _token_changed: dict[str, asyncio.Event] = field(init=False, default_factory=dict)
    keeper: leases.LeaseKeeper | None = field(init=False, default=None)  # made once the pool is open
    _saved_held: set[str] = field(init=False, default_factory=set)  # as last written for `rooms.load_known`
    _lease_round_failing: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.credentials = credentials.Credentials(self.settings)
        self.token_files = rooms.TokenFiles(rooms.tokens_dir(self.settings))
        self.token_files.scan()
        if self.token_files.directory is not None:  # until the database answers: the rooms it last held
            self._table_rooms = self._saved_held = rooms.load_known(self.settings.data_dir)
        # A limit for the process besides each room's own: the API's 2,000 a minute do not say per what.
        self.limiter = events_api.RequestLimiter(
            self.settings.cb_events_max_requests_per_minute, 60.0, self._poll_sleep
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
            self._rescan.set()
            for unit in self.units.values():
                unit.stop.set()

    def reload(self) -> None:
        """SIGHUP (a reload, a closed terminal): reopen logging, re-read the token files; never a stop."""
        logs.configure(self.settings.log_level, self.settings.log_format)
        changed = self.credentials.reload()
        log.info("reloaded", tokens_changed=changed)
        if "cb_events_token" in changed and self.single_room in self._token_changed:
            self._token_changed[self.single_room].set()
        self._rescan.set()

    @contextlib.asynccontextmanager
    async def _resources(self) -> AsyncIterator[tuple[str, db.Pool, aiohttp.ClientSession]]:
        """Nothing here needs the database to answer: the pool connects on first use, and migrations wait
        for the database in their own task (`_prepare_database`) while polling goes on into the spool."""
        settings = self.settings
        async with contextlib.AsyncExitStack() as stack:
            url = await stack.enter_async_context(database_server.open_url(settings))
            pool = await stack.enter_async_context(
                db.open_pool(
                    url,
                    min_size=0,
                    max_size=6,
                    application_name=f"mhc-daemon {settings.host_id}",
                    pooler=settings.database_transaction_pooler,
                )
            )
            # No connection limit: every room holds a long-poll open (aiohttp's default caps them at 100).
            session = await stack.enter_async_context(
                aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=0),
                    headers={"User-Agent": "mhc-daemon"},
                    raise_for_status=False,
                )
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
        self._rescan.set()  # the rooms table can be read now
        log.info("database_ready")
        await self._record_failures(pool)

    async def _run_tasks(self, url: str, pool: db.Pool, session: aiohttp.ClientSession) -> None:
        tasks = asyncio.ensure_future(self._task_group(url, pool, session))
        stopped = asyncio.ensure_future(self.stop.wait())
        await asyncio.wait({tasks, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not tasks.done():
            # Bounded: what is not written by then is re-read at the next start, never lost.
            try:
                await asyncio.wait_for(asyncio.shield(tasks), timeout=self.settings.shutdown_timeout)
            except TimeoutError:
                waiting = sum(unit.pages_waiting for unit in self.units.values())
                log.warning("shutdown_timeout_reached", pages_not_written=waiting)
                tasks.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await tasks
        if self.keeper is not None and self.database_ready.is_set():
            try:  # the rooms' leases went with their units: the rest, so other hosts take over at once
                await asyncio.wait_for(self.keeper.leave(), timeout=5.0)
            except (errors.StorageError, TimeoutError) as error:
                log.warning("leases_not_released", error=logs.mask(str(error)))
        if not tasks.cancelled():
            tasks.result()  # an unexpected failure of the event path propagates as the daemon's failure

    async def _task_group(self, url: str, pool: db.Pool, session: aiohttp.ClientSession) -> None:
        """The event path (database preparation, the rooms and their units, the watchdog) may end the daemon,
        and only through a bug; every other task is isolated (`_isolated`): its failures are recorded and it
        starts again, so nothing on the snapshot or reporting side can stop event capture."""
        settings = self.settings
        self.keeper = keeper = leases.LeaseKeeper(pool, settings)
        shared = room_unit.Shared(
            settings=settings,
            pool=pool,
            state=self.state,
            database_ready=self.database_ready,
            first_commit=self.first_commit,
            record_failures=lambda: self._record_failures(pool),
            failures_waiting=lambda: bool(self._unrecorded),
            group=group_commit.GroupCommit(pool, settings.cb_events_timeout, keeper.holder),
        )
        async with asyncio.TaskGroup() as group:
            group.create_task(self._prepare_database(url, pool), name="database")
            group.create_task(self._manage_rooms(group, shared, session, keeper), name="rooms")
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
                    self._as_leader(
                        keeper.leader,
                        lambda stop: snapshots.run_scheduler(
                            pool=pool,
                            session=session,
                            settings=settings,
                            state=self.state,
                            stop=stop,
                            on_failure=self._failure_recorder(pool),
                            tokens=self.credentials,
                            room_stats_tokens=self._room_stats_tokens if self.token_files.directory else None,
                        ),
                    )
                ),
            }
            for name, run in isolated.items():
                group.create_task(self._isolated(name, run, pool), name=name)

    # -- rooms -----------------------------------------------------------------------------------------------

    @property
    def single_room(self) -> str | None:
        """The room of the single-room settings (MHC_CB_USERNAME with an Events API token), if set."""
        name = db.normalize_username(self.settings.cb_username)
        return name if name and self.credentials.current("cb_events_token") else None

    async def _manage_rooms(
        self,
        group: asyncio.TaskGroup,
        shared: room_unit.Shared,
        session: aiohttp.ClientSession,
        keeper: leases.LeaseKeeper,
    ) -> None:
        """Keep one unit running per room this daemon holds the lease of, one lease round every
        `lease_renew_seconds` (`leases.LeaseKeeper`): start the units of rooms taken, stop those of rooms
        lost, handed over or gone (disabled, or their token file removed). Token files and the rooms table
        are read at start, on SIGHUP and every `ROOMS_SCAN_SECONDS`. Until the database first answers, the
        rooms this host last polled are polled without a lease, into their spools."""
        announced = False
        loop = asyncio.get_running_loop()
        scanned = -math.inf
        wanted: set[str] = set()
        while not self.stop.is_set():
            if self._rescan.is_set() or loop.time() - scanned >= ROOMS_SCAN_SECONDS:
                self._rescan.clear()
                wanted = await self._wanted_rooms(shared.pool)
                scanned = loop.time()
            for name in sorted(self.units.keys() - wanted):
                self._stop_unit(name, "room_stopping")
            if self.database_ready.is_set():
                await self._lease_round(group, shared, session, keeper, wanted)
            else:
                for name in sorted(wanted - self.units.keys()):
                    self._start_unit(group, shared, session, name, epoch=None)
            for name in keeper.lapsed():
                if name in self.units:
                    self.units[name].give_up("lease not renewed in time (the database is out of reach)")
            if not wanted and not announced and self.database_ready.is_set():
                log.warning("no_rooms_to_poll", hint="add one: `mhc-daemon rooms add NAME` and NAME.events")
                systemd.ready()  # nothing to poll is a state, not a failure to start
                announced = True
            due = loop.time() + self.settings.lease_renew_seconds
            while not self._rescan.is_set() and (left := due - loop.time()) > 0:
                with contextlib.suppress(TimeoutError):  # a stop sets `_rescan` too
                    await asyncio.wait_for(self._rescan.wait(), timeout=min(left, 1.0))
                if self.stop.is_set():
                    return
                if not self.units:  # an idle daemon is not a wedged one
                    self.state.poll_progress += 1
                    self.state.write_progress += 1

    async def _lease_round(
        self,
        group: asyncio.TaskGroup,
        shared: room_unit.Shared,
        session: aiohttp.ClientSession,
        keeper: leases.LeaseKeeper,
        wanted: set[str],
    ) -> None:
        now = asyncio.get_running_loop().time()
        allowance = self.settings.cb_events_timeout + 2 * self.settings.lease_seconds
        progressing = {
            name
            for name, unit in self.units.items()
            if unit.room.poll_problem is None
            and now - (unit.room.last_poll_monotonic or unit.started) < allowance
        }
        unleased = {name for name, unit in self.units.items() if unit.room.epoch is None and not unit.lost}
        total = len(self._table_rooms | ({self.single_room} if self.single_room else set()))
        try:  # bounded: a database that stops answering must not hold up `lapsed`
            turn = await asyncio.wait_for(
                keeper.round(wanted, total, progressing, unleased), timeout=self.settings.lease_seconds / 2
            )
        except (errors.StorageError, TimeoutError) as error:
            # Once per outage at warning (the database checks say the rest), then at debug.
            level = log.debug if self._lease_round_failing else log.warning
            level("lease_round_failed", error=logs.mask(str(error)) or "no answer in time")
            self._lease_round_failing = True
            return
        self._lease_round_failing = False
        self.state.hosts, self.state.holder = keeper.live_hosts, keeper.holder
        self.state.rooms_share, self.state.share_held = keeper.share, keeper.satisfied
        if keeper.held.keys() != self._saved_held and self.token_files.directory is not None:
            self._saved_held = set(keeper.held)
            rooms.save_known(self.settings.data_dir, self._saved_held)
        for name, epoch in turn.acquired.items():
            if name in self.units:
                self.units[name].grant(epoch)
            else:
                self._start_unit(group, shared, session, name, epoch=epoch)
        # (A unit may have ended while the round ran.)
        for reason, names in (
            ("another host took the room", turn.lost),
            ("another host holds the room", unleased - turn.acquired.keys()),
        ):
            for name in names:
                if name in self.units:
                    self.units[name].give_up(reason)
        for name in turn.extra:
            if name in self.units:
                self._stop_unit(name, "room_handed_over")

    def _stop_unit(self, name: str, event: str) -> None:
        """Stop `name`'s unit after its in-flight write; its lease is released when it has ended."""
        unit = self.units[name]
        if not unit.stop.is_set():
            log.info(event, room=name)
        unit.room.stopping = True
        unit.stop.set()

    async def _wanted_rooms(self, pool: db.Pool) -> set[str]:
        """The rooms this daemon may poll (their leases decide which it does): the single-room settings' room,
        and the enabled rows of `rooms` with a token file, as last read; before the database first answers,
        the rooms this host last held (`MHC_DATA_DIR/rooms.json`)."""
        changed = self.token_files.scan()
        for name in changed & self.units.keys() & self._token_changed.keys():
            log.info("room_token_changed", room=name)
            self._token_changed[name].set()
        if self.token_files.directory is not None and self.database_ready.is_set():
            try:
                self._table_rooms = set(await db.enabled_rooms(pool))
            except errors.StorageError as error:
                log.warning("rooms_not_read", error=logs.mask(str(error)), keeping=sorted(self._table_rooms))
        wanted = self._table_rooms & self.token_files.rooms()
        if self.single_room:
            wanted.add(self.single_room)
        return wanted

    def _start_unit(
        self,
        group: asyncio.TaskGroup,
        shared: room_unit.Shared,
        session: aiohttp.ClientSession,
        name: str,
        *,
        epoch: int | None,
    ) -> None:
        settings = self.settings
        state = runtime_state.RoomState(name)
        single = name == self.single_room
        token_changed = self._token_changed[name] = asyncio.Event()
        if single:
            token: Callable[[], str] = self.credentials.provider("cb_events_token")
            reload: Callable[[], bool] = self._reload_tokens
        else:
            token = self._room_token(name)
            reload = lambda: name in self.token_files.scan()  # noqa: E731  # a one-line hook
        client = events_api.EventsClient(
            session,
            base_url=settings.cb_events_base_url,
            username=name,
            token=token,
            on_auth_rejected=reload,
            timeout=settings.cb_events_timeout,
            on_failure=self._failure_recorder(shared.pool),
            state=self.state,
            room=state,
            max_body_bytes=settings.api_max_body_bytes,
            backoff_max=self.backoff_max,
            auth_retry_seconds=self.auth_retry_seconds,
            process_limiter=self.limiter,
            token_source="MHC_CB_EVENTS_TOKEN" if single else f"{self.token_files.directory}/{name}.events",
            sleep=functools.partial(self._poll_sleep, wake=token_changed),
        )
        directory = settings.data_dir if single else settings.data_dir / "rooms" / name
        unit = room_unit.RoomUnit(name, directory, client, shared, state)
        if epoch is not None:
            unit.grant(epoch)
        if self.stop.is_set():
            unit.stop.set()
        self.units[name] = unit
        self.state.rooms[name] = state
        log.info("room_started", room=name, epoch=epoch)

        async def run() -> None:
            try:
                await unit.run()
            finally:
                if self.units.get(name) is unit:
                    del self.units[name], self.state.rooms[name], self._token_changed[name]
                    self.state.spool_total()
                log.info("room_stopped", room=name)
            if self.keeper is not None and not unit.lost:
                try:  # after its last write: the next holder need not wait for the lease to run out
                    await self.keeper.release(name)
                except errors.StorageError as error:
                    log.warning("lease_not_released", room=name, error=logs.mask(str(error)))

        group.create_task(run(), name=f"room:{name}")

    def _room_stats_tokens(self) -> dict[str, Callable[[], str]]:
        """The rooms polled now that have a Stats API token file (`NAME.stats`), with their current token."""

        def current(name: str) -> str:
            tokens = self.token_files.get(name)
            return (tokens.stats if tokens else None) or ""

        return {  # every room of the cluster: only one daemon (the cluster lease's holder) runs the lookups
            name: functools.partial(current, name)
            for name in sorted(self._table_rooms | self.units.keys())
            if (tokens := self.token_files.get(name)) is not None and tokens.stats
        }

    def _room_token(self, name: str) -> Callable[[], str]:
        """The current Events API token of a table room; the last one read while its file is gone."""
        last = ""

        def current() -> str:
            nonlocal last
            tokens = self.token_files.get(name)
            last = tokens.events if tokens else last
            return last

        current()
        return current

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

    async def _as_leader(
        self, leader: asyncio.Event, work: Callable[[asyncio.Event], Coroutine[Any, Any, None]]
    ) -> None:
        """Run `work(stop)` while this daemon holds the cluster lease of the lookups, so that they run on one
        host of the cluster; `stop` is set when the daemon stops or the lease is lost, and `work` starts again
        when it is regained."""

        async def watch(scoped: asyncio.Event) -> None:
            while leader.is_set() and not await waits.wait_for_stop(self.stop, 1.0):
                pass
            scoped.set()

        while not self.stop.is_set():
            if not leader.is_set():
                await waits.wait_for_stop(self.stop, 1.0)
                continue
            scoped = asyncio.Event()
            watcher = asyncio.ensure_future(watch(scoped))
            try:
                await work(scoped)
            finally:
                watcher.cancel()

    async def _when_database_ready(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` once the schema is ready (never, if the daemon stops first), and after the writer's
        first commit or a few seconds: the event path goes first, and lookups then find the first viewers."""
        try:
            await self._database_ready()
        except room_unit.Stopping:
            work.close()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.first_commit.wait(), timeout=FIRST_COMMIT_WAIT_SECONDS)
        await work

    async def _database_ready(self) -> None:
        """Wait for the database to be ready; `room_unit.Stopping` when the daemon stops first."""
        ready = asyncio.ensure_future(self.database_ready.wait())
        stopped = asyncio.ensure_future(self.stop.wait())
        await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        stopped.cancel()
        if not self.database_ready.is_set():
            raise room_unit.Stopping

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
            damaged_records = [
                (unit, damaged)
                for unit in list(self.units.values())
                for damaged in unit.disk_spool.take_damaged()
            ]
            for unit, damaged in damaged_records:
                self.state.failures += 1
                self._unrecorded.append(
                    errors.ApiFailure(
                        api="spool",
                        operation="drain",
                        url=str(damaged.path or unit.disk_spool.path),
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

    async def _poll_sleep(self, seconds: float, wake: asyncio.Event | None = None) -> None:
        """The client's waits (backoff, Retry-After, a rejected token's slow retry) are deliberate, not a
        wedge: they count as poll progress every second, so only a request that never ends stops the pings.
        A set `wake` (the room's token changed) ends the wait within a second."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while (left := end - loop.time()) > 0:
            if await waits.wait_for_stop(self.stop, min(left, 1.0)):
                return
            self.state.poll_progress += 1
            if wake is not None and wake.is_set():
                wake.clear()
                return

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
            if ended := await check_session_staleness(pool, now=clock(), stale_after=stale_after):
                live = await db.live_session_id(pool, room)
                state.live_session_id = str(live) if live else None
                gone = {str(item.id) for item in ended}
                for polled in state.rooms.values():
                    if polled.live_session_id in gone:
                        polled.live_session_id = None
        except errors.DatabaseUnavailable as error:
            log.warning("session_staleness_check_skipped", error=logs.mask(str(error)))
        if await waits.wait_for_stop(stop, max(0.0, due - monotonic())):
            return
