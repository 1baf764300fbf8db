"""`mhc-daemon run` as a real child process: SIGKILL at random moments, SIGTERM mid-backlog, systemd notify.

The simulator runs in this process on 127.0.0.1; the daemon writes into a fresh test database.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import random
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from daemon import ingest
from daemon.simulator import events, traffic
from tests.daemon_process import BROADCASTER, TOKEN, daemon_env, running_daemon, wait_for_count

pytestmark = pytest.mark.slow

COUNT_EVENTS = "SELECT count(*) FROM events"


def _expected_interaction_ids(generated: list[dict[str, object]]) -> set[str]:
    batch = ingest.parse_page(
        generated, broadcaster=BROADCASTER, received_at=dt.datetime.now(dt.UTC), next_event_id=None
    )
    assert not batch.quarantined
    return {row.event_id for row in batch.interactions}


@pytest.fixture
async def connection(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    opened: asyncpg.Connection = await asyncpg.connect(database_url)
    try:
        yield opened
    finally:
        await opened.close()


async def test_sigkill_at_random_moments_loses_and_doubles_nothing(
    database_url: str, connection: asyncpg.Connection, tmp_path: Path
) -> None:
    generated = traffic.generate(20_000, seed=11, broadcaster=BROADCASTER, shows=3)
    ids = {str(event["id"]) for event in generated}
    chooser = random.Random(20_000)
    log_path = tmp_path / "daemon.log"
    async with events.EventsSimulator(
        username=BROADCASTER, token=TOKEN, events=generated, page_size=20
    ) as sim:
        env = daemon_env(database_url=database_url, events_base_url=sim.base_url, data_dir=tmp_path / "data")
        kills = 0
        while kills < 15:
            before = int(await connection.fetchval(COUNT_EVENTS))
            if before == len(ids):
                break
            async with running_daemon(env, log_path) as child:
                # Kill only once this run has committed something, at a random instant after that: mid-drain,
                # often mid-transaction.
                await wait_for_count(connection, COUNT_EVENTS, at_least=before + 1, within=60, process=child)
                await asyncio.sleep(chooser.uniform(0.0, 0.2))
                await child.kill()
                kills += 1
        assert kills >= 10, (
            f"the backlog drained after {kills} kills; the test needs at least 10 mid-drain kills"
        )
        log_path.rename(tmp_path / "killed-runs.log")
        async with running_daemon(env, log_path) as child:
            await child.wait_for_log("polling_started")
            await wait_for_count(connection, COUNT_EVENTS, at_least=len(ids), within=120, process=child)
            child.signal(signal.SIGTERM)
            assert await child.wait(within=30) == 0

    stored = [row["event_id"] for row in await connection.fetch("SELECT event_id FROM events")]
    assert len(stored) == len(ids) and set(stored) == ids
    linked = [
        row["e"] for row in await connection.fetch("SELECT metadata->>'event_id' AS e FROM interactions")
    ]
    assert len(linked) == len(set(linked)), "an interaction was written twice"
    assert set(linked) == _expected_interaction_ids(generated)
    sessions = await connection.fetch("SELECT status FROM stream_sessions ORDER BY started_at")
    assert [row["status"] for row in sessions] == ["ENDED"] * 3
    print(f"\n{kills} SIGKILLs: {len(stored)} events, {len(linked)} interactions, 0 duplicates")
    logs = log_path.read_text(encoding="utf-8") + (tmp_path / "killed-runs.log").read_text(encoding="utf-8")
    assert TOKEN not in logs
    dump = await connection.fetchval(
        "SELECT concat_ws(' ', (SELECT string_agg(t::text, ' ') FROM api_failures t),"
        " (SELECT string_agg(t::text, ' ') FROM ingest_cursor t))"
    )
    assert TOKEN not in (dump or "")


async def test_sigterm_mid_backlog_commits_the_last_batch_and_saves_the_cursor(
    database_url: str, connection: asyncpg.Connection, tmp_path: Path
) -> None:
    generated = traffic.generate(20_000, seed=5, broadcaster=BROADCASTER)
    async with events.EventsSimulator(
        username=BROADCASTER, token=TOKEN, events=generated, page_size=100
    ) as sim:
        env = daemon_env(
            database_url=database_url,
            events_base_url=sim.base_url,
            data_dir=tmp_path / "data",
            MHC_SHUTDOWN_TIMEOUT="5",
        )
        async with running_daemon(env, tmp_path / "daemon.log") as child:
            await wait_for_count(connection, COUNT_EVENTS, at_least=500, within=60, process=child)
            loop = asyncio.get_running_loop()
            sent = loop.time()
            child.signal(signal.SIGTERM)
            assert await child.wait(within=5 + 3) == 0
            took = loop.time() - sent
        stored = int(await connection.fetchval(COUNT_EVENTS))
        assert stored < len(generated), "the backlog must still be draining when SIGTERM arrives"
    assert stored % 100 == 0, "pages are committed whole"
    cursor = await connection.fetchval(
        "SELECT last_event_id FROM ingest_cursor WHERE broadcaster = $1", BROADCASTER
    )
    stored_ids = [row["event_id"] for row in await connection.fetch("SELECT event_id FROM events")]
    newest = max(stored_ids, key=lambda event_id: tuple(int(part) for part in event_id.split("-")))
    assert cursor == newest, "the cursor is the last committed event"
    lines = [json.loads(line) for line in (tmp_path / "daemon.log").read_text().splitlines() if line.strip()]
    assert any(line["event"] == "stopped" for line in lines)
    print(f"\nSIGTERM after {stored} events: exit 0 in {took:.2f} s, cursor {cursor}")


def _notify_socket(path: Path) -> socket.socket:
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.setblocking(False)
    return receiver


async def _messages(receiver: socket.socket, seconds: float) -> list[tuple[float, str]]:
    """Every datagram received within `seconds`, with its arrival time."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    found: list[tuple[float, str]] = []
    while (left := end - loop.time()) > 0:
        try:
            data = await asyncio.wait_for(loop.sock_recv(receiver, 4096), timeout=left)
        except TimeoutError:
            break
        found.extend((loop.time(), line) for line in data.decode().splitlines())
    return found


