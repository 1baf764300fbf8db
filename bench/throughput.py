"""End-to-end throughput, and the limit: the same rows written with COPY.

End to end: the simulator serves a backlog (the realistic mix of all 12 methods, pages of 100) and the real
daemon, a child process, drains it. The run starts at the simulator's first recorded request and ends when the
committed cursor names the last event (polled every 20 ms, so the figure errs on the slow side).

The limit: every row the daemon stored (persons, watchlist members, stream sessions, events, interactions,
quarantined items, the cursor) is read back, then written with asyncpg's `copy_records_to_table` into a fresh
database of the same schema on the same server, in one transaction, timed from the first COPY to the commit.
No HTTP, no JSON, no Python per row beyond what asyncpg's COPY encoder does: what this schema and this server
can take at best. The ratio end-to-end / limit is the headline figure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from bench import harness

# Parents before children, so foreign keys hold at every step.
COPY_TABLES = (
    "persons",
    "watchlist_members",
    "stream_sessions",
    "events",
    "interactions",
    "quarantined_events",
    "ingest_cursor",
)


@dataclass(frozen=True)
class EndToEnd:
    events: int
    seconds: float
    requests: int
    daemon_cpu_seconds: float  # from its start to the last commit, so start-up is in it
    postgres_cpu_seconds: float | None  # the whole server over the same span (embedded server only)
    bench_cpu_seconds: float  # this process: the simulator serving pages, and the cursor polling
    database_url: str

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds


@dataclass(frozen=True)
class Limit:
    events: int
    rows: dict[str, int]
    seconds: float

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds


async def end_to_end(
    databases: harness.Databases, backlog: list[dict[str, Any]], work: Path, *, profile: Path | None = None
) -> EndToEnd:
    """Drain `backlog` through the daemon; with `profile`, under py-spy (a slower run, not a figure)."""
    database_url = await databases.fresh()
    async with harness.simulator(backlog) as sim:
        env = harness.daemon_env(database_url, sim.base_url, work / "throughput-data")
        connection = await asyncpg.connect(database_url)
        try:
            postgres_before = harness.postgres_cpu_seconds(databases.server)
            bench_before = time.process_time()
            async with _daemon(env, work / "throughput.log", profile) as child:
                last = await harness.wait_for_cursor(connection, backlog[-1]["id"], child, within=1800)
                cpu = harness.cpu_seconds(child.process.pid)
                bench_cpu = time.process_time() - bench_before
                postgres_after = harness.postgres_cpu_seconds(databases.server)
            stored = int(await connection.fetchval("SELECT count(*) FROM events"))
        finally:
            await connection.close()
        first = sim.requests[0].at
        requests = sim.request_count
    if stored != len(backlog):
        raise RuntimeError(f"the daemon stored {stored} events of {len(backlog)}")
    postgres_cpu = (
        postgres_after - postgres_before
        if postgres_after is not None and postgres_before is not None
        else None
    )
    return EndToEnd(len(backlog), last - first, requests, cpu, postgres_cpu, bench_cpu, database_url)


def _daemon(env: dict[str, str], log_path: Path, profile: Path | None) -> Any:
    if profile is None:
        return harness.daemon(env, log_path)
    return harness.profiled_daemon(env, log_path, profile)


async def limit(databases: harness.Databases, source_url: str) -> Limit:
    """COPY the rows the daemon stored in `source_url` into a fresh database, in one timed transaction."""
    source = await asyncpg.connect(source_url)
    try:
        tables: dict[str, tuple[list[str], list[asyncpg.Record]]] = {}
        for table in COPY_TABLES:
            records = await source.fetch(f"SELECT * FROM {table}")  # noqa: S608  # a fixed table name
            if records:
                tables[table] = (list(records[0].keys()), records)
    finally:
        await source.close()
    target = await asyncpg.connect(await databases.fresh())
    try:
        started = time.perf_counter()
        async with target.transaction():
            for table, (columns, records) in tables.items():
                await target.copy_records_to_table(
                    table, records=[tuple(r) for r in records], columns=columns
                )
        seconds = time.perf_counter() - started
    finally:
        await target.close()
    rows = {table: len(records) for table, (_, records) in tables.items()}
    return Limit(rows.get("events", 0), rows, seconds)
