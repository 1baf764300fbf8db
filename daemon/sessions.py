"""Stream-session rules. Pure functions: no database, no network, no clock (`now` is always an argument).

A session of one broadcaster spans [started_at, ended_at]; a LIVE session (ended_at None) spans from its start
on. The rules, which the writer (`db.write_batch`), the staleness task and `sessions repair` all apply:

* An event belongs to the session whose span contains its time (the latest-starting one if spans overlap),
  else to none. Replaying an old recording links old events to old sessions, never to the current one.
* A broadcastStart while a session is open ends that session at its last event (its start when it has none),
  end reason `next_start`, and opens the new one. A start inside an ended session's span changes nothing
  (that show is already recorded). A start older than every open session and inside no span (an old
  recording from before any stored session) opens a past session, bounded by the next session's start.
* A broadcastStop ends the open session that started at or before it (`broadcast_stop`). A stop inside an
  ended session's span, or older than the open session's start, is stale: recorded, it changes nothing. A
  stop with no session at all before or after it is an orphan (the daemon missed the start).
* Staleness (`is_stale`): a LIVE session with no event for `stale_after` while the newest Stats API report
  (taken after its last event) says the room is offline, or with no event for twice that when the Stats API
  says nothing usable, is ended at its last event (`stale`).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, cast

END_REASONS = ("broadcast_stop", "next_start", "stale", "repair")
EndReason = Literal["broadcast_stop", "next_start", "stale", "repair"]
Kind = Literal["start", "stop"] | None


@dataclass(frozen=True, slots=True)
class Known:
    """A stored session as the writer read it."""

    id: uuid.UUID
    broadcaster: str
    started_at: dt.datetime
    ended_at: dt.datetime | None  # None: LIVE
    last_event_at: dt.datetime | None = None  # its newest linked event; only needed for an open session


class Event(NamedTuple):
    """One new event in batch order: its room, its time and whether it starts or stops a broadcast. A tuple:
    the writer makes one per event, and a frozen dataclass cost three times as much to build."""

    event_id: str
    broadcaster: str
    at: dt.datetime
    kind: Kind = None


@dataclass(frozen=True, slots=True)
class Opened:
    """A session to insert; `ended_at` is set when it also ends within the batch (or is a past session)."""

    id: uuid.UUID
    broadcaster: str
    started_at: dt.datetime
    ended_at: dt.datetime | None
    end_reason: EndReason | None


@dataclass(frozen=True, slots=True)
class Ended:
    """A stored session to end."""

    id: uuid.UUID
    ended_at: dt.datetime
    end_reason: EndReason


@dataclass(frozen=True, slots=True)
class IgnoredStop:
    """A stop that changed nothing: `stale` (older than the open session, or inside an ended one) or
    `orphan` (no session before or after it)."""

    event_id: str
    broadcaster: str
    at: dt.datetime
    why: Literal["stale", "orphan"]
    session_started_at: dt.datetime | None  # the open (or containing) session it did not end


@dataclass
class Decisions:
    opened: list[Opened] = field(default_factory=list)
    ended: list[Ended] = field(default_factory=list)
    links: list[uuid.UUID | None] = field(default_factory=list)  # one per event, in order
    ignored_stops: list[IgnoredStop] = field(default_factory=list)

    @property
    def stale_stops(self) -> list[IgnoredStop]:
        return [stop for stop in self.ignored_stops if stop.why == "stale"]

    @property
    def orphan_stops(self) -> list[IgnoredStop]:
        return [stop for stop in self.ignored_stops if stop.why == "orphan"]


@dataclass(slots=True)
class _Span:
    id: uuid.UUID
    started_at: dt.datetime
    ended_at: dt.datetime | None
    last_event_at: dt.datetime | None
    stored: bool  # read from the database (else opened in this batch)
    bound: dt.datetime | None = None  # a past session opened here: open until the next session's start
    end_reason: EndReason | None = None

    @property
    def open(self) -> bool:
        return self.ended_at is None

    def contains(self, at: dt.datetime) -> bool:
        if at < self.started_at:
            return False
        if self.ended_at is not None:
            return at <= self.ended_at
        return self.bound is None or at < self.bound

    def last(self) -> dt.datetime:
        return max(self.started_at, self.last_event_at) if self.last_event_at else self.started_at


@dataclass
class _Room:
    """One broadcaster's sessions while a batch is walked, by start time."""

    spans: list[_Span]

    def containing(self, at: dt.datetime) -> _Span | None:
        """The latest-starting span containing `at`: spans are kept in start order, and live traffic finds
        its session at the first step (a list of every match cost 3 ms per 2,000 events)."""
        for span in reversed(self.spans):
            if span.contains(at):
                return span
        return None

    def next_start_after(self, at: dt.datetime) -> dt.datetime | None:
        return min((span.started_at for span in self.spans if span.started_at > at), default=None)

    def open_span(self) -> _Span | None:
        """The LIVE session (open and unbounded), if any."""
        return next((span for span in self.spans if span.open and span.bound is None), None)


