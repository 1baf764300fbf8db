"""Issue 12: several daemons share the rooms through leases in PostgreSQL, under live traffic.

Three daemons (separate processes, each its own host id and data directory) share 30 rooms. One is killed,
one is paused for a minute, one loses its link to PostgreSQL (a TCP proxy of ours stops forwarding), and a
fourth joins. Through all of it, every room's events are stored exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from daemon.simulator import events as simulator
from daemon.simulator import stats, traffic
from tests import chaos_support as chaos
from tests import pgbouncer
from tests.daemon_process import DaemonProcess, daemon_env, run_command, running_daemon
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.chaos

ROOMS = 30
RATE = 4.0  # events a second in every room
SECONDS = 200  # of traffic: the events of every room are available by then
FAILOVER_LIMIT = 30.0  # the bound for a host's death, with the default 20 s lease


def _rooms() -> list[simulator.EventsSimulator]:
    start_ms = int(time.time() * 1000)
    return [
        simulator.EventsSimulator(
            username=(name := f"room_{index:02d}"),
            token=f"token-{name}-0123456789",
            events=traffic.generate(int(RATE * SECONDS), seed=index, broadcaster=name, start_ms=start_ms),
            rate=RATE,
        )
        for index in range(ROOMS)
    ]


async def _held(connection: asyncpg.Connection) -> dict[str, str]:
    """room -> holder, for every room whose lease has not run out."""
    rows = await connection.fetch(
        "SELECT broadcaster, holder FROM ingest_cursor WHERE holder IS NOT NULL AND lease_expires_at > now()"
    )
    return {row["broadcaster"]: row["holder"].partition(":")[0] for row in rows}


async def _counts(connection: asyncpg.Connection) -> Counter[str]:
    rows = await connection.fetch("SELECT broadcaster, count(*) AS n FROM events GROUP BY broadcaster")
    return Counter({row["broadcaster"]: row["n"] for row in rows})


async def _until(check: Callable[[], Awaitable[bool]], within: float, what: str) -> float:
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < within, f"not within {within} s: {what}"
        await asyncio.sleep(0.2)
    return time.monotonic() - started


async def _metric(daemon: DaemonProcess, name: str) -> float:
    base = await chaos.health_url(daemon)
    async with aiohttp.ClientSession() as http, http.get(f"{base}/metrics") as response:
        return chaos.metric_value(await response.text(), name)


async def test_three_daemons_share_thirty_rooms_through_a_kill_a_pause_a_cut_link_and_a_fourth_host(
    tmp_path: Path, database_url: str, connection: asyncpg.Connection
) -> None:
    await _cluster(tmp_path, database_url, connection, database_url)


async def test_the_same_behind_pgbouncer_in_transaction_mode(
    tmp_path: Path, database_url: str, connection: asyncpg.Connection
) -> None:
    """The daemons reach PostgreSQL through PgBouncer (pool_mode = transaction): no session outlives a
    transaction, so the fence, its idle bound and the migrations' lock must each live in one."""
    async with pgbouncer.transaction_pooler(database_url, tmp_path / "pgbouncer") as pooled:
        await _cluster(tmp_path, database_url, connection, pooled)


