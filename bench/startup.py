"""Start-up: seconds from starting `python -m daemon run` to its `READY=1`, on an already migrated database.

This process binds a datagram socket and names it in the child's `NOTIFY_SOCKET`, exactly as systemd does for
a `Type=notify` unit. The clock starts just before the process is created, so interpreter start, imports,
configuration, the migration check, the pool, the health server and the first poll are all inside the figure
(the daemon says READY after its first successful poll). Before each start the simulator gets a few new
events, so that first poll answers at once instead of waiting out a long-poll. Several starts; the median is
the figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from bench import harness


@dataclass(frozen=True)
class Startup:
    runs: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)


async def measure(databases: harness.Databases, work: Path, *, runs: int) -> Startup:
    database_url = await databases.fresh()
    stream = harness.backlog(10 * runs, seed=8)
    seconds: list[float] = []
    socket_path = work / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(socket_path))
        sock.setblocking(False)
        async with harness.simulator([]) as sim:
            env = harness.daemon_env(
                database_url, sim.base_url, work / "startup-data", NOTIFY_SOCKET=str(socket_path)
            )
            for run in range(runs):
                await sim.append(stream[10 * run : 10 * run + 10])
                started = time.monotonic()
                async with harness.daemon(env, work / "startup.log") as child:
                    await _ready(sock, child.process)
                    seconds.append(time.monotonic() - started)
                _drain(sock)  # STOPPING=1 and anything else sent on the way out
    return Startup(seconds)


async def _ready(sock: socket.socket, process: asyncio.subprocess.Process) -> None:
    loop = asyncio.get_running_loop()
    while True:
        receive = asyncio.ensure_future(loop.sock_recv(sock, 4096))
        exited = asyncio.ensure_future(process.wait())
        done, _ = await asyncio.wait({receive, exited}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        exited.cancel()
        if receive not in done:
            receive.cancel()
            raise RuntimeError("the daemon exited or took over 30 s without READY=1")
        if b"READY=1" in receive.result().split(b"\n"):
            return


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(BlockingIOError):
        while True:
            sock.recv(4096)