def decide(
    events: Sequence[Event], known: Sequence[Known], new_id: Callable[[], uuid.UUID] = uuid.uuid4
) -> Decisions:
    """What storing `events` (new events, in delivery order) does to the sessions `known` (every stored
    session the batch's times can touch: the LIVE ones, those overlapping the batch's time range, and the
    first one starting after it)."""
    rooms: dict[str, _Room] = {}
    for session in sorted(known, key=lambda item: item.started_at):
        span = _Span(session.id, session.started_at, session.ended_at, session.last_event_at, stored=True)
        rooms.setdefault(session.broadcaster, _Room([])).spans.append(span)
    out = Decisions()
    for event in events:
        room = rooms.setdefault(event.broadcaster, _Room([]))
        if event.kind == "start":
            _start(room, event, new_id)
        home = room.containing(event.at)
        out.links.append(home.id if home is not None else None)
        if home is not None and (home.last_event_at is None or event.at > home.last_event_at):
            home.last_event_at = event.at
        if event.kind == "stop":
            _stop(room, event, home, out)  # after linking: the stop belongs to the show it ends
    for broadcaster, room in rooms.items():
        for span in room.spans:
            if span.open and span.bound is not None:  # a past session never stopped: ends before the next
                span.ended_at, span.end_reason = span.last(), "next_start"
            if span.stored and span.end_reason is not None and span.ended_at is not None:
                out.ended.append(Ended(span.id, span.ended_at, span.end_reason))
            elif not span.stored:
                out.opened.append(
                    Opened(span.id, broadcaster, span.started_at, span.ended_at, span.end_reason)
                )
    return out


def _start(room: _Room, event: Event, new_id: Callable[[], uuid.UUID]) -> None:
    current = room.containing(event.at)
    if current is not None and not (current.open and event.at > current.started_at):
        return  # inside a recorded show (or its own start again): nothing changes
    if current is not None:  # a start while open: the open session ends at its last event before this
        current.ended_at = min(current.last(), event.at)
        current.end_reason = "next_start"
        bound = current.bound
    else:
        bound = room.next_start_after(event.at)
    room.spans.append(_Span(new_id(), event.at, None, None, stored=False, bound=bound))
    room.spans.sort(key=lambda span: span.started_at)


def _stop(room: _Room, event: Event, span: _Span | None, out: Decisions) -> None:
    if span is not None and span.open and span.end_reason is None:
        span.ended_at, span.end_reason = event.at, "broadcast_stop"
        return
    live = room.open_span()
    later = room.next_start_after(event.at)
    if span is None and live is None and later is None:
        out.ignored_stops.append(IgnoredStop(event.event_id, event.broadcaster, event.at, "orphan", None))
        return
    against = span or live
    started = against.started_at if against is not None else later
    out.ignored_stops.append(IgnoredStop(event.event_id, event.broadcaster, event.at, "stale", started))


# --- staleness ------------------------------------------------------------------------------------------

RoomState = Literal["online", "offline", "unknown"]


def stats_room_state(payload: Mapping[str, Any] | None) -> RoomState:
    """What a Stats API answer says about the room: `time_online` is the minutes online, -1 while offline
    (reference section 5; the simulator answers the same). Anything else tells nothing."""
    if not isinstance(payload, Mapping):
        return "unknown"
    minutes = payload.get("time_online")
    if isinstance(minutes, bool) or not isinstance(minutes, int | float | str):
        return "unknown"
    try:
        value = float(minutes)
    except ValueError:
        return "unknown"
    if value == -1:
        return "offline"
    return "online" if value >= 0 else "unknown"


