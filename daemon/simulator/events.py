"""A local Events API: `GET /events/{username}/{token}/?i=<id>&timeout=<s>`, served like the real one.

It serves a list of envelopes either all at once (a backlog) or paced at R events per second, waits up to
`timeout` seconds when nothing is new, answers with `nextUrl` pointing after the last event returned, and
injects faults on request, deterministically: an explicit schedule for the next requests, or seeded
probabilities. Every request is recorded (path and query, status, fault) so tests can prove what was, and was
not, asked for. A `RawEvent` in the stream is served as its own JSON text, for events no encoder here writes.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import random
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlencode

from aiohttp import web

from daemon.simulator import http_faults, traffic

SERVER_ERROR_STATUSES = (500, 502, 503, 504)
CLOUDFLARE_STATUSES = (520, 521, 522, 523, 524)
DEFAULT_TIMEOUT = 10  # the API's documented default when a request names none
MAX_TIMEOUT = 90
FOREIGN_BASE = "https://evil.invalid"  # .invalid never resolves: nothing can be contacted by mistake

_CLOUDFLARE_PAGE = (
    "<!DOCTYPE html><html><head><title>{status}: Cloudflare error</title></head>"
    "<body><h1>Error {status}</h1><p>The origin web server did not answer as expected.</p>"
    "<p>Cloudflare Ray ID: 8f00000000000000</p></body></html>"
)


class RawEvent(dict[str, Any]):
    """An envelope served as exactly `text`: JSON the standard library will not write (nesting past its
    recursion limit, an integer over Python's 4,300 digits). As a dict it holds only the id that places it."""

    def __init__(self, event_id: str, text: str) -> None:
        super().__init__(id=event_id)
        self.text = text


@dataclass(frozen=True)
class Fault:
    """One injected fault, for one request. Build them with the class methods."""

    kind: str
    status: int | None = None
    retry_after: str | None = None
    next_url: Any = None
    body: str = ""
    content_type: str = "application/json"
    back: int = 3
    skip_ms: int = 0
    malformed_kinds: tuple[str, ...] = traffic.MALFORMED_KINDS

    @classmethod
    def server_error(cls, status: int = 503) -> Fault:
        return cls("server_error", status=status)

    @classmethod
    def cloudflare(cls, status: int = 522) -> Fault:
        """A Cloudflare 52x with its HTML page."""
        return cls("cloudflare", status=status)

    @classmethod
    def http_status(cls, status: int) -> Fault:
        """Any other status with a small JSON error body (e.g. 404)."""
        return cls("status", status=status)

    @classmethod
    def raw(cls, status: int, body: str, content_type: str = "application/json") -> Fault:
        """Exactly this status and body (for bodies no other fault produces)."""
        return cls("raw", status=status, body=body, content_type=content_type)

    @classmethod
    def rate_limited(cls, retry_after: str | None = "1") -> Fault:
        """HTTP 429; `retry_after` is the header's raw value, None to leave the header out."""
        return cls("rate_limited", status=429, retry_after=retry_after)

    @classmethod
    def auth_rejected(cls, status: int | None = None) -> Fault:
        """401 (or the simulator's `auth_status`) even for the right token."""
        return cls("auth_rejected", status=status)

    @classmethod
    def hang(cls) -> Fault:
        """Accept the request and never answer (until `hang_seconds` or shutdown)."""
        return cls("hang")

    @classmethod
    def drop(cls) -> Fault:
        """Close the connection without any response.

        aiohttp retries an idempotent request once, transparently, when its connection drops: schedule two
        drops in a row for an aiohttp client to see one failure.
        """
        return cls("drop")

    @classmethod
    def truncated(cls) -> Fault:
        """A 200 whose JSON body is cut in half (Content-Length matches the cut body)."""
        return cls("truncated", status=200)

    @classmethod
    def malformed(cls, *kinds: str) -> Fault:
        """Malformed envelopes mixed into the page, one per kind (never last: the cursor stays valid)."""
        return cls("malformed", malformed_kinds=kinds or traffic.MALFORMED_KINDS)

    @classmethod
    def foreign_next_url(cls) -> Fault:
        return cls("foreign_next_url")

    @classmethod
    def null_next_url(cls) -> Fault:
        return cls("null_next_url")

    @classmethod
    def missing_next_url(cls) -> Fault:
        return cls("missing_next_url")

    @classmethod
    def relative_next_url(cls) -> Fault:
        """A `nextUrl` without scheme and host (a path and query only)."""
        return cls("relative_next_url")

    @classmethod
    def redeliver(cls, back: int = 3) -> Fault:
        """A page whose `nextUrl` points `back` events behind its last one, so those come again."""
        return cls("redeliver", back=back)

    @classmethod
    def custom_next_url(cls, value: Any) -> Fault:
        """A page whose `nextUrl` is exactly `value` (any JSON value)."""
        return cls("next_url", next_url=value)

    @classmethod
    def hostile(cls, kind: str) -> Fault:
        """One of `http_faults.HOSTILE`: a nesting or gzip bomb, a body over the cap, invalid UTF-8, an
        unknown encoding, truncated or malformed HTTP, a redirect to itself."""
        if kind not in http_faults.HOSTILE:
            raise ValueError(f"unknown hostile answer {kind!r}; one of {http_faults.HOSTILE}")
        return cls(kind)

    @classmethod
    def jump(cls, minutes: float, *, status: int = 400) -> Fault:
        """An empty continuation (the 400 form, or a 200 with no events) whose `nextUrl` resumes `minutes`
        past the position asked for: the events in between are never delivered (a given-up position)."""
        return cls("jump", status=status, skip_ms=int(minutes * 60_000))

    @classmethod
    def empty_400(cls) -> Fault:
        """The undocumented HTTP 400 "waited too long for events" form, with no events, for this request."""
        return cls("empty_400", status=400)


@dataclass(frozen=True)
class FaultRates:
    """Probability of each fault per request, drawn from the simulator's seeded generator."""

    server_error: float = 0.0
    cloudflare: float = 0.0
    rate_limited: float = 0.0
    hang: float = 0.0
    drop: float = 0.0
    truncated: float = 0.0
    malformed: float = 0.0
    foreign_next_url: float = 0.0
    null_next_url: float = 0.0
    redeliver: float = 0.0


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the simulator saw it. `status` is None when no response was sent (drop, hang)."""

    path_qs: str
    host: str
    event_id: str | None
    timeout: int
    status: int | None
    fault: str | None
    at: float  # wall clock


@dataclass
class _Entry:
    event: dict[str, Any]
    key: tuple[int, int, int]  # (ms, seq, n): n > 0 for id-less envelopes following the event (ms, seq)
    cursor: str | None  # the id a nextUrl names after this entry
    available_at: float  # monotonic
    available_wall: float


@dataclass
class EventsSimulator:
    """The Events API on 127.0.0.1. Use as `async with EventsSimulator(...) as sim:` and poll `sim.base_url`.

    `events` form the backlog: available at once, or paced at `rate` events per second from `start()`.
    `append()` adds more at run time. Wrong username or token gives `auth_status` (401 or 403). `empty_status`
    400 answers an empty wait with the 400 continuation form instead of 200.
    """

    username: str = traffic.DEFAULT_BROADCASTER
    token: str = "simulatortoken0123456789"  # noqa: S105  # a made-up token for a local fake
    events: Iterable[dict[str, Any]] = ()
    rate: float | None = None
    page_size: int = 100
    seed: int = 0
    rates: FaultRates = field(default_factory=FaultRates)
    auth_status: int = 401
    # Tokens still accepted besides `token` (the real API's grace while a rotated-out token is revoked).
    retired_tokens: set[str] = field(default_factory=set)
    empty_status: int = 200
    # An API whose position runs with its clock: an empty answer's `nextUrl` lies as far past the position
    # asked for as the time since that position was handed out (retries in between included). Whether the
    # real API does this is undocumented; gap detection must take it for idling. Only for a backlog that is
    # available at once: with paced events the moved position could pass events not yet available.
    advance_idle: bool = False
    hang_seconds: float = 300.0
    foreign_base: str = FOREIGN_BASE
    host: str = "127.0.0.1"
    port: int = 0
    ssl_context: ssl.SSLContext | None = None  # serve HTTPS, as the real API does

    def __post_init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.waiting = 0  # requests parked in a long-poll wait right now
        self.injected: list[dict[str, Any]] = []  # malformed envelopes added by the `malformed` fault
        self._entries: list[_Entry] = []
        self._keys: list[tuple[int, int, int]] = []
        self._schedule: list[Fault] = []
        self._random = random.Random(self.seed)
        self._changed = asyncio.Condition()
        self._closing = asyncio.Event()
        self._issued: dict[str, float] = {}  # position -> when a nextUrl first named it (advance_idle)
        self._runner: web.AppRunner | None = None
        self.base_url = ""
        self._initial = list(self.events)

    # -- lifecycle -------------------------------------------------------------------------------------------

    def _open(self) -> None:
        """Make the backlog available (at once, or from now on at `rate`) and accept requests."""
        self._closing.clear()
        now, wall = time.monotonic(), time.time()
        for index, event in enumerate(self._initial):
            offset = index / self.rate if self.rate else 0.0
            self._add(event, now + offset, wall + offset)
        self._initial = []

    async def start(self) -> None:
        self._open()
        self._runner = web.AppRunner(self.make_app(), handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context)
        await site.start()
        address = self._runner.addresses[0]
        self.port = int(address[1])
        self.base_url = f"{'https' if self.ssl_context else 'http'}://{self.host}:{self.port}"

    async def stop(self) -> None:
        self._closing.set()  # releases hanging handlers so shutdown does not wait for them
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> EventsSimulator:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/events/{username}/{token}/", self._handle)
        return app

    # -- control ---------------------------------------------------------------------------------------------

    @property
    def events_url(self) -> str:
        """The first URL a client would load (it holds the token)."""
        return f"{self.base_url}/events/{quote(self.username, safe='')}/{quote(self.token, safe='')}/"

    def schedule(self, *faults: Fault) -> None:
        """The next requests get these faults, one each, in order (before any drawn by probability)."""
        self._schedule.extend(faults)

    async def append(self, events: Iterable[dict[str, Any]]) -> None:
        """Make more events available now, waking any waiting long-poll."""
        now, wall = time.monotonic(), time.time()
        for event in events:
            last = self._entries[-1].available_at if self._entries else now
            self._add(event, max(now, last), wall)
        async with self._changed:
            self._changed.notify_all()

    @property
    def request_count(self) -> int:
        return len(self.requests)

    @property
    def total_events(self) -> int:
        return len(self._entries)

    def available_at(self, event_id: str) -> float | None:
        """Wall-clock time at which the event with this id became available (for latency measurements)."""
        key = traffic.event_key(event_id)
        if key is None:
            return None
        index = bisect.bisect_left(self._keys, (*key, 0))
        if index < len(self._entries) and self._entries[index].key == (*key, 0):
            return self._entries[index].available_wall
        return None

    # -- storage ---------------------------------------------------------------------------------------------

    def _add(self, event: dict[str, Any], available_at: float, wall: float) -> None:
        parsed = traffic.event_key(event.get("id"))
        previous = self._entries[-1] if self._entries else None
        if parsed is not None:
            key = (*parsed, 0)
            cursor: str | None = event["id"]
        else:
            # An envelope without a usable id rides behind the event before it.
            base = previous.key if previous else (0, 0, 0)
            key = (base[0], base[1], base[2] + 1)
            cursor = previous.cursor if previous else None
        if previous is not None and key <= previous.key:
            raise ValueError(f"event ids must increase: {event.get('id')!r} after {previous.cursor!r}")
        self._entries.append(_Entry(event, key, cursor, available_at, wall))
        self._keys.append(key)

    def _available_count(self, now: float) -> int:
        # available_at never decreases along the list, so this is a prefix.
        low, high = 0, len(self._entries)
        while low < high:
            middle = (low + high) // 2
            if self._entries[middle].available_at <= now:
                low = middle + 1
            else:
                high = middle
        return low

    def _first_after(self, cursor: str | None) -> int | None:
        if cursor is None:
            return 0
        key = traffic.event_key(cursor)
        if key is None:
            return None
        return bisect.bisect_right(self._keys, (key[0], key[1], 1 << 62))

    def _page(self, start: int, available: int) -> list[_Entry]:
        end = min(start + self.page_size, available)
        # Id-less envelopes stay with the event they follow, so a nextUrl never skips them.
        while end < available and self._entries[end].key[2] > 0:
            end += 1
        return self._entries[start:end]

    # -- HTTP ------------------------------------------------------------------------------------------------

    def _next_fault(self) -> Fault | None:
        if self._schedule:
            return self._schedule.pop(0)
        rates = self.rates
        draw = self._random.random()
        for name in (
            "server_error",
            "cloudflare",
            "rate_limited",
            "hang",
            "drop",
            "truncated",
            "malformed",
            "foreign_next_url",
            "null_next_url",
            "redeliver",
        ):
            probability: float = getattr(rates, name)
            if draw < probability:
                return self._drawn_fault(name)
            draw -= probability
        return None

    def _drawn_fault(self, name: str) -> Fault:
        if name == "server_error":
            return Fault.server_error(self._random.choice(SERVER_ERROR_STATUSES))
        if name == "cloudflare":
            return Fault.cloudflare(self._random.choice(CLOUDFLARE_STATUSES))
        if name == "rate_limited":
            return Fault.rate_limited("1")
        factory = getattr(Fault, name)
        fault: Fault = factory()
        return fault

    def _next_url(self, cursor: str | None, timeout: int) -> str:
        if cursor is not None and self.advance_idle:
            self._issued.setdefault(cursor, time.monotonic())
        query = {"i": cursor, "timeout": str(timeout)} if cursor else {"timeout": str(timeout)}
        return f"{self.events_url}?{urlencode(query)}"

    def _record(self, request: web.Request, status: int | None, fault: Fault | None) -> None:
        self.requests.append(
            RecordedRequest(
                path_qs=request.path_qs,
                host=request.host,
                event_id=request.query.get("i"),
                timeout=_timeout_of(request),
                status=status,
                fault=fault.kind if fault else None,
                at=time.time(),
            )
        )

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        token = request.match_info["token"]
        if request.match_info["username"] != self.username or (
            token != self.token and token not in self.retired_tokens
        ):
            self._record(request, self.auth_status, None)
            return _json({"status": "unauthorized"}, self.auth_status)
        fault = self._next_fault()
        early = await self._early_fault(request, fault)
        if early is not None:
            return early
        cursor = request.query.get("i")
        start = self._first_after(cursor)
        if start is None:
            self._record(request, 400, fault)
            return _json({"status": "invalid i"}, 400)
        timeout = _timeout_of(request)
        asked_at = time.monotonic()
        page = await self._wait_for_page(start, timeout)
        last_cursor = page[-1].cursor if page else cursor
        if not page and self.advance_idle and cursor is not None:
            last_cursor = self._advanced(cursor, asked_at)
        body: dict[str, Any] = {
            "events": [entry.event for entry in page],
            "nextUrl": self._next_url(last_cursor, timeout),
        }
        status = 400 if not page and self.empty_status == 400 else 200
        if status == 400:
            body["status"] = "waited too long for events"
        if fault is not None:
            self._apply_page_fault(fault, body, last_cursor, start + len(page) - 1, timeout)
        self._record(request, status, fault)
        if fault is not None and fault.kind == "truncated":
            encoded = _encode(body).encode()
            return web.Response(body=encoded[: len(encoded) // 2], content_type="application/json")
        return _json(body, status)

    async def _early_fault(self, request: web.Request, fault: Fault | None) -> web.StreamResponse | None:
        """Faults that answer before any page is built; None when the request proceeds."""
        if fault is None:
            return None
        if fault.kind == "drop":
            self._record(request, None, fault)
            if request.transport is not None:
                request.transport.abort()
            # Nothing may be written now; cancelling the handler makes aiohttp drop it silently.
            raise asyncio.CancelledError
        if fault.kind == "hang":
            self._record(request, None, fault)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.hang_seconds)
            raise asyncio.CancelledError
        if fault.kind == "empty_400":
            self._record(request, 400, fault)
            cursor = request.query.get("i")
            body = {
                "status": "waited too long for events",
                "nextUrl": self._next_url(cursor, _timeout_of(request)),
            }
            return _json({**body, "events": []}, 400)
        if fault.kind == "jump":
            return self._jump(request, fault)
        if fault.kind in http_faults.HOSTILE:
            self._record(request, {"redirect_loop": 302, "malformed_http": None}.get(fault.kind, 200), fault)
            return await http_faults.hostile(fault.kind, request)
        if fault.kind == "raw":
            self._record(request, fault.status, fault)
            return web.Response(status=fault.status or 200, text=fault.body, content_type=fault.content_type)
        if fault.kind in ("server_error", "cloudflare", "status", "rate_limited", "auth_rejected"):
            status = fault.status or self.auth_status
            self._record(request, status, fault)
            if fault.kind == "cloudflare":
                page = _CLOUDFLARE_PAGE.format(status=status)
                return web.Response(status=status, text=page, content_type="text/html")
            headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
            return _json({"status": f"simulated {status}"}, status, headers)
        return None

    def _advanced(self, cursor: str, asked_at: float) -> str:
        """`cursor` moved on by the time since it was handed out (since `asked_at` if it never was)."""
        key = traffic.event_key(cursor)
        if key is None:
            return cursor
        moved = int((time.monotonic() - self._issued.get(cursor, asked_at)) * 1000)
        return f"{key[0] + moved}-0" if moved > 0 else cursor

    def _jump(self, request: web.Request, fault: Fault) -> web.Response:
        """The `jump` fault's answer: nothing delivered, the position `fault.skip_ms` past the one asked for
        (the asked-for id's time plus the skip; from the first event's time when none was asked for)."""
        status = fault.status or 400
        self._record(request, status, fault)
        key = traffic.event_key(request.query.get("i"))
        base = key[0] if key else (self._entries[0].key[0] if self._entries else 0)
        body: dict[str, Any] = {
            "events": [],
            "nextUrl": self._next_url(f"{base + fault.skip_ms}-0", _timeout_of(request)),
        }
        if status == 400:
            body["status"] = "waited too long for events"
        return _json(body, status)

    async def _wait_for_page(self, start: int, wait_seconds: int) -> list[_Entry]:
        deadline = time.monotonic() + wait_seconds
        while True:
            now = time.monotonic()
            available = self._available_count(now)
            if start < available or now >= deadline:
                return self._page(start, available)
            wake = deadline
            if available < len(self._entries):
                wake = min(wake, self._entries[available].available_at)
            async with self._changed:
                self.waiting += 1
                try:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), max(0.0, wake - now))
                finally:
                    self.waiting -= 1
            if self._closing.is_set():
                return self._page(start, self._available_count(time.monotonic()))

    def _apply_page_fault(
        self, fault: Fault, body: dict[str, Any], last_cursor: str | None, last_index: int, timeout: int
    ) -> None:
        if fault.kind == "foreign_next_url":
            path = self._next_url(last_cursor, timeout).removeprefix(self.base_url)
            body["nextUrl"] = self.foreign_base + path
        elif fault.kind == "null_next_url":
            body["nextUrl"] = None
        elif fault.kind == "missing_next_url":
            del body["nextUrl"]
        elif fault.kind == "relative_next_url":
            body["nextUrl"] = body["nextUrl"].removeprefix(self.base_url)
        elif fault.kind == "next_url":
            body["nextUrl"] = fault.next_url
        elif fault.kind == "redeliver":
            back = last_index - fault.back
            body["nextUrl"] = self._next_url(self._entries[back].cursor if back >= 0 else None, timeout)
        elif fault.kind == "malformed":
            events: list[dict[str, Any]] = body["events"]
            anchor = traffic.event_key(last_cursor) or (0, 0)
            for kind in fault.malformed_kinds:
                # A high sequence number keeps the injected id apart from every real one.
                event_id = f"{anchor[0]}-{900_000 + len(self.injected)}"
                bad = traffic.malformed_event(kind, event_id=event_id, broadcaster=self.username)
                self.injected.append(bad)
                events.insert(max(0, len(events) - 1), bad)


def _timeout_of(request: web.Request) -> int:
    raw = request.query.get("timeout")
    try:
        value = int(raw) if raw is not None else DEFAULT_TIMEOUT
    except ValueError:
        value = DEFAULT_TIMEOUT
    return max(0, min(MAX_TIMEOUT, value))


def _encode(body: dict[str, Any]) -> str:
    """`body` as JSON text, each `RawEvent` in its events written as its own text."""
    events = body.get("events")
    if not isinstance(events, list) or not any(isinstance(event, RawEvent) for event in events):
        return json.dumps(body)
    items = [event.text if isinstance(event, RawEvent) else json.dumps(event) for event in events]
    rest = [f"{json.dumps(key)}: {json.dumps(value)}" for key, value in body.items() if key != "events"]
    return "{" + ", ".join([f'"events": [{", ".join(items)}]', *rest]) + "}"


def _json(body: dict[str, Any], status: int, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, text=_encode(body), content_type="application/json", headers=headers or {}
    )


@dataclass
class RoomsSimulator:
    """Many rooms' Events API on one server, as the real API serves every room from one host: each room is an
    `EventsSimulator` of its own (its token, backlog or rate, faults and request log), reached by its path.
    Rooms may be added while it runs. Use as `async with RoomsSimulator(rooms) as sim:`."""

    rooms: list[EventsSimulator] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 0
    ssl_context: ssl.SSLContext | None = None

    def __post_init__(self) -> None:
        self.by_name = {room.username: room for room in self.rooms}
        self.base_url = ""
        self._runner: web.AppRunner | None = None

    def add(self, room: EventsSimulator) -> EventsSimulator:
        """Serve `room` too (from now on, when the server runs)."""
        self.by_name[room.username] = room
        if self._runner is not None:
            room.base_url = self.base_url
            room._open()
        return room

    @property
    def request_count(self) -> int:
        return sum(room.request_count for room in self.by_name.values())

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        room = self.by_name.get(request.match_info["username"])
        if room is None:
            return _json({"status": "unauthorized"}, 401)
        return await room._handle(request)

    async def __aenter__(self) -> RoomsSimulator:
        app = web.Application()
        app.router.add_get("/events/{username}/{token}/", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context).start()
        self.port = int(self._runner.addresses[0][1])
        self.base_url = f"{'https' if self.ssl_context else 'http'}://{self.host}:{self.port}"
        for room in self.by_name.values():
            room.base_url = self.base_url
            room._open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for room in self.by_name.values():
            room._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def create_app(simulator: EventsSimulator) -> web.Application:
    """The aiohttp application of `simulator` (for running it under another runner)."""
    return simulator.make_app()
