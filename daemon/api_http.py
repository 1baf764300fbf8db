"""The HTTP failure path of every API client (Events, Statbate, Chaturbate Stats), in one place.

One request becomes a `Response` whose body is at most `max_body_bytes` both on the wire and after
decompression, or an `errors.ApiError` subclass: every aiohttp, socket and parsing failure is translated here,
with messages that name only a type (aiohttp's own texts carry the URL, and the URL carries a token). An HTTP
status becomes an error class by one table, a `Retry-After` header becomes seconds by one parser, JSON is
decoded by one rule, and every failed attempt becomes one `errors.ApiFailure` for the caller's recorder.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import math
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import tenacity
import yarl

from daemon import errors, json_depth, logs, metrics, waits

FailureRecorder = Callable[[errors.ApiFailure], Awaitable[None]]
Sleep = Callable[[float], Awaitable[None]]
TokenProvider = Callable[[], str]  # the current token, asked again at every attempt (tokens rotate)

BACKOFF = waits.Backoff(initial=1.0, maximum=60.0)
# A longer Retry-After is waited out only this long: the API may ask again when it is still not ready.
RETRY_AFTER_MAX_SECONDS = 3600.0
# Only these, so a server cannot pick an encoding (br, zstd) that this module cannot bound.
ACCEPT_ENCODING = "gzip, deflate"
_READ_CHUNK = 64 * 1024
# 19 digits in a row may be an integer beyond 64 bits (see decode_json); digits in strings count too, which
# only costs such a body the slower decoder. Found by mapping every digit to "0" and every other byte to a
# space, then a plain substring search: twenty times faster than a regular expression here.
_DIGITS_AS_ZEROS = bytes(48 if 48 <= byte <= 57 else 32 for byte in range(256))
_LONG_DIGITS = b"0" * 19

TRANSIENT: tuple[type[errors.ApiError], ...] = (
    errors.ServerError,
    errors.RequestTimeout,
    errors.ConnectionFailed,
    errors.BadBody,
)
_STATUS_ERRORS: dict[int, type[errors.ApiError]] = {
    401: errors.AuthRejected,
    403: errors.AuthRejected,
    429: errors.RateLimited,
}

log = logs.get_logger(__name__)


@dataclass(frozen=True)
class Response:
    """A complete answer: its status, its raw `Retry-After` and its body (decompressed, within the cap)."""

    status: int
    retry_after: str | None
    body: bytes


def current_token(provider: TokenProvider) -> str:
    """The provider's token now, registered as a secret (as is and URL-quoted) before anything can send it."""
    token = provider()
    logs.register_secret(token)
    logs.register_secret(quote(token, safe=""))
    return token


async def request(
    session: aiohttp.ClientSession,
    method: str,
    url: str | yarl.URL,
    *,
    api: str,
    timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109  # aiohttp's own per-request timeout
    max_body_bytes: int,
    headers: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
    json_body: Any = None,
) -> Response:
    """One request, redirects not followed. Raises `RequestTimeout`, `ConnectionFailed` (the transport failed,
    the HTTP was malformed or cut short) or `BadBody` (over the cap, or an encoding that cannot be read)."""
    label = "error"
    try:
        async with session.request(
            method,
            url,
            headers={**(headers or {}), "Accept-Encoding": ACCEPT_ENCODING},
            params=params,
            json=json_body,
            timeout=timeout,
            allow_redirects=False,
            auto_decompress=False,  # decompressed in _read_body, where the cap applies to the output too
        ) as response:
            label = str(response.status)
            body = await _read_body(response, max_body_bytes)
            return Response(response.status, response.headers.get("Retry-After"), body)
    except TimeoutError:
        label = "timeout"
        raise errors.RequestTimeout(f"no answer within {timeout.total or timeout.sock_read} s") from None
    except (aiohttp.ClientError, aiohttp.http_exceptions.HttpProcessingError, OSError, ValueError) as error:
        label = "connection"
        raise errors.ConnectionFailed(f"connection failed ({type(error).__name__})") from None
    finally:
        metrics.API_REQUESTS.labels(api, label).inc()


