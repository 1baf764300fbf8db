"""api_failures rows: written as given, with any URL-borne credential masked on the way in."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg

from daemon import config, db, errors, supervisor

TOKEN = "q1w2e3r4t5y6u7i8o9p0asdf"


async def test_failure_rows_are_masked(pool: asyncpg.Pool) -> None:
    await db.record_api_failure(
        pool,
        errors.ApiFailure(
            api="cb_events",
            operation="poll",
            url=f"https://eventsapi.chaturbate.com/events/alice/{TOKEN}/?i=1-0&timeout=30",
            error_kind="http_5xx",
            http_status=502,
            body_excerpt="<html>bad gateway\x00</html>" + "x" * 500,
            attempt=3,
        ),
    )
    await db.record_api_failure(
        pool,
        errors.ApiFailure(
            api="cb_stats",
            operation="stats",
            url=f"https://chaturbate.com/statsapi/?username=alice&token={TOKEN}",
            error_kind="auth_rejected",
            http_status=403,
        ),
    )
    (stats, events) = await db.recent_api_failures(pool)
    assert events.url == "https://eventsapi.chaturbate.com/events/alice/***/?i=1-0&timeout=30"
    assert stats.url == "https://chaturbate.com/statsapi/?username=alice&token=***"
    assert events.body_excerpt is not None and len(events.body_excerpt) <= errors.BODY_EXCERPT_CHARS
    assert (events.http_status, events.attempt, events.error_kind) == (502, 3, "http_5xx")
    dump = await pool.fetchval("SELECT string_agg(t::text, ' ') FROM api_failures t")
    assert TOKEN not in dump


async def test_failures_of_tasks_recording_at_once_are_each_written_once(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """The poller, the writer and the snapshot task record failures; two at once once crashed the poller."""
    daemon = supervisor.Supervisor(config.load(data_dir=tmp_path, cb_username="alice"))
    daemon.database_ready.set()
    record = daemon._failure_recorder(pool)
    apis = ["cb_events", "cb_stats", "statbate"]
    await asyncio.gather(
        *(record(errors.ApiFailure(api=api, operation="x", url="-", error_kind="bad_body")) for api in apis)
    )
    assert sorted(await pool.fetchval("SELECT array_agg(api) FROM api_failures")) == apis
