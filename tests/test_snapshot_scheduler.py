"""The snapshot scheduler against a real PostgreSQL and the simulators, on injected clocks.

Simulated time moves only when the scheduler waits, so schedules and rate limits are checked exactly without
any wall-clock timing. The wall clock follows it, plus any jumps a test sets.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import math
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import pytest

from daemon import config, db, errors, logs, metrics, reports, runtime_state, snapshot_metrics, snapshots
from daemon.simulator import statbate as statbate_sim
from daemon.simulator import stats as stats_sim

T0 = dt.datetime(2025, 8, 16, 20, 0, 0)
STATBATE_TOKEN = "9|schedulerStatbateSecret0123456789abcdefghijklmnop"
STATS_TOKEN = "SchedStatsSecret87654321"
BROADCASTER = "hudson_cage"


Jumps = tuple[tuple[dt.timedelta, dt.timedelta], ...]  # (after this much time, set the wall clock by this)


class FakeTime:
    """Simulated time from `start` to `end`: every wait advances it, and reaching `end` sets the stop event.

    `monotonic` starts at an arbitrary origin; the naive-UTC wall clock (`now`) is `start` plus the time
    passed plus every jump whose moment has come, as when an operator or NTP sets the clock.
    """

    def __init__(self, start: dt.datetime, end: dt.datetime, stop: asyncio.Event, jumps: Jumps = ()) -> None:
        self.start, self.stop, self.jumps = start, stop, jumps
        self.length = (end - start).total_seconds()
        self.elapsed = 0.0

    def monotonic(self) -> float:
        return 86_400.0 + self.elapsed

    def wall(self, elapsed: float) -> dt.datetime:
        shift = sum((by for at, by in self.jumps if at.total_seconds() <= elapsed), dt.timedelta())
        return self.start + dt.timedelta(seconds=elapsed) + shift

    def now(self) -> dt.datetime:
        return self.wall(self.elapsed)

    def seconds(self) -> float:
        """The time the simulators stamp requests with: seconds since T0, which no wall-clock jump moves."""
        return (self.start - T0).total_seconds() + self.elapsed

    async def sleep(self, seconds: float) -> None:
        # On a grid of 1/1024 s every sum and difference of these times is exact in binary floating point, so
        # a deadline is met exactly (a jittered retry wait is rounded up onto the grid).
        self.elapsed += math.ceil(max(0.0, seconds) * 1024) / 1024
        if self.elapsed >= self.length:
            self.stop.set()
        await asyncio.sleep(0)


@dataclass
class World:
    pool: asyncpg.Pool
    session: aiohttp.ClientSession
    statbate: statbate_sim.StatbateSimulator
    stats: stats_sim.StatsSimulator
    clock: list[FakeTime]
    log: io.StringIO

    def settings(self, **overrides: Any) -> config.Settings:
        values: dict[str, Any] = {
            "cb_username": BROADCASTER,
            "statbate_token": STATBATE_TOKEN,
            "cb_stats_token": STATS_TOKEN,
            "statbate_base_url": self.statbate.base_url,
            "cb_stats_url": self.stats.base_url,
            "statbate_requests_per_minute": 2,
            "member_snapshot_ttl_hours": 24,
        }
        values.update(overrides)
        return config.Settings(**values)

    async def run(
        self, start: dt.datetime, end: dt.datetime, jumps: Jumps = (), **overrides: Any
    ) -> runtime_state.RuntimeState:
        stop = asyncio.Event()
        time = FakeTime(start, end, stop, jumps)
        self.clock[:] = [time]
        state = runtime_state.RuntimeState()

        async def record(failure: errors.ApiFailure) -> None:
            await db.record_api_failure(self.pool, failure)

        await asyncio.wait_for(
            snapshots.run_scheduler(
                pool=self.pool,
                session=self.session,
                settings=self.settings(**overrides),
                state=state,
                stop=stop,
                on_failure=record,
                clock=time.now,
                monotonic=time.monotonic,
                sleep=time.sleep,
                jitter=lambda: 0.0,
                request_timeout=0.3,
            ),
            timeout=60,
        )
        return state


@pytest.fixture
async def world(pool: asyncpg.Pool) -> AsyncIterator[World]:
    clock: list[FakeTime] = []

    def seconds() -> float:
        return clock[0].seconds() if clock else 0.0

    stream = io.StringIO()
    logs.configure("debug", "json", stream=stream)
    async with (
        aiohttp.ClientSession() as session,
        statbate_sim.running(token=STATBATE_TOKEN, seed=7, clock=seconds) as statbate,
        stats_sim.running(username=BROADCASTER, token=STATS_TOKEN, seed=7, clock=seconds) as stats,
    ):
        yield World(pool, session, statbate, stats, clock, stream)


async def seen(pool: asyncpg.Pool, name: str, kind: str, at: dt.datetime = T0) -> uuid.UUID:
    person = await db.find_or_create_person(pool, name, seen_at=at)
    metadata = {"tokens": 25} if kind == "TIP_EVENT" else {}
    await pool.execute(
        "INSERT INTO interactions (person_id, type, content, timestamp, source, metadata)"
        " VALUES ($1, $2, '', $3, 'cb_events', $4::jsonb)",
        person.id,
        kind,
        at,
        metadata,
    )
    return person.id


async def snapshot_rows(pool: asyncpg.Pool, source: str) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT p.username, s.captured_at, s.raw_payload, s.normalized_metrics FROM snapshots s"
        " JOIN persons p ON p.id = s.person_id WHERE s.source = $1 ORDER BY s.captured_at, p.username",
        source,
    )


async def everything_stored(pool: asyncpg.Pool) -> str:
    parts = []
    for table in ("api_failures", "snapshots", "snapshot_misses", "persons", "person_aliases"):
        parts.append(await pool.fetchval(f"SELECT coalesce(string_agg(t::text, ' '), '') FROM {table} t"))
    return " ".join(parts)


def counted(source: str) -> float:
    return metrics.REGISTRY.get_sample_value("mhc_snapshots_total", {"source": source}) or 0.0


async def test_schedule_batches_priorities_rate_limit_and_restart(world: World) -> None:
    pool, sim = world.pool, world.statbate
    tippers = [f"tipper{n:03d}" for n in range(120)]
    chatters = [f"chatter{n:03d}" for n in range(80)]
    others = [f"other{n:02d}" for n in range(40)]
    ghosts = others[:5]  # Statbate does not know them
    for name in tippers:
        await seen(pool, name, "TIP_EVENT")
        await seen(pool, name, "CHAT_MESSAGE")
    for name in chatters:
        await seen(pool, name, "CHAT_MESSAGE")
    for name in others:
        await seen(pool, name, "PROFILE_PASTE")
    await seen(pool, "smk_lover", "TIP_EVENT")  # excluded: never looked up
    await seen(pool, BROADCASTER, "CHAT_MESSAGE")  # the broadcaster as a viewer of his own room
    watched = await db.find_or_create_person(pool, "watched_one", seen_at=T0)
    await pool.execute(
        "INSERT INTO watchlist_members (watchlist_id, person_id)"
        " SELECT id, $1 FROM watchlists WHERE name = 'Friends'",
        watched.id,
    )
    for name in [*tippers, *chatters, *others[5:], "watched_one", "smk_lover"]:
        sim.add_member(name)
    model = sim.add_model(BROADCASTER, rid=5001)
    before = {source: counted(source) for source in db.SNAPSHOT_SOURCES}

    state = await world.run(T0, T0 + dt.timedelta(minutes=30))

    batches = [r for r in sim.recorder.requests if r.method == "POST"]
    assert [len(r.names) for r in batches] == [100, 100, 41]
    assert set(batches[0].names) <= set(tippers), "tippers first"
    assert set(batches[1].names) == (set(tippers) - set(batches[0].names)) | set(chatters), (
        "then people who messaged"
    )
    assert batches[2].names[0] == "watched_one" and set(batches[2].names[1:]) == set(others)
    assert not {"smk_lover", BROADCASTER} & {name for r in batches for name in r.names}
    assert sim.recorder.max_in_any_window(60) <= 2, "over the configured 2 requests per minute"
    assert len(sim.recorder.requests) == 4, "one model lookup and three batches, then nothing is due"

    members = await snapshot_rows(pool, "statbate_member")
    assert len(members) == 241 - len(ghosts)
    for row in members:
        assert row["raw_payload"] == {**sim.members[row["username"]], "error": None}
        assert row["normalized_metrics"] == snapshot_metrics.normalize_member(row["raw_payload"])
        assert row["normalized_metrics"]["did"] == sim.members[row["username"]]["did"]
    dids = await pool.fetch("SELECT username, did FROM persons WHERE did IS NOT NULL")
    assert {r["username"]: r["did"] for r in dids} == {
        name: sim.members[name]["did"] for name in (row["username"] for row in members)
    }

    ghost_rows = await pool.fetch("SELECT * FROM api_failures WHERE error_kind = 'not_found'")
    assert len(ghost_rows) == 5 and all(r["api"] == "statbate" for r in ghost_rows)
    assert await pool.fetchval("SELECT count(*) FROM snapshot_misses") == 5

    stats_rows = await snapshot_rows(pool, "cb_stats")
    assert [r["captured_at"] for r in stats_rows] == [T0 + dt.timedelta(minutes=5 * n) for n in range(6)]
    for row in stats_rows:
        assert row["raw_payload"]["username"] == BROADCASTER
        assert row["normalized_metrics"] == snapshot_metrics.normalize_stats(row["raw_payload"])
    assert (
        stats_rows[1]["normalized_metrics"]["token_balance"]
        >= stats_rows[0]["normalized_metrics"]["token_balance"]
    )

    (model_row,) = await snapshot_rows(pool, "statbate_model")
    assert model_row["raw_payload"]["data"] == model
    assert model_row["normalized_metrics"]["rid"] == 5001
    broadcaster = await db.find_person(pool, BROADCASTER)
    assert broadcaster is not None and (broadcaster.rid, broadcaster.role) == (5001, "BOTH")

    total = len(members) + len(stats_rows) + 1
    assert state.snapshots_taken == total
    assert sum(counted(source) - before[source] for source in db.SNAPSHOT_SOURCES) == total

    # A restart neither repeats nor forgets: members and model are not due, stats go on at their pace.
    requests_before = len(sim.recorder.requests)
    await world.run(T0 + dt.timedelta(minutes=32), T0 + dt.timedelta(minutes=45))
    assert len(sim.recorder.requests) == requests_before
    stats_rows = await snapshot_rows(pool, "cb_stats")
    assert [r["captured_at"] for r in stats_rows][-3:] == [
        T0 + dt.timedelta(minutes=32),
        T0 + dt.timedelta(minutes=37),
        T0 + dt.timedelta(minutes=42),
    ]

    # A day later, members are due again (ghosts stay skipped for a week).
    await world.run(T0 + dt.timedelta(hours=25), T0 + dt.timedelta(hours=25, minutes=3))
    asked = {name for r in sim.recorder.requests[requests_before:] if r.method == "POST" for name in r.names}
    assert len(asked) == 236 and not asked & set(ghosts)

    assert STATBATE_TOKEN not in await everything_stored(pool)
    assert STATS_TOKEN not in await everything_stored(pool)
    assert STATS_TOKEN not in world.log.getvalue() and STATBATE_TOKEN not in world.log.getvalue()


async def test_every_failure_kind_is_recorded_and_the_scheduler_keeps_going(world: World) -> None:
    pool, sim = world.pool, world.statbate
    for name in ("alice", "bob"):
        await seen(pool, name, "TIP_EVENT")
        sim.add_member(name)
    await seen(pool, "ghost", "CHAT_MESSAGE")
    sim.add_model(BROADCASTER)
    for kind in ("http_5xx", "hang", "not_found"):
        sim.faults.add(kind, path_contains="/model/")
    for kind in ("rate_limited", "drop", "truncated", "http_4xx"):
        sim.faults.add(kind, path_contains="/batch", retry_after=5)
    world.stats.faults.add("forbidden")
    world.stats.faults.add("rate_limited", retry_after=600)

    await world.run(T0, T0 + dt.timedelta(minutes=40))

    kinds = await pool.fetch("SELECT api, error_kind, count(*) AS n FROM api_failures GROUP BY 1, 2")
    found = {(r["api"], r["error_kind"]) for r in kinds}
    assert found == {
        ("statbate", "http_5xx"),
        ("statbate", "timeout"),
        ("statbate", "not_found"),
        ("statbate", "rate_limited"),
        ("statbate", "connection"),
        ("statbate", "bad_body"),
        ("statbate", "http_4xx"),
        ("cb_stats", "auth_rejected"),
        ("cb_stats", "rate_limited"),
    }
    # The batch failed with a 4xx after three retried faults, and went through two minutes later.
    members = await snapshot_rows(pool, "statbate_member")
    assert sorted(r["username"] for r in members) == ["alice", "bob"]
    # The model 404 is remembered: no second model lookup within the run.
    model_requests = [r for r in sim.recorder.requests if "/model/" in r.path]
    assert len(model_requests) == 3 and await snapshot_rows(pool, "statbate_model") == []
    # Stats: 403 at 0 → wait 5 min; 429 with Retry-After 600 at 5 → wait 10 min; then every 5 minutes.
    stats_times = [r.at / 60 for r in world.stats.recorder.requests]
    assert stats_times == [0, 5, 15, 20, 25, 30, 35]
    assert len(await snapshot_rows(pool, "cb_stats")) == 5

    # After a restart the 403/429 cool-down and the model miss still hold (derived from the database).
    world.stats.faults.add("forbidden")
    stats_before = len(world.stats.recorder.requests)
    await world.run(T0 + dt.timedelta(minutes=41), T0 + dt.timedelta(minutes=44))
    assert [r.at / 60 for r in world.stats.recorder.requests[stats_before:]] == [41]
    requests_before = len(world.stats.recorder.requests)
    await world.run(T0 + dt.timedelta(minutes=44), T0 + dt.timedelta(minutes=50))
    assert [r.at / 60 for r in world.stats.recorder.requests[requests_before:]] == [46]
    assert len([r for r in sim.recorder.requests if "/model/" in r.path]) == 3

    stored = await everything_stored(pool)
    assert STATBATE_TOKEN not in stored and STATS_TOKEN not in stored
    assert STATS_TOKEN not in world.log.getvalue() and STATBATE_TOKEN not in world.log.getvalue()


async def test_statbate_auth_rejection_pauses_the_source_with_one_line(world: World) -> None:
    pool, sim = world.pool, world.statbate
    await seen(pool, "alice", "TIP_EVENT")
    sim.add_member("alice")
    sim.add_model(BROADCASTER)
    sim.faults.add("unauthorized", path_contains="/model/")

    await world.run(T0, T0 + dt.timedelta(minutes=90), cb_stats_token=None)

    times = [r.at for r in sim.recorder.requests]
    assert times[0] == 0 and times[1] >= 3600, "nothing asked while paused"
    assert len(await snapshot_rows(pool, "statbate_member")) == 1, "resumed after the pause"
    assert world.log.getvalue().count("statbate_token_rejected") == 1
    assert world.log.getvalue().count("snapshot_source_off") == 1  # cb_stats, said once
    assert world.stats.recorder.requests == []


async def test_rename_keeps_one_person_and_its_history(world: World) -> None:
    pool, sim = world.pool, world.statbate
    person_id = await seen(pool, "oldname", "TIP_EVENT")
    sim.add_member("oldname", did=777, all_time_tokens=100)

    await world.run(T0, T0 + dt.timedelta(minutes=1), cb_stats_token=None)
    sim.rename("oldname", "newname")
    sim.members["newname"]["all_time_tokens"] = 150
    renamed_at = T0 + dt.timedelta(hours=2)
    await world.run(
        renamed_at, renamed_at + dt.timedelta(minutes=1), cb_stats_token=None, member_snapshot_ttl_hours=1
    )

    assert await pool.fetchval("SELECT count(*) FROM persons WHERE username <> $1", BROADCASTER) == 1
    aliases = await db.person_aliases(pool, person_id)
    assert [(a.alias, a.valid_from, a.valid_to) for a in aliases] == [
        ("oldname", T0, renamed_at),
        ("newname", renamed_at, None),
    ]
    for name in ("oldname", "NewName"):
        found = await db.find_person(pool, name)
        assert found is not None and found.id == person_id and found.did == 777
    assert await pool.fetchval("SELECT count(*) FROM interactions WHERE person_id = $1", person_id) == 1
    deltas = await db.snapshot_deltas(pool, person_id, "statbate_member")
    assert [d.delta["all_time_tokens"] for d in deltas] == [50], "history intact across the rename"

    # The next lookup asks under the current name and records nothing new.
    later = renamed_at + dt.timedelta(hours=2)
    await world.run(later, later + dt.timedelta(minutes=1), cb_stats_token=None, member_snapshot_ttl_hours=1)
    assert sim.recorder.requests[-1].names == ("newname",)
    assert len(await db.person_aliases(pool, person_id)) == 2
    assert len(await snapshot_rows(pool, "statbate_member")) == 3


async def test_rename_seen_in_events_first_links_the_new_name(world: World) -> None:
    """Events created a person under the new name before any lookup: the did ties it back, nothing deleted."""
    pool, sim = world.pool, world.statbate
    original = await seen(pool, "oldname", "TIP_EVENT")
    sim.add_member("oldname", did=777)
    await world.run(T0, T0 + dt.timedelta(minutes=1), cb_stats_token=None)
    sim.rename("oldname", "newname")
    second = await seen(pool, "newname", "CHAT_MESSAGE", at=T0 + dt.timedelta(hours=1))
    assert second != original

    later = T0 + dt.timedelta(hours=1, minutes=5)
    await world.run(later, later + dt.timedelta(minutes=1), cb_stats_token=None)

    assert sim.recorder.requests[-1].names == ("newname",)
    assert [a.alias for a in await db.person_aliases(pool, original)] == ["oldname", "newname"]
    found = await db.find_person(pool, "newname")
    assert found is not None and found.id == original
    assert await pool.fetchval("SELECT count(*) FROM snapshots WHERE person_id = $1", original) == 2
    assert await pool.fetchval("SELECT count(*) FROM interactions") == 2, "nothing deleted"
    assert "person_identity_shared" in world.log.getvalue()


async def test_sources_off_without_tokens_wait_for_stop(world: World) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(
        snapshots.run_scheduler(
            pool=world.pool,
            session=world.session,
            settings=world.settings(statbate_token=None, cb_stats_token=None),
            state=runtime_state.RuntimeState(),
            stop=stop,
            on_failure=lambda failure: db.record_api_failure(world.pool, failure),
        )
    )
    await asyncio.sleep(0.05)
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, timeout=5)
    assert world.log.getvalue().count("snapshot_source_off") == 2
    assert world.statbate.recorder.requests == [] and world.stats.recorder.requests == []


async def test_default_waits_stop_promptly(world: World) -> None:
    """With the real clock and the stop-aware wait, setting stop ends a long idle wait at once."""
    stop = asyncio.Event()
    task = asyncio.create_task(
        snapshots.run_scheduler(
            pool=world.pool,
            session=world.session,
            settings=world.settings(statbate_token=None),
            state=runtime_state.RuntimeState(),
            stop=stop,
            on_failure=lambda failure: db.record_api_failure(world.pool, failure),
        )
    )
    for _ in range(200):
        if world.stats.recorder.requests:
            break
        await asyncio.sleep(0.01)
    assert len(world.stats.recorder.requests) == 1
    stop.set()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(task, timeout=5)
    assert task.done(), "the scheduler did not stop during its 5-minute wait"


async def test_demo_pieces_auto_members_and_counts(world: World) -> None:
    """What the demo uses: a simulator that knows every viewer, and a per-source summary."""
    pool, sim = world.pool, world.statbate
    sim.auto_members = True
    sim.unknown.add("nobody")
    for name in ("viewer_a", "viewer_b", "nobody"):
        await seen(pool, name, "CHAT_MESSAGE")

    await world.run(T0, T0 + dt.timedelta(minutes=6))

    counts = {count.source: count.snapshots for count in await db.snapshot_counts(pool)}
    assert counts == {"cb_stats": 2, "statbate_member": 2, "statbate_model": 1}
    text = reports.render_snapshot_counts(await db.snapshot_counts(pool))
    assert text.splitlines()[0].split() == ["SOURCE", "SNAPSHOTS", "NEWEST"] and "statbate_member  2" in text
    assert reports.render_snapshot_counts([]) == "no snapshots yet"


YEAR = dt.timedelta(days=365)


@pytest.mark.parametrize("first", [YEAR, -YEAR], ids=["ahead_then_back", "back_then_ahead"])
async def test_wall_clock_jumps_leave_every_interval_as_configured(world: World, first: dt.timedelta) -> None:
    """The wall clock is set a year one way 40 s in and back at 19.5 min; every interval holds on the real
    (simulator's) time, and every row is stamped with the wall clock of its moment."""
    pool, sim = world.pool, world.statbate
    tippers = [f"tipper{n:03d}" for n in range(150)]
    for name in tippers:
        await seen(pool, name, "TIP_EVENT")
        sim.add_member(name)
    sim.add_model(BROADCASTER)
    jumps = ((dt.timedelta(seconds=40), first), (dt.timedelta(minutes=19, seconds=30), -first))

    await world.run(T0, T0 + dt.timedelta(hours=3, minutes=5), jumps=jumps)
    time = world.clock[0]

    stats_at = [r.at for r in world.stats.recorder.requests]
    assert stats_at == [300.0 * n for n in range(37)], "every 5 minutes"
    stats_rows = await snapshot_rows(pool, "cb_stats")
    assert sorted(r["captured_at"] for r in stats_rows) == sorted(time.wall(at) for at in stats_at)
    assert [r.at for r in sim.recorder.requests if "/model/" in r.path] == [0.0, 3 * 3600.0], "every 3 hours"
    batches = [(r.at, len(r.names)) for r in sim.recorder.requests if r.method == "POST"]
    # Whichever way the clock jumps, a snapshot stamped after the wall clock's now does not count: the first
    # hundred (stamped before the jump) are looked up again right after it, the fifty stamped during it right
    # after the jump back. The bucket spaces the batches 30 s apart (2 a minute).
    assert batches == [(30.0, 100), (60.0, 50), (90.0, 100), (1170.0, 50)]
    assert sim.recorder.max_in_any_window(60) <= 2
    member_rows = await snapshot_rows(pool, "statbate_member")
    assert {r["username"] for r in member_rows} == set(tippers)
    assert sorted(r["captured_at"] for r in member_rows) == sorted(
        time.wall(at) for at, size in batches for _ in range(size)
    )


async def test_history_written_while_the_clock_was_ahead_does_not_stall_a_restart(world: World) -> None:
    """A Stats snapshot, a Stats 403 and a model miss stamped a year ahead; after a restart on the right
    time, Stats and the model are asked at once and Stats every 5 minutes after."""
    pool, ahead = world.pool, T0 + YEAR
    await world.run(ahead, ahead + dt.timedelta(minutes=1))  # model unknown: a miss a year ahead
    world.stats.faults.add("forbidden")
    await world.run(ahead + dt.timedelta(minutes=5), ahead + dt.timedelta(minutes=6))
    assert [r.at for r in world.stats.recorder.requests] == [YEAR.total_seconds(), YEAR.total_seconds() + 300]
    assert await pool.fetchval("SELECT count(*) FROM snapshot_misses") == 1
    assert await pool.fetchval("SELECT count(*) FROM api_failures WHERE api = 'cb_stats'") == 1
    world.stats.recorder.requests.clear()
    world.statbate.recorder.requests.clear()
    world.statbate.add_model(BROADCASTER)

    await world.run(T0, T0 + dt.timedelta(minutes=11))

    assert [r.at for r in world.stats.recorder.requests] == [0.0, 300.0, 600.0]
    assert [r.at for r in world.statbate.recorder.requests if "/model/" in r.path] == [0.0]
    stats_rows = await snapshot_rows(pool, "cb_stats")
    assert [r["captured_at"] for r in stats_rows] == [T0 + dt.timedelta(minutes=m) for m in (0, 5, 10)] + [
        ahead
    ]
    assert [r["captured_at"] for r in await snapshot_rows(pool, "statbate_model")] == [T0]


async def test_absurd_ids_store_no_wrong_id_and_do_not_stop_the_scheduler(world: World) -> None:
    """A did or rid of hundreds of digits, or one past BIGINT or the INTEGER columns: no id is stored, the
    member counts as not found, the model answer is a plain snapshot, and the schedule goes on."""
    pool, sim = world.pool, world.statbate
    absurd = {
        "huge": 10**300,
        "huge_text": "1" * 300,
        "endless_text": "9" * 5000,  # past Python's 4,300-digit int limit
        "past_bigint": 2**63,
        "past_integer": 2**31,
    }
    for name, did in {"fine": 4242, **absurd}.items():
        await seen(pool, name, "TIP_EVENT")
        sim.add_member(name, did=4242 if did == 4242 else None)
        sim.members[name]["did"] = did
    sim.add_model(BROADCASTER, rid=10**300)

    await world.run(T0, T0 + dt.timedelta(minutes=6))

    assert "snapshot_storage_failed" not in world.log.getvalue()
    dids = await pool.fetch("SELECT username, did, rid FROM persons WHERE did IS NOT NULL OR rid IS NOT NULL")
    assert [(r["username"], r["did"], r["rid"]) for r in dids] == [("fine", 4242, None)]
    assert [r["username"] for r in await snapshot_rows(pool, "statbate_member")] == ["fine"]
    misses = await pool.fetch("SELECT username FROM snapshot_misses WHERE source = 'statbate_member'")
    assert sorted(r["username"] for r in misses) == sorted(absurd)
    failures = await pool.fetch("SELECT body_excerpt FROM api_failures WHERE error_kind = 'not_found'")
    assert sorted(r["body_excerpt"] for r in failures) == sorted(
        f"{name}: did is no usable id" for name in absurd
    )
    (model_row,) = await snapshot_rows(pool, "statbate_model")
    assert model_row["raw_payload"]["data"]["rid"] == 10**300
    assert model_row["normalized_metrics"]["rid"] == 10**300, "jsonb is numeric: the figure itself is kept"
    assert [r["captured_at"] for r in await snapshot_rows(pool, "cb_stats")] == [
        T0,
        T0 + dt.timedelta(minutes=5),
    ]
    assert len([r for r in sim.recorder.requests if r.method == "POST"]) == 1, (
        "the misses are not asked again"
    )


@pytest.mark.parametrize("retry_after", [float("inf"), 1e12])
async def test_an_absurd_retry_after_neither_stops_nor_stalls_stats(world: World, retry_after: float) -> None:
    """A 429's Retry-After of forever (or 30,000 years) neither ends the task nor stalls Stats: the header is
    unusable (not whole seconds or a date), so the usual cooldown applies."""
    world.stats.faults.add("rate_limited", retry_after=retry_after)

    await world.run(T0, T0 + dt.timedelta(hours=1, minutes=1), statbate_token=None)

    assert [r.at for r in world.stats.recorder.requests] == [300.0 * n for n in range(13)]
