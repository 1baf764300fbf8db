"""`mhc-daemon run` as a real child process: SIGKILL at random moments, SIGTERM mid-backlog, systemd notify,
SIGHUP mid-drain, a read-only database, an event the schema refuses, a snapshot task that keeps failing.

The simulator runs in this process on 127.0.0.1; the daemon writes into a fresh test database.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import itertools
import json
import random
import signal
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from daemon import ingest, spool
from daemon.simulator import events, traffic
from tests import chaos_support as chaos
from tests.daemon_process import (
    BROADCASTER,
    TOKEN,
    DaemonProcess,
    daemon_env,
    running_daemon,
    wait_for_count,
)

pytestmark = pytest.mark.slow

COUNT_EVENTS = "SELECT count(*) FROM events"


def _expected_interaction_ids(generated: list[dict[str, object]]) -> set[str]:
    batch = ingest.parse_page(
        generated, broadcaster=BROADCASTER, received_at=dt.datetime.now(dt.UTC), next_event_id=None
    )
    assert not batch.quarantined
    return {row.event_id for row in batch.interactions}


async def test_sigkill_at_random_moments_loses_and_doubles_nothing(
    database_url: str, connection: asyncpg.Connection, tmp_path: Path
) -> None:
    generated = traffic.generate(20_000, seed=11, broadcaster=BROADCASTER, shows=3)
    ids = {str(event["id"]) for event in generated}
    chooser = random.Random(20_000)
    log_path = tmp_path / "daemon.log"
    async with events.EventsSimulator(
        username=BROADCASTER, token=TOKEN, events=generated, page_size=20
    ) as sim:
        env = daemon_env(database_url=database_url, events_base_url=sim.base_url, data_dir=tmp_path / "data")
        kills = 0
        while kills < 15:
            before = int(await connection.fetchval(COUNT_EVENTS))
            if before == len(ids):
                break
            async with running_daemon(env, log_path) as child:
                # Kill only once this run has committed something, at a random instant after that: mid-drain,
                # often mid-transaction.
                await wait_for_count(connection, COUNT_EVENTS, at_least=before + 1, within=60, process=child)
                await asyncio.sleep(chooser.uniform(0.0, 0.2))
                await child.kill()
                kills += 1
        assert kills >= 10, (
            f"the backlog drained after {kills} kills; the test needs at least 10 mid-drain kills"
        )
        log_path.rename(tmp_path / "killed-runs.log")
        async with running_daemon(env, log_path) as child:
            await child.wait_for_log("polling_started")
            await wait_for_count(connection, COUNT_EVENTS, at_least=len(ids), within=120, process=child)
            child.signal(signal.SIGTERM)
            assert await child.wait(within=30) == 0

    stored = [row["event_id"] for row in await connection.fetch("SELECT event_id FROM events")]
    assert len(stored) == len(ids) and set(stored) == ids
    linked = [
        row["e"] for row in await connection.fetch("SELECT metadata->>'event_id' AS e FROM interactions")
    ]
    assert len(linked) == len(set(linked)), "an interaction was written twice"
    assert set(linked) == _expected_interaction_ids(generated)
    sessions = await connection.fetch("SELECT status FROM stream_sessions ORDER BY started_at")
    assert [row["status"] for row in sessions] == ["ENDED"] * 3
    print(f"\n{kills} SIGKILLs: {len(stored)} events, {len(linked)} interactions, 0 duplicates")
    logs = log_path.read_text(encoding="utf-8") + (tmp_path / "killed-runs.log").read_text(encoding="utf-8")
    assert TOKEN not in logs
    dump = await connection.fetchval(
        "SELECT concat_ws(' ', (SELECT string_agg(t::text, ' ') FROM api_failures t),"
        " (SELECT string_agg(t::text, ' ') FROM ingest_cursor t))"
    )
    assert TOKEN not in (dump or "")


async def test_sigterm_mid_backlog_commits_the_last_batch_and_saves_the_cursor(
    database_url: str, connection: asyncpg.Connection, tmp_path: Path
) -> None:
    generated = traffic.generate(20_000, seed=5, broadcaster=BROADCASTER)
    async with events.EventsSimulator(
        username=BROADCASTER, token=TOKEN, events=generated, page_size=100
    ) as sim:
        env = daemon_env(
            database_url=database_url,
            events_base_url=sim.base_url,
            data_dir=tmp_path / "data",
            MHC_SHUTDOWN_TIMEOUT="5",
        )
        async with running_daemon(env, tmp_path / "daemon.log") as child:
            await wait_for_count(connection, COUNT_EVENTS, at_least=500, within=60, process=child)
            loop = asyncio.get_running_loop()
            sent = loop.time()
            child.signal(signal.SIGTERM)
            assert await child.wait(within=5 + 3) == 0
            took = loop.time() - sent
        stored = int(await connection.fetchval(COUNT_EVENTS))
        assert stored < len(generated), "the backlog must still be draining when SIGTERM arrives"
    assert stored % 100 == 0, "pages are committed whole"
    cursor = await connection.fetchval(
        "SELECT last_event_id FROM ingest_cursor WHERE broadcaster = $1", BROADCASTER
    )
    stored_ids = [row["event_id"] for row in await connection.fetch("SELECT event_id FROM events")]
    newest = max(stored_ids, key=lambda event_id: tuple(int(part) for part in event_id.split("-")))
    assert cursor == newest, "the cursor is the last committed event"
    lines = [json.loads(line) for line in (tmp_path / "daemon.log").read_text().splitlines() if line.strip()]
    assert any(line["event"] == "stopped" for line in lines)
    print(f"\nSIGTERM after {stored} events: exit 0 in {took:.2f} s, cursor {cursor}")


def _notify_socket(path: Path) -> socket.socket:
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.setblocking(False)
    return receiver


async def _messages(receiver: socket.socket, seconds: float) -> list[tuple[float, str]]:
    """Every datagram received within `seconds`, with its arrival time."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    found: list[tuple[float, str]] = []
    while (left := end - loop.time()) > 0:
        try:
            data = await asyncio.wait_for(loop.sock_recv(receiver, 4096), timeout=left)
        except TimeoutError:
            break
        found.extend((loop.time(), line) for line in data.decode().splitlines())
    return found


