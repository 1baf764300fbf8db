"""The wheel built from the sdist carries the SQL and the console script, and works outside the checkout."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import asyncpg
import pytest

from daemon import config, health, runtime_state

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


def _dockerfile_exec_form(instruction: str) -> list[str]:
    """The exec-form argv of a Dockerfile instruction (`ENTRYPOINT [...]`, `HEALTHCHECK ... CMD [...]`)."""
    text = (ROOT / "Dockerfile").read_text()
    (line,) = [line for line in text.splitlines() if line.startswith(instruction + " ")]
    argv: list[str] = json.loads(line[line.index("[") :])
    return argv


def _dockerfile_env() -> dict[str, str]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    pairs = [line.split()[1:] for line in text.splitlines() if line.startswith("ENV ")]
    return dict(pair.split("=", 1) for group in pairs for pair in group)


@pytest.fixture(scope="module")
def installed_wheel(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed as the image installs it (its own console script), dependencies from .venv."""
    target = tmp_path_factory.mktemp("image-site")
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index"]
    subprocess.run(
        [*pip, "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return target


def _image_env(installed: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MHC_")}
    env |= _dockerfile_env() | extra
    env["PATH"] = f"{installed / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    env["PYTHONPATH"] = str(installed)
    return env


def test_image_runs_the_installed_console_script(installed_wheel: Path, tmp_path: Path) -> None:
    env = _image_env(installed_wheel)
    entrypoint = _dockerfile_exec_form("ENTRYPOINT")
    assert shutil.which(entrypoint[0], path=env["PATH"]) == str(installed_wheel / "bin" / entrypoint[0])
    where = subprocess.run(
        [sys.executable, "-c", "import daemon; print(daemon.__file__)"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert where.stdout.strip().startswith(str(installed_wheel))
    usage = subprocess.run(
        [entrypoint[0], "--help"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert usage.returncode == 0, usage.stderr
    for command in ("run", "migrate", "demo", "replay", "deltas", "stats", "sessions", "gaps", "health"):
        assert command in usage.stdout, command


async def test_image_healthcheck_command_against_a_real_health_server(
    installed_wheel: Path, tmp_path: Path, pool: asyncpg.Pool
) -> None:
    healthcheck = _dockerfile_exec_form("HEALTHCHECK")
    state = runtime_state.RuntimeState()
    state.poll_succeeded()
    settings = config.load(health_host="127.0.0.1", health_port=0)
    async with health.serve(pool, settings, state) as server:
        # The image's own environment (MHC_HEALTH_HOST=0.0.0.0), pointed at this server's port.
        env = _image_env(installed_wheel, MHC_HEALTH_PORT=str(server.port))
        assert env["MHC_HEALTH_HOST"] == "0.0.0.0"  # noqa: S104  # the image's setting, dialled as loopback
        codes = []
        for rejected in (False, True):
            state.token_rejected = rejected
            process = await asyncio.create_subprocess_exec(
                *healthcheck, env=env, cwd=tmp_path, stdout=asyncio.subprocess.PIPE
            )
            stdout, _ = await asyncio.wait_for(process.communicate(), timeout=60)
            codes.append((process.returncode, stdout.decode().count("\n")))
    assert codes == [(0, 1), (1, 1)]