async def _cluster(
    tmp_path: Path,
    database_url: str,
    connection: asyncpg.Connection,
    daemons_url: str,
) -> None:
    """Three daemons, 30 rooms: kill -9 one, SIGSTOP one for 60 s, cut one's link to the database, add a
    fourth. Then every room's events, each once."""
    served = _rooms()
    tokens = tmp_path / "tokens"
    tokens.mkdir(mode=0o700)
    for room in served:
        (tokens / f"{room.username}.events").write_text(room.token)
    # One room has a Stats API token on every host: the lookups run on the cluster lease's holder alone.
    stats_token = "room-00-stats-token-0123456789"
    (tokens / "room_00.stats").write_text(stats_token)
    async with (
        stats.running(username="nobody_here", rooms={"room_00": stats_token}) as stats_api,
        simulator.RoomsSimulator(served) as server,
        TcpProxy(daemons_url) as proxy,
        contextlib.AsyncExitStack() as daemons,
    ):
        traffic_started = time.monotonic()

        def env(host: str, url: str = daemons_url) -> dict[str, str]:
            values = daemon_env(
                database_url=url,
                events_base_url=server.base_url,
                data_dir=tmp_path / host,
                MHC_TOKENS_DIR=str(tokens),
                MHC_HOST_ID=host,
                MHC_CB_EVENTS_TIMEOUT="5",
                MHC_LOG_LEVEL="info",
                MHC_DATABASE_TRANSACTION_POOLER=str(daemons_url != database_url).lower(),
                MHC_CB_STATS_URL=stats_api.base_url,
            )
            del values["MHC_CB_USERNAME"], values["MHC_CB_EVENTS_TOKEN"]
            return values

        setup = env("setup", database_url)  # direct: a blocking command would stall the proxies of this loop
        for room in served:
            assert run_command(["rooms", "add", room.username], setup, tmp_path).returncode == 0

        async def start(host: str, url: str = daemons_url) -> DaemonProcess:
            return await daemons.enter_async_context(running_daemon(env(host, url), tmp_path / f"{host}.log"))

        a, b = await start("host-a"), await start("host-b")
        await start("host-c", proxy.url(daemons_url))
        took = await _until(
            balanced_between(connection, {"host-a", "host-b", "host-c"}), 90, "30 rooms, 10 on each host"
        )
        print(f"\nstart: 30 rooms shared 10/10/10 within {took:.1f} s")

        # kill -9: the dead host's rooms resume on the others (a new holder commits new events).
        theirs = {room for room, host in (await _held(connection)).items() if host == "host-a"}
        before = await _counts(connection)
        await a.kill()

        async def resumed() -> bool:
            held, counts = await _held(connection), await _counts(connection)
            moved = all(held.get(room) in ("host-b", "host-c") for room in theirs)
            return moved and all(counts[room] > before[room] for room in theirs)

        failover = await _until(resumed, 60, "host-a's rooms resumed elsewhere")
        print(f"kill -9 host-a: its {len(theirs)} rooms committed by a new holder after {failover:.1f} s")
        assert failover <= FAILOVER_LIMIT

        # SIGSTOP for 60 s, caught inside a write transaction: the server ends that transaction (it sits idle
        # holding the rooms' cursor rows), the rooms move, and nothing of it is stored.
        stopped_at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        paused, backend = await _stop_inside_a_write(b, connection, "mhc-daemon host-b")
        try:
            ended = await _until(lambda: _gone(connection, backend), 30, "host-b's open transaction ended")
            print(f"SIGSTOP host-b inside a write transaction: the server rolled it back after {ended:.1f} s")
            await _until(
                lambda: _all_held_by(connection, {"host-c"}), 60, "every room on host-c while host-b sleeps"
            )
            print(f"SIGSTOP host-b: every room on host-c after {time.monotonic() - paused:.1f} s")
            await asyncio.sleep(max(0.0, 60 - (time.monotonic() - paused)))
        finally:
            b.signal(signal.SIGCONT)
        await asyncio.sleep(5)
        fenced = await _metric(b, "mhc_fenced_writes_total")
        lost = await _metric(b, "mhc_leases_lost_total")
        # What host-b was doing when it stopped, a write or taking a lease, failed on the ended session.
        failed = [
            record
            for record in chaos.log_records(b)
            if record.get("event") in ("database_unavailable", "lease_round_failed")
            and record.get("timestamp", "") >= stopped_at
        ]
        print(f"SIGCONT host-b: {len(failed)} failed on the ended session,", end=" ")
        print(f"{fenced:.0f} writes fenced, {lost:.0f} leases given up")
        assert failed or fenced, "the transaction host-b was in when it stopped did not go through"

        # host-c's link to PostgreSQL stops forwarding: its rooms move to host-b.
        await _until(balanced_between(connection, {"host-b", "host-c"}), 90, "15/15 on host-b and host-c")
        await _cut_link_and_add_a_host(connection, proxy, start)
        # Every room, every event, exactly once.
        expected = {room.username: Counter(entry.event["id"] for entry in room._entries) for room in served}

        async def complete() -> bool:
            rows = await connection.fetch("SELECT broadcaster, event_id FROM events")
            stored: dict[str, Counter[str]] = {}
            for row in rows:
                stored.setdefault(row["broadcaster"], Counter())[row["event_id"]] += 1
            return stored == expected

        remaining = SECONDS - (time.monotonic() - traffic_started)
        await _until(complete, max(0.0, remaining) + 60, "every delivered event stored once, in every room")
    quarantined = await connection.fetchval("SELECT count(*) FROM quarantined_events")
    assert quarantined == 0
    # Every host polled (and would have taken a Stats snapshot at start); one cluster lease, one snapshot.
    snapshots = await connection.fetchval("SELECT count(*) FROM snapshots WHERE source = 'cb_stats'")
    leader = await connection.fetchval("SELECT holder FROM cluster_leases WHERE name = 'snapshots'")
    print(f"Stats API snapshots of room_00 over the run: {snapshots} (cluster lease now on {leader})")
    assert snapshots == 1