async def test_systemd_ready_then_watchdog_pings_that_stop_when_polling_hangs(
    database_url: str, connection: asyncpg.Connection, tmp_path: Path
) -> None:
    generated = traffic.generate(300, seed=3, broadcaster=BROADCASTER)
    receiver = _notify_socket(tmp_path / "notify.sock")
    try:
        async with events.EventsSimulator(
            username=BROADCASTER, token=TOKEN, events=generated, hang_seconds=120
        ) as sim:
            env = daemon_env(
                database_url=database_url,
                events_base_url=sim.base_url,
                data_dir=tmp_path / "data",
                NOTIFY_SOCKET=str(tmp_path / "notify.sock"),
                WATCHDOG_USEC="2000000",  # pings every second
            )
            async with running_daemon(env, tmp_path / "daemon.log") as child:
                healthy = await _messages(receiver, 6.0)
                texts = [text for _, text in healthy]
                assert "READY=1" in texts, texts
                assert sim.request_count >= 1
                ready_at = next(at for at, text in healthy if text == "READY=1")
                pings = [at for at, text in healthy if text == "WATCHDOG=1" and at > ready_at]
                assert len(pings) >= 3, texts

                # Every request from now on hangs: the poll loop makes no progress, so the pings must stop
                # once one long-poll (1 s) plus the stall margin (10 s) has passed without progress.
                sim.schedule(*[events.Fault.hang() for _ in range(10)])
                hung = await _messages(receiver, 16.0)
                hung_pings = [at for at, text in hung if text == "WATCHDOG=1"]
                quiet = [later - earlier for earlier, later in itertools.pairwise(hung_pings)]
                last = hung[-1][0] if hung else 0.0
                longest_gap = max([*quiet, last - (hung_pings[-1] if hung_pings else 0.0)])
                assert longest_gap >= 4.0, f"pings kept coming while the poll hung: {hung_pings}"
                assert any(text.startswith("STATUS=") for _, text in hung)
                child.signal(signal.SIGTERM)
                assert await child.wait(within=15) == 0
        after_sigterm = [text for _, text in await _messages(receiver, 0.5)]
        assert "STOPPING=1" in after_sigterm, after_sigterm
    finally:
        receiver.close()


