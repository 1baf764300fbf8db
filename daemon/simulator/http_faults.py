"""Fault injection and request recording shared by the snapshot API simulators.

A test queues faults (`faults.add("http_5xx", times=2)`); each matching request takes one and fails that way
instead of being answered. Every request, failed or not, is recorded with the simulator's clock, so a test can
count requests per (simulated) minute.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import time
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
)
HANG_SECONDS = 3600.0


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
        if kind not in KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {KINDS}")
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


async def apply(
    fault: Fault, request: web.Request, closing: asyncio.Event, truncate: Any
) -> web.StreamResponse:
    """The failing answer for `fault` (`truncate` is the body whose JSON is cut in half)."""
    if fault.kind == "hang":
        # Ends when the client gives up or the simulator closes, so shutdown never waits an hour.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closing.wait(), HANG_SECONDS)
        return json_response(504, {"error": "hung"})
    if fault.kind == "drop":
        # Headers promise a body that never comes: the client sees the connection die mid-answer (a drop
        # before any byte would be re-sent silently by aiohttp's client for idempotent requests).
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.content_length = 4096
        await response.prepare(request)
        await response.write(b'{"data": ')
        if request.transport is not None:
            request.transport.close()
        return response
    if fault.kind == "truncated":
        text = json.dumps(truncate)
        return web.Response(status=200, text=text[: max(1, len(text) // 2)], content_type="application/json")
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
