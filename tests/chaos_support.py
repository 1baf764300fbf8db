"""Helpers of the chaos suite: expected contents, exact database checks, the health endpoint, secret scans.

Everything here reads real things: the daemon's log file, the database over asyncpg, the daemon's own
HTTP endpoint, and /proc for the sockets the daemon process listens on.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from daemon import api_http, ingest
from daemon.simulator import events as simulator
from tests.daemon_process import BROADCASTER, DaemonProcess

# Fault kinds of the simulator's request log → the error_kind the daemon records for that response.
FAILURE_KIND_OF_FAULT = {
    "server_error": "http_5xx",
    "cloudflare": "http_5xx",
    "rate_limited": "rate_limited",
    "hang": "timeout",
    "truncated": "bad_body",
    "foreign_next_url": "foreign_next_url",
    # The hostile answers (http_faults.HOSTILE): an unreadable body, a broken transport, a redirect.
    "nesting_bomb": "bad_body",
    "gzip_bomb": "bad_body",
    "over_cap": "bad_body",
    "invalid_utf8": "bad_body",
    "unknown_encoding": "bad_body",
    "truncated_http": "connection",
    "malformed_http": "connection",
    "redirect_loop": "http_4xx",
}
# The README's bound on the daemon's peak resident memory (its performance table).
MEMORY_BOUND_MIB = 150


@dataclass(frozen=True)
class Contents:
    """What the tables hold (or must hold) for one run, as sets of keys."""

    event_ids: frozenset[str]
    interaction_event_ids: frozenset[str]
    quarantined: frozenset[str]  # fingerprints

    def summary(self) -> str:
        return (
            f"{len(self.event_ids)} events, {len(self.interaction_event_ids)} interactions, "
            f"{len(self.quarantined)} quarantined"
        )


def decoded(served: list[dict[str, Any]]) -> list[Any]:
    """What the daemon reads of `served`: each `RawEvent` decoded from its text as every API body is."""
    return [
        api_http.decode_json(api_http.Response(200, None, event.text.encode()))[0]
        if isinstance(event, simulator.RawEvent)
        else event
        for event in served
    ]


def expected_contents(delivered: list[dict[str, Any]]) -> Contents:
    """What storing `delivered` must leave behind, computed by the ingest rules themselves."""
    batch = ingest.parse_page(
        delivered, broadcaster=BROADCASTER, received_at=dt.datetime.now(dt.UTC), next_event_id=None
    )
    return Contents(
        event_ids=frozenset(event.event_id for event in batch.events),
        interaction_event_ids=frozenset(row.event_id for row in batch.interactions),
        quarantined=frozenset(item.fingerprint for item in batch.quarantined),
    )


async def stored_contents(url: str) -> Contents:
    """The tables' contents; raises when any key is stored twice (the exactly-once half of the check)."""
    connection = await asyncpg.connect(url)
    try:
        events = [row[0] for row in await connection.fetch("SELECT event_id FROM events")]
        interactions = [
            row[0]
            for row in await connection.fetch(
                "SELECT metadata->>'event_id' FROM interactions WHERE source = 'cb_events'"
            )
        ]
        quarantined = [row[0] for row in await connection.fetch("SELECT fingerprint FROM quarantined_events")]
    finally:
        await connection.close()
    for name, keys in (("events", events), ("interactions", interactions), ("quarantined", quarantined)):
        doubled = [key for key, count in Counter(keys).items() if count > 1]
        assert not doubled, f"{name} stored more than once: {doubled[:5]}"
    return Contents(frozenset(events), frozenset(interactions), frozenset(quarantined))


def assert_exactly(stored: Contents, expected: Contents, label: str) -> None:
    print(f"[{label}] expected {expected.summary()}; stored {stored.summary()}")
    missing, extra = expected.event_ids - stored.event_ids, stored.event_ids - expected.event_ids
    assert not missing and not extra, f"{len(missing)} events missing, {len(extra)} extra"
    assert stored.interaction_event_ids == expected.interaction_event_ids
    assert stored.quarantined == expected.quarantined


def log_records(process: DaemonProcess) -> list[dict[str, Any]]:
    return log_file_records(process.log_path)


