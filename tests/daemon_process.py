"""Run `mhc-daemon run` as a real child process against a simulator and a test database.

Shared by the acceptance, crash and chaos tests. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg

BROADCASTER = "alice_cam"
TOKEN = "t0k3nt0k3nt0k3nt0k3nt0k"


def daemon_env(
    *, database_url: str, events_base_url: str, data_dir: Path, timeout: int = 1, **extra: str
) -> dict[str, str]:
    """The child's environment: only our settings plus what Python needs (no MHC_ leaks from the caller)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MHC_", "NOTIFY_", "WATCHDOG_"))
    }
    env.update(
        {
            "MHC_DATABASE_URL": database_url,
            "MHC_DATA_DIR": str(data_dir),
            "MHC_CB_USERNAME": BROADCASTER,
            "MHC_CB_EVENTS_TOKEN": TOKEN,
            "MHC_CB_EVENTS_BASE_URL": events_base_url,
            "MHC_CB_EVENTS_TIMEOUT": str(timeout),
            "MHC_HEALTH_PORT": "0",
            "MHC_LOG_FORMAT": "json",
            "MHC_LOG_LEVEL": "debug",
        }
    )
    env.update(extra)
    return env


@dataclass
class DaemonProcess:
    process: asyncio.subprocess.Process
    log_path: Path

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def kill(self) -> None:
        """SIGKILL: no handler runs, no transaction finishes; only what was committed survives."""
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def wait(self, within: float) -> int:
        return await asyncio.wait_for(self.process.wait(), timeout=within)

    def peak_rss_mib(self) -> float:
        """The kernel's high-water mark of the child's resident memory (`VmHWM`), in MiB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmHWM in /proc/<pid>/status")

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    async def wait_for_log(self, event: str, within: float = 60.0) -> None:
        """Wait until the daemon logged `event` (`polling_started`: its signal handlers are in place)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while f'"event": "{event}"' not in self.log_text():
            if self.process.returncode is not None:
                raise AssertionError(f"daemon exited {self.process.returncode}:\n{self.log_text()[-3000:]}")
            if loop.time() > deadline:
                raise AssertionError(f"the daemon did not log {event!r} within {within} s")
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running_daemon(env: dict[str, str], log_path: Path) -> AsyncIterator[DaemonProcess]:
    """Start `python -m daemon run`, appending its stdout and stderr to `log_path`; killed if still alive."""
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "daemon",
            "run",
            env=env,
            stdout=log,
            stderr=log,
            stdin=asyncio.subprocess.DEVNULL,
        )
    child = DaemonProcess(process, log_path)
    try:
        yield child
    finally:
        if process.returncode is None:
            await child.kill()


async def wait_for_count(
    connection: asyncpg.Connection,
    query: str,
    *,
    at_least: int,
    within: float,
    process: DaemonProcess | None = None,
) -> int:
    """Poll `query` (a count) until it reaches `at_least`; fail early if the daemon died."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        count = int(await connection.fetchval(query))
        if count >= at_least:
            return count
        if process is not None and process.process.returncode is not None:
            raise AssertionError(f"daemon exited {process.process.returncode}:\n{process.log_text()[-3000:]}")
        if loop.time() > deadline:
            raise AssertionError(f"{query!r} reached {count}, not {at_least}, within {within} s")
        await asyncio.sleep(0.05)


def run_command(
    args: list[str], env: dict[str, str], cwd: Path, *, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """`python -m daemon ARGS` to its end (a one-shot command), its output captured as text."""
    return subprocess.run(  # a fixed executable and arguments, no shell
        [sys.executable, "-m", "daemon", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
