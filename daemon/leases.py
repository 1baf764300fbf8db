"""Rooms leased to hosts in PostgreSQL, so that any number of identical daemons share them (issue 12).

A room's lease lives on its cursor row: a holder (`host id:pid`), an epoch that grows with every new holder,
and an expiry on the database's clock. This module keeps this daemon's side of it, one round every
`lease_renew_seconds` (the supervisor drives the rounds and owns the room units):
- a heartbeat in `hosts`, which tells the live hosts;
- renewal of the held rooms whose polls make progress (a host cut off from the API lets its rooms go);
- taking free rooms up to a fair share (rooms / live hosts), and rooms no one took within a lease (orphans);
- handing rooms over above the share a few at a time, so rebalancing is incremental and sticky;
- the cluster lease 'snapshots': only its holder runs the Statbate and Stats API lookups.

The lease itself only says who should poll. What keeps the record exact is the fence: every write
transaction first locks its rooms' cursor rows where holder and epoch are still this daemon's
(`db.Fence`), so a holder that lost a room (paused, cut off) can never write for it again.

Time: expiry is the database's clock; this daemon counts its own lease on the monotonic clock from the moment
it sent the last renewal the database confirmed, and stops polling a room whose lease may have run out.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from dataclasses import dataclass, field

from daemon import config, db, logs, metrics

log = logs.get_logger(__name__)

HANDOVER_STEP = 5  # rooms handed over per round above the fair share
SNAPSHOTS = "snapshots"  # the cluster lease of the lookups


@dataclass
class _Held:
    epoch: int
    renewed: float  # monotonic: when the last renewal the database confirmed was sent
    taken: float  # monotonic: when this daemon took the room


@dataclass(frozen=True)
class Round:
    acquired: dict[str, int]  # room -> epoch
    lost: list[str]  # taken over by another host
    extra: list[str]  # above the fair share: to hand over (stop the unit, then `release`)


def holder_name(host_id: str) -> str:
    return f"{host_id}:{os.getpid()}"


@dataclass
class LeaseKeeper:
    pool: db.Pool
    settings: config.Settings
    holder: str = ""
    held: dict[str, _Held] = field(default_factory=dict)
    live_hosts: list[str] = field(default_factory=list)
    share: int = 0
    satisfied: bool = False  # holds its share, or every room it could take is held (readiness)
    leader: asyncio.Event = field(default_factory=asyncio.Event)  # set while this daemon runs the lookups
    _leader_renewed: float = 0.0

    def __post_init__(self) -> None:
        self.holder = self.holder or holder_name(self.settings.host_id)
        self.live_hosts = [self.holder]

    async def round(self, wanted: set[str], total: int, progressing: set[str], unleased: set[str]) -> Round:
        """One round: heartbeat, renew, take, hand over (see the module's description). `wanted`: the rooms
        this daemon may poll (it holds their token); `total`: the rooms of the whole cluster; `unleased`:
        rooms this daemon already polls without a lease (started while the database was away), taken first
        and beyond the share so their spools are not thrown away when they are free."""
        lease = self.settings.lease_seconds
        dead = await self._dead_holders()
        # An earlier process of this host that died moments ago still looks live by its heartbeat: it is not.
        live = await db.leases.heartbeat(self.pool, self.holder, lease)
        self.live_hosts = [host for host in live if host == self.holder or host not in dead]
        sent = time.monotonic()
        renewing = {room: held.epoch for room, held in self.held.items() if room in progressing}
        kept = await db.leases.renew(self.pool, self.holder, renewing, lease)
        # A unit may have ended (releasing its room) while the renewal ran: `held` is current, `renewing` not.
        lost = sorted(room for room in renewing.keys() - kept if room in self.held)
        for room in kept & self.held.keys():
            self.held[room].renewed = sent
        for room in lost:
            del self.held[room]
        self.share = math.ceil(total / len(self.live_hosts)) if total else 0
        acquired: dict[str, int] = {}
        candidates = sorted(wanted - self.held.keys())
        if candidates:
            first = sorted(unleased & set(candidates))
            acquired = await self._acquire(first, dead, len(first), orphans_only=False, sent=sent)
            rest = [room for room in candidates if room not in acquired]
            room_left = self.share - len(self.held)
            within_share = await self._acquire(rest, dead, room_left, orphans_only=False, sent=sent)
            acquired |= within_share
            # Ready: this host holds its share, or there was nothing more it could take (all are held).
            self.satisfied = len(within_share) < room_left or len(self.held) >= self.share
            rest = [room for room in rest if room not in acquired]
            acquired |= await self._acquire(rest, dead, HANDOVER_STEP, orphans_only=True, sent=sent)
        else:
            self.satisfied = True
        extra: list[str] = []
        if self.share and len(self.held) > self.share:
            # The rooms held longest stay (sticky); the newest go first.
            newest_first = sorted(self.held, key=lambda room: -self.held[room].taken)
            extra = [room for room in newest_first if room not in acquired][: len(self.held) - self.share]
            extra = extra[:HANDOVER_STEP]
        await self._lead(sent)
        metrics.ROOMS_HELD.set(len(self.held))
        if acquired or lost or extra:
            log.info(
                "leases_changed",
                acquired=sorted(acquired),
                lost=lost,
                handing_over=extra,
                held=len(self.held),
                share=self.share,
                live_hosts=len(self.live_hosts),
            )
        return Round(acquired, lost, extra)

    async def _acquire(
        self, rooms: list[str], dead: list[str], limit: int, *, orphans_only: bool, sent: float
    ) -> dict[str, int]:
        taken = await db.leases.acquire(
            self.pool,
            self.holder,
            rooms,
            dead=dead,
            limit=limit,
            lease_seconds=self.settings.lease_seconds,
            timeout_seconds=self.settings.cb_events_timeout,
            orphans_only=orphans_only,
        )
        for room, epoch in taken.items():
            self.held[room] = _Held(epoch, sent, sent)
        metrics.LEASES_ACQUIRED.inc(len(taken))
        return taken

    async def _dead_holders(self) -> list[str]:
        """Holders named after this host whose process is gone (a restart after a crash takes their rooms
        at once instead of after a lease); this daemon's own name when an earlier process had it."""
        dead = []
        for holder in await db.leases.local_holders(self.pool, self.settings.host_id):
            pid = holder.rpartition(":")[2]
            if holder == self.holder or (pid.isdigit() and not _alive(int(pid))):
                dead.append(holder)
        return dead

    async def _lead(self, sent: float) -> None:
        epoch = await db.leases.acquire_cluster_lease(
            self.pool, SNAPSHOTS, self.holder, self.settings.lease_seconds
        )
        if epoch is not None:
            self._leader_renewed = sent
            if not self.leader.is_set():
                log.info("cluster_lease_acquired", lease=SNAPSHOTS, epoch=epoch)
                self.leader.set()
        elif self.leader.is_set():
            log.warning("cluster_lease_lost", lease=SNAPSHOTS)
            self.leader.clear()

    def lapsed(self) -> list[str]:
        """Rooms whose lease may have run out (no renewal confirmed for a lease, on the monotonic clock),
        while other hosts are live to take them: dropped here, the caller stops their units. A daemon alone
        keeps its rooms and spools through a database outage; its writes stay fenced all the same."""
        now = time.monotonic()
        if self.leader.is_set() and now - self._leader_renewed > self.settings.lease_seconds:
            log.warning("cluster_lease_lapsed", lease=SNAPSHOTS)
            self.leader.clear()
        if len(self.live_hosts) <= 1:
            return []
        gone = [room for room, held in self.held.items() if now - held.renewed > self.settings.lease_seconds]
        for room in gone:
            del self.held[room]
        return gone

    async def release(self, room: str) -> None:
        """Give `room` up (its unit has stopped, after its last write): another host may take it at once."""
        held = self.held.pop(room, None)
        if held is not None:
            await db.leases.release(self.pool, self.holder, {room: held.epoch})
            metrics.ROOMS_HELD.set(len(self.held))

    async def leave(self) -> None:
        """At a clean stop, after every unit ended: the remaining leases, the cluster lease, the host row."""
        rooms = {room: held.epoch for room, held in self.held.items()}
        self.held.clear()
        await db.leases.release(self.pool, self.holder, rooms)
        await db.leases.release_cluster_lease(self.pool, SNAPSHOTS, self.holder)
        await db.leases.leave(self.pool, self.holder)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