def log_file_records(path: Path) -> list[dict[str, Any]]:
    """The JSON log lines of a daemon log file (other lines, e.g. a traceback, are skipped)."""
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


async def health_url(process: DaemonProcess, *, within: float = 30.0) -> str:
    """The endpoint of the newest run in this log, from its `health_server_listening` line."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        lines = [
            record for record in log_records(process) if record.get("event") == "health_server_listening"
        ]
        if lines:
            return f"http://{lines[-1]['host']}:{lines[-1]['port']}"
        if process.process.returncode is not None or loop.time() > deadline:
            raise AssertionError(f"no health_server_listening line:\n{process.log_text()[-3000:]}")
        await asyncio.sleep(0.05)


async def wait_for_log_event(
    process: DaemonProcess, event: str, *, count: int = 1, within: float = 30.0
) -> None:
    """Wait until the log holds `count` lines of `event` (runs append to one file, so count them)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while sum(1 for record in log_records(process) if record.get("event") == event) < count:
        if process.process.returncode is not None or loop.time() > deadline:
            raise AssertionError(f"no {event} line #{count}:\n{process.log_text()[-3000:]}")
        await asyncio.sleep(0.05)


async def is_ready(http: aiohttp.ClientSession, base: str) -> bool:
    async with http.get(f"{base}/readyz") as response:
        await response.read()
        return response.status == 200


def metric_value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} is not in /metrics")


async def endpoint_texts(base: str) -> dict[str, str]:
    async with aiohttp.ClientSession() as http:
        texts = {}
        for path in ("/metrics", "/status", "/readyz", "/healthz"):
            async with http.get(base + path) as response:
                texts[path] = await response.text()
    return texts


async def text_columns_containing(url: str, needle: str) -> tuple[int, dict[str, int]]:
    """(columns scanned, {table.column: rows holding `needle`}) over every text-like column of every table."""
    connection = await asyncpg.connect(url)
    try:
        columns = await connection.fetch(
            """
            SELECT table_schema, table_name, column_name
            FROM information_schema.columns
            WHERE table_schema NOT IN ('pg_catalog', 'information_schema')
              AND data_type IN ('text', 'character varying', 'character', 'json', 'jsonb')
            ORDER BY 1, 2, 3
            """
        )
        hits: dict[str, int] = {}
        for schema, table, column in columns:
            # Identifiers come from the catalog and are quoted; the needle is a parameter.
            query = (
                f'SELECT count(*) FROM "{schema}"."{table}" '  # catalog identifiers, quoted
                f'WHERE strpos("{column}"::text, $1) > 0'
            )
            count = int(await connection.fetchval(query, needle))
            if count:
                hits[f"{table}.{column}"] = count
    finally:
        await connection.close()
    return len(columns), hits


def listening_addresses(pid: int) -> list[str]:
    """The local addresses of the TCP sockets process `pid` listens on (hex decoded), from /proc."""
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for entry in fd_dir.iterdir():
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    addresses = []
    for table, width in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                addresses.append(_decode_address(local.split(":")[0], width))
    return addresses


def _decode_address(hex_address: str, width: int) -> str:
    raw = bytes.fromhex(hex_address)
    if width == 8:
        return str(ipaddress.IPv4Address(raw[::-1]))
    # IPv6 in /proc: four 32-bit words, each in host (little-endian) order.
    return str(ipaddress.IPv6Address(b"".join(raw[index : index + 4][::-1] for index in range(0, 16, 4))))


def failures_expected_from(requests: list[simulator.RecordedRequest]) -> Counter[str]:
    """One api_failures row per faulted response, by the kind the daemon records for it."""
    return Counter(
        FAILURE_KIND_OF_FAULT[request.fault] for request in requests if request.fault in FAILURE_KIND_OF_FAULT
    )


async def failures_stored(url: str, api: str | None = None) -> Counter[str]:
    """api_failures rows by error_kind, of one API or (None) all."""
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch(
            "SELECT error_kind, count(*) FROM api_failures WHERE $1::text IS NULL OR api = $1 GROUP BY 1", api
        )
    finally:
        await connection.close()
    return Counter({row[0]: int(row[1]) for row in rows})