@dataclass(frozen=True, slots=True)
class StatsReport:
    captured_at: dt.datetime
    state: RoomState


def is_stale(
    last_event_at: dt.datetime, now: dt.datetime, stale_after: dt.timedelta, report: StatsReport | None
) -> bool:
    """The staleness rule for a LIVE session whose newest event is at `last_event_at` (its start if none).

    Only a report taken after the last event counts. Offline: stale after `stale_after` without an event.
    Online, reported within `stale_after`: a quiet show, not stale. Otherwise (no Stats token, no report,
    an old or unreadable one): stale after twice `stale_after`.
    """
    quiet = now - last_event_at
    if report is not None and report.captured_at >= last_event_at:
        if report.state == "offline":
            return quiet >= stale_after
        if report.state == "online" and now - report.captured_at < stale_after:
            return False
    return quiet >= 2 * stale_after


@dataclass(frozen=True, slots=True)
class Live:
    """A LIVE session as the staleness check reads it."""

    id: uuid.UUID
    broadcaster: str
    started_at: dt.datetime
    last_event_at: dt.datetime | None
    report: StatsReport | None  # the broadcaster's newest Stats API snapshot, if any


def stale_endings(live: Sequence[Live], now: dt.datetime, stale_after: dt.timedelta) -> list[Ended]:
    """The LIVE sessions the staleness rule ends, each at its last event (its start when it has none)."""
    endings = []
    for session in live:
        last = max(session.started_at, session.last_event_at or session.started_at)
        if is_stale(last, now, stale_after, session.report):
            endings.append(Ended(session.id, last, "stale"))
    return endings


# --- repair of data written by earlier versions ----------------------------------------------------------

REPAIR_MARKER = "marker:"  # event ids of the "last event before" markers fed to `decide` by `plan_repair`
STORED_END = "stored-end:"  # event ids of the stops that stand for an end an earlier version wrote


@dataclass(frozen=True, slots=True)
class Stored:
    """A stored session as `sessions repair` reads it."""

    id: uuid.UUID
    broadcaster: str
    started_at: dt.datetime
    ended_at: dt.datetime | None
    status: str
    end_reason: str | None


@dataclass(frozen=True, slots=True)
class Repair:
    """One change of `sessions repair`: a stored session set to these values (`insert`: a new one)."""

    id: uuid.UUID
    broadcaster: str
    started_at: dt.datetime
    ended_at: dt.datetime | None
    end_reason: EndReason | None
    insert: bool
    note: str

    @property
    def status(self) -> str:
        return "LIVE" if self.ended_at is None else "ENDED"


@dataclass(frozen=True, slots=True)
class RepairInput:
    """Everything `plan_repair` reads, per the whole database."""

    stored: Sequence[Stored]
    edges: Sequence[Event]  # the stored broadcastStart/broadcastStop events
    # (broadcaster, time) -> the newest cb_events interaction of that room strictly before it; the times are
    # every start (`repair_marker_times`) and `FAR_FUTURE` (the room's newest interaction of all)
    last_before: Mapping[tuple[str, dt.datetime], dt.datetime | None]
    reports: Mapping[str, StatsReport | None]  # the newest Stats API report per room


FAR_FUTURE = dt.datetime(9999, 1, 1)


def repair_marker_times(stored: Sequence[Stored], edges: Sequence[Event]) -> set[tuple[str, dt.datetime]]:
    """The (room, time) pairs whose "newest interaction before" `plan_repair` needs."""
    times = {(item.broadcaster, item.started_at) for item in stored}
    times |= {(edge.broadcaster, edge.at) for edge in edges if edge.kind == "start"}
    times |= {(room, FAR_FUTURE) for room, _at in list(times)}
    return times


