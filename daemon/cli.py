"""The `mhc-daemon` command line. Every command reads the same `MHC_` configuration first."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from daemon import __version__, config, database_server, db, errors, health, logs, migrations

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
