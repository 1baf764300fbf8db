"""Issue 12, leases and the fence on a real PostgreSQL: racing holders, and a stale writer rolled back."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict

import asyncpg
import pytest

from daemon import db, errors
from tests import event_samples as sample

ROOMS = ["room_a", "room_b", "room_c"]


async def test_eight_connections_racing_a_thousand_rounds_each_find_one_holder_per_epoch(
    database_url: str,
) -> None:
    """Each round: take a room (some leases are so short they run out, so rooms are also taken over, not
    only released), renew it, write through the fence, release it half the time. Every epoch of a room has
    one holder; a write fenced by an epoch that is no longer current never commits."""
    holders: dict[tuple[str, int], set[str]] = defaultdict(set)
    committed = fenced = 0
    # The server's own order of the cursor moves: a fenced write holds the row until it commits.
    async with db.single_connection(database_url) as setup:
        await setup.execute(_CURSOR_LOG)

    async def contender(index: int, pool: asyncpg.Pool) -> None:
        nonlocal committed, fenced
        holder = f"host-{index}:1"
        chance = random.Random(index)
        for _ in range(1_000):
            lease = chance.choice([0.001, 0.005, 0.02])
            taken = await db.leases.acquire(
                pool, holder, ROOMS, dead=[], limit=1, lease_seconds=lease, timeout_seconds=30
            )
            for room, epoch in taken.items():
                holders[room, epoch].add(holder)
                await db.leases.renew(pool, holder, {room: epoch}, lease)
                batch = sample.page([], next_event_id=f"{epoch}-{index}", room=room)
                try:
                    await db.write_rooms(
                        pool, {room: batch}, timeout_seconds=30, fence=db.Fence(holder, {room: epoch})
                    )
                    committed += 1
                except errors.LeaseLost:
                    fenced += 1
                if chance.random() < 0.5:
                    await db.leases.release(pool, holder, {room: epoch})

    pools = [await db.connect(database_url, min_size=1, max_size=1) for _ in range(8)]
    try:
        await asyncio.gather(*(contender(index, pool) for index, pool in enumerate(pools)))
        moves = await pools[0].fetch("SELECT room, position FROM cursor_log ORDER BY id")
    finally:
        for pool in pools:
            await pool.close()
    print(f"\n{len(holders)} leases (room, epoch), {committed} fenced writes committed, {fenced} rolled back")
    assert all(len(found) == 1 for found in holders.values()), "an epoch with two holders"
    assert len(holders) > 500, "the rooms changed hands many times"
    assert fenced > 0, "the race should have fenced some writes"
    # Once a newer epoch wrote a room's cursor, no older epoch ever did again.
    newest: dict[str, int] = {}
    for move in moves:
        epoch = int(move["position"].partition("-")[0])
        assert epoch >= newest.get(move["room"], 0), f"{move['room']}: epoch {epoch} after {newest}"
        newest[move["room"]] = epoch
    assert len(moves) == committed


_CURSOR_LOG = """
CREATE TABLE cursor_log (id BIGSERIAL PRIMARY KEY, room TEXT, position TEXT);
CREATE FUNCTION log_cursor() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO cursor_log (room, position) VALUES (NEW.broadcaster, NEW.last_event_id);
  RETURN NULL;
END $$;
CREATE TRIGGER log_cursor AFTER UPDATE ON ingest_cursor FOR EACH ROW
  WHEN (OLD.last_event_id IS DISTINCT FROM NEW.last_event_id) EXECUTE FUNCTION log_cursor();
"""


async def test_a_stale_holders_write_is_rolled_back_and_the_new_holder_resumes_from_the_committed_cursor(
    pool: asyncpg.Pool, connection: asyncpg.Connection
) -> None:
    room = sample.ROOM
    first = await db.leases.acquire(
        pool, "a:1", [room], dead=[], limit=1, lease_seconds=0.2, timeout_seconds=30
    )
    assert first == {room: 1}
    page_one = sample.page([sample.chat(0, "viewer_one")])
    await db.write_rooms(pool, {room: page_one}, timeout_seconds=30, fence=db.Fence("a:1", first))
    # The lease runs out (a paused host); another host takes the room at the next epoch.
    await asyncio.sleep(0.3)
    second = await db.leases.acquire(
        pool, "b:1", [room], dead=[], limit=1, lease_seconds=20, timeout_seconds=30
    )
    assert second == {room: 2}
    page_two = sample.page([sample.chat(10, "viewer_two")])
    with pytest.raises(errors.LeaseLost) as lost:
        await db.write_rooms(pool, {room: page_two}, timeout_seconds=30, fence=db.Fence("a:1", first))
    assert lost.value.rooms == {room}
    assert await connection.fetchval("SELECT count(*) FROM events") == 1, "the stale write stored nothing"
    cursor = await db.load_cursor(pool, room)
    assert cursor is not None and cursor.last_event_id == sample.event_id(0)
    # The old holder cannot renew either: the room is gone from what it keeps.
    assert await db.leases.renew(pool, "a:1", first, 20) == set()
    result = await db.write_rooms(pool, {room: page_two}, timeout_seconds=30, fence=db.Fence("b:1", second))
    assert result.new_events == 1
    # A host's own earlier process, known dead, is taken over at once, lease or not.
    again = await db.leases.acquire(
        pool, "b:2", [room], dead=["b:1"], limit=1, lease_seconds=20, timeout_seconds=30
    )
    assert again == {room: 3}
