"""Memory: the daemon's resident set while it drains a large backlog.

Every 0.25 s this samples the child's `VmRSS` from /proc/<pid>/status together with how far the committed
cursor has got (an index into the backlog). Peak is the kernel's own high-water mark (`VmHWM`), read just
before the daemon is stopped, so no spike between samples is missed. Growth compares the median RSS of the
samples taken around the half-way mark (45 to 55% of the backlog committed) with those near the end (the last
10%): a leak grows with the events processed, a one-off allocation does not.
"""

from __future__ import annotations

import asyncio
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from bench import harness

SAMPLE_SECONDS = 0.25


@dataclass(frozen=True)
class Memory:
    events: int
    peak_mib: float
    half_way_mib: float
    end_mib: float
    samples: list[tuple[int, float]] = field(repr=False)  # (events committed, RSS MiB)

    @property
    def growth(self) -> float:
        return self.end_mib / self.half_way_mib - 1


async def drain(databases: harness.Databases, backlog: list[dict[str, Any]], work: Path) -> Memory:
    position = {event["id"]: index + 1 for index, event in enumerate(backlog)}
    total = len(backlog)
    database_url = await databases.fresh()
    samples: list[tuple[int, float]] = []
    async with harness.simulator(backlog) as sim:
        env = harness.daemon_env(database_url, sim.base_url, work / "memory-data")
        connection = await asyncpg.connect(database_url)
        try:
            async with harness.daemon(env, work / "memory.log") as child:
                pid = child.process.pid
                done = 0
                while done < total:
                    if child.process.returncode is not None:
                        raise RuntimeError(f"daemon exited:\n{child.log_text()[-3000:]}")
                    cursor = await connection.fetchval("SELECT last_event_id FROM ingest_cursor LIMIT 1")
                    done = position.get(cursor, 0)
                    rss, _ = harness.rss_kib(pid)
                    samples.append((done, rss / 1024))
                    await asyncio.sleep(SAMPLE_SECONDS)
                _, peak = harness.rss_kib(pid)
        finally:
            await connection.close()
    half = [rss for done, rss in samples if 0.45 * total <= done <= 0.55 * total]
    end = [rss for done, rss in samples if done >= 0.9 * total]
    return Memory(total, peak / 1024, statistics.median(half), statistics.median(end), samples)