async def test_run_without_a_token_is_a_config_error(tmp_path: Path, database_url: str) -> None:
    env = daemon_env(
        database_url=database_url, events_base_url="http://127.0.0.1:9", data_dir=tmp_path / "data"
    )
    del env["MHC_CB_EVENTS_TOKEN"]
    async with running_daemon(env, tmp_path / "daemon.log") as child:
        assert await child.wait(within=30) == 78
    text = child.log_text()
    assert "MHC_CB_EVENTS_TOKEN must be set" in text and "Traceback" not in text


# -- Unkillable: database refusals and signals ---------------------------------------------------------------


def _database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


async def _set_read_only(admin: asyncpg.Connection, database: str, *, read_only: bool) -> None:
    """New sessions of `database` refuse (or take again) every write; the daemon's sessions are ended so that
    the ones it opens next pick the setting up. No ALTER SYSTEM: safe on a shared server."""
    change = "SET default_transaction_read_only = on" if read_only else "RESET default_transaction_read_only"
    await admin.execute(f'ALTER DATABASE "{database}" {change}')  # a name from our own fixture
    await admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = $1 AND application_name LIKE 'mhc-daemon%'",
        database,
    )


async def _wait_for_read_only_refusal(child: DaemonProcess, *, within: float = 30.0) -> None:
    """Until the daemon logs a write refused as read-only (not merely its session ended)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not any(
        record.get("event") == "database_unavailable" and "read-only" in record.get("error", "")
        for record in chaos.log_records(child)
    ):
        assert loop.time() < deadline and child.process.returncode is None, child.log_text()[-3000:]
        await asyncio.sleep(0.1)


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


async def _wait_for_growth(path: Path, beyond: int, *, within: float = 30.0) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while (size := _size(path)) <= beyond:
        assert loop.time() < deadline, f"{path} did not grow beyond {beyond} bytes within {within} s"
        await asyncio.sleep(0.05)
    return size


async def test_a_read_only_database_spools_pages_and_stores_each_once_when_writable_again(
    server_url: str, database_url: str, connection: asyncpg.Connection, tmp_path: Path
) -> None:
    served = traffic.generate(5_000, seed=23, broadcaster=BROADCASTER, shows=2)
    backlog, later = served[:4_000], served[4_000:]  # `later` arrives while writes are refused
    expected = chaos.expected_contents(served)
    spool_file = tmp_path / "data" / "spool" / "pages.jsonl"
    database = _database_name(database_url)
    admin: asyncpg.Connection = await asyncpg.connect(server_url)
    try:
        async with events.EventsSimulator(
            username=BROADCASTER, token=TOKEN, events=backlog, page_size=20
        ) as sim:
            env = daemon_env(
                database_url=database_url, events_base_url=sim.base_url, data_dir=tmp_path / "data"
            )
            async with running_daemon(env, tmp_path / "daemon.log") as child:
                await wait_for_count(connection, COUNT_EVENTS, at_least=300, within=60, process=child)
                await _set_read_only(admin, database, read_only=True)
                stored_at_switch = int(await connection.fetchval(COUNT_EVENTS))
                await chaos.wait_for_log_event(child, "spooling_to_disk")
                await _wait_for_read_only_refusal(child)
                spooled = await _wait_for_growth(spool_file, 0)
                await sim.append(later)
                grown = await _wait_for_growth(spool_file, spooled)
                await _set_read_only(admin, database, read_only=False)
                await wait_for_count(
                    connection, COUNT_EVENTS, at_least=len(expected.event_ids), within=60, process=child
                )
                await chaos.wait_for_log_event(child, "spool_drained")
                child.signal(signal.SIGTERM)
                assert await child.wait(within=30) == 0
    finally:
        await _set_read_only(admin, database, read_only=False)
        await admin.close()
    refusals = [
        record for record in chaos.log_records(child) if record.get("event") == "database_unavailable"
    ]
    print(
        f"\nread-only after {stored_at_switch} events: {len(refusals)} database_unavailable lines "
        f"({sum('read-only' in record['error'] for record in refusals)} read-only), "
        f"spool {spooled} -> {grown} bytes, drained"
    )
    assert stored_at_switch < len(backlog), "the database must turn read-only mid-drain"
    assert not spool_file.exists()
    chaos.assert_exactly(await chaos.stored_contents(database_url), expected, "read-only, then writable")


async def test_ten_sighups_while_draining_neither_stop_nor_disturb_the_daemon(
    database_url: str, connection: asyncpg.Connection, tmp_path: Path
) -> None:
    served = traffic.generate(20_000, seed=31, broadcaster=BROADCASTER, shows=2)
    expected = chaos.expected_contents(served)
    async with events.EventsSimulator(username=BROADCASTER, token=TOKEN, events=served) as sim:
        env = daemon_env(database_url=database_url, events_base_url=sim.base_url, data_dir=tmp_path / "data")
        async with running_daemon(env, tmp_path / "daemon.log") as child:
            await child.wait_for_log("polling_started")
            await wait_for_count(connection, COUNT_EVENTS, at_least=500, within=60, process=child)
            for count in range(1, 11):
                child.signal(signal.SIGHUP)
                await chaos.wait_for_log_event(child, "reloaded", count=count)  # one at a time: none merge
            after_reloads = int(await connection.fetchval(COUNT_EVENTS))
            await wait_for_count(
                connection, COUNT_EVENTS, at_least=len(expected.event_ids), within=120, process=child
            )
            child.signal(signal.SIGTERM)
            assert await child.wait(within=30) == 0
    reloads = [record for record in chaos.log_records(child) if record.get("event") == "reloaded"]
    print(
        f"\n10 SIGHUPs done with {after_reloads} of {len(served)} events stored; "
        f"{len(reloads)} reloaded lines"
    )
    assert after_reloads < len(served), "the SIGHUPs must arrive while the backlog drains"
    assert len(reloads) == 10
    chaos.assert_exactly(await chaos.stored_contents(database_url), expected, "10 SIGHUPs mid-drain")


POISON = "poison pill"


def _with_poison(backlog: list[dict[str, Any]], where: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`backlog` with one valid chat message saying POISON: before the first event (first of the first page),
    after the last (last of the last page, a full one with 599 events in pages of 50), or mid-page."""
    poison = copy.deepcopy(next(event for event in backlog if event["method"] == "chatMessage"))
    poison["object"]["message"]["message"] = POISON
    if where == "first":
        poison["id"] = f"{traffic.DEFAULT_START_MS - 1_000}-0"
        return [poison, *backlog], poison
    if where == "last":
        poison["id"] = f"{(traffic.event_key(backlog[-1]['id']) or (0, 0))[0] + 1_000}-0"
        return [*backlog, poison], poison
    index = next(
        index
        for index, event in enumerate(backlog)
        if index > len(backlog) // 2 and index % 50 not in (0, 49) and event["method"] == "chatMessage"
    )
    poison["id"] = backlog[index]["id"]
    return [*backlog[:index], poison, *backlog[index + 1 :]], poison


