"""The chaos suite (`make chaos`): the real daemon process, a PostgreSQL that really stops, the simulator.

Each scenario ends with an exact check of the database against what the ingest rules make of the traffic
that was served, and prints its counts (visible with `pytest -s`). Excluded from `make test` (marker `chaos`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import operator
import random
import signal
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from daemon import logs, migrations
from daemon.simulator import events as simulator
from daemon.simulator import http_faults, statbate, stats, traffic
from tests import chaos_support as chaos
from tests.daemon_process import BROADCASTER, TOKEN, daemon_env, running_daemon, wait_for_count
from tests.stoppable_postgres import StoppablePostgres, stoppable_postgres

pytestmark = pytest.mark.chaos

COUNT_EVENTS = "SELECT count(*) FROM events"


@pytest.fixture(scope="module")
def postgres() -> Iterator[StoppablePostgres]:
    # Not under pytest's tmp dirs: pytest may close their modes to 0700, which the server's own user needs.
    with (
        tempfile.TemporaryDirectory(prefix="mhc-chaos-pg-") as directory,
        stoppable_postgres(Path(directory) / "server") as server,
    ):
        yield server


async def _migrated_database(postgres: StoppablePostgres) -> str:
    url = await postgres.create_database()
    connection = await asyncpg.connect(url)
    try:
        await migrations.migrate(connection)
    finally:
        await connection.close()
    return url


async def _stop_cleanly(daemon: Any) -> None:
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait(within=60) == 0, daemon.log_text()[-3000:]


# -- kill -9 while draining a backlog ------------------------------------------------------------------------


@pytest.mark.timeout(900)
async def test_kill_9_at_20_random_moments_while_draining_100k_events(
    postgres: StoppablePostgres, tmp_path: Path
) -> None:
    total = 100_000
    served = traffic.generate(total, seed=61, shows=4)
    expected = chaos.expected_contents(served)
    url = await _migrated_database(postgres)
    rng = random.Random(6)  # reproducible kill moments
    thresholds = sorted(rng.sample(range(1_000, total - 5_000), 20))  # the last kills still mid-drain
    log_path = tmp_path / "daemon.log"
    connection = await asyncpg.connect(url)
    try:
        async with simulator.EventsSimulator(username=BROADCASTER, token=TOKEN, events=served) as sim:
            env = daemon_env(
                database_url=url,
                events_base_url=sim.base_url,
                data_dir=tmp_path / "data",
                MHC_LOG_LEVEL="info",
            )
            runs = 0
            for threshold in thresholds:
                async with running_daemon(env, log_path) as daemon:
                    runs += 1
                    await chaos.wait_for_log_event(daemon, "polling_started", count=runs)
                    # Mid-drain: at the threshold, and at least one commit into this run.
                    started_with = int(await connection.fetchval(COUNT_EVENTS))
                    target = min(max(threshold, started_with + 1), total)
                    await wait_for_count(
                        connection, COUNT_EVENTS, at_least=target, within=300, process=daemon
                    )
                    # A random instant after it: mid-fetch, mid-transaction or between the two.
                    await asyncio.sleep(rng.uniform(0.0, 0.25))
                    await daemon.kill()
                print(f"[kill -9] killed with {await connection.fetchval(COUNT_EVENTS)} events stored")
            async with running_daemon(env, log_path) as daemon:
                await wait_for_count(connection, COUNT_EVENTS, at_least=total, within=300, process=daemon)
                await chaos.wait_for_log_event(daemon, "polling_started", count=runs + 1)
                await _stop_cleanly(daemon)
            cursor = await connection.fetchval("SELECT last_event_id FROM ingest_cursor")
    finally:
        await connection.close()
    assert cursor == served[-1]["id"]
    chaos.assert_exactly(await chaos.stored_contents(url), expected, "kill -9 x20, 100k backlog")


# -- PostgreSQL outages: the disk spool ----------------------------------------------------------------------


async def _spool_status(http: aiohttp.ClientSession, base: str) -> tuple[float, int]:
    """(mhc_spool_bytes from /metrics, spool_bytes from /status)."""
    async with http.get(f"{base}/metrics") as response:
        gauge = chaos.metric_value(await response.text(), "mhc_spool_bytes")
    async with http.get(f"{base}/status") as response:
        status = await response.json()
    return gauge, int(status["spool_bytes"])


async def _outage(
    postgres: StoppablePostgres,
    tmp_path: Path,
    *,
    label: str,
    outage: float,
    rate: float,
    seconds_of_traffic: float,
    spool_max_mb: int = 64,
    ready_within: float | None = None,
) -> list[dict[str, Any]]:
    """Paced traffic; PostgreSQL really stopped for `outage` seconds mid-stream; then an exact check.

    Returns the daemon's log records for scenario-specific checks.
    """
    served = traffic.generate(int(rate * seconds_of_traffic), seed=int(outage), shows=2)
    expected = chaos.expected_contents(served)
    url = await _migrated_database(postgres)
    loop = asyncio.get_running_loop()
    async with (
        simulator.EventsSimulator(username=BROADCASTER, token=TOKEN, events=served, rate=rate) as sim,
        aiohttp.ClientSession() as http,
    ):
        env = daemon_env(
            database_url=url,
            events_base_url=sim.base_url,
            data_dir=tmp_path / "data",
            MHC_LOG_LEVEL="info",
            MHC_SPOOL_MAX_MB=str(spool_max_mb),
        )
        async with running_daemon(env, tmp_path / "daemon.log") as daemon:
            base = await chaos.health_url(daemon)
            connection = await asyncpg.connect(url)
            await wait_for_count(connection, COUNT_EVENTS, at_least=int(rate * 3), within=60, process=daemon)
            before = int(await connection.fetchval(COUNT_EVENTS))
            await connection.close()
            postgres.stop()
            try:
                stopped_at = loop.time()
                probes = ready_probes = 0
                gauge_peak, status_peak = 0.0, 0
                while loop.time() - stopped_at < outage:
                    assert daemon.process.returncode is None, daemon.log_text()[-3000:]
                    probes += 1
                    ready_probes += await chaos.is_ready(http, base)
                    gauge, status_bytes = await _spool_status(http, base)
                    gauge_peak, status_peak = max(gauge_peak, gauge), max(status_peak, status_bytes)
                    await asyncio.sleep(1.0)
            finally:
                postgres.start()
            started_at = loop.time()
            not_ready_body = ""
            while not await chaos.is_ready(http, base):
                assert daemon.process.returncode is None, daemon.log_text()[-3000:]
                async with http.get(f"{base}/readyz") as response:
                    not_ready_body = await response.text()
                await asyncio.sleep(0.1)
            ready_after = loop.time() - started_at
            connection = await asyncpg.connect(url)
            await wait_for_count(
                connection,
                COUNT_EVENTS,
                at_least=len(expected.event_ids),
                within=seconds_of_traffic + outage + 120,
                process=daemon,
            )
            await connection.close()
            for _ in range(600):
                if (await _spool_status(http, base))[1] == 0:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the spool was not drained within 60 s of the last event")
            peak_mib = daemon.peak_rss_mib()
            await _stop_cleanly(daemon)
            records = chaos.log_records(daemon)
    print(
        f"[{label}] {before} events stored before the stop; {outage:.0f} s outage; {probes} probes, "
        f"{ready_probes} ready; spool peak {status_peak} bytes; ready {ready_after:.1f} s after the start; "
        f"peak RSS {peak_mib:.0f} MiB"
    )
    assert peak_mib <= chaos.MEMORY_BOUND_MIB, f"peak RSS {peak_mib:.0f} MiB while spooling an outage"
    assert ready_probes == 0, "readiness must be false while the database is down"
    assert gauge_peak > 0 and status_peak > 0, "no spool depth in /metrics and /status during the outage"
    if ready_within is not None:
        assert ready_after <= ready_within, f"not ready {ready_after:.1f} s after the start: {not_ready_body}"
    assert not (tmp_path / "data" / "spool" / "pages.jsonl").exists()
    events = [record.get("event") for record in records]
    assert "spooling_to_disk" in events and "spool_drained" in events
    chaos.assert_exactly(await chaos.stored_contents(url), expected, label)
    return records


@pytest.mark.timeout(300)
async def test_a_30_second_database_stop_loses_and_doubles_nothing(
    postgres: StoppablePostgres, tmp_path: Path
) -> None:
    await _outage(
        postgres,
        tmp_path,
        label="PostgreSQL stopped 30 s",
        outage=30,
        rate=200,
        seconds_of_traffic=50,
        ready_within=5.0,
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_a_2_minute_database_outage_during_paced_traffic_stores_every_event_once(
    postgres: StoppablePostgres, tmp_path: Path
) -> None:
    await _outage(
        postgres, tmp_path, label="PostgreSQL stopped 2 min", outage=120, rate=100, seconds_of_traffic=135
    )


@pytest.mark.timeout(300)
async def test_a_full_spool_pauses_polling_and_drops_nothing(
    postgres: StoppablePostgres, tmp_path: Path
) -> None:
    records = await _outage(
        postgres,
        tmp_path,
        label="spool full (1 MB)",
        outage=20,
        rate=300,
        seconds_of_traffic=30,
        spool_max_mb=1,
    )
    full = [record for record in records if record.get("event") == "spool_full_polling_paused"]
    assert full and full[0]["level"] == "error" and full[0]["limit_mb"] == 1


# -- PostgreSQL down when the daemon starts ------------------------------------------------------------------


async def _probe_outage(
    daemon: Any, http: aiohttp.ClientSession, sim: simulator.EventsSimulator, seconds: float
) -> tuple[list[tuple[int, dict[str, Any]]], int, int]:
    """Probe /readyz and the spool once a second for `seconds` while the database is down, the daemon alive
    throughout; (readiness answers, spool peak bytes, requests the simulator saw meanwhile)."""
    loop = asyncio.get_running_loop()
    base = await chaos.health_url(daemon)
    requests_before, started = sim.request_count, loop.time()
    answers, spool_peak = [], 0
    while loop.time() - started < seconds:
        assert daemon.process.returncode is None, daemon.log_text()[-3000:]
        async with http.get(f"{base}/readyz") as response:
            answers.append((response.status, await response.json()))
        spool_peak = max(spool_peak, (await _spool_status(http, base))[1])
        await asyncio.sleep(1.0)
    return answers, spool_peak, sim.request_count - requests_before


@pytest.mark.timeout(300)
async def test_a_start_while_postgresql_is_down_polls_from_the_saved_position_into_the_spool(
    postgres: StoppablePostgres, tmp_path: Path
) -> None:
    served = traffic.generate(6_000, seed=83, broadcaster=BROADCASTER, shows=2)
    backlog, later = served[:4_000], served[4_000:]  # `later` arrives while the database is down
    expected = chaos.expected_contents(served)
    url = await _migrated_database(postgres)
    log_path, spool_file = tmp_path / "daemon.log", tmp_path / "data" / "spool" / "pages.jsonl"
    connection = await asyncpg.connect(url)
    async with (
        simulator.EventsSimulator(username=BROADCASTER, token=TOKEN, events=backlog, page_size=20) as sim,
        aiohttp.ClientSession() as http,
    ):
        env = daemon_env(
            database_url=url, events_base_url=sim.base_url, data_dir=tmp_path / "data", MHC_LOG_LEVEL="info"
        )
        async with running_daemon(env, log_path) as daemon:
            await wait_for_count(connection, COUNT_EVENTS, at_least=1_000, within=60, process=daemon)
            await _stop_cleanly(daemon)
        first_run = int(await connection.fetchval(COUNT_EVENTS))
        await connection.close()
        saved = json.loads((tmp_path / "data" / "position.json").read_text())["last_event_id"]
        postgres.stop()
        try:
            await sim.append(later)
            first_request = sim.request_count
            async with running_daemon(env, log_path) as daemon:
                await chaos.wait_for_log_event(daemon, "health_server_listening", count=2)
                answers, spool_peak, requests = await _probe_outage(daemon, http, sim, 60.0)
                postgres.start()
                connection = await asyncpg.connect(url)
                await wait_for_count(
                    connection, COUNT_EVENTS, at_least=len(expected.event_ids), within=120, process=daemon
                )
                await connection.close()
                await chaos.wait_for_log_event(daemon, "spool_drained")
                await _stop_cleanly(daemon)
        finally:
            if not postgres.is_running():
                postgres.start()
    problems = {body.get("database_problem") for _, body in answers}
    print(
        f"[PostgreSQL down at start] first run stored {first_run} events, saved {saved}; 60 s down: "
        f"{len(answers)} /readyz probes {Counter(status for status, _ in answers)}, {requests} requests, "
        f"spool peak {spool_peak} bytes; problems {problems}"
    )
    assert sim.requests[first_request].event_id == saved, "polling resumes from the saved position"
    assert requests > 0 and spool_peak > 0
    assert all(status == 503 and body["checks"]["database"] == "failing" for status, body in answers), answers
    assert all(problem and problem.startswith("database unavailable") for problem in problems), problems
    assert not spool_file.exists()
    chaos.assert_exactly(await chaos.stored_contents(url), expected, "PostgreSQL down 60 s at start")


@pytest.mark.timeout(300)
async def test_a_first_start_while_postgresql_is_down_waits_for_it_then_stores_everything_once(
    postgres: StoppablePostgres, tmp_path: Path
) -> None:
    """No position saved on this host (a fresh data directory), no database: nothing to poll from yet."""
    served = traffic.generate(2_000, seed=89, broadcaster=BROADCASTER)
    expected = chaos.expected_contents(served)
    url = await postgres.create_database()  # empty: migrated by the daemon once the server is back
    async with simulator.EventsSimulator(
        username=BROADCASTER, token=TOKEN, events=served, page_size=50
    ) as sim:
        env = daemon_env(
            database_url=url, events_base_url=sim.base_url, data_dir=tmp_path / "data", MHC_LOG_LEVEL="info"
        )
        postgres.stop()
        try:
            async with running_daemon(env, tmp_path / "daemon.log") as daemon:
                await chaos.wait_for_log_event(daemon, "waiting_for_database")
                await asyncio.sleep(10.0)
                assert daemon.process.returncode is None, daemon.log_text()[-3000:]
                requests_while_down = sim.request_count
                postgres.start()
                await chaos.wait_for_log_event(daemon, "database_ready", within=60)  # migrated
                connection = await asyncpg.connect(url)
                await wait_for_count(
                    connection, COUNT_EVENTS, at_least=len(expected.event_ids), within=120, process=daemon
                )
                await connection.close()
                await _stop_cleanly(daemon)
        finally:
            if not postgres.is_running():
                postgres.start()
    print(
        f"[first start, PostgreSQL down] {requests_while_down} requests while down, then {sim.request_count}"
    )
    assert requests_while_down == 0
    chaos.assert_exactly(await chaos.stored_contents(url), expected, "first start while PostgreSQL is down")


# -- an API fault storm --------------------------------------------------------------------------------------

HANG_SECONDS = 16.0  # just past the daemon's read timeout with MHC_CB_EVENTS_TIMEOUT=0 (0 + its 15 s margin)


class _Trap:
    """A server on 127.0.0.1 that records every request: foreign nextUrls point here and must never arrive."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def _any(self, request: web.Request) -> web.Response:
        self.requests.append(request.path_qs)
        return web.json_response({"events": [], "nextUrl": None})

    async def __aenter__(self) -> _Trap:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._any)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def _assert_token_nowhere(url: str, log_text: str, endpoints: dict[str, str]) -> None:
    """The token is in no log line, no text or JSON column of any table, no endpoint; checked for real."""
    for form in {TOKEN, quote(TOKEN, safe="")}:
        assert form not in log_text
        for path, text in endpoints.items():
            assert form not in text, path
        scanned, hits = await chaos.text_columns_containing(url, form)
        assert scanned >= 20 and not hits, hits
    # The scans looked where the token would be: failure rows and log lines carry the masked URL.
    _, masked_rows = await chaos.text_columns_containing(url, f"/events/{BROADCASTER}/{logs.MASK}/")
    assert masked_rows.get("api_failures.url", 0) > 0
    assert f"/events/{BROADCASTER}/{logs.MASK}/" in log_text
    print(
        f"[security] token absent: {len(log_text)} log bytes, {scanned} text/JSON columns, {list(endpoints)}"
    )


