"""Schema migrations: numbered SQL files with an up and a down part, applied under an advisory lock.

Each file in `sql/migrations/` is `NNN_name.sql` with a `-- migrate:up` and a `-- migrate:down` section.
Applied versions are recorded in `schema_migrations` with the file's SHA-256; a changed file is refused.
This module works on one asyncpg connection (not the pool); its advisory lock is taken per transaction.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from daemon import errors, sql_files

_FILE_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")
_UP_MARK = "-- migrate:up"
_DOWN_MARK = "-- migrate:down"
# Any constant works; this one is "mhc-daemon" read as bytes, so it will not collide with other users' locks.
_LOCK_KEY = int.from_bytes(b"mhc-daem", "big") & 0x7FFF_FFFF_FFFF_FFFF

# Held for one transaction at a time (never for a session): it works behind a transaction-pooling proxy, and
# a process that dies mid-migration cannot leave it taken.
_LOCK = "SELECT pg_advisory_xact_lock($1)"
_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
  version INTEGER PRIMARY KEY,
  name TEXT NOT NULL,
  checksum TEXT NOT NULL,
  applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    up: str
    down: str
    checksum: str


@dataclass(frozen=True)
class MigrationState:
    version: int
    name: str
    applied: bool
    applied_at: str | None


def load(directory: Path | None = None) -> list[Migration]:
    """Read every migration file, in version order."""
    directory = directory or sql_files.directory() / "migrations"
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if not match:
            raise errors.MigrationError(f"migration file name {path.name!r} is not NNN_name.sql")
        text = path.read_text(encoding="utf-8")
        if text.count(_UP_MARK) != 1 or text.count(_DOWN_MARK) != 1:
            raise errors.MigrationError(f"{path.name} needs exactly one '{_UP_MARK}' and one '{_DOWN_MARK}'")
        up = text.split(_UP_MARK, 1)[1].split(_DOWN_MARK, 1)[0]
        down = text.split(_DOWN_MARK, 1)[1]
        found.append(
            Migration(
                version=int(match.group(1)),
                name=path.stem,
                up=up,
                down=down,
                checksum=hashlib.sha256(text.encode()).hexdigest(),
            )
        )
    versions = [migration.version for migration in found]
    if len(set(versions)) != len(versions):
        raise errors.MigrationError("two migration files share a version number")
    return found


async def _applied(connection: asyncpg.Connection) -> dict[int, tuple[str, str]]:
    """version -> (checksum, applied_at); empty when the bookkeeping table does not exist."""
    exists = await connection.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await connection.fetch("SELECT version, checksum, applied_at FROM schema_migrations")
    return {row["version"]: (row["checksum"], row["applied_at"].isoformat()) for row in rows}


def _check(known: list[Migration], applied: dict[int, tuple[str, str]]) -> None:
    by_version = {migration.version: migration for migration in known}
    for version, (checksum, _) in sorted(applied.items()):
        migration = by_version.get(version)
        if migration is None:
            raise errors.MigrationError(
                f"the database has migration {version:03d} applied, which this version of mhc-daemon "
                "does not know; upgrade mhc-daemon instead of running an older one"
            )
        if migration.checksum != checksum:
            raise errors.MigrationError(
                f"migration {migration.name}.sql was changed after it was applied (checksum differs); "
                "applied migrations must never be edited: restore the file and add a new migration instead"
            )


async def status(
    connection: asyncpg.Connection, known: list[Migration] | None = None
) -> list[MigrationState]:
    known = known if known is not None else load()
    applied = await _applied(connection)
    _check(known, applied)
    return [
        MigrationState(
            version=migration.version,
            name=migration.name,
            applied=migration.version in applied,
            applied_at=applied[migration.version][1] if migration.version in applied else None,
        )
        for migration in known
    ]


async def is_current(connection: asyncpg.Connection) -> bool:
    """True when every known migration is applied and none was changed."""
    try:
        return all(state.applied for state in await status(connection))
    except errors.MigrationError:
        return False


async def migrate(
    connection: asyncpg.Connection, target: int | None = None, known: list[Migration] | None = None
) -> list[str]:
    """Move the schema up or down to `target` (None: the newest). Returns what was done, one line each.

    Each migration runs in its own transaction under a transaction-level advisory lock, and is skipped there
    when another process applied it meanwhile: two processes never apply one twice, and a failure leaves the
    schema at the last migration that succeeded.
    """
    known = known if known is not None else load()
    newest = known[-1].version if known else 0
    target = newest if target is None else target
    if target < 0 or target > newest:
        raise errors.MigrationError(f"no migration {target}; versions run from 0 to {newest}")
    done: list[str] = []
    async with connection.transaction():
        await connection.execute(_LOCK, _LOCK_KEY)
        await connection.execute(_CREATE_TABLE)
        applied = await _applied(connection)
    _check(known, applied)
    for migration in known:
        wanted = migration.version <= target and migration.version not in applied
        if wanted and await _apply(connection, migration, up=True):
            done.append(f"applied {migration.name}")
    for migration in reversed(known):
        unwanted = migration.version > target and migration.version in applied
        if unwanted and await _apply(connection, migration, up=False):
            done.append(f"reverted {migration.name}")
    if target == 0:
        # `--to 0` removes everything the migrations created, the bookkeeping table included.
        async with connection.transaction():
            await connection.execute(_LOCK, _LOCK_KEY)
            await connection.execute("DROP TABLE IF EXISTS schema_migrations")
    return done


async def _apply(connection: asyncpg.Connection, migration: Migration, *, up: bool) -> bool:
    """Apply (or revert) `migration` in a transaction of its own; False when another process did first."""
    try:
        async with connection.transaction():
            await connection.execute(_LOCK, _LOCK_KEY)
            if (migration.version in await _applied(connection)) == up:
                return False
            if up:
                await connection.execute(migration.up)
                await connection.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            else:
                await connection.execute(migration.down)
                await connection.execute(
                    "DELETE FROM schema_migrations WHERE version = $1", migration.version
                )
    except asyncpg.PostgresError as error:
        direction = "applying" if up else "reverting"
        raise errors.MigrationError(f"{direction} {migration.name}.sql failed: {error}") from error
    return True
