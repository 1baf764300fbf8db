"""The migrated schema equals what the seed document declares, column for column and index for index.

The reference is built by running the seed's own SQL blocks in a scratch database (in dependency order), so
the comparison is against the founding document, not against a copy of our migrations.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from daemon import db, migrations
from tests.conftest import shared_path

_COLUMNS = """
SELECT table_name, column_name, data_type, character_maximum_length, column_default, is_nullable
FROM information_schema.columns WHERE table_schema = 'public' AND table_name = ANY($1::text[])
"""
_CONSTRAINTS = """
SELECT c.conrelid::regclass::text AS table_name, c.conname, pg_get_constraintdef(c.oid) AS definition
FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
WHERE n.nspname = 'public' AND c.conrelid::regclass::text = ANY($1::text[])
"""
_INDEXES = """
SELECT tablename, indexname, indexdef
FROM pg_indexes WHERE schemaname = 'public' AND tablename = ANY($1::text[])
"""


def _seed_statements() -> list[str]:
    text = shared_path("seed", "database-schema.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```sql\n(.*?)```", text, flags=re.DOTALL)
    statements = []
    for block in blocks:
        body = re.sub(r"--[^\n]*", "", block)
        statements += [
            part.strip() for part in body.split(";") if part.strip().upper().startswith(("CREATE", "INSERT"))
        ]
    return statements


async def _build_seed(connection: asyncpg.Connection) -> list[str]:
    """Run the seed's statements, retrying those whose dependencies come later in the document."""
    pending = _seed_statements()
    while pending:
        failed = []
        for statement in pending:
            try:
                await connection.execute(statement)
            except asyncpg.UndefinedTableError:
                failed.append(statement)
        assert len(failed) < len(pending), f"seed statements cannot run in any order: {failed}"
        pending = failed
    rows = await connection.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return sorted(row["tablename"] for row in rows)


async def _describe(connection: asyncpg.Connection, tables: list[str]) -> dict[str, set[tuple[Any, ...]]]:
    return {
        name: {tuple(row.values()) for row in await connection.fetch(query, tables)}
        for name, query in (("columns", _COLUMNS), ("constraints", _CONSTRAINTS), ("indexes", _INDEXES))
    }


async def test_migrated_schema_equals_seed(make_empty_database: Callable[[], Awaitable[str]]) -> None:
    """Migrations 001-009, the seed's own plan, give exactly the seed's schema."""
    seed_url, our_url = await make_empty_database(), await make_empty_database()
    async with db.single_connection(seed_url) as seed, db.single_connection(our_url) as ours:
        await migrations.migrate(ours, target=9)
        tables = await _build_seed(seed)
        assert len(tables) == 8, tables
        expected = await _describe(seed, tables)
        actual = await _describe(ours, tables)
        for aspect in ("columns", "constraints", "indexes"):
            missing = expected[aspect] - actual[aspect]
            extra = actual[aspect] - expected[aspect]
            assert not missing and not extra, f"{aspect}: missing {sorted(missing)} extra {sorted(extra)}"
        seed_lists = await seed.fetch("SELECT name, description FROM watchlists ORDER BY name")
        our_lists = await ours.fetch("SELECT name, description FROM watchlists ORDER BY name")
        assert [tuple(row) for row in our_lists] == [tuple(row) for row in seed_lists]
