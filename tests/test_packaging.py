"""The wheel built from the sdist carries the SQL and the console script, and works outside the checkout."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # `python -m build` with no target builds the sdist, then the wheel *from that sdist*.
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=240,
    )
    (found,) = out.glob("*.whl")
    return found


def test_wheel_ships_sql_and_entry_point(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    migrations = sorted(name for name in names if name.startswith("daemon/sql/migrations/"))
    assert migrations[:9] == [
        f"daemon/sql/migrations/{name}.sql"
        for name in (
            "001_create_persons",
            "002_create_person_aliases",
            "003_create_snapshots",
            "004_create_interactions",
            "005_create_stream_sessions",
            "006_create_attributes",
            "007_create_watchlists",
            "008_create_watchlist_members",
            "009_seed_watchlists",
        )
    ]
    assert "daemon/sql/queries.sql" in names
    (entry_points,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
    assert "mhc-daemon = daemon.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_unpacked_wheel_finds_its_own_sql(wheel: Path, tmp_path: Path) -> None:
    zipfile.ZipFile(wheel).extractall(tmp_path)
    script = "\n".join(
        [
            "from daemon import migrations, sql_files",
            "print(sql_files.directory())",
            "print(len(migrations.load()))",
        ]
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    directory, count = result.stdout.split()
    assert directory == str(tmp_path / "daemon" / "sql")
    assert int(count) >= 9
