"""Live latency: from the moment an event becomes available at the API to the moment its row is committed.

The daemon starts against an empty simulator and long-polls. Then a pacer in this process makes events
available at `rate` per second (`EventsSimulator.append`, which stamps each event's `available_at` with the
wall clock at that instant and wakes the waiting long-poll).

Commit times come from PostgreSQL itself (`harness.commit_times`: a trigger's notifications, delivered at
commit). `received_at` is not used: it is when the daemon received the page, before the write.

Latency = notification time - available_at, per event, both on this machine's wall clock.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from bench import harness
from daemon.simulator import events as simulator_events
from tests import daemon_process


@dataclass(frozen=True)
class Latency:
    events: int
    rate: float
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    missing: int  # paced events whose commit was never observed (should be 0)


async def live(databases: harness.Databases, work: Path, *, rate: float, seconds: float) -> Latency:
    count = max(1, int(rate * seconds))
    stream = harness.backlog(count, seed=7)
    database_url = await databases.fresh()
    listener = await asyncpg.connect(database_url)
    try:
        committed = await harness.commit_times(listener)
        async with harness.simulator([]) as sim:
            env = harness.daemon_env(database_url, sim.base_url, work / "latency-data")
            async with harness.daemon(env, work / "latency.log") as child:
                await _until_polling(sim, child)
                await _pace(sim, stream, rate)
                await harness.wait_for_cursor(listener, stream[-1]["id"], child, within=60)
                await asyncio.sleep(0.2)  # the last notification may trail the cursor read
            available = {event["id"]: sim.available_at(event["id"]) for event in stream}
    finally:
        await listener.close()
    delays = [
        (committed[key] - at) * 1000
        for event_id, at in available.items()
        if at is not None and (key := f"{harness.BROADCASTER}/{event_id}") in committed
    ]
    if not delays:
        raise RuntimeError("no commit was observed")
    centiles = statistics.quantiles(delays, n=100, method="inclusive")
    return Latency(
        events=len(delays),
        rate=rate,
        seconds=seconds,
        p50_ms=statistics.median(delays),
        p99_ms=centiles[98],
        max_ms=max(delays),
        missing=len(stream) - len(delays),
    )


async def _until_polling(sim: simulator_events.EventsSimulator, child: daemon_process.DaemonProcess) -> None:
    """Wait until the daemon has a long-poll parked at the simulator (it is up and waiting for events)."""
    deadline = time.monotonic() + 30
    while sim.waiting == 0:
        if child.process.returncode is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the daemon never polled:\n{child.log_text()[-3000:]}")
        await asyncio.sleep(0.01)


async def _pace(sim: simulator_events.EventsSimulator, stream: list[dict[str, Any]], rate: float) -> None:
    """Make `stream` available at `rate` events per second, each at its own instant (1 ms ticks)."""
    started = time.monotonic()
    released = 0
    while released < len(stream):
        due = min(len(stream), int((time.monotonic() - started) * rate) + 1)
        if due > released:
            await sim.append(stream[released:due])
            released = due
        await asyncio.sleep(0.001)
