"""`mhc-daemon demo`: the whole daemon against local simulators and a throw-away embedded PostgreSQL.

Needs no token and no database server: simulated Events, Statbate and Stats APIs on 127.0.0.1 feed the real
supervisor, which writes into an embedded PostgreSQL in a temporary directory. Three rooms are captured: the
single-room settings' room (with the Stats API) and two rooms added as rows with token files, as a studio
would; their event ids coincide, as ids of different rooms may. A live line shows the flow; a short report of
what was stored follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

from pydantic import SecretStr

from daemon import config, database_server, db, migrations, reports, supervisor
from daemon.simulator import events, statbate, stats, traffic

BROADCASTER = "alice_cam"
OTHER_ROOMS = ("bob_cam", "carol_cam")  # rows of `rooms`, with token files
EVENTS_TOKEN = "demo0events0token0000000"  # noqa: S105  # the local simulator's token, not a real one
STATBATE_TOKEN = "demo-statbate-token"  # noqa: S105
STATS_TOKEN = "demo0stats0token00000000"  # noqa: S105
# A little weather, so the report shows that failures are recorded and bad events quarantined.
FAULTS = events.FaultRates(server_error=0.02, rate_limited=0.01, malformed=0.02, redeliver=0.02)
# Halfway through, the API gives up our position once and resumes a minute of the show later (about 85
# events), so the report shows how a hole in the feed is recorded.
JUMP_MINUTES = 1.0

_REPORT_QUERIES = {
    "events by room": "SELECT broadcaster, count(*) FROM events GROUP BY 1 ORDER BY 1",
    "interactions by type": "SELECT type, count(*) FROM interactions GROUP BY type ORDER BY count(*) DESC",
    "stream sessions": "SELECT status, count(*) FROM stream_sessions GROUP BY status ORDER BY status",
    "API failures recorded": (
        "SELECT api || ' ' || error_kind, count(*) FROM api_failures GROUP BY 1 ORDER BY 2 DESC"
    ),
}


async def run(*, duration: float, rate: float, keep: Path | None, out: TextIO = sys.stdout) -> int:
    """Run the demo for `duration` seconds; with `keep`, the embedded database stays in that directory."""
    with contextlib.ExitStack() as cleanup:
        data_dir = keep or Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="mhc-demo-")))
        # Stamped from now, as a live room's events are: with the generator's fixed 2025 start, the session
        # staleness rule rightly ended the demo's show a year after its last event.
        now_ms = int(time.time() * 1000)
        count = int(duration * rate) + 200
        backlog = traffic.generate(count, seed=7, broadcaster=BROADCASTER, start_ms=now_ms, end_live=True)
        events_sim = events.EventsSimulator(
            username=BROADCASTER, token=EVENTS_TOKEN, events=backlog, rate=rate, rates=FAULTS, seed=7
        )
        others = [
            events.EventsSimulator(
                username=name,
                token=f"{EVENTS_TOKEN}{index}",
                events=traffic.generate(count // 2, seed=7, broadcaster=name, start_ms=now_ms, end_live=True),
                rate=rate / 2,
            )
            for index, name in enumerate(OTHER_ROOMS)
        ]
        tokens_dir = data_dir / "tokens"
        tokens_dir.mkdir(mode=0o700, exist_ok=True)
        for room in others:
            (tokens_dir / f"{room.username}.events").write_text(room.token)
        async with (
            events.RoomsSimulator([events_sim, *others]) as rooms_sim,
            statbate.running(token=STATBATE_TOKEN, auto_members=True) as statbate_sim,
            stats.running(username=BROADCASTER, token=STATS_TOKEN) as stats_sim,
        ):
            embedded = config.Settings(data_dir=data_dir)
            async with database_server.open_url(embedded) as url:
                settings = config.Settings(
                    database_url=SecretStr(url),
                    data_dir=data_dir,
                    cb_username=BROADCASTER,
                    cb_events_token=SecretStr(EVENTS_TOKEN),
                    cb_events_base_url=rooms_sim.base_url,
                    tokens_dir=tokens_dir,
                    cb_events_timeout=2,
                    statbate_base_url=statbate_sim.base_url,
                    statbate_token=SecretStr(STATBATE_TOKEN),
                    cb_stats_url=stats_sim.base_url,
                    cb_stats_token=SecretStr(STATS_TOKEN),
                    health_port=0,
                )
                async with db.single_connection(url) as connection:
                    await migrations.migrate(connection)
                async with db.open_pool(url) as pool:
                    for name in OTHER_ROOMS:
                        await db.add_room(pool, name)
                daemon = supervisor.Supervisor(settings, backoff_max=1.0, auth_retry_seconds=5.0)
                print(
                    f"demo: simulated rooms {BROADCASTER} ({rate:g} events/s) and {', '.join(OTHER_ROOMS)}"
                    f" ({rate / 2:g} events/s each, the same event ids), for {duration:g} s",
                    file=out,
                )
                running = asyncio.create_task(daemon.run())
                jump = asyncio.get_running_loop().call_later(
                    duration / 2, events_sim.schedule, events.Fault.jump(JUMP_MINUTES)
                )
                await _show_progress(daemon, running, duration, out)
                jump.cancel()
                daemon.request_stop()
                await running
                async with db.open_pool(url) as pool:
                    await _report(pool, out)
    if keep:
        print(f"demo: the database stays in {keep}/postgres", file=out)
    return 0


async def _show_progress(
    daemon: supervisor.Supervisor, running: asyncio.Task[int], duration: float, out: TextIO
) -> None:
    state = daemon.state
    started = time.monotonic()
    last_count, last_time = 0, started
    end = "\r" if out.isatty() else "\n"
    while (now := time.monotonic()) - started < duration and not running.done():
        await asyncio.sleep(1.0)
        now = time.monotonic()
        rate = (state.events_stored - last_count) / max(now - last_time, 1e-6)
        last_count, last_time = state.events_stored, now
        session = f"LIVE {state.live_session_id[:8]}" if state.live_session_id else "offline"
        print(
            f"  {now - started:5.1f}s  {rate:7.1f} events/s  stored {state.events_stored:6d}  "
            f"duplicates {state.duplicates_skipped:4d}  quarantined {state.quarantined:3d}  "
            f"failures {state.failures:3d}  snapshots {state.snapshots_taken:4d}  session {session}  rooms "
            + " ".join(
                f"{name.split('_')[0]} {room.events_stored}" for name, room in sorted(state.rooms.items())
            ),
            end=end,
            file=out,
            flush=True,
        )
    print(file=out)


async def _report(pool: db.Pool, out: TextIO) -> None:
    totals = [
        f"{await pool.fetchval(f'SELECT count(*) FROM {table}')} {table}"  # noqa: S608  # fixed table names
        for table in ("events", "interactions", "persons", "quarantined_events")
    ]
    print("\nstored:", ", ".join(totals), file=out)
    for title, query in _REPORT_QUERIES.items():
        rows = await pool.fetch(query)
        print(f"\n{title}:", file=out)
        for label, count in rows:
            print(f"  {label:40} {count:7d}", file=out)
    print("\n" + reports.render_snapshot_counts(await db.snapshot_counts(pool)), file=out)
    stats = await reports.room_stats(
        pool, room=None, session_id=None, live=True, include_excluded=False, limit=5
    )
    print("\n" + reports.render_stats(stats), file=out)
    summaries = await db.session_summaries(pool, last=3, include_excluded=False)
    print("\nShow summaries:\n" + reports.render_sessions(summaries, include_excluded=False), file=out)
    print("\nGaps in the feed:\n" + reports.render_gaps(await db.ingest_gaps(pool, limit=10)), file=out)