@pytest.mark.timeout(600)
async def test_an_api_fault_storm_over_50k_events(postgres: StoppablePostgres, tmp_path: Path) -> None:
    built = traffic.build(50_000, seed=13, shows=3, malformed_rate=0.01)
    rates = simulator.FaultRates(
        server_error=0.10, rate_limited=0.05, hang=0.05, truncated=0.02, malformed=0.01, foreign_next_url=0.01
    )
    stored_ids = chaos.expected_contents(built.events).event_ids
    url = await _migrated_database(postgres)
    async with (
        _Trap() as trap,
        simulator.EventsSimulator(
            username=BROADCASTER,
            token=TOKEN,
            events=built.events,
            page_size=500,  # fewer requests: each hang costs the full 15 s read timeout
            seed=53,  # its draws come close to the nominal mix (6 hangs in 127 requests), ~2 min
            rates=rates,
            hang_seconds=HANG_SECONDS,
            foreign_base=trap.base_url,
        ) as sim,
    ):
        env = daemon_env(
            database_url=url,
            events_base_url=sim.base_url,
            data_dir=tmp_path / "data",
            timeout=0,
            MHC_LOG_LEVEL="info",
        )
        async with running_daemon(env, tmp_path / "daemon.log") as daemon:
            base = await chaos.health_url(daemon)
            connection = await asyncpg.connect(url)
            try:
                await wait_for_count(
                    connection, COUNT_EVENTS, at_least=len(stored_ids), within=540, process=daemon
                )
                cursor = await connection.fetchval("SELECT last_event_id FROM ingest_cursor")
            finally:
                await connection.close()
            listening = chaos.listening_addresses(daemon.process.pid)
            endpoints = await chaos.endpoint_texts(base)
            await _stop_cleanly(daemon)
            log_text = daemon.log_text()
    expected = chaos.expected_contents(built.events + sim.injected)
    faults = Counter(request.fault for request in sim.requests)
    print(f"[fault storm] {len(sim.requests)} requests, faults {dict(faults)}; {len(sim.injected)} injected")
    assert all(
        faults[kind] > 0 for kind in ("server_error", "rate_limited", "hang", "truncated", "malformed")
    )
    assert cursor == built.events[-1]["id"]
    chaos.assert_exactly(await chaos.stored_contents(url), expected, "fault storm, 50k events")
    assert len(expected.quarantined) >= len(built.malformed)
    expected_failures = chaos.failures_expected_from(sim.requests)
    stored_failures = await chaos.failures_stored(url)
    print(f"[fault storm] api_failures expected {dict(expected_failures)}, stored {dict(stored_failures)}")
    assert stored_failures == expected_failures
    assert faults["foreign_next_url"] > 0 and trap.requests == [], "a foreign nextUrl was requested"
    assert listening and all(ipaddress.ip_address(host).is_loopback for host in listening), listening
    await _assert_token_nowhere(url, log_text, endpoints)


