"""The `mhc-daemon` command line. Every command reads the same `MHC_` configuration first."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import uvloop

from daemon import (
    __version__,
    config,
    database_server,
    db,
    demo,
    errors,
    health,
    ingest,
    logs,
    migrations,
    reports,
    rooms,
    supervisor,
)

log = logs.get_logger(__name__)
EX_SOFTWARE = 70  # sysexits.h: an internal error; the service manager restarts the daemon

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


async def _run(settings: config.Settings, args: argparse.Namespace) -> int:
    # One room from the settings, or many rooms (rows of `rooms` with token files in MHC_TOKENS_DIR), or both.
    many_rooms = rooms.tokens_dir(settings) is not None and not settings.cb_username
    missing = [
        name
        for name, value in (
            ("MHC_CB_USERNAME", settings.cb_username),
            ("MHC_CB_EVENTS_TOKEN", settings.cb_events_token),
        )
        if not value and not many_rooms
    ]
    if missing:
        raise errors.ConfigError(
            f"invalid configuration: {' and '.join(missing)} must be set to run the daemon "
            "(the token may also be a file: MHC_CB_EVENTS_TOKEN_FILE; "
            "make an Events API token at https://chaturbate.com/statsapi/authtoken/; "
            "for many rooms set MHC_TOKENS_DIR instead)"
        )
    if args.no_migrate:
        settings = settings.model_copy(update={"migrate_on_start": False})
    return await supervisor.Supervisor(settings).run()


async def _rooms(settings: config.Settings, args: argparse.Namespace) -> int:
    if args.action != "list" and not args.name:
        raise errors.DaemonError(f"rooms {args.action} needs a room name")
    name = rooms.room_name(args.name) if args.name else ""
    async with database_server.open_url(settings) as url:
        async with db.single_connection(url) as connection:
            await migrations.migrate(connection)
        async with db.open_pool(url, pooler=settings.database_transaction_pooler) as pool:
            if args.action == "list":
                listed = await db.list_rooms(pool)
                tokens = rooms.TokenFiles(rooms.tokens_dir(settings))
                tokens.scan()
                held = tokens.rooms() | ({db.normalize_username(settings.cb_username)} - {""})
                if args.json:
                    print(
                        json.dumps([reports.room_json(item, item.name in held) for item in listed], indent=2)
                    )
                else:
                    print(reports.render_rooms(listed, held, now=db.utc_now()))
                return 0
            if args.action == "add":
                added = await db.add_room(pool, name)
                print(f"room {name} {'added' if added else 'was there: enabled'}")
                directory = rooms.tokens_dir(settings)
                if directory is None or not (directory / f"{name}{rooms.EVENTS_SUFFIX}").is_file():
                    where = directory or "MHC_TOKENS_DIR"
                    print(
                        f"put its Events API token in {where}/{name}{rooms.EVENTS_SUFFIX} to start polling it"
                    )
                return 0
            if not await db.set_room_enabled(pool, name, args.action == "enable"):
                raise errors.DaemonError(f"no room {name}: add it with `mhc-daemon rooms add {name}`")
            print(
                f"room {name} {args.action}d; a running daemon follows within a minute (or at once on SIGHUP)"
            )
    return 0


ROOM_ACTIONS = ("list", "add", "disable", "enable")


async def _demo(settings: config.Settings, args: argparse.Namespace) -> int:
    logs.configure("warning", "console", stream=sys.stderr)
    return await demo.run(duration=args.duration, rate=args.rate, keep=args.keep)


async def _replay(settings: config.Settings, args: argparse.Namespace) -> int:
    """Ingest recorded response bodies (one JSON document per line) of one room's feed through the writer; the
    cursor stays."""
    path: Path = args.file
    room = args.room or settings.cb_username
    try:
        lines = await asyncio.to_thread(lambda: path.read_text(encoding="utf-8").splitlines())
    except OSError as error:
        raise errors.DaemonError(f"cannot read {path}: {error.strerror}") from error
    stored = duplicates = quarantined = unreadable = 0
    async with database_server.open_url(settings) as url:
        async with db.single_connection(url) as connection:
            await migrations.migrate(connection)
        async with db.open_pool(url, pooler=settings.database_transaction_pooler) as pool:
            for number, line in enumerate(lines, start=1):
                events = _response_events(line)
                if events is None:
                    unreadable += 1
                    log.error("replay_line_unreadable", file=str(path), line=number)
                    continue
                batch = ingest.parse_page(
                    events, broadcaster=room, received_at=db.utc_now(), next_event_id=None
                )
                result = await db.write_batch(
                    pool, batch, cursor_broadcaster=None, timeout_seconds=settings.cb_events_timeout
                )
                stored += result.new_events
                duplicates += result.duplicates
                quarantined += result.quarantined
                _progress(number, len(lines))
    print(
        f"replayed {len(lines)} responses: {stored} events stored, {duplicates} already stored, "
        f"{quarantined} quarantined, {unreadable} unreadable lines"
    )
    return 1 if unreadable else 0


def _response_events(line: str) -> list[Any] | None:
    """The `events` array of one recorded response body, or None when the line is not one. The API's 400
    continuation (`{"status": ..., "nextUrl": ...}`, no events) is an empty page, as the poller reads it."""
    try:
        body = json.loads(line)
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    events = body.get("events")
    if events is None and isinstance(body.get("nextUrl"), str):
        return []
    return events if isinstance(events, list) else None


def _progress(done: int, total: int) -> None:
    if not sys.stderr.isatty():
        return
    width = 30
    filled = width * done // max(total, 1)
    end = "\n" if done == total else ""
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end=end, file=sys.stderr, flush=True)


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

    run = commands.add_parser("run", help="the daemon: migrate, then poll and store until SIGTERM/SIGINT")
    run.add_argument("--no-migrate", action="store_true", help="do not apply pending migrations at start")
    run.set_defaults(handler=_run)

    show = commands.add_parser("demo", help="the daemon against local simulators and a throw-away database")
    show.add_argument("--duration", type=float, default=20.0, metavar="S", help="seconds to run (default 20)")
    show.add_argument(
        "--rate", type=float, default=100.0, metavar="N", help="events per second (default 100)"
    )
    show.add_argument("--keep", type=Path, metavar="DIR", help="keep the demo database in DIR")
    show.set_defaults(handler=_demo)

    replay = commands.add_parser("replay", help="ingest recorded Events API response bodies, one per line")
    replay.add_argument("file", type=Path, help="a file of JSON response bodies, one per line")
    replay.add_argument("--room", metavar="NAME", help="whose feed it recorded (default: MHC_CB_USERNAME)")
    replay.set_defaults(handler=_replay)

    room = commands.add_parser(
        "rooms", help="the rooms to capture: list them, add one, disable or enable one (no restart needed)"
    )
    room.add_argument("action", nargs="?", choices=list(ROOM_ACTIONS), default="list")
    room.add_argument("name", nargs="?", help="the room (its broadcaster's username)")
    room.add_argument("--json", action="store_true", help="list: JSON instead of a table")
    room.set_defaults(handler=_rooms)
    _add_report_commands(commands)

    probe = commands.add_parser(
        "health", help="ask the running daemon's /readyz: exit 0 when ready, 1 otherwise (a HEALTHCHECK)"
    )
    probe.add_argument("--timeout", type=float, default=5.0, metavar="S", help="give up after S seconds")
    probe.set_defaults(handler=_health)
    return parser


@contextlib.asynccontextmanager
async def _database(settings: config.Settings) -> AsyncIterator[db.Pool]:
    """A pool on the configured database (or the embedded one) for a one-shot command."""
    async with (
        database_server.open_url(settings) as url,
        db.open_pool(url, pooler=settings.database_transaction_pooler) as pool,
    ):
        yield pool


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
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(handler(settings, args))
    except errors.ConfigError as error:
        print(f"mhc-daemon: {logs.mask(str(error))}", file=sys.stderr)
        return errors.EX_CONFIG
    except errors.DaemonError as error:
        print(f"mhc-daemon: {logs.mask(str(error))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # the last boundary: one line for people, the traceback in the log
        problems = list(error.exceptions) if isinstance(error, ExceptionGroup) else [error]
        if all(isinstance(problem, errors.DaemonError) for problem in problems):
            for problem in problems:
                print(f"mhc-daemon: {logs.mask(str(problem))}", file=sys.stderr)
            return 1
        log.error("crashed", exc_info=error)
        print(f"mhc-daemon: internal error: {logs.mask(repr(error))} (details in the log)", file=sys.stderr)
        return EX_SOFTWARE


async def _deltas(settings: config.Settings, args: argparse.Namespace) -> int:
    async with _database(settings) as pool:
        deltas = await reports.deltas_for(pool, args.username, args.source)
    print(json.dumps(reports.deltas_json(deltas), indent=2) if args.json else reports.render_deltas(deltas))
    return 0


async def _stats(settings: config.Settings, args: argparse.Namespace) -> int:
    async with _database(settings) as pool:
        stats = await reports.room_stats(
            pool,
            room=args.room or settings.cb_username or None,
            session_id=args.session,
            live=args.session is None,
            include_excluded=args.include_excluded,
            limit=args.limit,
        )
    print(json.dumps(reports.stats_json(stats), indent=2) if args.json else reports.render_stats(stats))
    return 0


async def _run_session_action(settings: config.Settings, args: argparse.Namespace) -> int:
    return await SESSION_ACTIONS[args.action](settings, args)


async def _gaps(settings: config.Settings, args: argparse.Namespace) -> int:
    async with _database(settings) as pool:
        gaps = await db.ingest_gaps(pool, limit=args.limit, room=args.room)
    if args.json:
        print(json.dumps([reports.gap_json(gap) for gap in gaps], indent=2))
    else:
        print(reports.render_gaps(gaps))
    return 0


async def _list_sessions(settings: config.Settings, args: argparse.Namespace) -> int:
    async with _database(settings) as pool:
        summaries = await db.session_summaries(
            pool, last=args.last, include_excluded=args.include_excluded, room=args.room
        )
    if args.json:
        print(json.dumps([reports.session_json(summary) for summary in summaries], indent=2))
    else:
        print(reports.render_sessions(summaries, include_excluded=args.include_excluded))
    return 0


def _add_report_commands(commands: Any) -> None:
    gaps = commands.add_parser("gaps", help="list the recorded gaps of the event feed, newest first")
    gaps.add_argument("--json", action="store_true", help="JSON instead of a table")
    gaps.add_argument("--limit", type=int, default=100, metavar="N", help="at most N gaps (default 100)")
    gaps.add_argument("--room", metavar="NAME", help="only this room's feed (default: every room)")
    gaps.set_defaults(handler=_gaps)

    sessions = commands.add_parser(
        "sessions",
        help="show summaries (tips, visitors, follows, top tippers, token balance change); "
        "`sessions repair` applies the session rules to older data",
    )
    sessions.add_argument("action", nargs="?", choices=list(SESSION_ACTIONS), default="list")
    sessions.add_argument("--last", type=int, default=10, metavar="N", help="the newest N sessions (10)")
    sessions.add_argument("--json", action="store_true", help="JSON instead of text")
    sessions.add_argument("--include-excluded", action="store_true", help="count excluded persons too")
    sessions.add_argument("--dry-run", action="store_true", help="repair: print the changes, make none")
    sessions.add_argument("--room", metavar="NAME", help="list: one room's sessions only")
    sessions.set_defaults(handler=_run_session_action)

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
    stats.add_argument(
        "--room", metavar="NAME", help="whose live session (default: MHC_CB_USERNAME, else the newest)"
    )
    stats.add_argument("--include-excluded", action="store_true", help="count excluded persons too")
    stats.add_argument("--limit", type=int, default=10, metavar="N", help="rows per ranking (default 10)")
    stats.add_argument("--json", action="store_true", help="JSON instead of tables")
    stats.set_defaults(handler=_stats)


async def _repair_sessions(settings: config.Settings, args: argparse.Namespace) -> int:
    stale_after = dt.timedelta(minutes=settings.session_stale_minutes)
    async with _database(settings) as pool:
        outcome = await db.repair_sessions(
            pool, now=db.utc_now(), stale_after=stale_after, dry_run=args.dry_run
        )
    print(reports.render_repair(outcome))
    return 0


# Actions of `mhc-daemon sessions`; the listing is the default when none is named.
SESSION_ACTIONS: dict[str, Handler] = {"list": _list_sessions, "repair": _repair_sessions}
