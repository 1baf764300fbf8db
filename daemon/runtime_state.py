"""What the running daemon knows about itself, shared by its tasks and read by the health endpoint."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class RoomState:
    """One room's part of the state (`/status` lists them)."""

    name: str
    stopping: bool = False  # the room was disabled (or its token file removed): its unit is finishing
    last_successful_poll: float | None = None
    poll_problem: str | None = None
    token_rejected: bool = False
    last_event_time: float | None = None  # server time of the room's newest committed event
    live_session_id: str | None = None
    events_stored: int = 0
    spool_bytes: int = 0
    last_poll_monotonic: float | None = None  # the lease keeper renews only rooms whose polls progress
    epoch: int | None = None  # of this daemon's lease on the room; None: not leased (yet)

    @property
    def status(self) -> str:
        """stopping, token_rejected, spooling (the database is away), starting (no answer yet), waiting for
        its lease, or polling."""
        if self.stopping:
            return "stopping"
        if self.token_rejected:
            return "token_rejected"
        if self.spool_bytes:
            return "spooling"
        if self.epoch is None:
            return "unleased"
        return "starting" if self.last_successful_poll is None else "polling"


@dataclass
class RuntimeState:
    """Plain, single-threaded state: every writer and reader runs on the one event loop."""

    started_at: float = field(default_factory=time.time)
    hosts: list[str] = field(default_factory=list)  # the live daemons sharing the rooms, this one included
    rooms_share: int = 0  # this daemon's fair share of the rooms (rooms / live hosts)
    holder: str = ""  # this daemon's name in the leases (`host id:pid`)
    share_held: bool = True  # holds its share of the rooms, or every room it could take is held
    last_successful_poll: float | None = None  # wall-clock seconds
    token_rejected: bool = False
    database_up: bool = False
    database_problem: str | None = None  # why the database is not ready yet (masked), for /readyz and /status
    poll_problem: str | None = None  # why the latest Events API request failed (masked); None after a success
    migrations_current: bool = False
    last_event_time: float | None = None  # server time of the newest committed event
    live_session_id: str | None = None
    events_stored: int = 0
    duplicates_skipped: int = 0
    quarantined: int = 0
    failures: int = 0
    spool_bytes: int = 0
    # Progress counters the watchdog reads: they must keep moving while the loops are healthy.
    poll_progress: int = 0
    write_progress: int = 0
    snapshots_taken: int = 0
    rooms: dict[str, RoomState] = field(default_factory=dict)  # the rooms polled now, by name

    def poll_succeeded(self, room: RoomState | None = None) -> None:
        self.last_successful_poll = time.time()
        self.poll_problem = None
        self.poll_progress += 1
        if room is not None:
            room.last_successful_poll = self.last_successful_poll
            room.last_poll_monotonic = time.monotonic()
            room.poll_problem = None

    def poll_failed(self, problem: str, room: RoomState | None = None) -> None:
        self.poll_problem = problem
        if room is not None:
            room.poll_problem = problem

    def token_verdict(self, rejected: bool, room: RoomState | None = None) -> bool:
        """Record whether the token was rejected; True when that changed the verdict. The daemon's own flag
        (readiness) is set only while every room's token is rejected: one room's bad token pauses that room
        alone."""
        if room is None:
            changed, self.token_rejected = self.token_rejected != rejected, rejected
            return changed
        changed, room.token_rejected = room.token_rejected != rejected, rejected
        self.token_rejected = bool(self.rooms) and all(item.token_rejected for item in self.rooms.values())
        return changed

    def spool_total(self) -> int:
        self.spool_bytes = sum(room.spool_bytes for room in self.rooms.values())
        return self.spool_bytes