async def _read_body(response: aiohttp.ClientResponse, limit: int) -> bytes:
    status = response.status
    too_large = f"the body is larger than {limit} bytes"
    if response.content_length is not None and response.content_length > limit:
        raise errors.BadBody(too_large, status=status)
    decoder = _decompressor(response.headers.get("Content-Encoding", ""), status)
    chunks: list[bytes] = []
    wire = size = 0
    async for chunk in response.content.iter_chunked(_READ_CHUNK):
        wire += len(chunk)
        if wire > limit:
            raise errors.BadBody(too_large, status=status)
        if decoder is not None:
            try:
                # One byte over what may still come proves the cap is passed, however much more would.
                chunk = decoder.decompress(chunk, limit - size + 1)
            except zlib.error:
                raise errors.BadBody("the compressed body is corrupt", status=status) from None
        size += len(chunk)
        if size > limit:
            raise errors.BadBody(f"the body inflates to more than {limit} bytes", status=status)
        chunks.append(chunk)
    if decoder is not None and not decoder.eof:
        raise errors.BadBody("the compressed body ends early", status=status)
    return b"".join(chunks)


def _decompressor(content_encoding: str, status: int) -> zlib._Decompress | None:
    """A zlib decompressor for the body's encoding, None when it is not encoded; `BadBody` for any other."""
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip", "deflate"):
        return zlib.decompressobj(wbits=32 + zlib.MAX_WBITS)  # either header, gzip or zlib
    raise errors.BadBody("the body has an encoding this client does not read", status=status)


def error_for_status(response: Response, *, lookup: bool = False) -> errors.ApiError:
    """The error an unsuccessful status means; a 3xx too (redirects are never followed).

    A 404 is `NotFound` for a `lookup` by name (the snapshot APIs); elsewhere (the Events feed's own URL)
    it is one more refused request.
    """
    status = response.status
    cls = _STATUS_ERRORS.get(status) or (errors.ServerError if status >= 500 else errors.ClientRejected)
    if lookup and status == 404:
        cls = errors.NotFound
    return cls(
        f"HTTP {status}",
        status=status,
        body_excerpt=excerpt(response.body),
        retry_after=parse_retry_after(response.retry_after),
    )