def _timeline(data: RepairInput) -> list[Event]:
    """The rule events in time order as if delivered in order: the stored start/stop events, each stored
    session's start, each end an earlier version wrote (never a backwards one), and markers at each room's
    last interaction before each start (so `next_start` ends land on a real last event)."""
    events: dict[tuple[str, dt.datetime, str], Event] = {}
    for edge in data.edges:
        if edge.kind is not None:
            events.setdefault((edge.broadcaster, edge.at, edge.kind), edge)
    for item in data.stored:
        key = (item.broadcaster, item.started_at, "start")
        events.setdefault(key, Event(f"stored-start:{item.id}", item.broadcaster, item.started_at, "start"))
        if item.ended_at is not None and item.ended_at >= item.started_at:
            stop = Event(f"{STORED_END}{item.id}", item.broadcaster, item.ended_at, "stop")
            events.setdefault((item.broadcaster, item.ended_at, "stop"), stop)
    timeline = list(events.values())
    for (room, at), last in data.last_before.items():
        if last is not None:
            timeline.append(Event(f"{REPAIR_MARKER}{room}:{at.isoformat()}", room, last))
    # Markers first at equal times: the last event before a start or stop belongs to the show it ends.
    return sorted(timeline, key=lambda item: (item.at, item.kind is not None, item.kind == "start"))


def plan_repair(
    data: RepairInput,
    now: dt.datetime,
    stale_after: dt.timedelta,
    new_id: Callable[[], uuid.UUID] = uuid.uuid4,
) -> list[Repair]:
    """The rules applied to a whole stored history: merged shows split at their broadcastStart events, a
    session left LIVE ended by the next start or by staleness, backwards sessions (ended before they started)
    rebuilt from the events, ends recorded without a reason given one. Stored sessions are matched by room
    and start; a changed one is updated, a missing one inserted. Running it on its own output changes nothing.
    """
    shows = decide(_timeline(data), [], new_id).opened
    real_stops = {(edge.broadcaster, edge.at) for edge in data.edges if edge.kind == "stop"}
    by_start = {(item.broadcaster, item.started_at): item for item in data.stored}
    changes = []
    for show in shows:
        stored = by_start.get((show.broadcaster, show.started_at))
        ended_at, reason = show.ended_at, show.end_reason
        if ended_at is None:
            last = data.last_before.get((show.broadcaster, FAR_FUTURE))
            last = max(show.started_at, last) if last else show.started_at
            if is_stale(last, now, stale_after, data.reports.get(show.broadcaster)):
                ended_at, reason = last, "stale"
        if reason == "broadcast_stop" and (show.broadcaster, ended_at) not in real_stops:
            reason = "repair"  # an end an earlier version wrote that no stop event explains: kept
        if stored is not None and ended_at == stored.ended_at and stored.end_reason is not None:
            reason = _reason(stored.end_reason)  # an end this version wrote keeps its reason
        change = _change(stored, show, ended_at, reason)
        if change is not None:
            changes.append(change)
    return changes


def _reason(value: str) -> EndReason:
    if value not in END_REASONS:
        raise ValueError(f"unknown end reason {value!r}")
    return cast(EndReason, value)


def _change(
    stored: Stored | None, show: Opened, ended_at: dt.datetime | None, reason: EndReason | None
) -> Repair | None:
    if stored is None:
        end = f"ended {ended_at.isoformat()} ({reason})" if ended_at else "LIVE"
        note = f"split: the broadcastStart at {show.started_at.isoformat()} opens its own session, {end}"
        return Repair(show.id, show.broadcaster, show.started_at, ended_at, reason, True, note)
    if (stored.ended_at, stored.end_reason, stored.status) == (ended_at, reason, _status(ended_at)):
        return None
    before = stored.ended_at.isoformat() if stored.ended_at else "LIVE"
    after = ended_at.isoformat() if ended_at else "LIVE"
    if stored.ended_at is not None and stored.ended_at < stored.started_at:
        what = "backwards session fixed"
    elif stored.ended_at is None and reason == "stale":
        what = "stale session ended"
    elif stored.ended_at == ended_at:
        what = "end reason recorded"
    elif reason == "next_start":
        what = "merged show split"
    else:
        what = "end corrected"
    note = f"{what}: ended {before} -> {after} ({reason or 'LIVE'})"
    return Repair(stored.id, stored.broadcaster, stored.started_at, ended_at, reason, False, note)


def _status(ended_at: dt.datetime | None) -> str:
    return "LIVE" if ended_at is None else "ENDED"