@pytest.mark.parametrize("where", ["middle", "first", "last"])
async def test_an_event_the_schema_always_refuses_is_quarantined_and_the_rest_stored_once(
    database_url: str, connection: asyncpg.Connection, tmp_path: Path, where: str
) -> None:
    await connection.execute(
        f"ALTER TABLE interactions ADD CONSTRAINT test_poison CHECK (content <> '{POISON}')"
    )
    served, poison = _with_poison(traffic.generate(599, seed=41, broadcaster=BROADCASTER), where)
    expected = chaos.expected_contents([event for event in served if event is not poison])
    async with events.EventsSimulator(username=BROADCASTER, token=TOKEN, events=served, page_size=50) as sim:
        env = daemon_env(database_url=database_url, events_base_url=sim.base_url, data_dir=tmp_path / "data")
        async with running_daemon(env, tmp_path / "daemon.log") as child:
            await wait_for_count(
                connection, COUNT_EVENTS, at_least=len(expected.event_ids), within=60, process=child
            )
            await wait_for_count(
                connection, "SELECT count(*) FROM quarantined_events", at_least=1, within=30, process=child
            )
            cursor = await connection.fetchval("SELECT last_event_id FROM ingest_cursor")
            child.signal(signal.SIGTERM)
            assert await child.wait(within=30) == 0
    quarantined = await connection.fetch("SELECT event_id, method, reason FROM quarantined_events")
    splits = [
        record for record in chaos.log_records(child) if record.get("event") == "batch_refused_splitting"
    ]
    assert [(row["event_id"], row["method"]) for row in quarantined] == [(poison["id"], "chatMessage")]
    reason = quarantined[0]["reason"]
    print(f"\npoison {where} ({poison['id']}): {len(splits)} splits, quarantined: {reason.splitlines()[0]}")
    assert splits, "the poison must be refused within a page of many events"
    assert reason.startswith("refused by PostgreSQL") and "test_poison" in reason, reason
    stored = await chaos.stored_contents(database_url)
    assert poison["id"] not in stored.event_ids
    assert (
        stored.event_ids == expected.event_ids
        and stored.interaction_event_ids == expected.interaction_event_ids
    )
    assert cursor == served[-1]["id"], "the read position moves past the end, poison or not"


