"""The migration runner against a real server: up, down, status, checksums, the lock, idempotent files."""

from __future__ import annotations

import asyncio
import dataclasses

import asyncpg
import pytest

from daemon import db, errors, migrations

SEED_TABLES = {
    "persons",
    "person_aliases",
    "snapshots",
    "interactions",
    "stream_sessions",
    "attributes",
    "watchlists",
    "watchlist_members",
}


async def _tables(connection: asyncpg.Connection) -> set[str]:
    rows = await connection.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {row["tablename"] for row in rows}


def test_files_are_the_seed_plan() -> None:
    names = [migration.name for migration in migrations.load()][:9]
    assert names == [
        "001_create_persons",
        "002_create_person_aliases",
        "003_create_snapshots",
        "004_create_interactions",
        "005_create_stream_sessions",
        "006_create_attributes",
        "007_create_watchlists",
        "008_create_watchlist_members",
        "009_seed_watchlists",
    ]


async def test_up_down_to_zero_and_up_again(empty_database_url: str) -> None:
    known = migrations.load()
    async with db.single_connection(empty_database_url) as connection:
        states = await migrations.status(connection)
        assert [state.applied for state in states] == [False] * len(known)

        applied = await migrations.migrate(connection)
        assert applied == [f"applied {migration.name}" for migration in known]
        assert await _tables(connection) >= SEED_TABLES
        assert await migrations.is_current(connection)

        reverted = await migrations.migrate(connection, target=0)
        assert reverted == [f"reverted {migration.name}" for migration in reversed(known)]
        assert await _tables(connection) == set(), "--to 0 must leave no table of ours"

        await migrations.migrate(connection)
        assert await _tables(connection) >= SEED_TABLES
        assert await migrations.migrate(connection) == []


async def test_partial_targets_move_both_ways(empty_database_url: str) -> None:
    async with db.single_connection(empty_database_url) as connection:
        await migrations.migrate(connection, target=4)
        assert await _tables(connection) == {
            "persons",
            "person_aliases",
            "snapshots",
            "interactions",
            "schema_migrations",
        }
        await migrations.migrate(connection, target=7)
        assert "watchlists" in await _tables(connection)
        await migrations.migrate(connection, target=2)
        assert await _tables(connection) == {"persons", "person_aliases", "schema_migrations"}
        with pytest.raises(errors.MigrationError, match="no migration 999"):
            await migrations.migrate(connection, target=999)


async def test_every_part_runs_twice_harmlessly(empty_database_url: str) -> None:
    known = migrations.load()
    async with db.single_connection(empty_database_url) as connection:
        for migration in known:
            await connection.execute(migration.up)
            await connection.execute(migration.up)
        assert await connection.fetchval("SELECT count(*) FROM watchlists") == 5
        for migration in reversed(known):
            await connection.execute(migration.down)
            await connection.execute(migration.down)
        assert await _tables(connection) == set()


async def test_changed_file_is_refused(empty_database_url: str) -> None:
    known = migrations.load()
    async with db.single_connection(empty_database_url) as connection:
        await migrations.migrate(connection, known=known)
        edited = [dataclasses.replace(known[0], checksum="0" * 64), *known[1:]]
        with pytest.raises(
            errors.MigrationError, match=r"001_create_persons\.sql was changed after it was applied"
        ):
            await migrations.migrate(connection, known=edited)
        with pytest.raises(errors.MigrationError, match="changed"):
            await migrations.status(connection, known=edited)


async def test_unknown_applied_version_is_refused(empty_database_url: str) -> None:
    known = migrations.load()
    async with db.single_connection(empty_database_url) as connection:
        await migrations.migrate(connection, known=known)
        with pytest.raises(errors.MigrationError, match="does not know"):
            await migrations.status(connection, known=known[:3])


async def test_concurrent_runs_apply_each_migration_once(empty_database_url: str) -> None:
    """Four processes' worth of runners at once: the advisory lock serialises them, nothing fails."""
    async with (
        db.single_connection(empty_database_url) as first,
        db.single_connection(empty_database_url) as second,
        db.single_connection(empty_database_url) as third,
        db.single_connection(empty_database_url) as fourth,
    ):
        results = await asyncio.gather(*(migrations.migrate(c) for c in (first, second, third, fourth)))
        applied = [line for result in results for line in result]
        assert len(applied) == len(migrations.load()), applied
        assert await first.fetchval("SELECT count(*) FROM watchlists") == 5


async def test_failed_migration_rolls_back_alone(empty_database_url: str) -> None:
    known = migrations.load()
    broken = dataclasses.replace(known[1], up="CREATE TABLE half_done (id int); SELECT no_such_function();")
    async with db.single_connection(empty_database_url) as connection:
        with pytest.raises(errors.MigrationError, match=r"applying 002_create_person_aliases\.sql failed"):
            await migrations.migrate(connection, known=[known[0], broken])
        assert await _tables(connection) == {"persons", "schema_migrations"}
        states = await migrations.status(connection, known=known)
        assert [state.applied for state in states[:2]] == [True, False]
