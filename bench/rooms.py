"""Rooms per process: one daemon polling many rooms, most of them idle, a few live.

`rooms` rooms are rows of `rooms` with a token file each; `active` of them get events paced at `rate` per
second each, the rest hold an idle long-poll open the whole time (the production timeout, 30 s). Figures:
event → commit latency over the live rooms (commit times from PostgreSQL's own notifications,
`harness.commit_times`), the daemon's peak RSS, and its CPU time per event stored, to compare with the
single-room drain's.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from bench import harness
from daemon.simulator import events as simulator_events
from daemon.simulator import traffic
from tests.daemon_process import DaemonProcess

IDLE_TIMEOUT = 30  # the production long-poll


@dataclass(frozen=True)
class Rooms:
    rooms: int
    active: int
    rate: float  # events per second per active room
    events: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    missing: int
    peak_rss_mb: float
    cpu_seconds: float  # the daemon's, while the events were paced and committed
    seconds: float  # how long that took
    bench_cpu_seconds: float  # this process's over the same span: the simulator serving every room

    @property
    def cpu_ms_per_event(self) -> float:
        return self.cpu_seconds * 1000 / max(1, self.events)


async def many(
    databases: harness.Databases, work: Path, *, rooms: int, active: int, rate: float, seconds: float
) -> Rooms:
    database_url = await databases.fresh()
    names = [f"room_{index:03d}" for index in range(rooms)]
    served = [
        simulator_events.EventsSimulator(username=name, token=f"{name}-token-0123456789", page_size=100)
        for name in names
    ]
    live = served[:active]
    per_room = max(1, int(rate * seconds))
    start_ms = int(time.time() * 1000)
    streams = {
        room.username: traffic.generate(per_room, seed=index, broadcaster=room.username, start_ms=start_ms)
        for index, room in enumerate(live)
    }
    tokens = work / "room-tokens"
    listener = await asyncpg.connect(database_url)
    try:
        committed = await harness.commit_times(listener)
        await harness.rooms_table(listener, served, tokens)
        async with simulator_events.RoomsSimulator(served, ssl_context=harness.server_tls()) as server:
            env = harness.rooms_env(
                database_url,
                server.base_url,
                work / "rooms-data",
                tokens,
                MHC_CB_EVENTS_TIMEOUT=str(IDLE_TIMEOUT),
            )
            async with harness.daemon(env, work / "rooms.log") as child:
                await _until_all_wait(served, child, within=120)
                cpu_before = harness.cpu_seconds(child.process.pid)
                bench_before, started = time.process_time(), time.monotonic()
                await _pace(live, streams, rate)
                await _until_committed(committed, streams, child, within=60)
                cpu = harness.cpu_seconds(child.process.pid) - cpu_before
                bench_cpu, span = time.process_time() - bench_before, time.monotonic() - started
                _, peak_kib = harness.rss_kib(child.process.pid)
            delays = [
                (committed[f"{name}/{event['id']}"] - at) * 1000
                for room in live
                for name in [room.username]
                for event in streams[name]
                if (at := room.available_at(event["id"])) is not None and f"{name}/{event['id']}" in committed
            ]
    finally:
        await listener.close()
    total = sum(len(stream) for stream in streams.values())
    centiles = statistics.quantiles(delays, n=100, method="inclusive")
    return Rooms(
        rooms=rooms,
        active=active,
        rate=rate,
        events=total,
        p50_ms=statistics.median(delays),
        p99_ms=centiles[98],
        max_ms=max(delays),
        missing=total - len(delays),
        peak_rss_mb=peak_kib * 1024 / 10**6,
        cpu_seconds=cpu,
        seconds=span,
        bench_cpu_seconds=bench_cpu,
    )


async def _until_all_wait(
    served: list[simulator_events.EventsSimulator], child: DaemonProcess, within: float
) -> None:
    """Until every room has a long-poll parked at the simulator: the daemon polls them all."""
    deadline = time.monotonic() + within
    while (waiting := sum(1 for room in served if room.waiting)) < len(served):
        if child.process.returncode is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{waiting} of {len(served)} rooms polled:\n{child.log_text()[-3000:]}")
        await asyncio.sleep(0.05)


async def _pace(
    live: list[simulator_events.EventsSimulator], streams: dict[str, list[dict[str, object]]], rate: float
) -> None:
    """Each live room's stream made available at `rate` per second, each event at its own instant."""
    started = time.monotonic()
    released = dict.fromkeys(streams, 0)
    while any(released[name] < len(stream) for name, stream in streams.items()):
        due_now = int((time.monotonic() - started) * rate) + 1
        for room in live:
            stream = streams[room.username]
            due = min(len(stream), due_now)
            if due > released[room.username]:
                await room.append(stream[released[room.username] : due])
                released[room.username] = due
        await asyncio.sleep(0.002)


async def _until_committed(
    committed: dict[str, float],
    streams: dict[str, list[dict[str, object]]],
    child: DaemonProcess,
    within: float,
) -> None:
    wanted = {f"{name}/{event['id']}" for name, stream in streams.items() for event in stream}
    deadline = time.monotonic() + within
    while not wanted <= committed.keys():
        if child.process.returncode is not None or time.monotonic() > deadline:
            break  # what never committed counts as missing
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # a last notification may trail
