"""A fake Chaturbate Stats API: `GET /statsapi/?username=&token=` answering one flat JSON object.

The fields are the documented ones; `time_online` is -1 while the broadcaster is offline and `last_broadcast`
is -1 until the first broadcast, as the documentation says. Undocumented behaviour decided here: a wrong token
is a 401 and an unknown username a 404. Figures move a little on every answer (token balance, viewers) so
consecutive snapshots differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from daemon.simulator import http_faults


class StatsSimulator:
    """`async with StatsSimulator(username=..., token=...) as sim:`; the client's URL is `sim.base_url`.
    `rooms` serves more broadcasters (username → their token), with the same figures."""

    def __init__(
        self,
        *,
        username: str = "hudson_cage",
        token: str = "simstatstoken0123456789a",  # noqa: S107  # the fake server's own test token
        seed: int = 0,
        online: bool = True,
        ever_broadcast: bool = True,
        clock: Callable[[], float] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        rooms: dict[str, str] | None = None,
    ) -> None:
        self.username = username.lower()
        self.token = token
        self.rooms = {name.lower(): value for name, value in (rooms or {}).items()}
        self.rng = random.Random(seed)
        self.online = online
        self.ever_broadcast = ever_broadcast
        self.account: dict[str, Any] = {
            "token_balance": self.rng.randint(0, 5_000),
            "tips_in_last_hour": self.rng.randint(0, 30),
            "votes_up": self.rng.randint(100, 2_000),
            "votes_down": self.rng.randint(0, 100),
            "num_followers": self.rng.randint(100, 50_000),
            "time_online": self.rng.randint(1, 240),
            "num_viewers": self.rng.randint(10, 900),
        }
        self.faults = http_faults.FaultQueue()
        self.recorder = http_faults.Recorder(clock)
        self._host, self._port = host, port
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    def snapshot(self, username: str | None = None) -> dict[str, Any]:
        """The answer for `username` (default: the first) now; the figures move on."""
        account = self.account
        account["token_balance"] += self.rng.randint(0, 200)
        account["num_viewers"] = max(0, account["num_viewers"] + self.rng.randint(-20, 20))
        up, down = account["votes_up"], account["votes_down"]
        registered = account["num_viewers"] * 3 // 4
        return {
            "username": username or self.username,
            "token_balance": account["token_balance"],
            "tips_in_last_hour": account["tips_in_last_hour"] if self.online else 0,
            "votes_down": down,
            "votes_up": up,
            "satisfaction_score": round(100 * up / max(1, up + down)),
            "last_broadcast": "2025-08-16T20:00:00.000000" if self.ever_broadcast else -1,
            "time_online": account["time_online"] if self.online else -1,
            "num_followers": account["num_followers"],
            "num_viewers": account["num_viewers"] if self.online else 0,
            "num_registered_viewers": registered if self.online else 0,
            "num_tokened_viewers": registered // 3 if self.online else 0,
        }

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/statsapi/", self._stats)
        return app

    async def __aenter__(self) -> StatsSimulator:
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://{self._host}:{port}/statsapi/"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _stats(self, request: web.Request) -> web.StreamResponse:
        username = request.query.get("username", "").lower()
        fault = self.faults.take(request.path)
        self.recorder.record(request, (username,), fault)
        if fault is not None:
            return await http_faults.apply(fault, request, self._closing, self.snapshot())
        token = request.query.get("token")
        tokens = {**self.rooms, self.username: self.token}  # `token` may be rotated by a test
        if token not in tokens.values() or tokens.get(username, token) != token:
            return http_faults.json_response(401, {"error": "invalid token"})
        if username not in tokens:
            return http_faults.json_response(404, {"error": "unknown username"})
        return http_faults.json_response(200, self.snapshot(username))


@contextlib.asynccontextmanager
async def running(**options: Any) -> AsyncIterator[StatsSimulator]:
    """`async with stats.running(username="hudson_cage") as sim:` — started on a free port."""
    async with StatsSimulator(**options) as simulator:
        yield simulator