async def test_a_snapshot_task_that_keeps_failing_is_restarted_and_capture_goes_on(
    database_url: str, connection: asyncpg.Connection, tmp_path: Path
) -> None:
    # The Statbate side reads snapshot_misses when it starts, before any request: without the table every
    # start fails with an error the scheduler does not expect. The event path never reads that table.
    await connection.execute("ALTER TABLE snapshot_misses RENAME TO snapshot_misses_away")
    served = traffic.generate(3_000, seed=51, broadcaster=BROADCASTER)
    expected = chaos.expected_contents(served)
    failures = "SELECT count(*) FROM api_failures WHERE api = 'snapshot_scheduler'"
    async with events.EventsSimulator(username=BROADCASTER, token=TOKEN, events=served, page_size=50) as sim:
        env = daemon_env(
            database_url=database_url,
            events_base_url=sim.base_url,
            data_dir=tmp_path / "data",
            MHC_STATBATE_TOKEN="statbatetoken0123456789",
            MHC_STATBATE_BASE_URL="http://127.0.0.1:9",  # never reached: the start fails first
        )
        async with running_daemon(env, tmp_path / "daemon.log") as child:
            await wait_for_count(connection, failures, at_least=2, within=60, process=child)
            await wait_for_count(
                connection, COUNT_EVENTS, at_least=len(expected.event_ids), within=60, process=child
            )
            child.signal(signal.SIGTERM)  # while the task waits to restart
            assert await child.wait(within=15) == 0
    rows = await connection.fetch(
        "SELECT operation, error_kind, body_excerpt, occurred_at FROM api_failures"
        " WHERE api = 'snapshot_scheduler' ORDER BY occurred_at"
    )
    restarts = [
        record for record in chaos.log_records(child) if record.get("event") == "task_failed_restarting"
    ]
    print(
        f"\nsnapshot task failed {len(rows)} times, restarts after {[r['restart_in_s'] for r in restarts]} s"
    )
    assert [record["task"] for record in restarts] == ["snapshot_scheduler"] * len(rows)
    delays = [float(record["restart_in_s"]) for record in restarts]
    # Doubling from 2 s, each jittered between half and all of its ceiling.
    assert all(2.0**n / 2 <= delay <= 2.0**n for n, delay in enumerate(delays, start=1)), delays
    assert all(row["error_kind"] == "internal_error" and row["operation"] == "run" for row in rows)
    assert all("snapshot_misses" in row["body_excerpt"] for row in rows), rows
    gaps = [
        (later - earlier).total_seconds()
        for earlier, later in itertools.pairwise(r["occurred_at"] for r in rows)
    ]
    assert all(gap >= delay * 0.95 for gap, delay in zip(gaps, delays, strict=False)), (gaps, delays)
    chaos.assert_exactly(await chaos.stored_contents(database_url), expected, "snapshot task failing")


