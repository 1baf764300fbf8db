"""A fake Statbate Plus API: member info, batch member info and model info, with seeded data and faults.

Shapes follow the saved OpenAPI document: `{"data": ..., "meta": ...}` envelopes, batch items with `error` and
a nullable `did`, 404 `{"error": "Model not found"}`. What the document leaves open is decided here, and said:
an unknown member is a 404 `{"error": "Member not found"}` on the single endpoint; a missing or wrong bearer
token is a 401 `{"message": "Unauthenticated."}`; a renamed member keeps its did, and its old name still
resolves to it (answered under the new name), which is how a lookup discovers a rename.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from daemon.simulator import http_faults

SITES = ("chaturbate", "stripchat", "bongacams", "camsoda", "mfc")
MAX_BATCH = 100
MEMBER_DATE_KEYS = ("first_message_date", "first_tip_date", "last_tip_date")


def member_record(name: str, did: int, rng: random.Random) -> dict[str, Any]:
    """A plausible member info item for `name`."""
    tipped = rng.sample(["alice_cam", "bella", "cora_x", "dina", "eve_live", "fay"], k=rng.randint(0, 3))
    messaged = rng.sample(
        ["alice_cam", "bella", "cora_x", "dina", "eve_live", "fay", "gia"], k=rng.randint(0, 4)
    )
    return {
        "name": name,
        "did": did,
        "first_message_date": f"2023-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}T12:00:00+00:00",
        "first_tip_date": f"2024-0{rng.randint(1, 9)}-0{rng.randint(1, 9)}T18:30:00+00:00",
        "last_tip_date": f"2025-0{rng.randint(1, 7)}-1{rng.randint(0, 9)}T21:15:00+00:00",
        "last_tip_amount": rng.choice([1, 5, 10, 25, 50, 100, 500]),
        "models_messaged_2weeks": len(messaged),
        "models_messaged_2weeks_list": messaged,
        "models_tipped_2weeks": len(tipped),
        "models_tipped_2weeks_list": tipped,
        "per_day_tokens": [
            {"date": f"2025-08-{day:02d}", "tokens": rng.randint(0, 300)} for day in (14, 15, 16)
        ],
        "all_time_tokens": rng.randint(0, 200_000),
    }


def model_record(name: str, rid: int, rng: random.Random) -> dict[str, Any]:
    count = rng.randint(5, 60)
    total = count * rng.randint(60, 300)
    tokens = rng.randint(1_000, 500_000)
    return {
        "name": name,
        "rid": rid,
        "gender": rng.randint(0, 3),
        "rank": rng.randint(1, 20_000),
        "sessions": {"count": count, "total_duration": total, "average_duration": total // count},
        "income": {"tokens": tokens, "usd": round(tokens * 0.05, 2)},
        "tags": [{"name": "bigcock", "category": "body"}, {"name": "muscle", "category": "body"}],
    }


class StatbateSimulator:
    """The fake server. Use as `async with StatbateSimulator(token=...) as sim:` and point a client at
    `sim.base_url`. `faults` queues failures, `recorder` holds every request."""

    def __init__(
        self,
        *,
        token: str = "sim-statbate-token",  # noqa: S107  # the fake server's own test token
        seed: int = 0,
        auto_members: bool = False,
        clock: Callable[[], float] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.token = token
        self.rng = random.Random(seed)
        # The demo's viewers are invented by the traffic generator: with auto_members every asked name exists
        # (seeded figures) unless it is listed in `unknown`.
        self.auto_members = auto_members
        self.unknown: set[str] = set()
        self.members: dict[str, dict[str, Any]] = {}  # current name → item
        self.old_names: dict[str, str] = {}  # old name → current name
        self.models: dict[str, dict[str, Any]] = {}
        self.faults = http_faults.FaultQueue()
        self.recorder = http_faults.Recorder(clock)
        self._host, self._port = host, port
        self._next_did, self._next_rid = 100_001, 5_001
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    # --- data ---

    def add_member(self, name: str, **fields: Any) -> dict[str, Any]:
        """A member with seeded figures (any field can be given); returns the stored item."""
        name = name.lower()
        did = fields.pop("did", None) or self._next_did
        self._next_did = max(self._next_did, did) + 1
        record = member_record(name, did, self.rng)
        record.update(fields)
        self.members[name] = record
        return record

    def add_model(self, name: str, **fields: Any) -> dict[str, Any]:
        name = name.lower()
        rid = fields.pop("rid", None) or self._next_rid
        self._next_rid = max(self._next_rid, rid) + 1
        record = model_record(name, rid, self.rng)
        record.update(fields)
        self.models[name] = record
        return record

    def rename(self, old: str, new: str) -> None:
        """The member (or model) `old` is now called `new`: same did/rid, new name."""
        old, new = old.lower(), new.lower()
        for table in (self.members, self.models):
            if old in table:
                record = table.pop(old)
                record["name"] = new
                table[new] = record
        self.old_names[old] = new
        for earlier, current in list(self.old_names.items()):
            if current == old:
                self.old_names[earlier] = new

    def member(self, name: str) -> dict[str, Any] | None:
        name = name.lower()
        found = self.members.get(self.old_names.get(name, name))
        if found is None and self.auto_members and name not in self.unknown:
            found = self.add_member(name)
        return found

    def model(self, name: str) -> dict[str, Any] | None:
        name = name.lower()
        found = self.models.get(self.old_names.get(name, name))
        if found is None and self.auto_members and name not in self.unknown:
            found = self.add_model(name)
        return found

    # --- HTTP ---

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/members/{site}/{name}/info", self._member_info)
        app.router.add_post("/api/members/{site}/info/batch", self._member_batch)
        app.router.add_get("/api/model/{site}/{name}/info", self._model_info)
        return app

    async def __aenter__(self) -> StatbateSimulator:
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://{self._host}:{port}/api"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _gate(
        self, request: web.Request, names: tuple[str, ...], answer: Any
    ) -> web.StreamResponse | None:
        """Record the request; answer it with a queued fault or an auth failure, else None (serve it)."""
        fault = self.faults.take(request.path)
        self.recorder.record(request, names, fault)
        if fault is not None:
            return await http_faults.apply(fault, request, self._closing, answer)
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return http_faults.json_response(401, {"message": "Unauthenticated."})
        if request.match_info["site"] not in SITES:
            return http_faults.json_response(422, {"error": "The selected site is invalid."})
        return None

    def _meta(self, request: web.Request) -> dict[str, Any]:
        return {"site": request.match_info["site"], "timezone": request.query.get("timezone", "UTC")}

    async def _member_info(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"].lower()
        record = self.member(name)
        envelope = {"data": record, "meta": self._meta(request)}
        failed = await self._gate(request, (name,), envelope)
        if failed is not None:
            return failed
        if record is None:
            return http_faults.json_response(404, {"error": "Member not found"})
        return http_faults.json_response(200, envelope)

    async def _member_batch(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            body = None
        names = body.get("names") if isinstance(body, dict) else None
        asked = tuple(str(name).lower() for name in names) if isinstance(names, list) else ()
        items = [self._batch_item(name) for name in asked]
        found = sum(1 for item in items if item["error"] is None)
        meta = {**self._meta(request), "found": found, "requested": len(asked)}
        envelope = {"data": items, "meta": meta}
        failed = await self._gate(request, asked, envelope)
        if failed is not None:
            return failed
        if not isinstance(names, list) or not names:
            return http_faults.json_response(422, {"error": "names array is required"})
        if len(names) > MAX_BATCH:
            return http_faults.json_response(422, {"error": f"at most {MAX_BATCH} names per request"})
        return http_faults.json_response(200, envelope)

    def _batch_item(self, name: str) -> dict[str, Any]:
        record = self.member(name)
        if record is not None:
            return {**record, "error": None}
        empty: dict[str, Any] = {key: None for key in MEMBER_DATE_KEYS}
        return {"name": name, "did": None, **empty, "error": "Member not found"}

    async def _model_info(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"].lower()
        record = self.model(name)
        meta = {**self._meta(request), "range": ["2025-07-17 00:00:00", "2025-08-16 23:59:59"]}
        envelope = {"data": record, "meta": meta}
        failed = await self._gate(request, (name,), envelope)
        if failed is not None:
            return failed
        if record is None:
            return http_faults.json_response(404, {"error": "Model not found"})
        return http_faults.json_response(200, envelope)


@contextlib.asynccontextmanager
async def running(**options: Any) -> AsyncIterator[StatbateSimulator]:
    """`async with statbate.running(seed=1) as sim:` — the simulator, started on a free port."""
    async with StatbateSimulator(**options) as simulator:
        yield simulator
