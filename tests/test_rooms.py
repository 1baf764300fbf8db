"""Issue 11: many rooms in one daemon, as a user runs it: `rooms add/disable`, token files, SIGHUP, /status.

One simulator serves every room (each its own token and backlog); the daemon is a real child process.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from daemon import rooms
from daemon.simulator import events as simulator
from daemon.simulator import stats, traffic
from tests import chaos_support as chaos
from tests.daemon_process import daemon_env, run_command, running_daemon, wait_for_count

BACKLOG = 600


def _room(name: str, count: int = BACKLOG, **options: Any) -> simulator.EventsSimulator:
    """A room whose backlog has the same ids as every other room's built here (same seed and start)."""
    stream = traffic.build(count, seed=7, broadcaster=name)
    return simulator.EventsSimulator(
        username=name, token=f"token-of-{name}-0123456789", events=stream.events, **options
    )


def _multi_room_env(tmp_path: Path, database_url: str, base_url: str) -> dict[str, str]:
    env = daemon_env(
        database_url=database_url,
        events_base_url=base_url,
        data_dir=tmp_path / "data",
        MHC_TOKENS_DIR=str(tmp_path / "tokens"),
    )
    del env["MHC_CB_USERNAME"], env["MHC_CB_EVENTS_TOKEN"]
    (tmp_path / "tokens").mkdir(mode=0o700)
    return env


def _give_token(tmp_path: Path, name: str, token: str, kind: str = "events") -> None:
    path = tmp_path / "tokens" / f"{name}.{kind}"
    path.write_text(token + "\n")
    path.chmod(0o600)


