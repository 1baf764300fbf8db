"""The Chaturbate Events API client: long-poll `{base}/events/{username}/{token}/?i=..&timeout=T`.

`fetch()` returns the next successful response and never gives up: every failed attempt is recorded (a row
via `on_failure`, a log line, a metric) and retried with capped, jittered exponential backoff. The token lives
only in the URL path, so every URL leaving this module for a log, a row or an exception is masked, `EventsUrl`
hides it in its repr, and a `nextUrl` pointing anywhere but the configured origin is refused, never requested.
The token is asked of its provider at every attempt and written into the URL requested, a `nextUrl` too (it
carries the token it was issued with), so a rotated token takes effect without a restart.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import tenacity
import yarl

from daemon import api_http, config, errors, logs, metrics, runtime_state, waits

log = logs.get_logger(__name__)

API = "cb_events"
OPERATION = "poll"
AUTH_PAGE = "https://chaturbate.com/statsapi/authtoken/"
CONNECT_TIMEOUT = 10.0
READ_MARGIN = 15.0  # the server may answer a little after `timeout`; never cut a healthy long-poll short
DEFAULT_SERVER_TIMEOUT = 10  # what the API assumes when a URL names no timeout
MAX_SERVER_TIMEOUT = 90

FOREIGN_NEXT_URL = "foreign_next_url"


class EventsUrl:
    """An Events API URL. It holds the token: `str()` and `repr()` are masked; `reveal()` is the real URL.

    Immutable, compared and hashed by the URL it holds.
    """

    __slots__ = ("_url",)
    _url: yarl.URL

    def __init__(self, url: yarl.URL) -> None:
        object.__setattr__(self, "_url", url)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("EventsUrl is immutable")

    def reveal(self) -> str:
        """The real URL, token included: only for the request itself."""
        return str(self._url)

    def as_yarl(self) -> yarl.URL:
        """The URL object to request (holds the token)."""
        return self._url

    def masked(self) -> str:
        return logs.mask(str(self._url))

    @property
    def event_id(self) -> str | None:
        """The `i` cursor this URL reads after (None: "all latest events")."""
        return self._url.query.get("i")

    @property
    def server_timeout(self) -> int:
        """The long-poll wait this URL asks the server for, clamped to what the API allows."""
        try:
            value = int(self._url.query.get("timeout", DEFAULT_SERVER_TIMEOUT))
        except ValueError:
            value = DEFAULT_SERVER_TIMEOUT
        return max(0, min(MAX_SERVER_TIMEOUT, value))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EventsUrl) and other._url == self._url

    def __hash__(self) -> int:
        return hash(self._url)

    def __str__(self) -> str:
        return self.masked()

    def __repr__(self) -> str:
        return f"EventsUrl({self.masked()!r})"


@dataclass(frozen=True)
class Page:
    """One successful response. `events` is the decoded array exactly as delivered, not validated.

    `next_url` is the accepted `nextUrl` (None when it was null, missing or refused); `next_event_id` is where
    to resume: the accepted `nextUrl`'s `i`, else the last event id of this page, else the request's own `i`.
    """

    events: list[Any]
    next_url: EventsUrl | None
    next_event_id: str | None
    received_at: dt.datetime
    request_event_id: str | None
    body: bytes = field(repr=False)  # the raw response body; its nextUrl holds the token
    finite_numbers: bool = False  # orjson decoded the body: no NaN or infinite float in `events`
    continuation: bool = False  # the answer was the 400 "waited too long" form


def resolve_next_url(base: yarl.URL, raw: object) -> yarl.URL | None:
    """`raw` as an absolute URL when it has the same scheme, host and port as `base`, else None.

    Relative URLs are resolved against `base`. The URL returned is the very object that will be requested, so
    the check and the request cannot disagree about where it goes.
    """
    if not isinstance(raw, str) or not raw or "\\" in raw or any(ch <= " " or ch == "\x7f" for ch in raw):
        return None
    try:
        url = yarl.URL(raw)
        if url.scheme and not url.absolute:
            return None  # "http:///x" and the like: malformed, whatever a join would make of it
        if not url.absolute:
            url = base.join(url)
        same_origin = (
            url.absolute
            and url.scheme == base.scheme
            and url.host is not None
            and url.host == base.host
            and url.port == base.port
            and url.user is None
            and url.password is None
        )
    except (ValueError, TypeError):
        return None
    return url if same_origin else None


class RequestLimiter:
    """At most `limit` requests in any `period` seconds (the API's own rule: a backlog may use a whole
    minute's allowance at once). The poller spaces requests once caught up, so a live room never burns it in a
    burst. Times are logical: a wait counts as done. Each room's client has its own (the API's documented
    2,000 a minute); one more, shared by every room, caps the process
    (`MHC_CB_EVENTS_MAX_REQUESTS_PER_MINUTE`): the documentation does not say whether the 2,000 count per
    token or per client."""

    def __init__(self, limit: int, period: float, sleep: api_http.Sleep) -> None:
        self._limit = max(1, limit)
        self._period = period
        self._sleep = sleep
        self._stamps: collections.deque[float] = collections.deque()

    async def acquire(self) -> None:
        now = time.monotonic()
        while self._stamps and self._stamps[0] <= now - self._period:
            self._stamps.popleft()
        if len(self._stamps) >= self._limit:
            wait = self._stamps[0] + self._period - now
            log.info("events_request_limit_reached", wait_s=round(wait, 3))
            await self._sleep(wait)
            self._stamps.popleft()
            now += wait
        self._stamps.append(now)


class EventsClient:
    """Polls one broadcaster's Events API feed. One caller at a time: `fetch` calls must not overlap.

    `token` gives the current token; `on_auth_rejected` is called on a 401/403 so the token's source is read
    again: when it gives a new token (the hook returns True) the retry comes at once, else after the slow
    `auth_retry_seconds`.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        username: str,
        token: api_http.TokenProvider,
        timeout: int,
        on_failure: api_http.FailureRecorder,
        state: runtime_state.RuntimeState,
        room: runtime_state.RoomState | None = None,
        on_auth_rejected: Callable[[], bool] | None = None,
        max_body_bytes: int = config.DEFAULT_API_MAX_BODY_BYTES,
        backoff_max: float = 60.0,
        auth_retry_seconds: float = 300.0,
        max_requests_per_minute: int = 2000,
        process_limiter: RequestLimiter | None = None,
        token_source: str = "MHC_CB_EVENTS_TOKEN",  # noqa: S107  # a setting's name, not a secret
        backoff_initial: float = 1.0,
        read_margin: float = READ_MARGIN,
        sleep: api_http.Sleep = asyncio.sleep,
    ) -> None:
        if not username.strip() or not api_http.current_token(token).strip():
            raise errors.ConfigError("the Events API needs a username and a token")
        base = yarl.URL(base_url.rstrip("/"))
        if base.scheme not in ("http", "https") or not base.host:
            raise errors.ConfigError("the Events API base URL must be an http:// or https:// URL")
        self._session = session
        self._base = base
        self._username = username
        self._token = token
        self._timeout = max(0, min(MAX_SERVER_TIMEOUT, timeout))
        self._on_failure = on_failure
        self._on_auth_rejected = on_auth_rejected
        self._token_renewed = False  # the hook read a new token after the last 401/403
        self._state = state
        self._room = room
        self._max_body_bytes = max_body_bytes
        self._backoff = waits.Backoff(backoff_initial, backoff_max)
        self._auth_retry_seconds = auth_retry_seconds
        self._read_margin = read_margin
        self._sleep = sleep
        self._limiter = RequestLimiter(max_requests_per_minute, 60.0, sleep)
        self._process_limiter = process_limiter
        self._token_source = token_source  # where a person puts a new token, for the rejection message

    def __repr__(self) -> str:
        return (
            f"EventsClient(base_url={str(self._base)!r}, username={self._username!r}, "
            f"token={logs.MASK!r}, timeout={self._timeout})"
        )

    def start_url(self, last_event_id: str | None) -> EventsUrl:
        """The URL that reads after `last_event_id` (from "all latest events" when None)."""
        token = api_http.current_token(self._token)
        path = f"/events/{quote(self._username, safe='')}/{quote(token, safe='')}/"
        query: dict[str, str] = {"i": last_event_id} if last_event_id is not None else {}
        query["timeout"] = str(self._timeout)
        base = str(self._base.with_query(None).with_fragment(None)).rstrip("/")
        return EventsUrl(yarl.URL(f"{base}{path}?{urlencode(query)}", encoded=True))

    async def fetch(self, url: EventsUrl) -> Page:
        """The next successful response to `url`, retrying every failure for as long as it takes."""
        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type(errors.ApiError),
            wait=self._wait,
            sleep=self._sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._attempt(url, attempt.retry_state.attempt_number)
        raise AssertionError("tenacity stopped retrying, but it has no stop condition")  # pragma: no cover

    # -- one attempt -----------------------------------------------------------------------------------------

    async def _attempt(self, url: EventsUrl, attempt: int) -> Page:
        await self._limiter.acquire()
        if self._process_limiter is not None:
            await self._process_limiter.acquire()
        try:
            response = await self._get(url)
            page = await self._page(url, response, attempt)
        except errors.ApiError as error:
            await self._failed(url, error, attempt)
            raise
        self._state.poll_succeeded(self._room)
        metrics.LAST_POLL.set(time.time())
        if self._state.token_verdict(False, self._room):
            log.info("events_token_accepted", room=self._username)
        return page

    def _with_current_token(self, url: EventsUrl) -> yarl.URL:
        """`url` with the token segment of its `/events/<user>/<token>/` path set to the current token."""
        requested = url.as_yarl()
        segments = requested.raw_path.split("/")
        if len(segments) < 5 or segments[-4] != "events" or segments[-1] != "":
            return requested  # a nextUrl of another shape names no token to replace
        segments[-2] = quote(api_http.current_token(self._token), safe="")
        return requested.with_path("/".join(segments), encoded=True, keep_query=True)

    async def _get(self, url: EventsUrl) -> api_http.Response:
        read = max(url.server_timeout, self._timeout) + self._read_margin
        timeout = aiohttp.ClientTimeout(
            total=read + CONNECT_TIMEOUT, sock_connect=CONNECT_TIMEOUT, sock_read=read
        )
        started = time.monotonic()
        try:
            return await api_http.request(
                self._session,
                "GET",
                self._with_current_token(url),
                api=API,
                timeout=timeout,
                max_body_bytes=self._max_body_bytes,
            )
        finally:
            metrics.POLL_SECONDS.observe(time.monotonic() - started)

    async def _page(self, url: EventsUrl, response: api_http.Response, attempt: int) -> Page:
        status = response.status
        finite_numbers = False
        if status == 200:
            payload, finite_numbers = api_http.decode_json(response)
            events = payload.get("events") if isinstance(payload, dict) else None
            if not isinstance(events, list):
                raise errors.BadBody(
                    "the body has no events array",
                    status=status,
                    body_excerpt=api_http.excerpt(response.body),
                )
        elif status == 400:
            # The undocumented "waited too long for events" form: a continuation when it names a nextUrl.
            payload = _continuation(response)
            if payload is None:
                raise api_http.error_for_status(response)
            events = []
        else:
            raise api_http.error_for_status(response)
        next_url = await self._accept_next_url(payload, status, attempt)
        fallback = _last_event_id(events) or url.event_id
        return Page(
            events=events,
            next_url=next_url,
            next_event_id=(next_url.event_id if next_url else None) or fallback,
            received_at=dt.datetime.now(dt.UTC),
            request_event_id=url.event_id,
            body=response.body,
            finite_numbers=finite_numbers,
            continuation=status == 400,
        )

    async def _accept_next_url(self, payload: dict[str, Any], status: int, attempt: int) -> EventsUrl | None:
        raw = payload.get("nextUrl")
        if raw is None:
            return None
        resolved = resolve_next_url(self._base, raw)
        if resolved is not None:
            return EventsUrl(resolved)
        shown = logs.mask(raw if isinstance(raw, str) else _shape(raw))[:500]
        log.warning("events_next_url_refused", next_url=shown, reason="not the configured origin")
        await api_http.record_failure(
            self._on_failure,
            errors.ApiFailure(
                api=API,
                operation=OPERATION,
                url=shown,
                error_kind=FOREIGN_NEXT_URL,
                http_status=status,
                attempt=attempt,
            ),
        )
        return None

    # -- failures and waits ----------------------------------------------------------------------------------

    async def _failed(self, url: EventsUrl, error: errors.ApiError, attempt: int) -> None:
        self._state.poll_failed(logs.mask(f"{error.kind}: {error}"), self._room)
        if isinstance(error, errors.AuthRejected):
            self._state.token_verdict(True, self._room)
            log.error(
                "events_token_rejected",
                message=(
                    f"The Events API rejected the token for {self._username!r}. Make a token at {AUTH_PAGE} "
                    f'with the "Events API" scope and put it in {self._token_source}.'
                ),
                status=error.status,
                retry_in_s=self._auth_retry_seconds,
            )
            if self._on_auth_rejected is not None:
                try:
                    self._token_renewed = self._on_auth_rejected()
                except errors.DaemonError as hook_error:  # e.g. an unreadable token file: retry as it is
                    log.warning("events_token_reload_failed", error=str(hook_error))
        else:
            log.warning(
                "events_poll_failed",
                kind=error.kind,
                status=error.status,
                attempt=attempt,
                url=url.masked(),
                error=str(error),
                body=error.body_excerpt,
            )
        failure = api_http.failure_of(error, api=API, operation=OPERATION, url=url.masked(), attempt=attempt)
        await api_http.record_failure(self._on_failure, failure)

    def _wait(self, retry_state: tenacity.RetryCallState) -> float:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        if isinstance(error, errors.AuthRejected):
            renewed, self._token_renewed = self._token_renewed, False
            return self._backoff.initial if renewed else self._auth_retry_seconds
        if isinstance(error, errors.ClientRejected):
            return self._backoff.maximum  # a 4xx will not heal quickly: retry slowly
        return self._backoff(retry_state)


def _continuation(response: api_http.Response) -> dict[str, Any] | None:
    """The 400 form's object when it names a `nextUrl`, else None."""
    try:
        payload, _ = api_http.decode_json(response)
    except errors.BadBody:
        return None
    return payload if isinstance(payload, dict) and isinstance(payload.get("nextUrl"), str) else None


def _shape(value: object) -> str:
    """What a non-string `nextUrl` was, for the log: its type, never its (possibly huge or deep) repr."""
    return f"<{type(value).__name__}>"


def _last_event_id(events: list[Any]) -> str | None:
    for event in reversed(events):
        event_id = event.get("id") if isinstance(event, dict) else None
        if isinstance(event_id, str) and event_id:
            return event_id
    return None
