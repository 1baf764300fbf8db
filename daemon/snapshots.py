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
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import asyncpg

from daemon import (
    api_http,
    config,
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
MODEL_INTERVAL = dt.timedelta(hours=3)
MODEL_RETRY = dt.timedelta(minutes=15)
NOT_FOUND_TTL = dt.timedelta(days=7)  # a name the API does not know is not asked again before this
STATBATE_AUTH_PAUSE = dt.timedelta(hours=1)
MEMBER_RETRY = dt.timedelta(minutes=2)  # after a failed batch, so a failing API is not hammered
IDLE_RECHECK = dt.timedelta(minutes=1)  # how soon newly seen viewers are looked for
STORAGE_RETRY = dt.timedelta(seconds=30)
JITTER_SECONDS = 2.0

Clock = Callable[[], dt.datetime]
Sleep = Callable[[float], Awaitable[None]]

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
    """A JSON number (or a numeric string) as int or float; anything else is None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                return float(text)
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
    """`did` or `rid` of an answer as an int (the batch schema allows a numeric string), else None."""
    value = _number(_unwrap(payload).get(key))
    return int(value) if value is not None and float(value).is_integer() else None


# --- the token bucket ---


class TokenBucket:
    """At most `per_minute` acquisitions in any minute: capacity 1, refilled continuously, so requests are
    spaced evenly (Statbate counts per account per minute; bursts buy nothing for a background task)."""

    def __init__(self, per_minute: int, *, clock: Clock, sleep: Sleep, jitter: Callable[[], float]) -> None:
        self._interval = 60.0 / per_minute
        self._clock = clock
        self._sleep = sleep
        self._jitter = jitter
        self._next_free: dt.datetime | None = None

    async def acquire(self) -> None:
        now = self._clock()
        if self._next_free is not None and now < self._next_free:
            wait = (self._next_free - now).total_seconds() + self._jitter() * self._interval * 0.1
            await self._sleep(wait)
            now = self._clock()
        self._next_free = max(now, self._next_free or now) + dt.timedelta(seconds=self._interval)


# --- the scheduler ---


@dataclasses.dataclass
class _Plan:
    """When each kind of work is next due (naive UTC). Rebuilt from the database at start."""

    stats: dt.datetime | None = None
    model: dt.datetime | None = None
    members: dt.datetime | None = None
    statbate_paused_until: dt.datetime | None = None


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
        self.clock = clock
        self.sleep = sleep
        self.jitter = jitter
        self.bucket = TokenBucket(
            settings.statbate_requests_per_minute, clock=clock, sleep=sleep, jitter=jitter
        )
        self.broadcaster = db.normalize_username(settings.cb_username)
        self.plan = _Plan()
        self._broadcaster_person: db.Person | None = None

    async def run(self) -> None:
        await self._load_plan()
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
        now = self.clock()
        if self.stats is not None:
            person = await self._broadcaster()
            last = await db.newest_snapshot_at(self.pool, person.id, "cb_stats")
            blocked = await db.newest_api_failure_at(
                self.pool, stats_api.API, ("auth_rejected", "rate_limited")
            )
            self.plan.stats = max(
                [now]
                + ([last + STATS_INTERVAL] if last else [])
                + ([blocked + STATS_COOLDOWN] if blocked else [])
            )
        if self.statbate is not None and self.broadcaster:
            person = await self._broadcaster()
            last = await db.newest_snapshot_at(self.pool, person.id, "statbate_model")
            missed = await db.newest_snapshot_miss_at(self.pool, person.id, "statbate_model")
            self.plan.model = max(
                [now]
                + ([last + MODEL_INTERVAL] if last else [])
                + ([missed + NOT_FOUND_TTL] if missed else [])
            )
        if self.statbate is not None:
            self.plan.members = now

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
        seconds = (min(pending) - self.clock()).total_seconds()
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

    def _due(self, moment: dt.datetime | None) -> bool:
        return moment is not None and self.clock() >= moment and not self.stop.is_set()

    def _statbate_paused(self) -> bool:
        until = self.plan.statbate_paused_until
        if until is None:
            return False
        if self.clock() >= until:
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
        self.plan.statbate_paused_until = self.clock() + STATBATE_AUTH_PAUSE

    async def _take_stats(self, client: stats_api.StatsClient) -> None:
        person = await self._broadcaster()
        try:
            payload = await client.fetch()
        except (errors.AuthRejected, errors.RateLimited) as error:
            wait = max(STATS_COOLDOWN.total_seconds(), error.retry_after or 0.0)
            log.warning("cb_stats_backing_off", kind=error.kind, status=error.status, seconds=int(wait))
            self.plan.stats = self.clock() + dt.timedelta(seconds=wait)
            return
        except errors.ApiError as error:
            log.warning("cb_stats_snapshot_failed", kind=error.kind, status=error.status)
            self.plan.stats = self.clock() + STATS_INTERVAL
            return
        captured_at = self.clock()
        if await db.record_snapshot(
            self.pool,
            person_id=person.id,
            source="cb_stats",
            captured_at=captured_at,
            raw_payload=payload,
            normalized_metrics=normalize_stats(payload),
        ):
            self._counted("cb_stats")
        self.plan.stats = captured_at + STATS_INTERVAL

    async def _take_model(self, client: statbate_api.StatbateClient) -> None:
        person = await self._broadcaster()
        await self.bucket.acquire()
        if self.stop.is_set():
            return
        try:
            payload = await client.model_info(self.broadcaster)
        except errors.NotFound:
            now = self.clock()
            await db.record_snapshot_miss(
                self.pool,
                person_id=person.id,
                source="statbate_model",
                username=self.broadcaster,
                missed_at=now,
            )
            self.plan.model = now + NOT_FOUND_TTL
            return
        except errors.AuthRejected:
            self._pause_statbate()
            return
        except errors.ApiError as error:
            log.warning("statbate_model_snapshot_failed", kind=error.kind, status=error.status)
            self.plan.model = self.clock() + MODEL_RETRY
            return
        captured_at = self.clock()
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
        self.plan.model = captured_at + MODEL_INTERVAL

    async def _take_members(self, client: statbate_api.StatbateClient) -> None:
        now = self.clock()
        ttl = dt.timedelta(hours=self.settings.member_snapshot_ttl_hours)
        due = await db.due_member_lookups(
            self.pool,
            stale_before=now - ttl,
            missed_before=now - NOT_FOUND_TTL,
            broadcaster=self.broadcaster,
            limit=statbate_api.MAX_BATCH,
        )
        if not due:
            self.plan.members = now + IDLE_RECHECK
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
            self.plan.members = self.clock() + MEMBER_RETRY
            return
        captured_at = self.clock()
        by_name = {member.name: member for member in due}
        for item in items:
            await self._store_member(by_name[item.requested], item, captured_at)
        # More may be due right away: the bucket, not this plan, spaces the next batch.
        self.plan.members = self.clock()

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
        """A per-item error or null did: a not_found failure row, and no new question for `NOT_FOUND_TTL`."""
        metrics.API_FAILURES.labels(statbate_api.API, "not_found").inc()
        failure = errors.ApiFailure(
            api=statbate_api.API,
            operation="member_info_batch",
            url=logs.mask(
                f"{self.settings.statbate_base_url.rstrip('/')}/members/{statbate_api.SITE}/info/batch"
            ),
            error_kind="not_found",
            http_status=200,
            body_excerpt=logs.mask(f"{member.name}: {item.error}"),
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
    sleep: Sleep | None = None,
    jitter: Callable[[], float] = random.random,
    request_timeout: float = statbate_api.DEFAULT_TIMEOUT,
) -> None:
    """The snapshot task: returns when `stop` is set. Expected API failures are recorded and waited out here;
    storage errors are retried after a pause; anything else propagates to the supervisor.

    `clock` gives naive-UTC now; `sleep(seconds)` is every wait (periodic, rate limit, retry backoff) and by
    default waits on `stop` with a timeout, so the task stops promptly. Tests inject both.
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
        statbate=statbate_api.StatbateClient.from_settings(session, settings, record, **options)
        if statbate_on
        else None,
        stats=stats_api.StatsClient.from_settings(session, settings, record, **options) if stats_on else None,
        clock=clock,
        sleep=wait,
        jitter=jitter,
    )
    if scheduler.statbate is None and scheduler.stats is None:
        await stop.wait()
        return
    log.info("snapshot_scheduler_started", statbate=statbate_on, cb_stats=stats_on)
    await scheduler.run()
    log.info("snapshot_scheduler_stopped")
