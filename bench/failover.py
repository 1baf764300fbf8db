"""Failover between hosts: how long a room goes without a commit when its daemon dies, or stops on purpose.

Two daemons (separate processes, each its own host id) share `rooms` live rooms with the default 20 s lease.
`kill -9` one: its rooms wait for their leases to run out, then the other takes them. Figure: from the kill to
the first commit by the new holder, per room (the slowest is the one that counts). Then a third joins, takes
its share, and the second is stopped with SIGTERM: its units finish their in-flight writes and release
their leases. Figure: from SIGTERM to the first commit by a new holder.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from bench import harness
from daemon.simulator import events as simulator_events
from daemon.simulator import traffic
from tests.daemon_process import DaemonProcess

RATE = 10.0  # events a second in every room: a commit every ~100 ms shows the takeover promptly


@dataclass(frozen=True)
class Failover:
    rooms: int
    killed_rooms: int
    kill_first_s: float
    kill_last_s: float
    handed_rooms: int
    graceful_first_s: float
    graceful_last_s: float


async def measure(databases: harness.Databases, work: Path, *, rooms: int) -> Failover:
    database_url = await databases.fresh()
    names = [f"room_{index:02d}" for index in range(rooms)]
    start_ms = int(time.time() * 1000)
    served = [
        simulator_events.EventsSimulator(
            username=name,
            token=f"{name}-token-0123456789",
            events=traffic.generate(int(RATE * 600), seed=index, broadcaster=name, start_ms=start_ms),
            rate=RATE,
        )
        for index, name in enumerate(names)
    ]
    tokens = work / "failover-tokens"
    listener = await asyncpg.connect(database_url)
    try:
        committed = await harness.commit_times(listener)
        await harness.rooms_table(listener, served, tokens)
        async with simulator_events.RoomsSimulator(served, ssl_context=harness.server_tls()) as server:

            def env(host: str) -> dict[str, str]:
                data = work / f"failover-{host}"
                return harness.rooms_env(database_url, server.base_url, data, tokens, MHC_HOST_ID=host)

            async with (
                harness.daemon(env("bench-a"), work / "failover-a.log") as first,
                harness.daemon(env("bench-b"), work / "failover-b.log") as second,
            ):
                await _until_shared(listener, {"bench-a", "bench-b"}, rooms, (first, second))
                killed = await _rooms_of(listener, "bench-a")
                killed_at = time.time()
                await first.kill()
                kill = await _first_commits(listener, committed, killed, "bench-b", killed_at)
                async with harness.daemon(env("bench-c"), work / "failover-c.log") as third:
                    await _until_shared(listener, {"bench-b", "bench-c"}, rooms, (second, third))
                    handed = await _rooms_of(listener, "bench-b")
                    stopped_at = time.time()
                    second.process.terminate()
                    graceful = await _first_commits(listener, committed, handed, "bench-c", stopped_at)
    finally:
        await listener.close()
    return Failover(
        rooms=rooms,
        killed_rooms=len(killed),
        kill_first_s=min(kill),
        kill_last_s=max(kill),
        handed_rooms=len(handed),
        graceful_first_s=min(graceful),
        graceful_last_s=max(graceful),
    )


async def _holders(connection: asyncpg.Connection) -> dict[str, str]:
    rows = await connection.fetch(
        "SELECT broadcaster, holder FROM ingest_cursor WHERE holder IS NOT NULL AND lease_expires_at > now()"
    )
    return {row["broadcaster"]: row["holder"].partition(":")[0] for row in rows}


async def _rooms_of(connection: asyncpg.Connection, host: str) -> set[str]:
    return {room for room, holder in (await _holders(connection)).items() if holder == host}


async def _until_shared(
    connection: asyncpg.Connection, hosts: set[str], rooms: int, children: tuple[DaemonProcess, ...]
) -> None:
    """Until every room is held, by `hosts` only, evenly (within one)."""
    deadline = time.monotonic() + 120
    while True:
        held = await _holders(connection)
        counts = [sum(1 for holder in held.values() if holder == host) for host in hosts]
        if len(held) == rooms and set(held.values()) <= hosts and max(counts) - min(counts) <= 1:
            return
        for child in children:
            if child.process.returncode is not None:
                raise RuntimeError(f"a daemon exited:\n{child.log_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"rooms not shared by {sorted(hosts)} within 120 s: {held}")
        await asyncio.sleep(0.1)


async def _first_commits(
    connection: asyncpg.Connection, committed: dict[str, float], rooms: set[str], taker: str, since: float
) -> list[float]:
    """Seconds from `since` to the first commit of each of `rooms` after `taker` took its lease."""
    taken: dict[str, float] = {}
    first: dict[str, float] = {}
    deadline = time.monotonic() + 120
    while len(first) < len(rooms):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(rooms) - len(first)} rooms not resumed by {taker} within 120 s")
        now = time.time()
        for room, holder in (await _holders(connection)).items():
            if room in rooms and holder == taker:
                taken.setdefault(room, now)
        for room, at in taken.items():
            if room not in first:
                after = [
                    heard for key, heard in committed.items() if key.startswith(f"{room}/") and heard >= at
                ]
                if after:
                    first[room] = min(after) - since
        await asyncio.sleep(0.05)
    return list(first.values())
