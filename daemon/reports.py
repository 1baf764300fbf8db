"""Read-side reports for the command line: snapshot deltas, exclusion-aware room stats, show summaries and
the gaps of the feed.

Gathering goes through `db`; rendering is pure (`render_*` take plain values and return text), so the
command-line handlers stay one call each.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg

from daemon import db, errors, ingest


@dataclasses.dataclass(frozen=True)
class RoomStats:
    session_id: uuid.UUID | None
    session_is_live: bool
    include_excluded: bool
    session_tippers: list[db.Ranked]
    session_chatters: list[db.Ranked]
    all_time_tippers: list[db.Ranked]
    all_time_chatters: list[db.Ranked]
    watchlists: dict[str, int]


async def deltas_for(pool: asyncpg.Pool, username: str, source: str | None) -> list[db.SnapshotDelta]:
    person = await db.find_person(pool, username)
    if person is None:
        raise errors.DaemonError(f"no person named {db.normalize_username(username)!r}")
    return await db.snapshot_deltas(pool, person.id, source)


def _time(moment: dt.datetime) -> str:
    return moment.isoformat(sep=" ", timespec="seconds")


def deltas_json(deltas: list[db.SnapshotDelta]) -> list[dict[str, Any]]:
    return [
        {
            "source": delta.source,
            "from": delta.previous_captured_at.isoformat(),
            "to": delta.captured_at.isoformat(),
            "delta": delta.delta,
        }
        for delta in deltas
    ]


def render_deltas(deltas: list[db.SnapshotDelta]) -> str:
    """One line per metric of each consecutive pair; a metric missing from either snapshot shows `null`."""
    if not deltas:
        return "no consecutive snapshots to compare"
    rows = [("SOURCE", "FROM", "TO", "METRIC", "DELTA")]
    for delta in deltas:
        for metric in sorted(delta.delta):
            value = json.dumps(delta.delta[metric])
            rows.append(
                (delta.source, _time(delta.previous_captured_at), _time(delta.captured_at), metric, value)
            )
    return _table(rows)


def _table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


async def room_stats(
    pool: asyncpg.Pool,
    *,
    room: str | None,
    session_id: uuid.UUID | None,
    live: bool,
    include_excluded: bool,
    limit: int,
) -> RoomStats:
    """Top tippers and chatters for one session (the given one, else `room`'s live one; any room's newest
    live one when `room` is None) and all time, plus watchlist member counts; excluded persons are left out
    unless `include_excluded`."""
    chosen = session_id
    if chosen is None and live:
        chosen = await db.live_session_id(pool, room)
    excluded, n = include_excluded, limit
    return RoomStats(
        session_id=chosen,
        session_is_live=session_id is None and chosen is not None,
        include_excluded=include_excluded,
        session_tippers=await db.top_tippers(pool, session_id=chosen, include_excluded=excluded, limit=n)
        if chosen
        else [],
        session_chatters=await db.top_chatters(pool, session_id=chosen, include_excluded=excluded, limit=n)
        if chosen
        else [],
        all_time_tippers=await db.top_tippers(pool, session_id=None, include_excluded=excluded, limit=n),
        all_time_chatters=await db.top_chatters(pool, session_id=None, include_excluded=excluded, limit=n),
        watchlists=await db.watchlist_counts(pool, include_excluded=include_excluded),
    )


def _tippers(ranked: list[db.Ranked]) -> list[dict[str, Any]]:
    return [{"username": item.username, "tokens": _number(item.total), "tips": item.count} for item in ranked]


def _chatters(ranked: list[db.Ranked]) -> list[dict[str, Any]]:
    return [{"username": item.username, "messages": item.count} for item in ranked]


def _number(value: float) -> int | float:
    return int(value) if value.is_integer() else value


def stats_json(stats: RoomStats) -> dict[str, Any]:
    return {
        "session": {"id": str(stats.session_id), "live": stats.session_is_live} if stats.session_id else None,
        "include_excluded": stats.include_excluded,
        "session_top_tippers": _tippers(stats.session_tippers),
        "session_top_chatters": _chatters(stats.session_chatters),
        "all_time_top_tippers": _tippers(stats.all_time_tippers),
        "all_time_top_chatters": _chatters(stats.all_time_chatters),
        "watchlists": stats.watchlists,
    }


def render_stats(stats: RoomStats) -> str:
    parts = []
    if stats.session_id is None:
        parts.append("Session: none live (use --session ID)")
    else:
        parts.append(f"Session: {stats.session_id}{' (live)' if stats.session_is_live else ''}")
    sections = (
        ("Top tippers, session", _tippers(stats.session_tippers), "tokens"),
        ("Top chatters, session", _chatters(stats.session_chatters), "messages"),
        ("Top tippers, all time", _tippers(stats.all_time_tippers), "tokens"),
        ("Top chatters, all time", _chatters(stats.all_time_chatters), "messages"),
    )
    for title, items, figure in sections:
        parts.append(f"\n{title}:")
        if not items:
            parts.append("  (none)")
            continue
        rows = [("USERNAME", figure.upper())] + [(item["username"], str(item[figure])) for item in items]
        parts.append("\n".join("  " + line for line in _table(rows).splitlines()))
    parts.append("\nWatchlists:")
    rows = [("WATCHLIST", "MEMBERS")] + [(name, str(count)) for name, count in stats.watchlists.items()]
    parts.append("\n".join("  " + line for line in _table(rows).splitlines()))
    if not stats.include_excluded:
        parts.append("\nExcluded persons are left out (--include-excluded to count them).")
    return "\n".join(parts)


def render_snapshot_counts(counts: list[db.SnapshotCount]) -> str:
    """One line per snapshot source: how many rows, and the newest capture."""
    if not counts:
        return "no snapshots yet"
    rows = [("SOURCE", "SNAPSHOTS", "NEWEST")]
    rows += [(count.source, str(count.snapshots), _time(count.newest)) for count in counts]
    return _table(rows)


def _utc(moment: dt.datetime | None) -> str | None:
    """A naive-UTC TIMESTAMP value as ISO 8601 with its offset."""
    return None if moment is None else moment.replace(tzinfo=dt.UTC).isoformat()


def gap_json(gap: ingest.Gap) -> dict[str, Any]:
    """One recorded gap as `/status` and `mhc-daemon gaps --json` show it."""
    return {
        "broadcaster": gap.broadcaster,
        "after_event_id": gap.after_event_id,
        "resumed_event_id": gap.resumed_event_id,
        "gap_from": _utc(gap.gap_from),
        "gap_to": _utc(gap.gap_to),
        "gap_s": (gap.gap_to - gap.gap_from).total_seconds(),
        "reason": gap.reason,
        "detected_at": _utc(gap.detected_at),
    }


def _lag(room: db.Room, now: dt.datetime) -> float | None:
    at = room.last_event_at
    return None if at is None else max(0.0, (now - at).total_seconds())


def room_json(room: db.Room, token_held: bool, now: dt.datetime | None = None) -> dict[str, Any]:
    now = now or db.utc_now()
    lag = _lag(room, now)
    return {
        "name": room.name,
        "state": _room_state(room),
        "token_file": token_held,
        "last_event_id": room.last_event_id,
        "last_event_at": _utc(room.last_event_at),
        "lag_s": None if lag is None else round(lag, 1),
        "added_at": _utc(room.added_at),
        "holder": room.holder,
        "epoch": room.epoch,
    }


def _room_state(room: db.Room) -> str:
    if room.enabled is None:
        return "settings"  # MHC_CB_USERNAME's room: no row, polled whenever its token is set
    return "enabled" if room.enabled else "disabled"


def render_rooms(rooms: list[db.Room], held: set[str], now: dt.datetime) -> str:
    """One line per room: whether it is captured, whether this host holds its token, how far behind it is,
    and which daemon holds its lease (none: the lease ran out) at which epoch."""
    if not rooms:
        return "no rooms: add one with `mhc-daemon rooms add NAME`"
    rows = [("ROOM", "STATE", "TOKEN", "LAST EVENT", "LAG", "HOLDER", "EPOCH")]
    for room in rooms:
        lag = _lag(room, now)
        rows.append(
            (
                room.name,
                _room_state(room),
                "yes" if room.name in held else "no",
                _time(room.last_event_at) if room.last_event_at else "-",
                _duration(lag) if lag is not None else "-",
                room.holder or "-",
                str(room.epoch),
            )
        )
    return _table(rows)


def render_gaps(gaps: list[ingest.Gap]) -> str:
    """One line per gap, newest first."""
    if not gaps:
        return "no gaps recorded: every position the feed moved over was delivered"
    rows = [("DETECTED", "FROM", "TO", "MISSING", "AFTER EVENT", "RESUMED AT", "REASON")]
    for gap in gaps:
        span = _duration((gap.gap_to - gap.gap_from).total_seconds())
        rows.append(
            (
                _time(gap.detected_at),
                _time(gap.gap_from),
                _time(gap.gap_to),
                span,
                gap.after_event_id,
                gap.resumed_event_id,
                gap.reason,
            )
        )
    return _table(rows)


def _duration(seconds: float) -> str:
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"


def session_json(summary: db.SessionSummary) -> dict[str, Any]:
    return {
        "session_id": str(summary.session_id),
        "broadcaster": summary.broadcaster,
        "status": summary.status,
        "started_at": _utc(summary.started_at),
        "ended_at": _utc(summary.ended_at),
        "duration_s": summary.duration_s,
        "end_reason": summary.end_reason,
        "tokens_tipped": summary.tokens_tipped,
        "tips": summary.tips,
        "tokens_per_hour": summary.tokens_per_hour,
        "unique_chatters": summary.unique_chatters,
        "unique_tippers": summary.unique_tippers,
        "unique_visitors": summary.unique_visitors,
        "new_followers": summary.new_followers,
        "unfollows": summary.unfollows,
        "fan_club_joins": summary.fan_club_joins,
        "media_purchases": summary.media_purchases,
        "top_tippers": [
            {"username": item["username"], "tokens": _number(float(item["tokens"])), "tips": item["tips"]}
            for item in summary.top_tippers
        ],
        "token_balance_before": summary.token_balance_before,
        "token_balance_after": summary.token_balance_after,
        "token_balance_change": summary.token_balance_change,
        "tokens_not_in_events": summary.tokens_not_in_events,
    }


def render_sessions(summaries: list[db.SessionSummary], *, include_excluded: bool) -> str:
    """A block per session, oldest first."""
    if not summaries:
        return "no stream sessions yet"
    parts = []
    for summary in summaries:
        end = _time(summary.ended_at) if summary.ended_at else "LIVE"
        reason = f" ({summary.end_reason})" if summary.end_reason else ""
        per_hour = f"{summary.tokens_per_hour:g}" if summary.tokens_per_hour is not None else "-"
        lines = [
            f"Session {summary.session_id}  {summary.broadcaster}",
            f"  {_time(summary.started_at)} -> {end}{reason}, {_duration(summary.duration_s)}",
            f"  tokens {summary.tokens_tipped} in {summary.tips} tips, {per_hour} per hour",
            f"  unique chatters {summary.unique_chatters}, tippers {summary.unique_tippers}, "
            f"visitors {summary.unique_visitors}",
            f"  follows {summary.new_followers}, unfollows {summary.unfollows}, "
            f"fan-club joins {summary.fan_club_joins}, media purchases {summary.media_purchases}",
        ]
        if summary.top_tippers:
            top = ", ".join(
                f"{item['username']} {_number(float(item['tokens']))}" for item in summary.top_tippers
            )
            lines.append(f"  top tippers: {top}")
        if summary.token_balance_change is None:
            lines.append("  token balance: no Stats API snapshots bracket this session")
        else:
            lines.append(
                f"  token balance {_number(summary.token_balance_change):+} "
                f"({_number(summary.tokens_not_in_events or 0.0):+} not in events: private and spy shows)"
            )
        parts.append("\n".join(lines))
    if not include_excluded:
        parts.append("Excluded persons are left out (--include-excluded to count them).")
    return "\n\n".join(parts)


def render_repair(outcome: db.RepairOutcome) -> str:
    """`sessions repair`'s report: one line per session changed, one per group of interactions relinked."""
    lines = [
        f"{change.broadcaster} session {change.id} started {change.started_at.isoformat()}: {change.note}"
        for change in outcome.changes
    ]
    for (before, after), count in sorted(
        outcome.relinked.items(), key=lambda item: (str(item[0][0]), str(item[0][1]))
    ):
        lines.append(f"relinked {count} interactions: session {before or 'none'} -> {after or 'none'}")
    if not lines:
        lines.append("sessions repair: nothing to change")
    elif not outcome.applied:
        lines.append("dry run: nothing was changed")
    else:
        moved = sum(outcome.relinked.values())
        lines.append(
            f"sessions repair: {len(outcome.changes)} sessions changed, {moved} interactions relinked"
        )
    return "\n".join(lines)
