"""What the running daemon knows about itself, shared by its tasks and read by the health endpoint."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class RuntimeState:
    """Plain, single-threaded state: every writer and reader runs on the one event loop."""

    started_at: float = field(default_factory=time.time)
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

    def poll_succeeded(self) -> None:
        self.last_successful_poll = time.time()
        self.poll_problem = None
        self.poll_progress += 1
