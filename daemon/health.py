"""The HTTP endpoint people and supervisors look at: liveness, readiness, Prometheus metrics, a status page.

`/healthz` answers while the event loop runs. `/readyz` is 200 only when the database answers, the schema is
current, the last successful poll is recent and the token was not rejected; otherwise 503 naming each failing
check. `/metrics` is Prometheus text; `/status` is JSON for people. Nothing served here carries a secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import prometheus_client
from aiohttp import web

from daemon import __version__, config, db, errors, logs, metrics, reports, runtime_state, waits

log = logs.get_logger(__name__)

# Readiness allows three long-polls to go by without a success, but never less than this (timeout 0 polls).
POLL_STALE_FLOOR_S = 10.0
# How often the background check re-reads the schema state; probes themselves only ping.
CHECK_INTERVAL_S = 30.0
RECENT_FAILURES = 10
CHECKS = ("database", "migrations", "poll_stale", "poll_failing", "token_rejected", "rooms_share")
# Hosts that mean "every address" when binding; a client must dial loopback instead.
_WILDCARD_TO_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104  # mapping, not binding


def poll_stale_after(settings: config.Settings) -> float:
    """Seconds after which the last successful poll no longer counts as recent."""
    return max(3.0 * settings.cb_events_timeout, POLL_STALE_FLOOR_S)


def failing_checks(
    state: runtime_state.RuntimeState, *, database_answers: bool, now: float, stale_after: float
) -> list[str]:
    """The names of the readiness checks that fail, in a stable order (empty: ready)."""
    failing = []
    if not database_answers:
        failing.append("database")
    if not state.migrations_current:
        failing.append("migrations")
    # A daemon holding no room while other hosts hold them all has nothing to poll: that is not stale.
    idle_by_share = not state.rooms and len(state.hosts) > 1 and state.share_held
    if not idle_by_share and (
        state.last_successful_poll is None or now - state.last_successful_poll > stale_after
    ):
        failing.append("poll_stale")
    if not state.share_held:
        failing.append("rooms_share")  # rooms are free and this host holds less than its share
    if state.poll_problem is not None:
        failing.append("poll_failing")  # the latest request failed (an unreadable body, say): retrying
    if state.token_rejected:
        failing.append("token_rejected")
    return failing


async def refresh_checks(pool: asyncpg.Pool, state: runtime_state.RuntimeState) -> None:
    """Update `state.database_up` and `state.migrations_current` from the database.

    When the database cannot answer, the schema flag keeps its last known value: "unknown" is not "behind".
    """
    try:
        state.migrations_current = await db.schema_is_current(pool)
    except errors.StorageError:
        state.database_up = False
    else:
        state.database_up = True


async def run_checks(
    pool: asyncpg.Pool,
    state: runtime_state.RuntimeState,
    stop: asyncio.Event,
    *,
    interval: float = CHECK_INTERVAL_S,
) -> None:
    """Refresh the database and schema flags every `interval` seconds until `stop` is set."""
    while not stop.is_set():
        await refresh_checks(pool, state)
        await waits.wait_for_stop(stop, interval)


def _room_json(room: runtime_state.RoomState, now: float) -> dict[str, Any]:
    """One polled room: its state, how far behind its newest stored event is, what it stored."""
    return {
        "name": room.name,
        "state": room.status,
        "lag_s": None if room.last_event_time is None else round(max(0.0, now - room.last_event_time), 1),
        "last_event_time": _iso(room.last_event_time),
        "last_successful_poll": _iso(room.last_successful_poll),
        "poll_problem": room.poll_problem,
        "events_stored": room.events_stored,
        "spool_bytes": room.spool_bytes,
        "live_session": room.live_session_id,
        "epoch": room.epoch,
    }


def _iso(moment: float | dt.datetime | None) -> str | None:
    if moment is None:
        return None
    if isinstance(moment, dt.datetime):
        aware = moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
        return aware.isoformat()
    return dt.datetime.fromtimestamp(moment, dt.UTC).isoformat()


def _failure_json(failure: errors.ApiFailure) -> dict[str, Any]:
    return {
        "occurred_at": _iso(failure.occurred_at),
        "api": failure.api,
        "operation": failure.operation,
        "error_kind": failure.error_kind,
        "http_status": failure.http_status,
        "attempt": failure.attempt,
        # Stored masked already; masked again because this page is the one most likely to be shared.
        "url": logs.mask(failure.url),
        "body_excerpt": logs.mask(failure.body_excerpt) if failure.body_excerpt else None,
    }


class _Endpoints:
    def __init__(
        self, pool: asyncpg.Pool, settings: config.Settings, state: runtime_state.RuntimeState
    ) -> None:
        self.pool = pool
        self.state = state
        self.stale_after = poll_stale_after(settings)

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "alive", "version": __version__})

    async def readyz(self, _request: web.Request) -> web.Response:
        answers = await db.ping(self.pool)
        self.state.database_up = answers
        if answers and not self.state.migrations_current:
            # Only a failing schema check costs a query per probe; a current one is trusted until refreshed.
            await refresh_checks(self.pool, self.state)
        failing = failing_checks(
            self.state, database_answers=answers, now=time.time(), stale_after=self.stale_after
        )
        body: dict[str, Any] = {
            "ready": not failing,
            "checks": {name: "failing" if name in failing else "ok" for name in CHECKS},
            "failing": failing,
        }
        if self.state.database_problem and ({"database", "migrations"} & set(failing)):
            body["database_problem"] = self.state.database_problem
        if self.state.poll_problem:
            body["poll_problem"] = self.state.poll_problem
        return web.json_response(body, status=503 if failing else 200)

    async def metrics(self, _request: web.Request) -> web.Response:
        metrics.DATABASE_UP.set(1 if self.state.database_up else 0)
        metrics.SPOOL_BYTES.set(self.state.spool_bytes)
        if self.state.last_successful_poll is not None:
            metrics.LAST_POLL.set(self.state.last_successful_poll)
        for gauge in (metrics.ROOM_LAST_EVENT, metrics.ROOM_TOKEN_REJECTED, metrics.ROOM_SPOOL_BYTES):
            gauge.clear()  # a room no longer polled has no value
        for room in self.state.rooms.values():
            if room.last_event_time is not None:
                metrics.ROOM_LAST_EVENT.labels(room=room.name).set(room.last_event_time)
            metrics.ROOM_TOKEN_REJECTED.labels(room=room.name).set(1 if room.token_rejected else 0)
            metrics.ROOM_SPOOL_BYTES.labels(room=room.name).set(room.spool_bytes)
        return web.Response(
            body=prometheus_client.generate_latest(metrics.REGISTRY),
            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST},
        )

    async def status(self, _request: web.Request) -> web.Response:
        state = self.state
        try:
            recent: list[dict[str, Any]] | None = [
                _failure_json(failure) for failure in await db.recent_api_failures(self.pool, RECENT_FAILURES)
            ]
        except errors.StorageError:
            recent = None
        try:
            gaps = await db.ingest_gaps(self.pool, limit=1)
            latest_gap: dict[str, Any] | None = reports.gap_json(gaps[0]) if gaps else None
        except errors.StorageError:
            latest_gap = None
        body = {
            "version": __version__,
            "started_at": _iso(state.started_at),
            "uptime_s": round(time.time() - state.started_at, 1),
            "live_session": state.live_session_id,
            "last_event_time": _iso(state.last_event_time),
            "last_successful_poll": _iso(state.last_successful_poll),
            "token_rejected": state.token_rejected,
            "database_up": state.database_up,
            "migrations_current": state.migrations_current,
            "database_problem": state.database_problem,
            "poll_problem": state.poll_problem,
            "counts": {
                "events_stored": state.events_stored,
                "duplicates_skipped": state.duplicates_skipped,
                "quarantined": state.quarantined,
                "failures": state.failures,
            },
            "spool_bytes": state.spool_bytes,
            "holder": state.holder,
            "live_hosts": state.hosts,
            "rooms_share": state.rooms_share,
            "rooms": [_room_json(room, now=time.time()) for _, room in sorted(state.rooms.items())],
            "recent_failures": recent,
            "latest_gap": latest_gap,
        }
        return web.json_response(body)


def build_app(
    pool: asyncpg.Pool, settings: config.Settings, state: runtime_state.RuntimeState
) -> web.Application:
    endpoints = _Endpoints(pool, settings, state)
    app = web.Application()
    routes: list[tuple[str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = [
        ("/healthz", endpoints.healthz),
        ("/readyz", endpoints.readyz),
        ("/metrics", endpoints.metrics),
        ("/status", endpoints.status),
    ]
    for path, handler in routes:
        app.router.add_get(path, handler)
    return app


@dataclass(frozen=True)
class HealthServer:
    """A running endpoint; `port` is the bound one (useful when the setting was 0)."""

    host: str
    port: int

    @property
    def url(self) -> str:
        return base_url(self.host, self.port)


def base_url(host: str, port: int) -> str:
    """`http://host:port` to dial, with wildcard bind addresses turned into loopback."""
    host = _WILDCARD_TO_LOOPBACK.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextlib.asynccontextmanager
async def serve(
    pool: asyncpg.Pool, settings: config.Settings, state: runtime_state.RuntimeState
) -> AsyncIterator[HealthServer]:
    """Serve on `MHC_HEALTH_HOST:MHC_HEALTH_PORT` for the duration of the block."""
    # Probes arrive every few seconds: an access line for each would drown the summary lines.
    runner = web.AppRunner(build_app(pool, settings, state), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.health_host, settings.health_port)
        try:
            await site.start()
        except OSError as error:
            # Not a ConfigError (exit 78): a port still held by the previous instance frees itself on restart.
            raise errors.DaemonError(
                f"MHC_HEALTH_HOST/MHC_HEALTH_PORT: cannot listen on "
                f"{settings.health_host}:{settings.health_port}: {error.strerror or error}"
            ) from error
        host, port = runner.addresses[0][:2]
        log.info("health_server_listening", host=host, port=port)
        yield HealthServer(host=host, port=port)
    finally:
        await runner.cleanup()


async def run(
    pool: asyncpg.Pool,
    settings: config.Settings,
    state: runtime_state.RuntimeState,
    stop: asyncio.Event,
) -> None:
    """Serve and keep the readiness flags fresh until `stop` is set (one task for the supervisor)."""
    async with serve(pool, settings, state):
        await run_checks(pool, state, stop)


async def probe(host: str, port: int, *, give_up_after: float = 5.0) -> tuple[bool, str]:
    """Ask a running daemon's `/readyz`; (ready, one line saying why)."""
    url = base_url(host, port) + "/readyz"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=give_up_after)) as session,
            session.get(url) as response,
        ):
            body = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:
        return False, f"unreachable: {url}: {type(error).__name__}"
    if response.status == 200:
        return True, f"ready: {url}"
    failing = body.get("failing") if isinstance(body, dict) else None
    reasons = ", ".join(str(name) for name in failing) if isinstance(failing, list) else "unknown"
    return False, f"not ready ({response.status}): {reasons}"
