"""`python -m bench`: every benchmark in one run on this machine, a table of figures against their
targets, and bench/results.json. `make bench` runs this; `--quick` uses small sizes (a smoke test of the
benchmark itself).

Benchmarks, never tests: nothing here fails on a missed target; the table says which are met.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import failover, harness, latency, memory, rooms, startup, throughput

RESULTS = Path(__file__).with_name("results.json")
STEPS = ("throughput", "latency", "memory", "startup", "rooms", "failover")


@dataclass(frozen=True)
class Sizes:
    throughput_events: int
    memory_events: int
    startup_runs: int
    rooms: int
    live_rooms: int
    rooms_seconds: float


FULL = Sizes(200_000, 1_000_000, startup_runs=5, rooms=500, live_rooms=50, rooms_seconds=30.0)
QUICK = Sizes(20_000, 100_000, startup_runs=3, rooms=50, live_rooms=5, rooms_seconds=10.0)


@dataclass(frozen=True)
class Figure:
    name: str
    result: str
    target: str
    met: bool | None  # None: a figure without a target of its own
    value: float
    unit: str


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: a few seconds per benchmark")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("MHC_TEST_DATABASE_URL"),
        help="a PostgreSQL server to use (default: MHC_TEST_DATABASE_URL, else an embedded server)",
    )
    parser.add_argument(
        "--latency-seconds", type=float, default=None, metavar="S", help="default 60 (10 quick)"
    )
    parser.add_argument("--latency-rate", type=float, default=200.0, metavar="N", help="events/s (200)")
    parser.add_argument("--throughput-events", type=int, metavar="N", help="default 200,000 (20,000 quick)")
    parser.add_argument("--memory-events", type=int, metavar="N", help="default 1,000,000 (100,000 quick)")
    parser.add_argument(
        "--only", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}"
    )
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep the daemons' logs and data in DIR")
    parser.add_argument(
        "--plain-http", action="store_true", help="serve plain HTTP instead of HTTPS (for comparison)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="also drain the throughput backlog once more under py-spy, collapsed stacks to FILE",
    )
    return parser


def machine() -> dict[str, Any]:
    model = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


async def _run(args: argparse.Namespace, work: Path) -> tuple[list[Figure], dict[str, Any]]:
    sizes = QUICK if args.quick else FULL
    sizes = dataclasses.replace(
        sizes,
        throughput_events=args.throughput_events or sizes.throughput_events,
        memory_events=args.memory_events or sizes.memory_events,
    )
    harness.HTTPS = not args.plain_http
    steps = [step.strip() for step in args.only.split(",") if step.strip()]
    figures: list[Figure] = []
    details: dict[str, Any] = {"machine": machine(), "quick": args.quick, "https": harness.HTTPS}
    with harness.server_url(args.database_url) as server:
        async with harness.databases(server) as databases:
            details["postgres"] = await databases.server_facts()
            if "throughput" in steps:
                with harness.frozen_backlog(sizes.throughput_events) as stream:
                    figures += await _throughput(databases, stream, work, details, args)
                await databases.settle()
            if "latency" in steps:
                seconds = args.latency_seconds or (10.0 if args.quick else 60.0)
                _say(f"live latency: {args.latency_rate:g} events/s for {seconds:g} s")
                result = await latency.live(databases, work, rate=args.latency_rate, seconds=seconds)
                details["latency"] = result.__dict__
                await databases.settle()
                figures.append(
                    Figure(
                        "live latency p50 / p99",
                        f"{result.p50_ms:.1f} / {result.p99_ms:.1f} ms ({result.events:,} events,"
                        f" max {result.max_ms:.0f} ms, {result.missing} unseen)",
                        "p99 ≤ 50 ms",
                        result.p99_ms <= 50 and result.missing == 0,
                        result.p99_ms,
                        "ms",
                    )
                )
            if "memory" in steps:
                with harness.frozen_backlog(sizes.memory_events) as stream:
                    figures += await _memory(databases, stream, work, details)
            if "startup" in steps:
                _say(f"start-up: {sizes.startup_runs} starts")
                started = await startup.measure(databases, work, runs=sizes.startup_runs)
                details["startup_seconds"] = started.runs
                figures.append(
                    Figure(
                        "start-up to READY=1 (median)",
                        f"{started.median:.2f} s (max {max(started.runs):.2f} s of {len(started.runs)})",
                        "≤ 1.5 s",
                        started.median <= 1.5,
                        started.median,
                        "s",
                    )
                )
            if "rooms" in steps:
                figures += await _rooms(databases, sizes, work, details)
            if "failover" in steps:
                figures += await _failover(databases, work, details)
    return figures, details


async def _failover(databases: harness.Databases, work: Path, details: dict[str, Any]) -> list[Figure]:
    _say("failover: two daemons share 10 live rooms; kill -9 one, then SIGTERM one")
    result = await failover.measure(databases, work, rooms=10)
    details["failover"] = result.__dict__
    return [
        Figure(
            "failover after kill -9 (20 s lease)",
            f"{result.kill_last_s:.1f} s to the last room's first commit by the new holder"
            f" (first room {result.kill_first_s:.1f} s; {result.killed_rooms} rooms)",
            "≤ 30 s",
            result.kill_last_s <= 30,
            result.kill_last_s,
            "s",
        ),
        Figure(
            "graceful handover (SIGTERM)",
            f"{result.graceful_last_s:.1f} s to the last room's first commit by the new holder"
            f" (first room {result.graceful_first_s:.1f} s; {result.handed_rooms} rooms)",
            "seconds, not a lease (≤ 10 s)",
            result.graceful_last_s <= 10,
            result.graceful_last_s,
            "s",
        ),
    ]


async def _rooms(
    databases: harness.Databases, sizes: Sizes, work: Path, details: dict[str, Any]
) -> list[Figure]:
    rate = 20.0
    _say(
        f"rooms: {sizes.rooms} rooms, {sizes.live_rooms} live at {rate:g} events/s"
        f" for {sizes.rooms_seconds:g} s"
    )
    result = await rooms.many(
        databases, work, rooms=sizes.rooms, active=sizes.live_rooms, rate=rate, seconds=sizes.rooms_seconds
    )
    details["rooms"] = {**result.__dict__, "cpu_ms_per_event": result.cpu_ms_per_event}
    label = f"{result.rooms} rooms, {result.active} live"
    figures = [
        Figure(
            f"{label}: event → commit p50 / p99",
            f"{result.p50_ms:.1f} / {result.p99_ms:.1f} ms ({result.events:,} events,"
            f" max {result.max_ms:.0f} ms, {result.missing} unseen)",
            "p99 ≤ 100 ms",
            result.p99_ms <= 100 and result.missing == 0,
            result.p99_ms,
            "ms",
        ),
        Figure(
            f"{label}: peak RSS",
            f"{result.peak_rss_mb:.0f} MB",
            "≤ 300 MB",
            result.peak_rss_mb <= 300,
            result.peak_rss_mb,
            "MB",
        ),
    ]
    drain = details.get("end_to_end")
    single = drain["daemon_cpu_seconds"] * 1000 / drain["events"] if drain else None
    figures.append(
        Figure(
            f"{label}: daemon CPU per event",
            f"{result.cpu_ms_per_event:.2f} ms (single-room drain: "
            f"{'not run' if single is None else f'{single:.2f} ms'}; over {result.seconds:.0f} s"
            f" the daemon used {result.cpu_seconds:.0f} CPU s, the simulator {result.bench_cpu_seconds:.0f})",
            "≤ the single-room drain's",
            None if single is None else result.cpu_ms_per_event <= single,
            result.cpu_ms_per_event,
            "ms",
        )
    )
    return figures


async def _throughput(
    databases: harness.Databases,
    stream: list[dict[str, Any]],
    work: Path,
    details: dict[str, Any],
    args: argparse.Namespace,
) -> list[Figure]:
    _say(f"end to end: draining {len(stream):,} events")
    run = await throughput.end_to_end(databases, stream, work)
    _say("the limit: the same rows with COPY")
    best = await throughput.limit(databases, run.database_url)
    ratio = run.events_per_second / best.events_per_second
    details["end_to_end"] = {
        "events": run.events,
        "seconds": run.seconds,
        "events_per_second": run.events_per_second,
        "requests": run.requests,
        "daemon_cpu_seconds": run.daemon_cpu_seconds,
        "postgres_cpu_seconds": run.postgres_cpu_seconds,
        "bench_cpu_seconds": run.bench_cpu_seconds,
    }
    details["copy_limit"] = {
        "rows": best.rows,
        "seconds": best.seconds,
        "events_per_second": best.events_per_second,
    }
    if args.profile is not None:
        _say(f"profiling a second drain under py-spy → {args.profile}")
        await throughput.end_to_end(databases, stream, work, profile=args.profile.resolve())
    return [
        Figure(
            "end-to-end throughput",
            f"{run.events_per_second:,.0f} events/s ({run.events:,} in {run.seconds:.1f} s,"
            f" CPU s: daemon {run.daemon_cpu_seconds:.1f}, PostgreSQL {_seconds(run.postgres_cpu_seconds)},"
            f" simulator {run.bench_cpu_seconds:.1f})",
            "",
            None,
            run.events_per_second,
            "events/s",
        ),
        Figure(
            "COPY limit (same rows)",
            f"{best.events_per_second:,.0f} events/s"
            f" ({sum(best.rows.values()):,} rows in {best.seconds:.1f} s)",
            "",
            None,
            best.events_per_second,
            "events/s",
        ),
        Figure("end-to-end / limit", f"{ratio:.2f}", "≥ 0.6", ratio >= 0.6, ratio, "ratio"),
    ]


async def _memory(
    databases: harness.Databases, stream: list[dict[str, Any]], work: Path, details: dict[str, Any]
) -> list[Figure]:
    _say(f"memory: draining {len(stream):,} events")
    result = await memory.drain(databases, stream, work)
    mib_to_mb = 2**20 / 10**6
    peak_mb = result.peak_mib * mib_to_mb
    details["memory"] = {
        "events": result.events,
        "peak_mb": peak_mb,
        "half_way_mb": result.half_way_mib * mib_to_mb,
        "end_mb": result.end_mib * mib_to_mb,
        "growth": result.growth,
        "samples": result.samples[:: max(1, len(result.samples) // 200)],
    }
    half = f"{result.events // 2:,}"
    return [
        Figure(
            f"peak RSS over {result.events:,} events",
            f"{peak_mb:.0f} MB",
            "≤ 150 MB",
            peak_mb <= 150,
            peak_mb,
            "MB",
        ),
        Figure(
            f"RSS growth {half} → {result.events:,}",
            f"{result.growth * 100:+.1f}%"
            f" ({result.half_way_mib * mib_to_mb:.0f} → {result.end_mib * mib_to_mb:.0f} MB)",
            "≤ 5%",
            result.growth <= 0.05,
            result.growth,
            "fraction",
        ),
    ]


def _seconds(value: float | None) -> str:
    return "?" if value is None else f"{value:.1f}"


def _say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def table(figures: list[Figure]) -> str:
    rows = [("figure", "result", "target", "met")]
    for figure in figures:
        met = "—" if figure.met is None else "yes" if figure.met else "NO"
        rows.append((figure.name, figure.result, figure.target or "—", met))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines = [
        "| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)


def main() -> int:
    args = _parser().parse_args()
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        figures, details = asyncio.run(_run(args, args.keep.resolve()))
    else:
        with tempfile.TemporaryDirectory(prefix="mhc-bench-") as directory:
            figures, details = asyncio.run(_run(args, Path(directory)))
    details["figures"] = [figure.__dict__ for figure in figures]
    RESULTS.write_text(json.dumps(details, indent=2, default=str) + "\n", encoding="utf-8")
    facts = details["machine"]
    print()
    print(
        f"{facts['nproc']} x {facts['cpu_model']}, {facts['memory_gib']} GiB; "
        f"PostgreSQL {details['postgres']['server_version']}; Python {facts['python']}"
    )
    print(table(figures))
    print(f"\nwritten to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
