"""Where the SQL lives, and the named runtime queries in `sql/queries.sql`.

The repository keeps SQL in the top-level `sql/`; the wheel ships the same files as `daemon/sql/`.
Queries are blocks headed by `-- name: <query_name>` (the procrastinate layout), loaded once.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from daemon import errors

_NAME = re.compile(r"^-- name: ([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


def directory() -> Path:
    """The SQL directory: inside the installed package, else the source checkout's `sql/`."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "sql", package.parent / "sql"):
        if (candidate / "migrations").is_dir():
            return candidate
    raise errors.MigrationError(f"no sql/ directory next to {package}; the installation is incomplete")


@functools.cache
def queries() -> dict[str, str]:
    """Every named query of `queries.sql`, by name."""
    text = (directory() / "queries.sql").read_text(encoding="utf-8")
    parts = _NAME.split(text)
    found: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in found:
            raise errors.MigrationError(f"queries.sql defines {name!r} twice")
        found[name] = body.strip()
    return found


def query(name: str) -> str:
    return queries()[name]
