"""The `api_failures` table: every failed API call, written and read back."""

from __future__ import annotations

import asyncpg

from daemon import errors, logs, sql_files
from daemon.db.core import translate_errors, utc_naive, utc_now

log = logs.get_logger(__name__)


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