async def _cut_link_and_add_a_host(
    connection: asyncpg.Connection, proxy: TcpProxy, start: Callable[[str], Awaitable[DaemonProcess]]
) -> None:
    proxy.cut()
    moved = await _until(lambda: _all_held_by(connection, {"host-b"}), 90, "host-c's rooms on host-b")
    print(f"link host-c -> PostgreSQL cut: every room on host-b after {moved:.1f} s")
    proxy.mend()

    # A fourth host joins: the rooms rebalance, a few at a time.
    await start("host-d")
    spread = await _until(
        balanced_between(connection, {"host-b", "host-c", "host-d"}), 120, "10/10/10 on b, c and d"
    )
    print(f"host-d joined: 10/10/10 after {spread:.1f} s")


async def _stop_inside_a_write(
    daemon: DaemonProcess, connection: asyncpg.Connection, application: str
) -> tuple[float, int]:
    """SIGSTOP `daemon` at a moment one of its connections is inside a transaction (between statements):
    try until the stopped process is seen holding one. Returns when it stopped, and that backend's pid."""
    inside = "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND state = 'idle in transaction'"
    busy = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND xact_start IS NOT NULL"
    for _ in range(20_000):
        if await connection.fetchval(busy, application):
            daemon.signal(signal.SIGSTOP)
            stopped = time.monotonic()
            await asyncio.sleep(0.05)  # a statement already sent completes; then the session idles
            if backend := await connection.fetchval(inside, application):
                return stopped, backend
            daemon.signal(signal.SIGCONT)
    raise AssertionError(f"{application} was never caught inside a transaction")


async def _gone(connection: asyncpg.Connection, backend: int) -> bool:
    return not await connection.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", backend)


async def _all_held_by(connection: asyncpg.Connection, hosts: set[str]) -> bool:
    held = await _held(connection)
    return len(held) == ROOMS and set(held.values()) <= hosts


def balanced_between(connection: asyncpg.Connection, hosts: set[str]) -> Callable[[], Awaitable[bool]]:
    """Every room held, by `hosts` only, each about its share (the share rounds up, so one less is fine)."""
    share = -(-ROOMS // len(hosts))

    async def check() -> bool:
        held = Counter((await _held(connection)).values())
        return sum(held.values()) == ROOMS and set(held) <= hosts and all(held[h] >= share - 1 for h in hosts)

    return check
