"""Deltas are computed by the database (migration 011) exactly as the seed's algorithm says."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import sys
from typing import Any

import asyncpg

from daemon import db
from tests.seed_examples import json_blocks_under


async def _store(
    pool: asyncpg.Pool, username: str, metrics: list[dict[str, Any]], at: list[dt.datetime]
) -> None:
    person = await db.find_or_create_person(pool, username, seen_at=at[0])
    for captured_at, normalized in zip(at, metrics, strict=True):
        assert await db.record_snapshot(
            pool,
            person_id=person.id,
            source="statbate_member",
            captured_at=captured_at,
            raw_payload={"data": normalized},
            normalized_metrics=normalized,
        )


def _seed_example() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], list[dt.datetime]]:
    first, second, delta = json_blocks_under("Example")
    # The seed gives the capture times in its headings: one day apart.
    return first, second, delta, [dt.datetime(2025, 1, 1), dt.datetime(2025, 1, 2)]


async def test_seed_example_gives_exactly_the_seed_delta(pool: asyncpg.Pool) -> None:
    first, second, expected, at = _seed_example()
    assert expected == {"all_time_tokens": 2000, "tips": None, "models_tipped_2weeks": None}
    await _store(pool, "example_user", [first, second], at)
    person = await db.find_person(pool, "example_user")
    assert person is not None
    (delta,) = await db.snapshot_deltas(pool, person.id)
    assert delta.delta == expected
    assert (delta.previous_captured_at, delta.captured_at) == (at[0], at[1])
    direct = await pool.fetchval("SELECT snapshot_metrics_delta($1, $2)", first, second)
    assert direct == expected


async def test_delta_function_edge_cases(pool: asyncpg.Pool) -> None:
    async def delta(old: Any, new: Any) -> Any:
        return await pool.fetchval("SELECT snapshot_metrics_delta($1, $2)", old, new)

    assert await delta({"a": 1.5, "b": None, "c": "x"}, {"a": 1.25, "b": 3, "c": "y"}) == {
        "a": -0.25,
        "b": None,
        "c": None,
    }
    assert await delta({}, {}) == {}
    assert await delta(None, {"a": 1}) == {"a": None}
    assert await delta({"did": 7, "n": 3}, {"did": 7, "n": 10}) == {"did": 0, "n": 7}


async def test_consecutive_pairs_per_source_and_nothing_stored(pool: asyncpg.Pool) -> None:
    at = [dt.datetime(2025, 1, 1) + dt.timedelta(hours=h) for h in range(3)]
    await _store(pool, "carol", [{"n": 1}, {"n": 4}, {"n": 10}], at)
    person = await db.find_person(pool, "carol")
    assert person is not None
    deltas = await db.snapshot_deltas(pool, person.id, "statbate_member")
    assert [d.delta for d in deltas] == [{"n": 3}, {"n": 6}]
    assert await db.snapshot_deltas(pool, person.id, "cb_stats") == []
    tables = await pool.fetchval("SELECT count(*) FROM pg_tables WHERE tablename LIKE '%delta%'")
    assert tables == 0, "deltas are computed, never stored"


async def _cli(database_url: str, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "MHC_DATABASE_URL": database_url, "MHC_LOG_LEVEL": "warning"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "daemon",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_deltas_command_prints_the_seed_delta(pool: asyncpg.Pool, database_url: str) -> None:
    first, second, expected, at = _seed_example()
    await _store(pool, "example_user", [first, second], at)

    code, out, err = await _cli(database_url, "deltas", "Example_User", "--json")
    assert code == 0, err
    (row,) = json.loads(out)
    assert row["delta"] == expected
    assert (row["source"], row["from"], row["to"]) == (
        "statbate_member",
        "2025-01-01T00:00:00",
        "2025-01-02T00:00:00",
    )

    code, out, err = await _cli(database_url, "deltas", "example_user", "--source", "statbate_member")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["SOURCE", "FROM", "TO", "METRIC", "DELTA"]
    table = {line.split()[-2]: line.split()[-1] for line in lines[1:]}
    assert table == {"all_time_tokens": "2000", "models_tipped_2weeks": "null", "tips": "null"}

    code, out, err = await _cli(database_url, "deltas", "nobody_here")
    assert code == 1 and "no person named 'nobody_here'" in err