# -- hostile servers -----------------------------------------------------------------------------------------

STATBATE_TOKEN = "statbatetoken0123456789"
STATS_TOKEN = "statstoken0123456789abcd"
_HOLE = "<raw JSON here>"


def _served_as(event: dict[str, Any], where: tuple[str, ...], raw: str) -> simulator.RawEvent:
    """`event` served with the JSON text `raw` as its value at the key path `where`."""
    copy = json.loads(json.dumps(event))
    *parents, key = where
    functools.reduce(operator.getitem, parents, copy)[key] = _HOLE
    return simulator.RawEvent(event["id"], json.dumps(copy).replace(json.dumps(_HOLE), raw))


def _backlog_with_hostile_events(total: int) -> list[dict[str, Any]]:
    """Realistic traffic in which one chat message nests 1,000 levels deep and one tip has 5,000 digits."""
    served = traffic.generate(total, seed=97, broadcaster=BROADCASTER, shows=2)
    chat = next(i for i in range(total // 3, total) if served[i]["method"] == "chatMessage")
    tip = next(i for i in range(2 * total // 3, total) if served[i]["method"] == "tip")
    # The envelope and its object are two levels; 998 arrays make the event 1,000 deep.
    served[chat] = _served_as(served[chat], ("object", "extra"), "[" * 998 + "]" * 998)
    served[tip] = _served_as(served[tip], ("object", "tip", "tokens"), "9" * 5000)
    return served


async def _one_fault_every(
    sim: simulator.EventsSimulator, faults: list[simulator.Fault], requests: int, daemon: Any
) -> None:
    """Schedule `faults` one at a time, `requests` requests apart, so valid pages come in between."""
    for fault in faults:
        target = sim.request_count + requests
        while sim.request_count < target:
            assert daemon.process.returncode is None, daemon.log_text()[-3000:]
            await asyncio.sleep(0.01)
        sim.schedule(fault)


async def _poll_problems(base: str, seen: set[str]) -> None:
    """Probe /readyz until cancelled, keeping each `poll_problem` it reports while `poll_failing`."""
    async with aiohttp.ClientSession() as http:
        while True:
            with contextlib.suppress(aiohttp.ClientError):  # a daemon that died fails the test elsewhere
                async with http.get(f"{base}/readyz") as response:
                    body = await response.json()
                if "poll_failing" in body["failing"]:
                    seen.add(body["poll_problem"])
            await asyncio.sleep(0.2)


async def _served_with(
    recorder: http_faults.Recorder, fault: str, daemon: Any
) -> http_faults.RecordedRequest:
    """The first request a snapshot simulator answered with `fault`, once it has come (within 150 s)."""
    for _ in range(1500):
        assert daemon.process.returncode is None, daemon.log_text()[-3000:]
        served = [request for request in recorder.requests if request.fault == fault]
        if served:
            return served[0]
        await asyncio.sleep(0.1)
    raise AssertionError(f"no request was answered with {fault}")


@pytest.mark.timeout(400)
async def test_hostile_servers_are_recorded_failures_and_the_daemon_never_exits(
    postgres: StoppablePostgres, tmp_path: Path
) -> None:
    served = _backlog_with_hostile_events(15_000)
    expected = chaos.expected_contents(chaos.decoded(served))
    url = await _migrated_database(postgres)
    async with (
        simulator.EventsSimulator(username=BROADCASTER, token=TOKEN, events=served) as sim,
        statbate.StatbateSimulator(token=STATBATE_TOKEN, auto_members=True) as statbate_sim,
        stats.StatsSimulator(username=BROADCASTER, token=STATS_TOKEN) as stats_sim,
    ):
        # Stats retries the two transient answers, then takes its snapshot; a redirect ends the model lookup;
        # the member batch meets a broken transport, a bomb, then dids of 400 digits.
        for kind in ("malformed_http", "gzip_bomb"):
            stats_sim.faults.add(kind)
        statbate_sim.faults.add("redirect_loop", path_contains="/model/")
        for kind in ("malformed_http", "gzip_bomb", "absurd_integers"):
            statbate_sim.faults.add(kind, path_contains="/batch")
        env = daemon_env(
            database_url=url,
            events_base_url=sim.base_url,
            data_dir=tmp_path / "data",
            MHC_LOG_LEVEL="info",
            MHC_STATBATE_TOKEN=STATBATE_TOKEN,
            MHC_STATBATE_BASE_URL=statbate_sim.base_url,
            MHC_CB_STATS_TOKEN=STATS_TOKEN,
            MHC_CB_STATS_URL=stats_sim.base_url,
        )
        async with running_daemon(env, tmp_path / "daemon.log") as daemon:
            problems: set[str] = set()
            probing = asyncio.create_task(_poll_problems(await chaos.health_url(daemon), problems))
            hostile = [simulator.Fault.hostile(kind) for kind in http_faults.HOSTILE]
            await _one_fault_every(sim, hostile, 10, daemon)
            absurd = await _served_with(statbate_sim.recorder, "absurd_integers", daemon)
            connection = await asyncpg.connect(url)
            try:
                for query, count in (
                    (COUNT_EVENTS, len(expected.event_ids)),
                    ("SELECT count(*) FROM snapshots WHERE source = 'cb_stats'", 1),
                    (
                        "SELECT count(*) FROM snapshot_misses WHERE source = 'statbate_member'",
                        len(absurd.names),
                    ),
                ):
                    await wait_for_count(connection, query, at_least=count, within=240, process=daemon)
                stats_after_failures = await connection.fetchval(
                    "SELECT count(*) FROM snapshots WHERE source = 'cb_stats' AND captured_at >"
                    " (SELECT max(occurred_at) FROM api_failures WHERE api = 'cb_stats')"
                )
            finally:
                await connection.close()
            probing.cancel()
            assert daemon.process.returncode is None, "the daemon exited before SIGTERM"
            peak_mib = daemon.peak_rss_mib()
            await _stop_cleanly(daemon)
            records = chaos.log_records(daemon)
    faults = Counter(request.fault for request in sim.requests if request.fault)
    failures = {api: await chaos.failures_stored(url, api) for api in ("cb_events", "cb_stats", "statbate")}
    print(
        f"[hostile servers] {len(sim.requests)} Events requests, hostile {dict(faults)}; "
        f"api_failures {failures}; {len(absurd.names)} dids of 400 digits; peak RSS {peak_mib:.0f} MiB; "
        f"/readyz said {sorted(problems)}"
    )
    assert faults == Counter(http_faults.HOSTILE)
    assert [record.get("event") for record in records].count("polling_started") == 1  # one process, one run
    assert not [record for record in records if record.get("event") == "task_failed_restarting"]
    chaos.assert_exactly(await chaos.stored_contents(url), expected, "hostile servers, 15k events")
    assert expected.quarantined == {event["id"] for event in served if isinstance(event, simulator.RawEvent)}
    assert failures["cb_events"] == chaos.failures_expected_from(sim.requests)
    assert failures["cb_stats"] == Counter(connection=1, bad_body=1) and stats_after_failures >= 1
    assert failures["statbate"] == Counter(http_4xx=1, connection=1, bad_body=1, not_found=len(absurd.names))
    assert await chaos.failures_stored(url) == sum(failures.values(), Counter())  # no other API's rows
    assert peak_mib <= chaos.MEMORY_BOUND_MIB
    assert problems, "/readyz never said poll_failing while a hostile answer was retried"


@pytest.mark.timeout(300)
async def test_kill_9_while_spooling_and_while_draining_loses_and_doubles_nothing(
    postgres: StoppablePostgres, tmp_path: Path
) -> None:
    """Pages queued in memory when the database went away are spooled too, so a crash then loses none."""
    rate, seconds = 300, 40
    served = traffic.generate(rate * seconds, seed=77, shows=2)
    expected = chaos.expected_contents(served)
    url = await _migrated_database(postgres)
    rng = random.Random(77)  # reproducible kill moments
    log_path = tmp_path / "daemon.log"
    spool_file = tmp_path / "data" / "spool" / "pages.jsonl"
    async with simulator.EventsSimulator(username=BROADCASTER, token=TOKEN, events=served, rate=rate) as sim:
        env = daemon_env(
            database_url=url, events_base_url=sim.base_url, data_dir=tmp_path / "data", MHC_LOG_LEVEL="info"
        )
        connection = await asyncpg.connect(url)
        async with running_daemon(env, log_path) as daemon:
            await wait_for_count(connection, COUNT_EVENTS, at_least=rate * 3, within=60, process=daemon)
            await connection.close()
            postgres.stop()
            try:
                await asyncio.sleep(rng.uniform(4.0, 6.0))
                await daemon.kill()  # while spooling
            finally:
                postgres.start()
        spooled = spool_file.stat().st_size
        async with running_daemon(env, log_path) as daemon:
            await chaos.wait_for_log_event(daemon, "polling_started", count=2)
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            await daemon.kill()  # while draining (or just after: the spool is re-read either way)
        connection = await asyncpg.connect(url)
        try:
            async with running_daemon(env, log_path) as daemon:
                await wait_for_count(
                    connection, COUNT_EVENTS, at_least=len(expected.event_ids), within=120, process=daemon
                )
                await chaos.wait_for_log_event(daemon, "spool_drained")
                await _stop_cleanly(daemon)
        finally:
            await connection.close()
    records = chaos.log_file_records(log_path)
    carried = [record["uncommitted"] for record in records if record.get("event") == "spooling_to_disk"]
    print(f"[kill -9 while spooling/draining] {spooled} spool bytes at the kill; in-memory pages {carried}")
    assert spooled > 0 and not spool_file.exists()
    chaos.assert_exactly(await chaos.stored_contents(url), expected, "kill -9 while spooling and draining")
