"""Group commit: the pages of several rooms that are ready at the same time share one transaction.

A live room's long-poll answers with an event or two at a time; written alone, each page costs a transaction
of its own (some eight round trips and a WAL flush), and with hundreds of rooms those transactions, not the
events, fill the daemon's and PostgreSQL's time. Here, a room that wants to commit joins a queue; whoever
holds one of `WRITERS` writer slots takes everything waiting (up to `GROUP_EVENTS` events, oldest first, one
request per room) into one `db.write_rooms`. No task of its own and no timer: a room's request is written by
the first slot that frees up, which may be its own.

Every group is fenced by its rooms' lease epochs (`db.Fence`): a room whose lease moved on fails alone with
`errors.LeaseLost` and the others are written without it. A group that PostgreSQL refuses for what it holds is
written again one room at a time, so a bad event costs only its own room a split (`RoomUnit._store`); a group
that fails because the database is away fails every request in it, and each room retries on its own schedule.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from daemon import db, errors, ingest, logs, metrics

log = logs.get_logger(__name__)

# Transactions at once. Two keep PostgreSQL busy while the daemon prepares the next group; more only
# contend for the same rows (persons, sessions) on a small server.
WRITERS = 2
# Events in one group: a request is never split, so a draining room's merged pages (up to MERGE_EVENTS)
# go alone, and live rooms' small pages go together.
GROUP_EVENTS = 2000


@dataclass(frozen=True, eq=False)  # compared by identity
class _Request:
    room: str
    epoch: int  # of the room's lease: the write is fenced by it
    batch: ingest.Batch
    done: asyncio.Future[db.WriteResult]


class GroupCommit:
    def __init__(self, pool: db.Pool, timeout_seconds: int, holder: str) -> None:
        self._pool = pool
        self._timeout_seconds = timeout_seconds
        self._holder = holder
        self._waiting: list[_Request] = []
        self._slots = asyncio.Semaphore(WRITERS)

    async def write(self, room: str, epoch: int, batch: ingest.Batch) -> db.WriteResult:
        """Commit `room`'s merged pages, most likely together with other rooms'; the result covers the whole
        transaction, and `result.rooms[room]` is this room's part. Raises what the write of this room's pages
        raised: `errors.StorageError`, or `errors.LeaseLost` when the room's lease is no longer at `epoch`."""
        request = _Request(room, epoch, batch, asyncio.get_running_loop().create_future())
        self._waiting.append(request)
        while request in self._waiting:  # not yet taken into a group, by this task or another
            async with self._slots:
                if request in self._waiting:
                    await self._commit(self._take())
        return await request.done

    def _take(self) -> list[_Request]:
        """The oldest waiting requests, up to `GROUP_EVENTS` events (at least one), one per room."""
        group: list[_Request] = []
        rooms: set[str] = set()
        events = 0
        for request in list(self._waiting):
            size = len(request.batch.events) + len(request.batch.quarantined)
            if group and events + size > GROUP_EVENTS:
                break
            if request.room in rooms:
                continue  # a room's second request waits for the next group: one cursor per room
            self._waiting.remove(request)
            group.append(request)
            rooms.add(request.room)
            events += size
        return group

    async def _commit(self, group: list[_Request]) -> None:
        fence = db.Fence(self._holder, {request.room: request.epoch for request in group})
        try:
            result = await db.write_rooms(
                self._pool,
                {request.room: request.batch for request in group},
                timeout_seconds=self._timeout_seconds,
                fence=fence,
            )
        except errors.LeaseLost as lost:  # those rooms fail; the others are written without them
            _settle([request for request in group if request.room in lost.rooms], lost)
            if rest := [request for request in group if request.room not in lost.rooms]:
                await self._commit(rest)
            return
        except errors.StorageError as error:
            if len(group) > 1 and not isinstance(error, errors.DatabaseUnavailable):
                reason = logs.mask(str(error))
                log.warning("write_group_refused_writing_rooms_alone", rooms=len(group), error=reason)
                for request in group:  # refused for its content: find whose, one room at a time
                    await self._commit([request])
                return
            _settle(group, error)
            return
        except BaseException:  # a bug, or the loop closing: no request may wait for ever
            for request in group:
                request.done.cancel()
            raise
        metrics.WRITE_ROOMS.observe(len(group))
        _settle(group, result)


def _settle(group: list[_Request], outcome: db.WriteResult | Exception) -> None:
    for request in group:
        if request.done.done():
            continue  # (cancelled)
        if isinstance(outcome, Exception):
            request.done.set_exception(outcome)
        else:
            request.done.set_result(outcome)
