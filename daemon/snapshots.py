"""Scheduled snapshots: the broadcaster's Stats API figures, its Statbate model info, viewers' member info.

What a snapshot holds is `snapshot_metrics`' (pure normalization). This module is the scheduler:
`run_scheduler`, one long-lived task that decides what is due from the `snapshots` table itself (so a restart
neither repeats nor forgets work), asks the APIs under a token-bucket limit and appends rows through `db`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import asyncpg

from daemon import (
    api_http,
    config,
    credentials,
    db,
    errors,
    logs,
    metrics,
    runtime_state,
    snapshot_metrics,
    statbate_api,
    stats_api,
    waits,
)

log = logs.get_logger(__name__)

STATS_INTERVAL = dt.timedelta(minutes=5)  # the Stats API refreshes its data no faster
STATS_COOLDOWN = dt.timedelta(minutes=5)  # after a 403 or 429: the API blocks over-eager pollers for minutes
STATS_BACKOFF_MAX = dt.timedelta(hours=1)  # a longer (or infinite) Retry-After is not believed
MODEL_INTERVAL = dt.timedelta(hours=3)
MODEL_RETRY = dt.timedelta(minutes=15)
NOT_FOUND_TTL = dt.timedelta(days=7)  # a name the API does not know is not asked again before this
STATBATE_AUTH_PAUSE = dt.timedelta(hours=1)
MEMBER_RETRY = dt.timedelta(minutes=2)  # after a failed batch, so a failing API is not hammered
IDLE_RECHECK = dt.timedelta(minutes=1)  # how soon newly seen viewers are looked for
STORAGE_RETRY = dt.timedelta(seconds=30)
JITTER_SECONDS = 2.0

Clock = Callable[[], dt.datetime]
Monotonic = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class TokenBucket:
    """At most `per_minute` acquisitions in any minute: capacity 1, refilled continuously, so requests are
    spaced evenly (Statbate counts per account per minute; bursts buy nothing for a background task)."""

    def __init__(
        self, per_minute: int, *, monotonic: Monotonic, sleep: Sleep, jitter: Callable[[], float]
    ) -> None:
        self._interval = 60.0 / per_minute
        self._monotonic = monotonic  # a wall clock set back would hold every request until it caught up
        self._sleep = sleep
        self._jitter = jitter
        self._next_free: float | None = None

    async def acquire(self) -> None:
        now = self._monotonic()
        if self._next_free is not None and now < self._next_free:
            await self._sleep(self._next_free - now + self._jitter() * self._interval * 0.1)
            now = self._monotonic()
        self._next_free = max(now, self._next_free or now) + self._interval


# --- the scheduler ---


@dataclasses.dataclass
class _Plan:
    """When each kind of work is next due, on the monotonic clock, so setting the wall clock moves no
    deadline. Rebuilt from the database (wall-clock history) at start."""

    stats: dict[str, float] = dataclasses.field(default_factory=dict)  # per room
    model: float | None = None
    members: float | None = None
    statbate_paused_until: float | None = None


def _wait_from_history(now: dt.datetime, stored: dt.datetime | None, interval: dt.timedelta) -> float:
    """Seconds until `interval` after a stored wall-clock moment has passed (0 without one).

    A stored moment ahead of `now` was written while the wall clock was ahead (no honest history lies in the
    future), so it is due now: otherwise a clock once set a year ahead would stall the schedule for a year.
    """
    if stored is None or stored > now:
        return 0.0
    return max(0.0, (stored + interval - now).total_seconds())


class _Scheduler:
    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        settings: config.Settings,
        state: runtime_state.RuntimeState,
        stop: asyncio.Event,
        on_failure: api_http.FailureRecorder,
        statbate: statbate_api.StatbateClient | None,
        stats_rooms: Callable[[], dict[str, stats_api.StatsClient]],
        rooms_may_change: bool,
        clock: Clock,
        monotonic: Monotonic,
        sleep: Sleep,
        jitter: Callable[[], float],
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.state = state
        self.stop = stop
        self.on_failure = on_failure
        self.statbate = statbate
        self.stats_rooms = stats_rooms  # the rooms to poll the Stats API for now, each with its client
        self.stats: dict[str, stats_api.StatsClient] = {}
        self.rooms_may_change = rooms_may_change
        self.clock = clock  # what is stored, and reading the stored history
        self.monotonic = monotonic  # every wait and deadline
        self.sleep = sleep
        self.jitter = jitter
        self.bucket = TokenBucket(
            settings.statbate_requests_per_minute, monotonic=monotonic, sleep=sleep, jitter=jitter
        )
        self.broadcaster = db.normalize_username(settings.cb_username)
        self.plan = _Plan()
        self._persons: dict[str, db.Person] = {}

    async def run(self) -> None:
        while not self.stop.is_set():
            try:
                await self._load_plan()
                break
            except errors.DatabaseUnavailable as error:  # passes; any other storage error is the supervisor's
                log.warning("snapshot_storage_failed", error=logs.mask(str(error)))
                await self.sleep(STORAGE_RETRY.total_seconds())
        while not self.stop.is_set():
            try:
                await self._tick()
            except errors.StorageError as error:
                log.warning("snapshot_storage_failed", error=logs.mask(str(error)))
                await self.sleep(STORAGE_RETRY.total_seconds())
                continue
            if self.stop.is_set():
                break
            await self.sleep(self._seconds_to_next_work())

    # What is due comes from the database, so a restart neither repeats nor forgets work.
    async def _load_plan(self) -> None:
        now, start = self.clock(), self.monotonic()
        await self._follow_stats_rooms()
        if self.statbate is not None and self.broadcaster:
            person = await self._person(self.broadcaster)
            last = await db.newest_snapshot_at(self.pool, person.id, "statbate_model")
            missed = await db.newest_snapshot_miss_at(self.pool, person.id, "statbate_model")
            self.plan.model = start + max(
                _wait_from_history(now, last, MODEL_INTERVAL),
                _wait_from_history(now, missed, NOT_FOUND_TTL),
            )
        if self.statbate is not None:
            self.plan.members = start

    async def _follow_stats_rooms(self) -> None:
        """Poll the Stats API for the rooms that have a Stats token now: a new room's first poll is planned
        from its stored history, a room gone is dropped."""
        current = self.stats_rooms()
        for room in self.stats.keys() - current.keys():
            del self.stats[room]
            self.plan.stats.pop(room, None)
        for room in current.keys() - self.stats.keys():
            now, start = self.clock(), self.monotonic()
            person = await self._person(room)
            last = await db.newest_snapshot_at(self.pool, person.id, "cb_stats")
            blocked = await db.newest_api_failure_at(
                self.pool, stats_api.API, ("auth_rejected", "rate_limited")
            )
            self.plan.stats[room] = start + max(
                _wait_from_history(now, last, STATS_INTERVAL),
                _wait_from_history(now, blocked, STATS_COOLDOWN),
            )
            self.stats[room] = current[room]

    def _after(self, interval: dt.timedelta, since: float | None = None) -> float:
        """The monotonic deadline `interval` after `since` (default: now)."""
        return (self.monotonic() if since is None else since) + interval.total_seconds()

    async def _person(self, room: str) -> db.Person:
        """The person of a room's broadcaster (created as a MODEL when no event named them yet)."""
        if room not in self._persons:
            found = await db.find_person(self.pool, room)
            self._persons[room] = found or await db.find_or_create_person(
                self.pool, room, seen_at=self.clock(), role="MODEL"
            )
        return self._persons[room]

    def _seconds_to_next_work(self) -> float:
        pending = list(self.plan.stats.values())
        statbate = [moment for moment in (self.plan.model, self.plan.members) if moment]
        if statbate:
            paused = self.plan.statbate_paused_until
            pending.append(max(min(statbate), paused) if paused else min(statbate))
        if not pending:
            return IDLE_RECHECK.total_seconds()
        seconds = min(pending) - self.monotonic()
        if self.rooms_may_change:  # a room added meanwhile gets its first Stats poll within a minute
            seconds = min(seconds, IDLE_RECHECK.total_seconds())
        return seconds + self.jitter() * JITTER_SECONDS if seconds > 0 else 0.0

    async def _tick(self) -> None:
        await self._follow_stats_rooms()
        for room, client in list(self.stats.items()):
            if self._due(self.plan.stats.get(room)):
                await self._take_stats(room, client)
        if self.statbate is None or self._statbate_paused():
            return
        if self._due(self.plan.model):
            await self._take_model(self.statbate)
        if self._due(self.plan.members) and not self._statbate_paused():
            await self._take_members(self.statbate)

    def _due(self, deadline: float | None) -> bool:
        return deadline is not None and self.monotonic() >= deadline and not self.stop.is_set()

    def _statbate_paused(self) -> bool:
        until = self.plan.statbate_paused_until
        if until is None:
            return False
        if self.monotonic() >= until:
            self.plan.statbate_paused_until = None
            log.info("statbate_resumed")
            return False
        return True

    def _pause_statbate(self) -> None:
        if self.plan.statbate_paused_until is None:
            log.error(
                "statbate_token_rejected",
                paused_seconds=int(STATBATE_AUTH_PAUSE.total_seconds()),
                hint="Statbate answered 401/403: check MHC_STATBATE_TOKEN and the account's Studio Plus plan",
            )
        self.plan.statbate_paused_until = self._after(STATBATE_AUTH_PAUSE)

    async def _take_stats(self, room: str, client: stats_api.StatsClient) -> None:
        person = await self._person(room)
        try:
            payload = await client.fetch()
        except (errors.AuthRejected, errors.RateLimited) as error:
            wait = min(
                max(STATS_COOLDOWN.total_seconds(), error.retry_after or 0.0),
                STATS_BACKOFF_MAX.total_seconds(),
            )
            log.warning(
                "cb_stats_backing_off", room=room, kind=error.kind, status=error.status, seconds=int(wait)
            )
            self.plan.stats[room] = self._after(dt.timedelta(seconds=wait))
            return
        except errors.ApiError as error:
            log.warning("cb_stats_snapshot_failed", room=room, kind=error.kind, status=error.status)
            self.plan.stats[room] = self._after(STATS_INTERVAL)
            return
        captured_at, taken = self.clock(), self.monotonic()
        if await db.record_snapshot(
            self.pool,
            person_id=person.id,
            source="cb_stats",
            captured_at=captured_at,
            raw_payload=payload,
            normalized_metrics=snapshot_metrics.normalize_stats(payload),
        ):
            self._counted("cb_stats")
        self.plan.stats[room] = self._after(STATS_INTERVAL, since=taken)

    async def _take_model(self, client: statbate_api.StatbateClient) -> None:
        person = await self._person(self.broadcaster)
        await self.bucket.acquire()
        if self.stop.is_set():
            return
        try:
            payload = await client.model_info(self.broadcaster)
        except errors.NotFound:
            await db.record_snapshot_miss(
                self.pool,
                person_id=person.id,
                source="statbate_model",
                username=self.broadcaster,
                missed_at=self.clock(),
            )
            self.plan.model = self._after(NOT_FOUND_TTL)
            return
        except errors.AuthRejected:
            self._pause_statbate()
            return
        except errors.ApiError as error:
            log.warning("statbate_model_snapshot_failed", kind=error.kind, status=error.status)
            self.plan.model = self._after(MODEL_RETRY)
            return
        captured_at, taken = self.clock(), self.monotonic()
        rid = snapshot_metrics.external_id(payload, "rid")
        if rid is None:
            stored = await db.record_snapshot(
                self.pool,
                person_id=person.id,
                source="statbate_model",
                captured_at=captured_at,
                raw_payload=payload,
                normalized_metrics=snapshot_metrics.normalize_model(payload),
            )
        else:
            outcome = await db.record_identified_snapshot(
                self.pool,
                asked_person_id=person.id,
                source="statbate_model",
                external_id=rid,
                reported_name=_reported_name(payload),
                captured_at=captured_at,
                raw_payload=payload,
                normalized_metrics=snapshot_metrics.normalize_model(payload),
            )
            self._log_identity(outcome)
            stored = outcome.inserted
        if stored:
            self._counted("statbate_model")
        self.plan.model = self._after(MODEL_INTERVAL, since=taken)

    async def _take_members(self, client: statbate_api.StatbateClient) -> None:
        now = self.clock()  # who is stale is a question about the stored (wall-clock) history
        ttl = dt.timedelta(hours=self.settings.member_snapshot_ttl_hours)
        due = await db.due_member_lookups(
            self.pool,
            now=now,
            stale_before=now - ttl,
            missed_before=now - NOT_FOUND_TTL,
            broadcaster=self.broadcaster,
            limit=statbate_api.MAX_BATCH,
        )
        if not due:
            self.plan.members = self._after(IDLE_RECHECK)
            return
        await self.bucket.acquire()
        if self.stop.is_set():
            return
        try:
            items = await client.member_info_batch([member.name for member in due])
        except errors.AuthRejected:
            self._pause_statbate()
            return
        except errors.ApiError as error:
            log.warning("statbate_member_batch_failed", kind=error.kind, status=error.status, names=len(due))
            self.plan.members = self._after(MEMBER_RETRY)
            return
        captured_at = self.clock()
        by_name = {member.name: member for member in due}
        for item in items:
            await self._store_member(by_name[item.requested], item, captured_at)
        # More may be due right away: the bucket, not this plan, spaces the next batch.
        self.plan.members = self.monotonic()

    async def _store_member(
        self, member: db.DueMember, item: statbate_api.BatchItem, captured_at: dt.datetime
    ) -> None:
        did = snapshot_metrics.external_id(item.item, "did") if item.item is not None else None
        if item.item is None or not item.found or did is None:
            await self._member_missing(member, item, captured_at)
            return
        outcome = await db.record_identified_snapshot(
            self.pool,
            asked_person_id=member.person_id,
            source="statbate_member",
            external_id=did,
            reported_name=_reported_name(item.item),
            captured_at=captured_at,
            raw_payload=item.item,
            normalized_metrics=snapshot_metrics.normalize_member(item.item),
        )
        self._log_identity(outcome)
        if outcome.inserted:
            self._counted("statbate_member")

    async def _member_missing(
        self, member: db.DueMember, item: statbate_api.BatchItem, captured_at: dt.datetime
    ) -> None:
        """A per-item error, or a did that is null or no usable id: a not_found failure row, and no new
        question for `NOT_FOUND_TTL`."""
        metrics.API_FAILURES.labels(statbate_api.API, "not_found").inc()
        failure = errors.ApiFailure(
            api=statbate_api.API,
            operation="member_info_batch",
            url=logs.mask(
                f"{self.settings.statbate_base_url.rstrip('/')}/members/{statbate_api.SITE}/info/batch"
            ),
            error_kind="not_found",
            http_status=200,
            body_excerpt=logs.mask(f"{member.name}: {item.error or 'did is no usable id'}"),
            occurred_at=captured_at,
        )
        await self.on_failure(failure)
        await db.record_snapshot_miss(
            self.pool,
            person_id=member.person_id,
            source="statbate_member",
            username=member.name,
            missed_at=captured_at,
        )

    def _log_identity(self, outcome: db.StoredSnapshot) -> None:
        if outcome.renamed_to:
            log.info(
                "person_renamed",
                person_id=str(outcome.person_id),
                old=outcome.renamed_from,
                new=outcome.renamed_to,
            )
        if outcome.other_person_id:
            # Events created a second person under the new name before the lookup linked the two; both keep
            # their rows (nothing is deleted) and the new name now resolves to the original person.
            log.warning(
                "person_identity_shared",
                person_id=str(outcome.person_id),
                other_person_id=str(outcome.other_person_id),
            )

    def _counted(self, source: str) -> None:
        metrics.SNAPSHOTS.labels(source).inc()
        self.state.snapshots_taken += 1


