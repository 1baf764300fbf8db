"""Fault injection and request recording shared by the API simulators.

A test queues faults (`faults.add("http_5xx", times=2)`); each matching request takes one and fails that way
instead of being answered. Every request, failed or not, is recorded with the simulator's clock, so a test can
count requests per (simulated) minute. The hostile answers (`HOSTILE`, see `hostile`) are what a broken or
malicious server could send; the Events simulator serves them too.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import json
import time
import zlib
from collections.abc import Callable
from typing import Any

from aiohttp import web

KINDS = (
    "http_5xx",
    "http_4xx",
    "rate_limited",
    "hang",
    "drop",
    "truncated",
    "unauthorized",
    "forbidden",
    "not_found",
    "absurd_integers",
)
# Answers no well-behaved server sends; each must end as a recorded failure of the client, never a crash.
HOSTILE = (
    "nesting_bomb",
    "gzip_bomb",
    "over_cap",
    "invalid_utf8",
    "unknown_encoding",
    "truncated_http",
    "malformed_http",
    "redirect_loop",
)
HANG_SECONDS = 3600.0
NESTING_BOMB_LEVELS = 100_000  # beyond every JSON decoder's limit (orjson 1,024; the standard library ~1,000)
GZIP_BOMB_MIB = 256  # inflated size; ~260 KB on the wire
OVER_CAP_BYTES = 16 * 1024 * 1024  # well over the clients' default cap (2 MiB), streamed without a length
ABSURD_DIGITS = 400  # within Python's 4,300-digit limit for int(), far beyond any 64-bit column
# Bodies shaped like both APIs' answers ("events" and "data"), so only the hostile part is wrong with them.
_PREFIX = b'{"events": [], "data": '
_BODIES = {
    "nesting_bomb": _PREFIX + b"[" * NESTING_BOMB_LEVELS + b"]" * NESTING_BOMB_LEVELS + b"}",
    "invalid_utf8": _PREFIX + b'{"name": "caf\xe9 \xff\xfe"}}',
    "unknown_encoding": _PREFIX + b'{"name": "not brotli"}}',
}
_GARBAGE = b"HTTP/1.1 2OO 0K\r\n\x00\xff no header here\r\nContent-Length: -7\r\n\r\n"


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str
    status: int | None = None  # for http_5xx (default 503) and http_4xx (default 422)
    retry_after: float | None = None  # for rate_limited
    path_contains: str | None = None  # only requests whose path contains this


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    at: float  # the simulator's clock (seconds)
    method: str
    path: str
    query: dict[str, str]
    names: tuple[str, ...]  # names asked for (one for single lookups, the list for a batch)
    fault: str | None


class FaultQueue:
    def __init__(self) -> None:
        self._queue: collections.deque[Fault] = collections.deque()

    def add(
        self,
        kind: str,
        *,
        times: int = 1,
        status: int | None = None,
        retry_after: float | None = None,
        path_contains: str | None = None,
    ) -> None:
        if kind not in KINDS + HOSTILE:
            raise ValueError(f"unknown fault {kind!r}; one of {KINDS + HOSTILE}")
        for _ in range(times):
            self._queue.append(Fault(kind, status, retry_after, path_contains))

    def clear(self) -> None:
        self._queue.clear()

    def __len__(self) -> int:
        return len(self._queue)

    def take(self, path: str) -> Fault | None:
        for fault in self._queue:
            if fault.path_contains is None or fault.path_contains in path:
                self._queue.remove(fault)
                return fault
        return None


class Recorder:
    """The requests a simulator saw, stamped with its clock."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self.clock = clock or time.monotonic
        self.requests: list[RecordedRequest] = []

    def record(self, request: web.Request, names: tuple[str, ...], fault: Fault | None) -> None:
        self.requests.append(
            RecordedRequest(
                at=self.clock(),
                method=request.method,
                path=request.path,
                query=dict(request.query),
                names=names,
                fault=fault.kind if fault else None,
            )
        )

    def per_minute(self, path_contains: str = "") -> dict[int, int]:
        """Requests per minute of the clock (minute index → count), for rate-limit checks."""
        counts: collections.Counter[int] = collections.Counter()
        for request in self.requests:
            if path_contains in request.path:
                counts[int(request.at // 60)] += 1
        return dict(counts)

    def max_in_any_window(self, seconds: float = 60.0, path_contains: str = "") -> int:
        """The most requests inside any half-open window of `seconds`."""
        times = sorted(r.at for r in self.requests if path_contains in r.path)
        best, start = 0, 0
        for end, moment in enumerate(times):
            while moment - times[start] >= seconds:
                start += 1
            best = max(best, end - start + 1)
        return best


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, text=json.dumps(body), content_type="application/json", headers=headers
    )


async def apply(fault: Fault, request: web.Request, closing: asyncio.Event, body: Any) -> web.StreamResponse:
    """The failing answer for `fault` (`body` is the answer it replaces: cut in half by `truncated`)."""
    if fault.kind in HOSTILE:
        return await hostile(fault.kind, request)
    if fault.kind == "hang":
        # Ends when the client gives up or the simulator closes, so shutdown never waits an hour.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closing.wait(), HANG_SECONDS)
        return json_response(504, {"error": "hung"})
    if fault.kind == "drop":
        # A drop before any byte would be re-sent silently by aiohttp's client for idempotent requests.
        return await hostile("truncated_http", request)
    if fault.kind == "truncated":
        text = json.dumps(body)
        return web.Response(status=200, text=text[: max(1, len(text) // 2)], content_type="application/json")
    if fault.kind == "absurd_integers":
        return json_response(200, _absurd(body))
    if fault.kind == "rate_limited":
        headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else None
        return json_response(429, {"message": "Too Many Attempts."}, headers)
    status = {
        "http_5xx": fault.status or 503,
        "http_4xx": fault.status or 422,
        "unauthorized": 401,
        "forbidden": 403,
        "not_found": 404,
    }[fault.kind]
    body = {401: {"message": "Unauthenticated."}, 403: {"message": "Forbidden"}, 404: {"error": "Not found"}}
    default = {"error": "Server Error"} if status >= 500 else {"error": "The given data was invalid."}
    return json_response(status, body.get(status, default))


async def hostile(kind: str, request: web.Request) -> web.StreamResponse:
    """One of the `HOSTILE` answers to `request`."""
    if kind == "truncated_http":
        # Headers promise a body that never comes: the client sees the connection die mid-answer.
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.content_length = 4096
        await response.prepare(request)
        await response.write(_PREFIX)
        _close(request)
        return response
    if kind == "malformed_http":
        if request.transport is not None:
            request.transport.write(_GARBAGE)
        _close(request)
        raise asyncio.CancelledError  # nothing more may be written; aiohttp drops a cancelled handler quietly
    if kind == "over_cap":
        return await _stream_over_cap(request)
    if kind == "redirect_loop":
        return web.Response(status=302, headers={"Location": str(request.url)})
    headers = {"Content-Type": "application/json"}
    if kind == "gzip_bomb":
        return web.Response(status=200, body=gzip_bomb(), headers={**headers, "Content-Encoding": "gzip"})
    if kind == "unknown_encoding":
        headers["Content-Encoding"] = "br"
    return web.Response(status=200, body=_BODIES[kind], headers=headers)


@functools.cache
def gzip_bomb() -> bytes:
    """A gzip body of ~260 KB that inflates to `GZIP_BOMB_MIB` MiB; built once, a MiB at a time."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [compressor.compress(_PREFIX + b'"')]
    block = b" " * (1024 * 1024)
    parts += [compressor.compress(block) for _ in range(GZIP_BOMB_MIB)]
    parts.append(compressor.flush())
    return b"".join(parts)


async def _stream_over_cap(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    response.enable_chunked_encoding()  # no Content-Length: the client must count
    await response.prepare(request)
    chunk = b" " * (64 * 1024)
    with contextlib.suppress(ConnectionError):  # the client hangs up once it has had enough
        await response.write(_PREFIX + b'"')
        for _ in range(OVER_CAP_BYTES // len(chunk)):
            await response.write(chunk)
        await response.write(b'"}')
    return response


def _close(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()


def _absurd(value: Any) -> Any:
    """`value` with every integer replaced by one of `ABSURD_DIGITS` digits."""
    if isinstance(value, dict):
        return {key: _absurd(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_absurd(item) for item in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return int("9" * ABSURD_DIGITS)
    return value