def parse_retry_after(value: str | None, now: dt.datetime | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (seconds or an HTTP date), capped; None if unusable."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value), RETRY_AFTER_MAX_SECONDS)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):  # OverflowError: a year past C's int
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    seconds = (when - (now or dt.datetime.now(dt.UTC))).total_seconds()
    return max(0.0, min(seconds, RETRY_AFTER_MAX_SECONDS))


def excerpt(body: bytes) -> str | None:
    """The start of a body for a failure row, masked, at most `errors.BODY_EXCERPT_CHARS` long."""
    if not body:
        return None
    # Mask before cutting, so a token split by the cut cannot survive in part.
    text = logs.mask(body[: errors.BODY_EXCERPT_CHARS * 10].decode("utf-8", errors="replace"))
    return text[: errors.BODY_EXCERPT_CHARS]


def decode_json(response: Response) -> tuple[Any, bool]:
    """The body's JSON value, and whether orjson decoded it; `BadBody` when it is not JSON.

    orjson is several times faster on a backlog, and what it decodes never holds NaN or an infinite float, so
    ingest may encode it with orjson too. What orjson refuses (NaN and Infinity literals, lone surrogates, a
    byte-order mark, nesting deeper than 1,024) or may read differently (a long digit run: an integer beyond
    64 bits becomes a float) the standard library decodes, so every body means what it did before. An integer
    beyond Python's 4,300-digit limit decodes as infinity, so only its own event is quarantined (a page that
    failed whole would be served again forever). Whatever neither reads (invalid UTF-8, nesting past the
    recursion limit) is a bad body.
    """
    body = response.body
    if _LONG_DIGITS not in body.translate(_DIGITS_AS_ZEROS):
        try:
            return orjson.loads(body), True
        except orjson.JSONDecodeError:
            pass
    try:
        return json.loads(body, parse_int=_integer), False
    except RecursionError:
        problem = "the body nests too deeply to decode"
    except ValueError:  # JSONDecodeError, UnicodeDecodeError, and int's digit limit
        problem = "the body is not JSON"
    raise errors.BadBody(problem, status=response.status, body_excerpt=excerpt(body))


def _integer(digits: str) -> int | float:
    try:
        return int(digits)
    except ValueError:  # over the digit limit: no storable value, and the encoders refuse infinity
        return math.inf


async def request_json(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    api: str,
    timeout: float,  # noqa: ASYNC109  # aiohttp's own per-request timeout, not a wrapper around the call
    max_body_bytes: int,
    headers: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
    json_body: Any = None,
) -> Any:
    """One attempt of a snapshot client: the decoded JSON of a 2xx answer, else the matching `ApiError`.

    The whole value is stored as one jsonb, so it must nest within `json_depth.MAX_DEPTH`.
    """
    response = await request(
        session,
        method,
        url,
        api=api,
        timeout=aiohttp.ClientTimeout(total=timeout),
        max_body_bytes=max_body_bytes,
        headers=headers,
        params=params,
        json_body=json_body,
    )
    if response.status >= 300:
        raise error_for_status(response, lookup=True)
    payload, finite = decode_json(response)
    problem = None
    if json_depth.deeper_than(payload):
        problem = f"the body nests deeper than {json_depth.MAX_DEPTH} levels"
    elif not finite:
        try:  # stored whole as jsonb, which holds no NaN or infinity
            json.dumps(payload, allow_nan=False)
        except ValueError:
            problem = "the body holds a number JSON cannot store (NaN, infinity, or too many digits)"
    if problem is not None:
        raise errors.BadBody(problem, status=response.status, body_excerpt=excerpt(response.body))
    return payload


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

    Every failed attempt is logged and becomes one failure record naming `url` (masked again here).
    """
    retrying = tenacity.AsyncRetrying(
        stop=tenacity.stop_after_attempt(max_attempts),
        retry=tenacity.retry_if_exception_type(retry_on),
        wait=BACKOFF,
        sleep=sleep,
        reraise=True,
    )
    async for try_ in retrying:
        with try_:
            number = try_.retry_state.attempt_number
            try:
                return await attempt()
            except errors.ApiError as error:
                failure = failure_of(error, api=api, operation=operation, url=url, attempt=number)
                log.warning(
                    "api_call_failed",
                    api=api,
                    operation=operation,
                    kind=error.kind,
                    status=error.status,
                    attempt=number,
                    url=failure.url,
                )
                await record_failure(on_failure, failure)
                raise
    raise AssertionError("tenacity ended without a result or an error")  # pragma: no cover


def failure_of(
    error: errors.ApiError, *, api: str, operation: str, url: str, attempt: int
) -> errors.ApiFailure:
    """The failure record of one failed attempt."""
    return errors.ApiFailure(
        api=api,
        operation=operation,
        url=logs.mask(url),
        error_kind=error.kind,
        http_status=error.status,
        body_excerpt=error.body_excerpt,
        attempt=attempt,
    )


async def record_failure(on_failure: FailureRecorder, failure: errors.ApiFailure) -> None:
    """Count `failure` and hand it to the recorder (usually the database)."""
    metrics.API_FAILURES.labels(failure.api, failure.error_kind).inc()
    try:
        await on_failure(failure)
    except errors.DaemonError as error:
        # Losing one failure row must not become a second failure, nor stop the calls that would heal it.
        log.warning(
            "api_failure_not_recorded", api=failure.api, kind=failure.error_kind, error=logs.mask(str(error))
        )
