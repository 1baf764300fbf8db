"""The systemd service-manager protocol: readiness, status, stopping and watchdog keep-alives.

Messages are datagrams of `KEY=value` lines sent to the `AF_UNIX` socket named by `NOTIFY_SOCKET`; a name that
starts with `@` lives in the abstract namespace. Without `NOTIFY_SOCKET` (a terminal, Docker) every call is a
quiet no-op, so the daemon never needs to know how it was started.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from daemon import logs, runtime_state, waits

log = logs.get_logger(__name__)

# systemd truncates STATUS= at a line break; a long line is still one line, but keep it readable in `status`.
_STATUS_MAX_CHARS = 200


def _address(raw: str) -> str | bytes | None:
    if raw.startswith("@"):
        # Abstract namespace: a leading NUL byte instead of the `@` systemd writes for it.
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    # vsock: and other transports are for VMs; we never run as a VM's init.
    return None


def notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send one notification; True when it was delivered, False when there is no socket or it failed.

    Never raises: a service manager that went away must not take the daemon down with it.
    """
    environ = os.environ if environ is None else environ
    address = _address(environ.get("NOTIFY_SOCKET", ""))
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            # Non-blocking: a full receive queue drops this one message instead of stalling the event loop.
            sock.setblocking(False)
            sock.sendto(message.encode(), address)
    except OSError as error:
        log.debug("notify_failed", error=f"{type(error).__name__}: {error}")
        return False
    return True


def ready() -> bool:
    """The database is migrated and the first poll has started."""
    return notify("READY=1")


def stopping() -> bool:
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """A one-line summary shown by `systemctl status`."""
    line = " ".join(text.split())[:_STATUS_MAX_CHARS]
    return notify(f"STATUS={line}")


def watchdog_ping() -> bool:
    return notify("WATCHDOG=1")


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between keep-alives (half of `WatchdogSec=`), or None when no watchdog watches this process."""
    environ = os.environ if environ is None else environ
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = environ.get("WATCHDOG_PID")
    # The variables are inherited by children; only the process they name is watched.
    if owner and owner != str(os.getpid()):
        return None
    return usec / 2 / 1_000_000


@dataclass
class ProgressWatch:
    """Decides whether the poll and write loops are still moving, from their progress counters.

    Pure bookkeeping over explicit times so the decision is testable without waiting.
    """

    stall_after: float
    _last_values: dict[str, int] = field(default_factory=dict)
    _last_moved: dict[str, float] = field(default_factory=dict)

    def observe(self, now: float, counters: Mapping[str, int]) -> list[str]:
        """Record the counters seen at `now`; return the loops whose counter stood still for `stall_after`."""
        stalled = []
        for name, value in counters.items():
            if self._last_values.get(name) != value:
                self._last_values[name] = value
                self._last_moved[name] = now
            elif now - self._last_moved[name] >= self.stall_after:
                stalled.append(name)
        return stalled


def status_line(state: runtime_state.RuntimeState, now: float | None = None) -> str:
    """The one-line summary for STATUS=: what a person wants from `systemctl status` at a glance."""
    now = time.time() if now is None else now
    if state.token_rejected:
        head = "token rejected"
    elif state.last_successful_poll is None:
        head = "starting"
    else:
        head = f"polling (last poll {now - state.last_successful_poll:.0f}s ago)"
    parts = [
        head,
        f"{state.events_stored} events",
        f"{state.duplicates_skipped} duplicates",
        f"{state.failures} failures",
        "database up" if state.database_up else "database DOWN",
    ]
    if state.live_session_id:
        parts.append(f"session {state.live_session_id}")
    if state.spool_bytes:
        parts.append(f"spool {state.spool_bytes} B")
    return "; ".join(parts)


async def run_watchdog(
    state: runtime_state.RuntimeState,
    stop: asyncio.Event,
    *,
    interval: float,
    stall_after: float,
) -> None:
    """Every `interval` seconds: send STATUS=, and WATCHDOG=1 unless a loop is wedged.

    The poll loop must bump `state.poll_progress` after every completed request (an empty long-poll counts)
    and the write loop `state.write_progress` after every commit and every idle wake-up. A counter that has
    not moved for `stall_after` seconds means that loop is wedged: the pings stop, so systemd restarts us.
    Returns when `stop` is set.
    """
    watch = ProgressWatch(stall_after=stall_after)
    wedged: list[str] = []
    while not stop.is_set():
        stalled = watch.observe(
            time.monotonic(), {"poll": state.poll_progress, "write": state.write_progress}
        )
        if stalled != wedged:
            if stalled:
                log.error("watchdog_loop_stalled", loops=stalled, stalled_for_s=stall_after)
            else:
                log.warning("watchdog_loop_recovered", loops=wedged)
            wedged = stalled
        if wedged:
            status(f"stalled: {', '.join(wedged)} loop made no progress for {stall_after:.0f}s")
        else:
            status(status_line(state))
            watchdog_ping()
        await waits.wait_for_stop(stop, interval)
