"""The notify protocol against real AF_UNIX datagram sockets, and the watchdog's progress rule."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import runtime_state, systemd


@contextlib.contextmanager
def _receiver(address: str | bytes) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(address)
        sock.settimeout(5)
        yield sock
    finally:
        sock.close()


@pytest.fixture
def path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    address = str(tmp_path / "notify.sock")
    with _receiver(address) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        yield sock


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    name = f"mhc-test-{uuid.uuid4().hex}"
    with _receiver(b"\0" + name.encode()) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield sock


def _receive(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_ready_status_stopping_reach_a_path_socket(path_socket: socket.socket) -> None:
    assert systemd.ready()
    assert systemd.status("polling;\n 3 events")
    assert systemd.watchdog_ping()
    assert systemd.stopping()
    assert [_receive(path_socket) for _ in range(4)] == [
        "READY=1",
        "STATUS=polling; 3 events",
        "WATCHDOG=1",
        "STOPPING=1",
    ]


def test_notify_reaches_an_abstract_socket(abstract_socket: socket.socket) -> None:
    assert systemd.notify("READY=1\nSTATUS=up")
    assert _receive(abstract_socket) == "READY=1\nSTATUS=up"


def test_notify_without_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.ready() is False


def test_notify_to_a_missing_socket_fails_quietly(tmp_path: Path) -> None:
    environ = {"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")}
    assert systemd.notify("READY=1", environ) is False
    assert systemd.notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:1234"}) is False


def test_watchdog_interval_is_half_of_watchdog_sec() -> None:
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    own = {"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    assert systemd.watchdog_interval(own) == 2.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}) is None
    assert systemd.watchdog_interval({}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


def test_progress_watch_flags_only_the_counter_that_stood_still() -> None:
    watch = systemd.ProgressWatch(stall_after=10)
    assert watch.observe(0, {"poll": 0, "write": 0}) == []
    assert watch.observe(6, {"poll": 1, "write": 0}) == []
    assert watch.observe(10, {"poll": 2, "write": 0}) == ["write"]
    assert watch.observe(12, {"poll": 2, "write": 1}) == []
    assert watch.observe(21, {"poll": 2, "write": 2}) == ["poll"]


def test_status_line_summarises_the_state() -> None:
    state = runtime_state.RuntimeState(
        last_successful_poll=100.0, events_stored=7, failures=2, database_up=True, live_session_id="s1"
    )
    line = systemd.status_line(state, now=104.0)
    assert line == "polling (last poll 4s ago); 7 events; 0 duplicates; 2 failures; database up; session s1"
    assert systemd.status_line(runtime_state.RuntimeState()).startswith("starting;")
    assert systemd.status_line(runtime_state.RuntimeState(token_rejected=True)).startswith("token rejected")


async def _next_message(sock: socket.socket, wanted: str) -> list[str]:
    """Messages up to and including the first one that starts with `wanted`."""
    loop = asyncio.get_running_loop()
    seen: list[str] = []
    while True:
        message = (await loop.sock_recv(sock, 4096)).decode()
        seen.append(message)
        if message.startswith(wanted):
            return seen


async def test_watchdog_pings_while_loops_progress_and_stops_when_one_hangs(
    path_socket: socket.socket,
) -> None:
    path_socket.setblocking(False)
    state = runtime_state.RuntimeState()
    stop = asyncio.Event()
    hang = asyncio.Event()

    async def loops() -> None:
        # Stands in for the poll and write loops: both move until the test makes them hang.
        while not hang.is_set():
            state.poll_succeeded()
            state.write_progress += 1
            await asyncio.sleep(0.01)

    mover = asyncio.create_task(loops())
    watchdog = asyncio.create_task(systemd.run_watchdog(state, stop, interval=0.02, stall_after=1.0))
    try:
        for _ in range(3):
            await asyncio.wait_for(_next_message(path_socket, "WATCHDOG=1"), timeout=10)
        hang.set()
        await mover
        before_stall = await asyncio.wait_for(_next_message(path_socket, "STATUS=stalled"), timeout=10)
        assert before_stall[-1] == "STATUS=stalled: poll, write loop made no progress for 1s"
        # While the counters stand still, nothing but stalled statuses may arrive.
        after = [
            (await asyncio.wait_for(asyncio.get_running_loop().sock_recv(path_socket, 4096), 10)).decode()
            for _ in range(5)
        ]
        assert all(message.startswith("STATUS=stalled") for message in after), after
        # A loop that moves again brings the pings back.
        state.poll_succeeded()
        state.write_progress += 1
        await asyncio.wait_for(_next_message(path_socket, "WATCHDOG=1"), timeout=10)
    finally:
        stop.set()
        await asyncio.wait_for(watchdog, timeout=10)