def _reported_name(payload: Mapping[str, Any]) -> str | None:
    name = snapshot_metrics.unwrap(payload).get("name")
    return name if isinstance(name, str) and name.strip() else None


def _stats_rooms(
    settings_client: stats_api.StatsClient | None,
    room_tokens: Callable[[], dict[str, api_http.TokenProvider]] | None,
    make: Callable[[str, api_http.TokenProvider], stats_api.StatsClient],
) -> Callable[[], dict[str, stats_api.StatsClient]]:
    """The rooms to poll the Stats API for, each with its client: the settings' room (MHC_CB_USERNAME with
    MHC_CB_STATS_TOKEN), and every room `room_tokens` names now (a client made once per room)."""
    made: dict[str, stats_api.StatsClient] = {}

    def current() -> dict[str, stats_api.StatsClient]:
        rooms = room_tokens() if room_tokens is not None else {}
        for room in made.keys() - rooms.keys():
            del made[room]
        for room, token in rooms.items():
            if room not in made:
                made[room] = make(room, token)
        if settings_client is not None:
            return {**made, settings_client.username: settings_client}
        return dict(made)

    return current


def announce_sources(settings: config.Settings) -> tuple[bool, bool]:
    """Log, once, which snapshot sources are off and why; (statbate on, cb_stats on)."""
    statbate_on = bool(settings.statbate_token and settings.statbate_token.get_secret_value())
    stats_on = bool(
        settings.cb_stats_token and settings.cb_stats_token.get_secret_value() and settings.cb_username
    )
    if not statbate_on:
        log.info("snapshot_source_off", source="statbate", reason="MHC_STATBATE_TOKEN is not set")
    if not stats_on:
        missing = "MHC_CB_USERNAME" if not settings.cb_username else "MHC_CB_STATS_TOKEN"
        log.info("snapshot_source_off", source="cb_stats", reason=f"{missing} is not set")
    if statbate_on and not settings.cb_username:
        log.info("snapshot_source_off", source="statbate_model", reason="MHC_CB_USERNAME is not set")
    return statbate_on, stats_on


