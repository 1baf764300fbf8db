"""Live latency: from the moment an event becomes available at the API to the moment its row is committed.

The daemon starts against an empty simulator and long-polls. Then a pacer in this process makes events
available at `rate` per second (`EventsSimulator.append`, which stamps each event's `available_at` with the
wall clock at that instant and wakes the waiting long-poll).

Commit times come from PostgreSQL itself: the benchmark database (only it, never the daemon's migrations) gets
a statement-level trigger on `events` that calls `pg_notify` with the ids the statement inserted. PostgreSQL
delivers a notification only when the inserting transaction commits, so the instant a LISTENing connection in
this process receives it is the commit time plus the local delivery delay; the figure can only err on the
slow side. `received_at` is not used: it is when the daemon received the page, before the write. The trigger
costs the daemon's transaction one small extra step, which again counts against it.

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

CHANNEL = "mhc_bench_commit"
# A statement-level trigger with a transition table sees exactly the rows this statement inserted. Ids go in
# notifications of at most 100 (ids are at most 64 characters; NOTIFY's payload limit is 8000 bytes), since a
# daemon that fell behind writes up to 2,000 events in one statement.
_TRIGGER = """
CREATE FUNCTION mhc_bench_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  ids text;
BEGIN
  FOR ids IN
    SELECT string_agg(event_id, ',') FROM (SELECT event_id, row_number() OVER () / 100 AS chunk FROM fresh) t
    GROUP BY chunk
  LOOP
    PERFORM pg_notify('mhc_bench_commit', ids);
  END LOOP;
  RETURN NULL;
END $$;
CREATE TRIGGER mhc_bench_notify AFTER INSERT ON events
  REFERENCING NEW TABLE AS fresh FOR EACH STATEMENT EXECUTE FUNCTION mhc_bench_notify();
"""


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
    committed: dict[str, float] = {}

    def on_commit(_connection: object, _pid: int, _channel: str, payload: object) -> None:
        now = time.time()
        for event_id in str(payload).split(","):
            committed.setdefault(event_id, now)

    listener = await asyncpg.connect(database_url)
    try:
        await listener.execute(_TRIGGER)
        await listener.add_listener(CHANNEL, on_commit)
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
        (committed[event_id] - at) * 1000
        for event_id, at in available.items()
        if at is not None and event_id in committed
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
