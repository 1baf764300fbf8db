"""The chaos suite (`make chaos`): the real daemon process, a PostgreSQL that really stops, the simulator.

Each scenario ends with an exact check of the database against what the ingest rules make of the traffic
that was served, and prints its counts (visible with `pytest -s`). Excluded from `make test` (marker `chaos`).
"""

from __future__ import annotations

import asyncio
import random
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from daemon import migrations
from daemon.simulator import events as simulator
from daemon.simulator import traffic
from tests import chaos_support as chaos
from tests.daemon_process import BROADCASTER, TOKEN, daemon_env, running_daemon, wait_for_count
from tests.stoppable_postgres import StoppablePostgres, stoppable_postgres

pytestmark = pytest.mark.chaos

COUNT_EVENTS = "SELECT count(*) FROM events"


@pytest.fixture(scope="module")
def postgres() -> Iterator[StoppablePostgres]:
    # Not under pytest's tmp dirs: pytest may close their modes to 0700, which the server's own user needs.
    with (
        tempfile.TemporaryDirectory(prefix="mhc-chaos-pg-") as directory,
        stoppable_postgres(Path(directory) / "server") as server,
    ):
        yield server


async def _migrated_database(postgres: StoppablePostgres) -> str:
    url = await postgres.create_database()
    connection = await asyncpg.connect(url)
    try:
        await migrations.migrate(connection)
    finally:
        await connection.close()
    return url


async def _stop_cleanly(daemon: Any) -> None:
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait(within=60) == 0, daemon.log_text()[-3000:]


# -- kill -9 while draining a backlog ------------------------------------------------------------------------


@pytest.mark.timeout(900)
async def test_kill_9_at_20_random_moments_while_draining_100k_events(
    postgres: StoppablePostgres, tmp_path: Path
) -> None:
    total = 100_000
    served = traffic.generate(total, seed=61, shows=4)
    expected = chaos.expected_contents(served)
    url = await _migrated_database(postgres)
    rng = random.Random(6)  # reproducible kill moments
    thresholds = sorted(rng.sample(range(1_000, total - 5_000), 20))  # the last kills still mid-drain
    log_path = tmp_path / "daemon.log"
    connection = await asyncpg.connect(url)
    try:
        async with simulator.EventsSimulator(username=BROADCASTER, token=TOKEN, events=served) as sim:
            env = daemon_env(
                database_url=url,
                events_base_url=sim.base_url,
                data_dir=tmp_path / "data",
                MHC_LOG_LEVEL="info",
            )
            runs = 0
            for threshold in thresholds:
                async with running_daemon(env, log_path) as daemon:
                    runs += 1
                    await chaos.wait_for_log_event(daemon, "polling_started", count=runs)
                    # Mid-drain: at the threshold, and at least one commit into this run.
                    started_with = int(await connection.fetchval(COUNT_EVENTS))
                    target = min(max(threshold, started_with + 1), total)
                    await wait_for_count(
                        connection, COUNT_EVENTS, at_least=target, within=300, process=daemon
                    )
                    # A random instant after it: mid-fetch, mid-transaction or between the two.
                    await asyncio.sleep(rng.uniform(0.0, 0.25))
                    await daemon.kill()
                print(f"[kill -9] killed with {await connection.fetchval(COUNT_EVENTS)} events stored")
            async with running_daemon(env, log_path) as daemon:
                await wait_for_count(connection, COUNT_EVENTS, at_least=total, within=300, process=daemon)
                await chaos.wait_for_log_event(daemon, "polling_started", count=runs + 1)
                await _stop_cleanly(daemon)
            cursor = await connection.fetchval("SELECT last_event_id FROM ingest_cursor")
    finally:
        await connection.close()
    assert cursor == served[-1]["id"]
    chaos.assert_exactly(await chaos.stored_contents(url), expected, "kill -9 x20, 100k backlog")