def _rooms_command(env: dict[str, str], tmp_path: Path, *args: str) -> str:
    result = run_command(["rooms", *args], env, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


async def stored_ids_by_room(connection: asyncpg.Connection) -> dict[str, Counter[str]]:
    rows = await connection.fetch("SELECT broadcaster, event_id FROM events")
    found: dict[str, Counter[str]] = {}
    for row in rows:
        found.setdefault(row["broadcaster"], Counter())[row["event_id"]] += 1
    return found


def _delivered_ids(room: simulator.EventsSimulator) -> Counter[str]:
    return Counter(entry.event["id"] for entry in room._entries)


async def _status(http: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with http.get(f"{base}/status") as response:
        body: dict[str, Any] = await response.json()
    return body


async def _until(check: Any, within: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await check():
        assert loop.time() < deadline, f"not within {within} s: {what}"
        await asyncio.sleep(0.1)


async def test_rooms_are_added_disabled_and_paused_one_at_a_time_while_the_daemon_runs(
    tmp_path: Path, database_url: str, connection: asyncpg.Connection
) -> None:
    alice, bob, carol = _room("alice_cam"), _room("bob_cam"), _room("carol_cam")
    stats_tokens = {"alice_cam": "alice-stats-token-0123456789", "dave_cam": "dave-stats-token-0123456789"}
    async with (
        simulator.RoomsSimulator([alice, bob, carol]) as server,
        stats.running(username="nobody_here", rooms=stats_tokens) as stats_api,
        aiohttp.ClientSession() as http,
    ):
        env = _multi_room_env(tmp_path, database_url, server.base_url)
        env["MHC_CB_STATS_URL"] = stats_api.base_url
        for room in (alice, bob):
            _give_token(tmp_path, room.username, room.token)
        # Alice's room has a Stats API token of its own: her room is polled for Stats too.
        _give_token(tmp_path, "alice_cam", stats_tokens["alice_cam"], kind="stats")
        _give_token(tmp_path, carol.username, "a-token-the-api-rejects-000")
        for name in ("alice_cam", "bob_cam", "carol_cam"):
            assert f"room {name} added" in _rooms_command(env, tmp_path, "add", name)
        async with running_daemon(env, tmp_path / "daemon.log") as daemon:
            base = await chaos.health_url(daemon)

            async def drained(*rooms: simulator.EventsSimulator) -> bool:
                stored = await stored_ids_by_room(connection)
                return all(stored.get(room.username) == _delivered_ids(room) for room in rooms)

            await _until(lambda: drained(alice, bob), 60, "alice and bob drained")
            # The same ids in two rooms: each room has all of its own, once.
            assert _delivered_ids(alice).keys() == _delivered_ids(bob).keys()
            # Carol's token is rejected: her room alone is paused, recorded and visible.
            rooms = {room["name"]: room for room in (await _status(http, base))["rooms"]}
            assert rooms["carol_cam"]["state"] == "token_rejected", rooms
            assert rooms["alice_cam"]["state"] == "polling" and rooms["alice_cam"]["events_stored"] == BACKLOG
            rejected = await connection.fetchval(
                "SELECT count(*) FROM api_failures"
                " WHERE error_kind = 'auth_rejected' AND url LIKE '%carol_cam%'"
            )
            assert rejected >= 1
            assert "carol_cam" not in (await stored_ids_by_room(connection))
            async with http.get(f"{base}/metrics") as response:
                exposed = await response.text()
            assert chaos.metric_value(exposed, 'mhc_room_token_rejected{room="carol_cam"}') == 1
            assert chaos.metric_value(exposed, 'mhc_room_token_rejected{room="alice_cam"}') == 0
            assert chaos.metric_value(exposed, 'mhc_room_events_total{room="bob_cam"}') == BACKLOG

            # A room added while running is polled after a SIGHUP, without a restart.
            dave = server.add(_room("dave_cam", 300))
            _give_token(tmp_path, dave.username, dave.token)
            _give_token(tmp_path, dave.username, stats_tokens["dave_cam"], kind="stats")
            _rooms_command(env, tmp_path, "add", "dave_cam")
            # Bob is disabled: his unit stops; events he gets later are not fetched.
            assert "room bob_cam disabled" in _rooms_command(env, tmp_path, "disable", "bob_cam")
            daemon.signal(signal.SIGHUP)
            await _until(lambda: drained(dave), 60, "dave drained")
            await daemon.wait_for_log("room_stopped")
            asked = bob.request_count
            await bob.append(
                traffic.build(50, seed=8, broadcaster="bob_cam", start_ms=traffic.DEFAULT_START_MS * 2).events
            )
            await alice.append(
                traffic.build(
                    50, seed=8, broadcaster="alice_cam", start_ms=traffic.DEFAULT_START_MS * 2
                ).events
            )
            await _until(lambda: drained(alice), 30, "alice's new events stored")
            # The long-poll in flight at the stop is logged by the simulator when it ends (at the append).
            assert bob.request_count <= asked + 1, "a disabled room is not polled"
            assert sum((await stored_ids_by_room(connection))["bob_cam"].values()) == BACKLOG

            listing = json.loads(_rooms_command(env, tmp_path, "list", "--json"))
            states = {item["name"]: (item["state"], item["token_file"]) for item in listing}
            assert states == {
                "alice_cam": ("enabled", True),
                "bob_cam": ("disabled", True),
                "carol_cam": ("enabled", True),
                "dave_cam": ("enabled", True),
            }
            assert next(item for item in listing if item["name"] == "dave_cam")["last_event_id"]
            assert "bob_cam" not in {room["name"] for room in (await _status(http, base))["rooms"]}

            # Carol's token file is fixed and SIGHUP sent: her room asks again at once (not after the 5 min
            # a rejected token waits) and drains.
            _give_token(tmp_path, carol.username, carol.token)
            daemon.signal(signal.SIGHUP)
            await _until(lambda: drained(carol), 30, "carol drained after her token was fixed")
            rooms = {room["name"]: room for room in (await _status(http, base))["rooms"]}
            assert rooms["carol_cam"]["state"] == "polling", rooms

            async def stats_taken() -> bool:
                rows = await connection.fetch(
                    "SELECT DISTINCT p.username FROM snapshots s JOIN persons p ON p.id = s.person_id"
                    " WHERE s.source = 'cb_stats'"
                )
                return {row[0] for row in rows} == {"alice_cam", "dave_cam"}

            await _until(stats_taken, 90, "a Stats API snapshot of each room with a NAME.stats file")
            pid = daemon.process.pid
            daemon.signal(signal.SIGTERM)
            assert await daemon.wait(30) == 0
        stored = await stored_ids_by_room(connection)
        for room in (alice, carol, dave):
            assert stored[room.username] == _delivered_ids(room), room.username
        counts = {name: sum(ids.values()) for name, ids in stored.items()}
        print(f"\none daemon (pid {pid}) stored {counts}")


@pytest.mark.chaos
@pytest.mark.timeout(900)
async def test_kill_9_ten_times_while_twenty_rooms_drain_their_backlogs(
    tmp_path: Path, database_url: str, connection: asyncpg.Connection
) -> None:
    """Every room's stored ids equal its delivered ids, each once, after ten kills at random instants."""
    per_room, count = 4_000, 20
    served = [_room(f"room_{index:02d}", per_room) for index in range(count)]
    total = per_room * count
    rng = random.Random(11)  # reproducible kill moments
    thresholds = sorted(rng.sample(range(2_000, total - 20_000), 10))  # the last kills still mid-drain
    async with simulator.RoomsSimulator(served) as server:
        env = _multi_room_env(tmp_path, database_url, server.base_url)
        env["MHC_LOG_LEVEL"] = "info"
        for room in served:
            _give_token(tmp_path, room.username, room.token)
            _rooms_command(env, tmp_path, "add", room.username)
        log_path = tmp_path / "daemon.log"
        for run, threshold in enumerate(thresholds, start=1):
            async with running_daemon(env, log_path) as daemon:
                await chaos.wait_for_log_event(daemon, "polling_started", count=run * count, within=60)
                started_with = int(await connection.fetchval("SELECT count(*) FROM events"))
                target = min(max(threshold, started_with + 1), total)
                await wait_for_count(
                    connection, "SELECT count(*) FROM events", at_least=target, within=300, process=daemon
                )
                await asyncio.sleep(rng.uniform(0.0, 0.25))  # mid-fetch, mid-transaction or between
                await daemon.kill()
            stored_now = await connection.fetchval("SELECT count(*) FROM events")
            print(f"[20 rooms, kill -9 #{run}] {stored_now} stored")
        async with running_daemon(env, log_path) as daemon:
            await wait_for_count(
                connection, "SELECT count(*) FROM events", at_least=total, within=300, process=daemon
            )
            await chaos.wait_for_log_event(daemon, "polling_started", count=(len(thresholds) + 1) * count)
            daemon.signal(signal.SIGTERM)
            assert await daemon.wait(60) == 0
    stored = await stored_ids_by_room(connection)
    for room in served:
        assert stored[room.username] == _delivered_ids(room), room.username  # each id once: counts are 1
    assert all(set(ids.values()) == {1} for ids in stored.values())
    interactions = await connection.fetchval(
        "SELECT count(*) FROM (SELECT DISTINCT COALESCE(metadata->>'room', metadata->>'broadcaster'),"
        " metadata->>'event_id' FROM interactions WHERE source = 'cb_events') keys"
    )
    assert interactions == await connection.fetchval("SELECT count(*) FROM interactions")
    print(f"[20 rooms, kill -9 x10] {total} events of {count} rooms stored exactly once")


def test_token_files_keep_a_token_through_a_half_written_rotation(tmp_path: Path) -> None:
    """An empty or unreadable NAME.events keeps the room's last token; a removed one ends the room; a name
    that is no username is refused (logged), never polled."""
    files = rooms.TokenFiles(tmp_path)
    (tmp_path / "alice_cam.events").write_text("first-token\n")
    (tmp_path / "alice_cam.stats").write_text("stats-token")
    (tmp_path / "bad-name!.events").write_text("whatever")
    (tmp_path / "notes.txt").write_text("not a token")
    assert files.scan() == {"alice_cam"}
    assert files.get("alice_cam") == rooms.RoomTokens("first-token", "stats-token")
    (tmp_path / "alice_cam.events").write_text("")
    assert files.scan() == set() and files.get("alice_cam") == rooms.RoomTokens("first-token", "stats-token")
    (tmp_path / "alice_cam.events").write_bytes(b"\xff\xfe")
    assert files.scan() == set() and files.rooms() == {"alice_cam"}
    (tmp_path / "alice_cam.events").write_text("second-token")
    assert files.scan() == {"alice_cam"} and files.get("alice_cam") == rooms.RoomTokens(
        "second-token", "stats-token"
    )
    (tmp_path / "alice_cam.events").unlink()
    assert files.scan() == {"alice_cam"} and files.rooms() == set()


async def test_a_start_while_postgresql_is_away_polls_the_rooms_it_last_knew_into_their_spools(
    tmp_path: Path, database_url: str, connection: asyncpg.Connection
) -> None:
    """The rooms table lives in PostgreSQL; a daemon that starts while it is away polls the rooms the database
    last listed (kept on disk), each into its own spool, and stores everything once it is back."""
    alice, bob = _room("alice_cam", 300), _room("bob_cam", 300)
    async with simulator.RoomsSimulator([alice, bob]) as server:
        env = _multi_room_env(tmp_path, database_url, server.base_url)
        for room in (alice, bob):
            _give_token(tmp_path, room.username, room.token)
            _rooms_command(env, tmp_path, "add", room.username)
        log_path = tmp_path / "daemon.log"

        async def drained() -> bool:
            stored = await stored_ids_by_room(connection)
            return all(stored.get(room.username) == _delivered_ids(room) for room in (alice, bob))

        async with running_daemon(env, log_path) as daemon:
            await _until(drained, 60, "both rooms drained")
            daemon.signal(signal.SIGTERM)
            assert await daemon.wait(30) == 0
        for room in (alice, bob):
            later = traffic.build(
                100, seed=9, broadcaster=room.username, start_ms=traffic.DEFAULT_START_MS * 2
            )
            await room.append(later.events)
        asked = {room.username: room.request_count for room in (alice, bob)}
        away = {**env, "MHC_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/away"}  # nothing listens there
        async with running_daemon(away, log_path) as daemon:
            await chaos.wait_for_log_event(daemon, "spooling_to_disk", count=2, within=60)
            daemon.signal(signal.SIGTERM)
            assert await daemon.wait(30) == 0
        for room in (alice, bob):
            assert room.request_count > asked[room.username], f"{room.username} was not polled"
            assert (tmp_path / "data" / "rooms" / room.username / "spool" / "pages.jsonl").stat().st_size > 0
        async with running_daemon(env, log_path) as daemon:
            await _until(drained, 60, "both rooms' spools drained once PostgreSQL is back")
    stored = await stored_ids_by_room(connection)
    assert {name: sum(ids.values()) for name, ids in stored.items()} == {"alice_cam": 400, "bob_cam": 400}


async def test_rooms_share_write_transactions_and_an_event_postgresql_refuses_costs_only_its_room(
    tmp_path: Path, database_url: str, connection: asyncpg.Connection
) -> None:
    poison = "refused by a check constraint"
    await connection.execute(
        f"ALTER TABLE interactions ADD CONSTRAINT test_poison CHECK (content <> '{poison}')"
    )
    # Small pages arriving for six rooms at once: the writers meet in the group commit.
    served = [_room(f"room_{index}", 300, page_size=5) for index in range(6)]
    refusing = served[2]
    bad = next(event for event in refusing.events if event["method"] == "chatMessage")
    bad["object"]["message"]["message"] = poison
    async with simulator.RoomsSimulator(served) as server, aiohttp.ClientSession() as http:
        env = _multi_room_env(tmp_path, database_url, server.base_url)
        for room in served:
            _give_token(tmp_path, room.username, room.token)
            _rooms_command(env, tmp_path, "add", room.username)
        async with running_daemon(env, tmp_path / "daemon.log") as daemon:
            base = await chaos.health_url(daemon)
            expected = {room.username: _delivered_ids(room) for room in served}
            del expected[refusing.username][bad["id"]]

            async def all_stored() -> bool:
                quarantined = await connection.fetchval("SELECT count(*) FROM quarantined_events")
                return quarantined == 1 and await stored_ids_by_room(connection) == expected

            await _until(all_stored, 60, "every room stored, the refused event quarantined")
            async with http.get(f"{base}/metrics") as response:
                exposed = await response.text()
    quarantined = await connection.fetch("SELECT broadcaster, event_id, reason FROM quarantined_events")
    assert [(row["broadcaster"], row["event_id"]) for row in quarantined] == [(refusing.username, bad["id"])]
    assert "test_poison" in quarantined[0]["reason"]
    transactions = chaos.metric_value(exposed, "mhc_write_rooms_count")
    rooms_written = chaos.metric_value(exposed, "mhc_write_rooms_sum")
    fallback = "write_group_refused_writing_rooms_alone"
    refused = sum(1 for record in chaos.log_records(daemon) if record.get("event") == fallback)
    print(f"\n{transactions:.0f} transactions wrote {rooms_written:.0f} rooms' pages; {refused} refused")
    assert rooms_written > transactions, "some transaction held the pages of two rooms or more"
