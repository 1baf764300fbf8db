"""One JSON request to a snapshot API (Statbate, Chaturbate Stats), its failures as our errors, and retries.

Both snapshot clients share this: an HTTP status or a socket error becomes an `errors.ApiError` subclass named
after the failure kind stored in `api_failures`; every failed attempt is handed to the caller's recorder and
counted; tenacity retries only the kinds a client names, honouring a 429's Retry-After.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import tenacity

from daemon import db, errors, logs, metrics

FailureRecorder = Callable[[db.ApiFailure], Awaitable[None]]
Sleep = Callable[[float], Awaitable[None]]

BACKOFF_BASE_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 60.0
# A Retry-After beyond this is not waited out inside one call; the scheduler's own pause covers it.
RETRY_AFTER_MAX_SECONDS = 300.0

log = logs.get_logger(__name__)


TRANSIENT: tuple[type[errors.ApiError], ...] = (
    errors.ServerError,
    errors.RequestTimeout,
    errors.ConnectionFailed,
    errors.BadBody,
)


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header in seconds; HTTP-date forms are ignored (the backoff covers them)."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def error_for_status(status: int, body: str, retry_after: str | None) -> errors.ApiError:
    excerpt = body[: db.BODY_EXCERPT_CHARS]
    kinds: dict[int, type[errors.ApiError]] = {
        401: errors.AuthRejected,
        403: errors.AuthRejected,
        404: errors.NotFound,
        429: errors.RateLimited,
    }
    cls = kinds.get(status) or (errors.ServerError if status >= 500 else errors.ClientRejected)
    return cls(
        f"HTTP {status}", status=status, body_excerpt=excerpt, retry_after=retry_after_seconds(retry_after)
    )


async def request_json(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    api: str,
    timeout: float,  # noqa: ASYNC109  # aiohttp's own per-request timeout, not a wrapper around the call
    headers: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
    json_body: Any = None,
) -> Any:
    """One attempt: the decoded JSON body of a 2xx answer, else the matching `errors.ApiError`."""
    try:
        async with session.request(
            method,
            url,
            headers=headers,
            params=params,
            json=json_body,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            body = await response.text(errors="replace")
            metrics.API_REQUESTS.labels(api, str(response.status)).inc()
            if response.status >= 300:
                raise error_for_status(response.status, body, response.headers.get("Retry-After"))
    except TimeoutError as error:
        metrics.API_REQUESTS.labels(api, "timeout").inc()
        raise errors.RequestTimeout(f"no answer within {timeout:g} s") from error
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as error:
        metrics.API_REQUESTS.labels(api, "connection").inc()
        raise errors.ConnectionFailed(f"connection failed: {type(error).__name__}") from error
    try:
        return json.loads(body)
    except ValueError as error:
        raise errors.BadBody(
            "the body is not JSON", status=response.status, body_excerpt=body[:200]
        ) from error


def _wait(state: tenacity.RetryCallState) -> float:
    """Retry-After when the API sent one, else exponential backoff with full jitter."""
    error: BaseException | None = state.outcome.exception() if state.outcome else None
    if isinstance(error, errors.ApiError) and error.retry_after is not None:
        return min(float(error.retry_after), RETRY_AFTER_MAX_SECONDS)
    ceiling = min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2.0 ** (state.attempt_number - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311  # jitter, not cryptography


async def call(
    attempt: Callable[[], Awaitable[Any]],
    *,
    api: str,
    operation: str,
    url: str,
    on_failure: FailureRecorder,
    retry_on: tuple[type[errors.ApiError], ...],
    max_attempts: int,
    sleep: Sleep,
) -> Any:
    """Run `attempt` until it succeeds, fails with a kind not in `retry_on`, or runs out of attempts.

    Every failed attempt becomes one failure record (`url` is masked again before it leaves).
    """
    retrying = tenacity.AsyncRetrying(
        stop=tenacity.stop_after_attempt(max_attempts),
        retry=tenacity.retry_if_exception_type(retry_on),
        wait=_wait,
        sleep=sleep,
        reraise=True,
    )
    async for try_ in retrying:
        with try_:
            number = try_.retry_state.attempt_number
            try:
                return await attempt()
            except errors.ApiError as error:
                await _record(
                    error, api=api, operation=operation, url=url, attempt=number, on_failure=on_failure
                )
                raise
    raise AssertionError("tenacity ended without a result or an error")  # pragma: no cover


async def _record(
    error: errors.ApiError, *, api: str, operation: str, url: str, attempt: int, on_failure: FailureRecorder
) -> None:
    metrics.API_FAILURES.labels(api, error.kind).inc()
    masked = logs.mask(url)
    log.warning(
        "api_call_failed",
        api=api,
        operation=operation,
        kind=error.kind,
        status=error.status,
        attempt=attempt,
        url=masked,
    )
    failure = db.ApiFailure(
        api=api,
        operation=operation,
        url=masked,
        error_kind=error.kind,
        http_status=error.status,
        body_excerpt=error.body_excerpt,
        attempt=attempt,
    )
    try:
        await on_failure(failure)
    except errors.DaemonError as storage_error:
        # The recorder is usually the database; losing one failure row must not turn into a second failure.
        log.warning("api_failure_not_recorded", api=api, error=logs.mask(str(storage_error)))


async def stop_aware_sleep(stop: asyncio.Event, seconds: float) -> None:
    """Wait `seconds`, or less when `stop` is set meanwhile."""
    if seconds <= 0:
        await asyncio.sleep(0)
        return
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        return