async def test_a_rewritten_token_file_and_sighup_rotate_the_token_without_a_restart(
    database_url: str, connection: asyncpg.Connection, tmp_path: Path
) -> None:
    """The file is rewritten and the API accepts both tokens for a while; after SIGHUP every request carries
    the new one (the old one never again), nothing is lost, and the process is the same."""
    old, new = "old0token0aaaaaaaaaaaaaaa", "new0token0bbbbbbbbbbbbbbb"
    generated = traffic.generate(4000, seed=23, broadcaster=BROADCASTER, shows=1)
    token_file = tmp_path / "token"
    token_file.write_text(old)
    async with events.EventsSimulator(
        username=BROADCASTER, token=old, events=generated[:2000], page_size=100
    ) as sim:
        env = daemon_env(
            database_url=database_url,
            events_base_url=sim.base_url,
            data_dir=tmp_path / "data",
            MHC_CB_EVENTS_TOKEN_FILE=str(token_file),
        )
        del env["MHC_CB_EVENTS_TOKEN"]
        async with running_daemon(env, tmp_path / "daemon.log") as daemon:
            await wait_for_count(connection, COUNT_EVENTS, at_least=2000, within=60, process=daemon)
            token_file.write_text(new + "\n")
            sim.token, sim.retired_tokens = new, {old}
            rotated_at = sim.request_count
            daemon.signal(signal.SIGHUP)
            await daemon.wait_for_log("reloaded")
            await sim.append(generated[2000:])
            await wait_for_count(connection, COUNT_EVENTS, at_least=4000, within=60, process=daemon)
            daemon.signal(signal.SIGTERM)
            assert await daemon.wait(within=30) == 0
    paths = [request.path_qs for request in sim.requests]
    first_new = next(index for index, path in enumerate(paths) if f"/{new}/" in path)
    print(f"token rotated at request {rotated_at}; the new token from request {first_new} of {len(paths)}")
    assert first_new <= rotated_at + 2, "the request after the reload carries the new token"
    assert all(f"/{new}/" in path for path in paths[first_new:]), "the old token was sent again"
    assert all(request.status != 401 for request in sim.requests), "no rejection was needed"
    assert int(await connection.fetchval(COUNT_EVENTS)) == len({event["id"] for event in generated})
    assert '"tokens_changed": ["cb_events_token"]' in daemon.log_text()
    assert old not in daemon.log_text() and new not in daemon.log_text()


async def test_a_damaged_spool_record_is_set_aside_reported_and_the_rest_drained(
    database_url: str, connection: asyncpg.Connection, tmp_path: Path
) -> None:
    """A spool left by an outage, with one record damaged in the middle: the daemon starts, drains the
    others in order, moves the damaged one aside and records it in api_failures."""
    generated = traffic.generate(600, seed=29, broadcaster=BROADCASTER, shows=1)
    pages = [generated[start : start + 100] for start in range(0, 600, 100)]
    queue = spool.Spool(tmp_path / "data" / "spool", max_bytes=10_000_000)
    for page in pages:
        queue.append(spool.SpooledPage(page, page[-1]["id"], dt.datetime.now(dt.UTC)))
    lines = queue.path.read_bytes().splitlines(keepends=True)
    damaged = bytearray(lines[2])
    damaged[len(damaged) // 2] ^= 0x01  # one flipped bit inside the third page's JSON
    queue.path.write_bytes(b"".join([*lines[:2], bytes(damaged), *lines[3:]]))
    async with events.EventsSimulator(username=BROADCASTER, token=TOKEN, events=generated) as sim:
        env = daemon_env(database_url=database_url, events_base_url=sim.base_url, data_dir=tmp_path / "data")
        async with running_daemon(env, tmp_path / "daemon.log") as daemon:
            await daemon.wait_for_log("spool_drained")
            rows = await connection.fetch(
                "SELECT url, body_excerpt FROM api_failures"
                " WHERE api = 'spool' AND error_kind = 'damaged_record'"
            )
            stored = {row[0] for row in await connection.fetch("SELECT event_id FROM events")}
            daemon.signal(signal.SIGTERM)
            assert await daemon.wait(within=30) == 0
    expected = {event["id"] for index, page in enumerate(pages) if index != 2 for event in page}
    assert stored == expected, "every page but the damaged one, drained from the spool"
    assert sim.request_count >= 1 and sim.requests[0].event_id == pages[-1][-1]["id"], "resumes after it"
    assert len(rows) == 1 and "checksum" in rows[0]["body_excerpt"], rows
    assert _file_and_mode(Path(rows[0]["url"])) == (bytes(damaged), 0o600)


def _file_and_mode(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mode & 0o777
