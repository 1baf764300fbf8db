"""Scheduled snapshots: the broadcaster's Stats API figures, its Statbate model info, viewers' member info.

The middle of this module is pure: `normalize_member`, `normalize_stats` and `normalize_model` turn an API
answer into the `normalized_metrics` the seed describes. The edge is `run_scheduler`, one long-lived task that
decides what is due from the `snapshots` table itself (so a restart neither repeats nor forgets work), asks
the APIs under a token-bucket limit and appends rows through `db`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import math
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

# persons.did and persons.rid are INTEGER (sql/migrations/001): an id outside this range cannot be stored.
EXTERNAL_ID_RANGE = range(-(2**31), 2**31)

# --- normalization (pure) ---

_MEMBER_NUMBERS = (
    "did",
    "all_time_tokens",
    "last_tip_amount",
    "models_tipped_2weeks",
    "models_messaged_2weeks",
)
_MEMBER_DATES = ("first_tip_date", "last_tip_date", "first_message_date")
_STATS_NUMBERS = (
    "token_balance",
    "num_followers",
    "tips_in_last_hour",
    "votes_up",
    "votes_down",
    "satisfaction_score",
    "num_viewers",
    "num_registered_viewers",
    "num_tokened_viewers",
)


def _number(value: Any) -> int | float | None:
    """A JSON number (or a numeric string) as int or float that jsonb can store; anything else is None.

    jsonb holds any integer but no NaN or infinity: "nan", "1e999", a float already infinite and a digit
    string beyond Python's 4,300-digit int limit (whose float is infinite) all become None.
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                return _number(float(text))
            except ValueError:
                return None
    return None


def _unwrap(payload: Mapping[str, Any]) -> Mapping[str, Any]:
    """The entity of a single-entity answer (`{"data": {...}}`) or the item itself (a batch item)."""
    data = payload.get("data")
    return data if isinstance(data, Mapping) else payload