async def run_scheduler(
    *,
    pool: asyncpg.Pool,
    session: aiohttp.ClientSession,
    settings: config.Settings,
    state: runtime_state.RuntimeState,
    stop: asyncio.Event,
    on_failure: api_http.FailureRecorder,
    clock: Clock = db.utc_now,
    monotonic: Monotonic = time.monotonic,
    sleep: Sleep | None = None,
    jitter: Callable[[], float] = random.random,
    request_timeout: float = statbate_api.DEFAULT_TIMEOUT,
    tokens: credentials.Credentials | None = None,
    room_stats_tokens: Callable[[], dict[str, api_http.TokenProvider]] | None = None,
) -> None:
    """The snapshot task: returns when `stop` is set. Expected API failures are recorded and waited out here;
    storage errors are retried after a pause; anything else propagates to the supervisor.

    `clock` gives naive-UTC now, for what is stored and for reading the stored history at start; `monotonic`
    times every wait and deadline, so setting the wall clock neither stalls nor hurries a schedule.
    `sleep(seconds)` is every wait (periodic, rate limit, retry backoff) and by default waits on `stop` with a
    timeout, so the task stops promptly. Tests inject all three. `tokens` gives the current tokens (rotated
    without a restart); by default the settings' values. `room_stats_tokens` gives the rooms polled now that
    have a Stats API token of their own (`NAME.stats`), besides the settings' room: each is polled too.
    """

    async def stop_aware(seconds: float) -> None:
        await waits.wait_for_stop(stop, seconds)

    wait: Sleep = sleep or stop_aware

    async def record(failure: errors.ApiFailure) -> None:
        # Failure rows carry the scheduler's clock, the same one its plan reads them back with.
        await on_failure(
            failure if failure.occurred_at else dataclasses.replace(failure, occurred_at=clock())
        )

    statbate_on, stats_on = announce_sources(settings)
    options: dict[str, Any] = {"sleep": wait, "timeout": request_timeout}
    scheduler = _Scheduler(
        pool=pool,
        settings=settings,
        state=state,
        stop=stop,
        on_failure=record,
        statbate=statbate_api.StatbateClient.from_settings(
            session, settings, record, token=tokens.provider("statbate_token") if tokens else None, **options
        )
        if statbate_on
        else None,
        stats_rooms=_stats_rooms(
            stats_api.StatsClient.from_settings(
                session,
                settings,
                record,
                token=tokens.provider("cb_stats_token") if tokens else None,
                **options,
            )
            if stats_on
            else None,
            room_stats_tokens,
            lambda room, token: stats_api.StatsClient(
                session,
                url=settings.cb_stats_url,
                username=room,
                token=token,
                on_failure=record,
                max_body_bytes=settings.api_max_body_bytes,
                **options,
            ),
        ),
        rooms_may_change=room_stats_tokens is not None,
        clock=clock,
        monotonic=monotonic,
        sleep=wait,
        jitter=jitter,
    )
    if scheduler.statbate is None and not stats_on and room_stats_tokens is None:
        await stop.wait()
        return
    log.info("snapshot_scheduler_started", statbate=statbate_on, cb_stats=stats_on)
    await scheduler.run()
    log.info("snapshot_scheduler_stopped")
