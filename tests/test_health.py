"""The health endpoint on a real socket, against a real database; `mhc-daemon health` against it."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon import config, db, errors, health, runtime_state

TOKEN = "z9x8c7v6b5n4m3l2k1j0hgfd"


def _settings(**overrides: Any) -> config.Settings:
    values: dict[str, Any] = {"health_host": "127.0.0.1", "health_port": 0, "cb_events_timeout": 30}
    return config.load(**(values | overrides))


def _fresh_state(**overrides: Any) -> runtime_state.RuntimeState:
    state = runtime_state.RuntimeState(**overrides)
    if "last_successful_poll" not in overrides:
        state.poll_succeeded()
    return state


async def _get(url: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, response.headers.get("Content-Type", ""), await response.text()


@pytest.fixture
async def serving(
    pool: asyncpg.Pool,
) -> AsyncIterator[tuple[health.HealthServer, runtime_state.RuntimeState]]:
    state = _fresh_state()
    async with health.serve(pool, _settings(), state) as server:
        yield server, state


async def test_healthz_answers_while_the_loop_runs(
    serving: tuple[health.HealthServer, runtime_state.RuntimeState],
) -> None:
    server, _ = serving
    status, _, body = await _get(server.url + "/healthz")
    assert status == 200
    assert json.loads(body)["status"] == "alive"


async def test_readyz_is_200_when_every_check_passes(
    serving: tuple[health.HealthServer, runtime_state.RuntimeState],
) -> None:
    server, state = serving
    assert state.migrations_current is False  # learnt from the database on the first probe
    status, _, body = await _get(server.url + "/readyz")
    assert status == 200, body
    assert json.loads(body) == {
        "ready": True,
        "checks": dict.fromkeys(health.CHECKS, "ok"),
        "failing": [],
    }
    assert state.database_up and state.migrations_current


async def test_readyz_names_a_stale_poll_and_a_rejected_token(
    serving: tuple[health.HealthServer, runtime_state.RuntimeState],
) -> None:
    server, state = serving
    # Three 30 s long-polls without a success is stale.
    state.last_successful_poll = time.time() - 91
    state.token_rejected = True
    status, _, body = await _get(server.url + "/readyz")
    assert status == 503
    answer = json.loads(body)
    assert answer["failing"] == ["poll_stale", "token_rejected"]
    assert answer["checks"]["database"] == "ok"
    assert answer["checks"]["token_rejected"] == "failing"


async def test_readyz_before_the_first_poll_is_not_ready(pool: asyncpg.Pool) -> None:
    state = runtime_state.RuntimeState()
    async with health.serve(pool, _settings(), state) as server:
        status, _, body = await _get(server.url + "/readyz")
    assert status == 503
    assert json.loads(body)["failing"] == ["poll_stale"]


async def test_readyz_fails_migrations_on_an_unmigrated_database(
    make_empty_database: Callable[[], Awaitable[str]],
) -> None:
    async with (
        db.open_pool(await make_empty_database()) as empty_pool,
        health.serve(empty_pool, _settings(), _fresh_state()) as server,
    ):
        status, _, body = await _get(server.url + "/readyz")
    assert status == 503
    assert json.loads(body)["failing"] == ["migrations"]


async def _allow_connections(server_url: str, name: str, allowed: bool) -> None:
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allowed).lower()}')
        if not allowed:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
            )
    finally:
        await admin.close()


async def test_readiness_follows_the_database_down_and_back_up(
    serving: tuple[health.HealthServer, runtime_state.RuntimeState],
    server_url: str,
    database_url: str,
) -> None:
    server, state = serving
    name = urlsplit(database_url).path.lstrip("/")
    assert (await _get(server.url + "/readyz"))[0] == 200
    await _allow_connections(server_url, name, allowed=False)
    try:
        # The pool's sessions were killed and no new one is let in: a real outage for this daemon.
        status, _, body = await _get(server.url + "/readyz")
        assert status == 503
        assert json.loads(body)["failing"] == ["database"]
        assert state.database_up is False
        metrics_text = (await _get(server.url + "/metrics"))[2]
        assert "mhc_database_up 0.0" in metrics_text
        status_page = json.loads((await _get(server.url + "/status"))[2])
        assert status_page["recent_failures"] is None
    finally:
        await _allow_connections(server_url, name, allowed=True)
    status, _, body = await _get(server.url + "/readyz")
    assert status == 200, body
    assert state.database_up is True


async def test_readyz_is_503_on_a_closed_pool(database_url: str) -> None:
    closed = await db.connect(database_url)
    await closed.close()
    async with health.serve(closed, _settings(), _fresh_state(migrations_current=True)) as server:
        status, _, body = await _get(server.url + "/readyz")
    assert status == 503
    assert json.loads(body)["failing"] == ["database"]


async def test_metrics_parse_with_the_prometheus_parser(
    serving: tuple[health.HealthServer, runtime_state.RuntimeState],
) -> None:
    server, state = serving
    state.spool_bytes = 4321
    state.database_up = True
    status, content_type, body = await _get(server.url + "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        if not sample.labels
    }
    assert samples["mhc_spool_bytes"] == 4321
    assert samples["mhc_database_up"] == 1
    assert state.last_successful_poll is not None
    assert samples["mhc_last_successful_poll_timestamp_seconds"] == pytest.approx(state.last_successful_poll)
    names = {family.name for family in text_string_to_metric_families(body)}
    assert {"mhc_events", "mhc_poll_seconds", "mhc_write_seconds", "mhc_ingest_lag_seconds"} <= names


async def test_status_shows_counts_and_the_last_ten_failures_masked(
    serving: tuple[health.HealthServer, runtime_state.RuntimeState], pool: asyncpg.Pool
) -> None:
    server, state = serving
    state.events_stored, state.duplicates_skipped, state.live_session_id = 17, 3, "session-1"
    state.last_event_time = 1_700_000_000.0
    for attempt in range(1, 13):
        await db.record_api_failure(
            pool,
            errors.ApiFailure(
                api="cb_events",
                operation="poll",
                url=f"https://eventsapi.chaturbate.com/events/alice/{TOKEN}/?i={attempt}",
                error_kind="http_5xx",
                http_status=502,
                attempt=attempt,
            ),
        )
    status, _, body = await _get(server.url + "/status")
    assert status == 200
    assert TOKEN not in body
    page = json.loads(body)
    assert page["counts"] == {
        "events_stored": 17,
        "duplicates_skipped": 3,
        "quarantined": 0,
        "failures": 0,
    }
    assert page["live_session"] == "session-1"
    assert page["last_event_time"] == "2023-11-14T22:13:20+00:00"
    assert len(page["recent_failures"]) == 10
    assert page["recent_failures"][0]["url"].endswith("/events/alice/***/?i=12")
    assert page["uptime_s"] >= 0
    assert page["version"]


async def test_default_binding_is_loopback(pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MHC_HEALTH_HOST", raising=False)
    settings = config.load(health_port=0)
    assert settings.health_host == "127.0.0.1"
    async with health.serve(pool, settings, _fresh_state()) as server:
        assert server.host == "127.0.0.1"
        assert server.port > 0


def test_wildcard_hosts_are_dialled_on_loopback() -> None:
    assert health.base_url("0.0.0.0", 8787) == "http://127.0.0.1:8787"  # noqa: S104  # dialled, not bound
    assert health.base_url("::", 8787) == "http://[::1]:8787"
    assert health.base_url("192.0.2.7", 1) == "http://192.0.2.7:1"


def test_poll_staleness_is_three_long_polls_with_a_floor() -> None:
    assert health.poll_stale_after(_settings(cb_events_timeout=30)) == 90
    assert health.poll_stale_after(_settings(cb_events_timeout=0)) == health.POLL_STALE_FLOOR_S


async def _health_command(tmp_path: Path, host: str, port: int) -> tuple[int, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MHC_")}
    env |= {"MHC_HEALTH_HOST": host, "MHC_HEALTH_PORT": str(port)}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "daemon",
        "health",
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, stdout.decode()


async def test_health_command_exits_0_when_ready_and_1_when_not(
    serving: tuple[health.HealthServer, runtime_state.RuntimeState], tmp_path: Path
) -> None:
    server, state = serving
    code, output = await _health_command(tmp_path, "0.0.0.0", server.port)  # noqa: S104  # dialled
    assert (code, output) == (0, f"ready: http://127.0.0.1:{server.port}/readyz\n")
    state.token_rejected = True
    code, output = await _health_command(tmp_path, "127.0.0.1", server.port)
    assert (code, output) == (1, "not ready (503): token_rejected\n")


async def test_health_command_exits_1_when_nothing_listens(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The port was free a moment ago and nothing listens on it now.
    code, output = await _health_command(tmp_path, "127.0.0.1", port)
    assert code == 1
    assert output.startswith(f"unreachable: http://127.0.0.1:{port}/readyz")
    assert output.count("\n") == 1


async def test_readyz_says_why_the_latest_poll_failed_until_one_succeeds(
    serving: tuple[health.HealthServer, runtime_state.RuntimeState],
) -> None:
    server, state = serving
    state.poll_problem = "bad_body: the body is not JSON"
    status, _, body = await _get(server.url + "/readyz")
    answer = json.loads(body)
    assert (status, answer["failing"]) == (503, ["poll_failing"])
    assert answer["poll_problem"] == "bad_body: the body is not JSON"
    state.poll_succeeded()
    status, _, body = await _get(server.url + "/readyz")
    assert (status, json.loads(body)["failing"]) == (200, [])