def normalize_member(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Member info (whole answer or batch item) → metrics. Only keys present in the answer appear, so a field
    the API stops sending gives a null delta rather than a fake one."""
    data = _unwrap(payload)
    metrics_: dict[str, Any] = {}
    for key in _MEMBER_NUMBERS:
        if key in data:
            metrics_[key] = _number(data[key])
    for key in _MEMBER_DATES:
        if key in data:
            metrics_[key] = data[key] if isinstance(data[key], str) and data[key] else None
    return metrics_


def _sentinel(value: Any) -> Any:
    """The Stats API's -1 means "none" (never broadcast, not online): stored as null."""
    return None if _number(value) == -1 else value


def normalize_stats(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Stats API object → metrics; `time_online` becomes `time_online_minutes`, every -1 becomes null."""
    metrics_: dict[str, Any] = {}
    for key in _STATS_NUMBERS:
        if key in payload:
            metrics_[key] = _number(_sentinel(payload[key]))
    if "time_online" in payload:
        metrics_["time_online_minutes"] = _number(_sentinel(payload["time_online"]))
    if "last_broadcast" in payload:
        last = _sentinel(payload["last_broadcast"])
        metrics_["last_broadcast"] = last if isinstance(last, str) and last else None
    return metrics_


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def normalize_model(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Model info → metrics. Session durations keep the API's unit, which its documentation leaves open."""
    data = _unwrap(payload)
    sessions: Mapping[str, Any] = _mapping(data.get("sessions"))
    income: Mapping[str, Any] = _mapping(data.get("income"))
    metrics_: dict[str, Any] = {}
    for key in ("rid", "gender", "rank"):
        if key in data:
            metrics_[key] = _number(data[key])
    for key, source, field in (
        ("session_count", sessions, "count"),
        ("session_total_duration", sessions, "total_duration"),
        ("session_average_duration", sessions, "average_duration"),
        ("income_tokens", income, "tokens"),
        ("income_usd", income, "usd"),
    ):
        if field in source:
            metrics_[key] = _number(source[field])
    return metrics_


def external_id(payload: Mapping[str, Any], key: str) -> int | None:
    """`did` or `rid` of an answer as an int (the batch schema allows a numeric string), else None.

    An id the persons table cannot hold (hundreds of digits, beyond INTEGER) is None too: storing it would
    fail the whole batch on every retry, and a clamped or rounded one would be somebody else's.
    """
    value = _number(_unwrap(payload).get(key))
    if isinstance(value, float):
        value = int(value) if value.is_integer() else None
    return value if value is not None and value in EXTERNAL_ID_RANGE else None


# --- the token bucket ---


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

    stats: float | None = None
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
        stats: stats_api.StatsClient | None,
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
        self.stats = stats
        self.clock = clock  # what is stored, and reading the stored history
        self.monotonic = monotonic  # every wait and deadline
        self.sleep = sleep
        self.jitter = jitter
        self.bucket = TokenBucket(
            settings.statbate_requests_per_minute, monotonic=monotonic, sleep=sleep, jitter=jitter
        )
        self.broadcaster = db.normalize_username(settings.cb_username)
        self.plan = _Plan()
        self._broadcaster_person: db.Person | None = None

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
        if self.stats is not None:
            person = await self._broadcaster()
            last = await db.newest_snapshot_at(self.pool, person.id, "cb_stats")
            blocked = await db.newest_api_failure_at(
                self.pool, stats_api.API, ("auth_rejected", "rate_limited")
            )
            self.plan.stats = start + max(
                _wait_from_history(now, last, STATS_INTERVAL),
                _wait_from_history(now, blocked, STATS_COOLDOWN),
            )
        if self.statbate is not None and self.broadcaster:
            person = await self._broadcaster()
            last = await db.newest_snapshot_at(self.pool, person.id, "statbate_model")
            missed = await db.newest_snapshot_miss_at(self.pool, person.id, "statbate_model")
            self.plan.model = start + max(
                _wait_from_history(now, last, MODEL_INTERVAL),
                _wait_from_history(now, missed, NOT_FOUND_TTL),
            )
        if self.statbate is not None:
            self.plan.members = start

    def _after(self, interval: dt.timedelta, since: float | None = None) -> float:
        """The monotonic deadline `interval` after `since` (default: now)."""
        return (self.monotonic() if since is None else since) + interval.total_seconds()

    async def _broadcaster(self) -> db.Person:
        if self._broadcaster_person is None:
            found = await db.find_person(self.pool, self.broadcaster)
            self._broadcaster_person = found or await db.find_or_create_person(
                self.pool, self.broadcaster, seen_at=self.clock(), role="MODEL"
            )
        return self._broadcaster_person

    def _seconds_to_next_work(self) -> float:
        pending = [self.plan.stats] if self.stats is not None and self.plan.stats else []
        statbate = [moment for moment in (self.plan.model, self.plan.members) if moment]
        if statbate:
            paused = self.plan.statbate_paused_until
            pending.append(max(min(statbate), paused) if paused else min(statbate))
        if not pending:
            return IDLE_RECHECK.total_seconds()
        seconds = min(pending) - self.monotonic()
        return seconds + self.jitter() * JITTER_SECONDS if seconds > 0 else 0.0

    async def _tick(self) -> None:
        if self.stats is not None and self._due(self.plan.stats):
            await self._take_stats(self.stats)
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

    async def _take_stats(self, client: stats_api.StatsClient) -> None:
        person = await self._broadcaster()
        try:
            payload = await client.fetch()
        except (errors.AuthRejected, errors.RateLimited) as error:
            wait = min(
                max(STATS_COOLDOWN.total_seconds(), error.retry_after or 0.0),
                STATS_BACKOFF_MAX.total_seconds(),
            )
            log.warning("cb_stats_backing_off", kind=error.kind, status=error.status, seconds=int(wait))
            self.plan.stats = self._after(dt.timedelta(seconds=wait))
            return
        except errors.ApiError as error:
            log.warning("cb_stats_snapshot_failed", kind=error.kind, status=error.status)
            self.plan.stats = self._after(STATS_INTERVAL)
            return
        captured_at, taken = self.clock(), self.monotonic()
        if await db.record_snapshot(
            self.pool,
            person_id=person.id,
            source="cb_stats",
            captured_at=captured_at,
            raw_payload=payload,
            normalized_metrics=normalize_stats(payload),
        ):
            self._counted("cb_stats")
        self.plan.stats = self._after(STATS_INTERVAL, since=taken)

    async def _take_model(self, client: statbate_api.StatbateClient) -> None:
        person = await self._broadcaster()
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
        rid = external_id(payload, "rid")
        if rid is None:
            stored = await db.record_snapshot(
                self.pool,
                person_id=person.id,
                source="statbate_model",
                captured_at=captured_at,
                raw_payload=payload,
                normalized_metrics=normalize_model(payload),
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
                normalized_metrics=normalize_model(payload),
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
        did = external_id(item.item, "did") if item.item is not None else None
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
            normalized_metrics=normalize_member(item.item),
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
    name = _unwrap(payload).get("name")
    return name if isinstance(name, str) and name.strip() else None


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
) -> None:
    """The snapshot task: returns when `stop` is set. Expected API failures are recorded and waited out here;
    storage errors are retried after a pause; anything else propagates to the supervisor.

    `clock` gives naive-UTC now, for what is stored and for reading the stored history at start; `monotonic`
    times every wait and deadline, so setting the wall clock neither stalls nor hurries a schedule.
    `sleep(seconds)` is every wait (periodic, rate limit, retry backoff) and by default waits on `stop` with a
    timeout, so the task stops promptly. Tests inject all three. `tokens` gives the current tokens (rotated
    without a restart); by default the settings' values.
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
        stats=stats_api.StatsClient.from_settings(
            session, settings, record, token=tokens.provider("cb_stats_token") if tokens else None, **options
        )
        if stats_on
        else None,
        clock=clock,
        monotonic=monotonic,
        sleep=wait,
        jitter=jitter,
    )
    if scheduler.statbate is None and scheduler.stats is None:
        await stop.wait()
        return
    log.info("snapshot_scheduler_started", statbate=statbate_on, cb_stats=stats_on)
    await scheduler.run()
    log.info("snapshot_scheduler_stopped")