async def test_systemd_ready_then_watchdog_pings_that_stop_when_polling_hangs(
    database_url: str, connection: asyncpg.Connection, tmp_path: Path
) -> None:
    generated = traffic.generate(300, seed=3, broadcaster=BROADCASTER)
    receiver = _notify_socket(tmp_path / "notify.sock")
    try:
        async with events.EventsSimulator(
            username=BROADCASTER, token=TOKEN, events=generated, hang_seconds=120
        ) as sim:
            env = daemon_env(
                database_url=database_url,
                events_base_url=sim.base_url,
                data_dir=tmp_path / "data",
                NOTIFY_SOCKET=str(tmp_path / "notify.sock"),
                WATCHDOG_USEC="2000000",  # pings every second
            )
            async with running_daemon(env, tmp_path / "daemon.log") as child:
                healthy = await _messages(receiver, 6.0)
                texts = [text for _, text in healthy]
                assert "READY=1" in texts, texts
                assert sim.request_count >= 1
                ready_at = next(at for at, text in healthy if text == "READY=1")
                pings = [at for at, text in healthy if text == "WATCHDOG=1" and at > ready_at]
                assert len(pings) >= 3, texts

                # Every request from now on hangs: the poll loop makes no progress, so the pings must stop
                # once one long-poll (1 s) plus the stall margin (10 s) has passed without progress.
                sim.schedule(*[events.Fault.hang() for _ in range(10)])
                hung = await _messages(receiver, 16.0)
                hung_pings = [at for at, text in hung if text == "WATCHDOG=1"]
                quiet = [later - earlier for earlier, later in itertools.pairwise(hung_pings)]
                last = hung[-1][0] if hung else 0.0
                longest_gap = max([*quiet, last - (hung_pings[-1] if hung_pings else 0.0)])
                assert longest_gap >= 4.0, f"pings kept coming while the poll hung: {hung_pings}"
                assert any(text.startswith("STATUS=") for _, text in hung)
                child.signal(signal.SIGTERM)
                assert await child.wait(within=15) == 0
        after_sigterm = [text for _, text in await _messages(receiver, 0.5)]
        assert "STOPPING=1" in after_sigterm, after_sigterm
    finally:
        receiver.close()


async def test_run_without_a_token_is_a_config_error(tmp_path: Path, database_url: str) -> None:
    env = daemon_env(
        database_url=database_url, events_base_url="http://127.0.0.1:9", data_dir=tmp_path / "data"
    )
    del env["MHC_CB_EVENTS_TOKEN"]
    async with running_daemon(env, tmp_path / "daemon.log") as child:
        assert await child.wait(within=30) == 78
    text = child.log_text()
    assert "MHC_CB_EVENTS_TOKEN must be set" in text and "Traceback" not in text
