"""No secret anywhere: a distinct value in every secret setting, a run of the real daemon against all three
simulated APIs (with failures, so URLs reach the failure table), then a search of everything it produced:
its debug log, `/status`, `/metrics`, every text and JSON column of every table, every file under its data
directory."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import quote

import aiohttp
import asyncpg
import pytest

from daemon import database_server, logs
from daemon.simulator import events, statbate, stats, traffic
from tests.daemon_process import BROADCASTER, daemon_env, running_daemon, wait_for_count

pytestmark = pytest.mark.slow

EVENTS_TOKEN = "evtsecret0EVENTS0token0aaaa"
STATS_TOKEN = "stssecret0STATS0token0bbbbb"
STATBATE_TOKEN = "sbtsecret0STATBATE0token0cc"
DB_PASSWORD = "dbpsecret0PASSWORD0dddd"
DB_SSL_PASSWORD = "sslsecret0SSLPASSWORD0eeee"
SECRETS = (EVENTS_TOKEN, STATS_TOKEN, STATBATE_TOKEN, DB_PASSWORD, DB_SSL_PASSWORD)


def _leaks(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text or quote(secret, safe="") in text]


async def _every_stored_text(connection: asyncpg.Connection) -> str:
    columns = await connection.fetch(
        """SELECT table_name, column_name FROM information_schema.columns
           WHERE table_schema = 'public' AND data_type IN ('text', 'character varying', 'json', 'jsonb')"""
    )
    parts: list[str] = []
    for column in columns:
        rows = await connection.fetch(
            f'SELECT "{column["column_name"]}"::text AS value FROM "{column["table_name"]}"'
        )
        parts.extend(str(row["value"]) for row in rows)
    assert len(columns) > 20 and parts, "the sweep must read the schema's text and JSON columns"
    return "\n".join(parts)


async def test_no_secret_reaches_a_log_an_endpoint_a_row_or_a_file(database_url: str, tmp_path: Path) -> None:
    generated = traffic.generate(600, seed=5, broadcaster=BROADCASTER, shows=1)
    token_file = tmp_path / "events-token"
    token_file.write_text(EVENTS_TOKEN + "\n")
    separator = "&" if "?" in database_url else "?"
    url = f"{database_url}{separator}password={DB_PASSWORD}&sslpassword={DB_SSL_PASSWORD}"
    assert not _leaks(logs.mask(url)) and set(database_server._passwords(url)) >= {DB_PASSWORD}
    log_path = tmp_path / "daemon.log"
    connection = await asyncpg.connect(database_url)
    async with (
        events.EventsSimulator(
            username=BROADCASTER, token=EVENTS_TOKEN, events=generated, page_size=50
        ) as sim,
        statbate.running(token=STATBATE_TOKEN, auto_members=True) as statbate_sim,
        stats.running(username=BROADCASTER, token=STATS_TOKEN) as stats_sim,
    ):
        sim.schedule(events.Fault.server_error(), events.Fault.server_error(502))
        stats_sim.faults.add("http_5xx")
        statbate_sim.faults.add("http_5xx")
        env = daemon_env(
            database_url=url,
            events_base_url=sim.base_url,
            data_dir=tmp_path / "data",
            MHC_CB_EVENTS_TOKEN_FILE=str(token_file),
            MHC_CB_STATS_TOKEN=STATS_TOKEN,
            MHC_CB_STATS_URL=stats_sim.base_url,
            MHC_STATBATE_TOKEN=STATBATE_TOKEN,
            MHC_STATBATE_BASE_URL=statbate_sim.base_url,
        )
        del env["MHC_CB_EVENTS_TOKEN"]
        try:
            async with running_daemon(env, log_path) as daemon:
                await daemon.wait_for_log("health_server_listening")
                await wait_for_count(
                    connection, "SELECT count(*) FROM events", at_least=600, within=90, process=daemon
                )
                for source in ("cb_stats", "statbate_model"):
                    await wait_for_count(
                        connection,
                        f"SELECT count(*) FROM snapshots WHERE source = '{source}'",
                        at_least=1,
                        within=60,
                        process=daemon,
                    )
                await wait_for_count(
                    connection, "SELECT count(DISTINCT api) FROM api_failures", at_least=3, within=30
                )
                port = re.search(r'"port": (\d+), "event": "health_server_listening"', daemon.log_text())
                assert port, daemon.log_text()[-2000:]
                async with aiohttp.ClientSession() as session:
                    pages = []
                    for path in ("/status", "/metrics", "/readyz"):
                        async with session.get(f"http://127.0.0.1:{port.group(1)}{path}") as response:
                            pages.append(await response.text())
                daemon.signal(15)
                assert await daemon.wait(within=30) == 0
            stored = await _every_stored_text(connection)
        finally:
            await connection.close()
    failures = json.loads(pages[0])["recent_failures"]
    assert {failure["api"] for failure in failures} >= {"cb_events", "cb_stats", "statbate"}, failures
    assert '"level": "debug"' in daemon.log_text(), "the sweep needs the debug lines too"
    files = [path for path in (tmp_path / "data").rglob("*") if path.is_file()]
    assert files, "the position file at least"
    where = {
        "log": daemon.log_text(),
        "/status": pages[0],
        "/metrics": pages[1],
        "/readyz": pages[2],
        "database": stored,
        **{str(path): path.read_bytes().decode("utf-8", "replace") for path in files},
    }
    leaked = {place: _leaks(text) for place, text in where.items() if _leaks(text)}
    assert not leaked, leaked
