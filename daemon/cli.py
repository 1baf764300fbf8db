"""The `mhc-daemon` command line. Every command reads the same `MHC_` configuration first."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from daemon import __version__, config, database_server, db, errors, health, logs, migrations, reports

Handler = Callable[[config.Settings, argparse.Namespace], Coroutine[Any, Any, int]]


async def _migrate(settings: config.Settings, args: argparse.Namespace) -> int:
    async with database_server.open_url(settings) as url, db.single_connection(url) as connection:
        if args.action == "status":
            for state in await migrations.status(connection):
                when = f"applied {state.applied_at}" if state.applied else "pending"
                print(f"{state.name:40} {when}")
            return 0
        done = await migrations.migrate(connection, target=args.to)
        for line in done or ["schema is up to date"]:
            print(line)
    return 0


async def _health(settings: config.Settings, args: argparse.Namespace) -> int:
    ready, line = await health.probe(settings.health_host, settings.health_port, give_up_after=args.timeout)
    print(line)
    return 0 if ready else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mhc-daemon",
        description="Capture a Chaturbate broadcaster's room into PostgreSQL. Configured by MHC_ variables.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    migrate = commands.add_parser(
        "migrate", help="apply pending migrations, move to a version, or show status"
    )
    migrate.add_argument("action", nargs="?", choices=["up", "status"], default="up")
    migrate.add_argument("--to", type=int, metavar="N", help="move up or down to version N (0 removes all)")
    migrate.set_defaults(handler=_migrate)
    _add_report_commands(commands)

    probe = commands.add_parser(
        "health", help="ask the running daemon's /readyz: exit 0 when ready, 1 otherwise (a HEALTHCHECK)"
    )
    probe.add_argument("--timeout", type=float, default=5.0, metavar="S", help="give up after S seconds")
    probe.set_defaults(handler=_health)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = config.load()
    except errors.ConfigError as error:
        print(f"mhc-daemon: {error}", file=sys.stderr)
        return errors.EX_CONFIG
    # The daemon logs to stdout (journald, Docker); one-shot commands keep stdout for their own output.
    logs.configure(
        settings.log_level, settings.log_format, stream=sys.stdout if args.command == "run" else sys.stderr
    )
    for secret in (settings.cb_events_token, settings.cb_stats_token, settings.statbate_token):
        logs.register_secret(secret.get_secret_value() if secret else None)
    handler: Handler = args.handler
    try:
        return asyncio.run(handler(settings, args))
    except errors.ConfigError as error:
        print(f"mhc-daemon: {logs.mask(str(error))}", file=sys.stderr)
        return errors.EX_CONFIG
    except errors.DaemonError as error:
        print(f"mhc-daemon: {logs.mask(str(error))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


async def _deltas(settings: config.Settings, args: argparse.Namespace) -> int:
    async with database_server.open_url(settings) as url, db.open_pool(url) as pool:
        deltas = await reports.deltas_for(pool, args.username, args.source)
    print(json.dumps(reports.deltas_json(deltas), indent=2) if args.json else reports.render_deltas(deltas))
    return 0


async def _stats(settings: config.Settings, args: argparse.Namespace) -> int:
    async with database_server.open_url(settings) as url, db.open_pool(url) as pool:
        stats = await reports.room_stats(
            pool,
            session_id=args.session,
            live=args.session is None,
            include_excluded=args.include_excluded,
            limit=args.limit,
        )
    print(json.dumps(reports.stats_json(stats), indent=2) if args.json else reports.render_stats(stats))
    return 0


def _add_report_commands(commands: Any) -> None:
    deltas = commands.add_parser("deltas", help="print the deltas between a person's consecutive snapshots")
    deltas.add_argument("username", help="a username or current alias")
    deltas.add_argument(
        "--source", choices=[*db.SNAPSHOT_SOURCES, "manual"], help="only this snapshot source"
    )
    deltas.add_argument("--json", action="store_true", help="JSON instead of a table")
    deltas.set_defaults(handler=_deltas)

    stats = commands.add_parser(
        "stats", help="top tippers and chatters, watchlist counts (exclusions applied)"
    )
    which = stats.add_mutually_exclusive_group()
    which.add_argument("--session", type=uuid.UUID, metavar="ID", help="this stream session")
    which.add_argument("--live", action="store_true", help="the live session (the default)")
    stats.add_argument("--include-excluded", action="store_true", help="count excluded persons too")
    stats.add_argument("--limit", type=int, default=10, metavar="N", help="rows per ranking (default 10)")
    stats.add_argument("--json", action="store_true", help="JSON instead of tables")
    stats.set_defaults(handler=_stats)
