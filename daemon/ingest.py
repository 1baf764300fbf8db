"""Events API pages → rows. Pure functions: no network, no database, no clock.

`parse_page` takes one response's `events` array exactly as decoded and sorts every item into exactly one of
two places: `Batch.events` (stored raw, keyed by room and the API's id) or `Batch.quarantined` (text with a
reason).
Stored events of a known method also yield one `InteractionRow`, and broadcastStart/broadcastStop a
`SessionChange` as well. An unknown method is stored raw with no interaction, so a new method loses nothing.

Choices worth knowing:
* broadcastStart/broadcastStop also become interactions (`BROADCAST_START`/`BROADCAST_STOP`, content
  "started broadcasting"/"stopped broadcasting") on the broadcaster's person, so a timeline shows show edges.
* `metadata` is `{"event_id", "broadcaster", "method", "user": <user object minus username>, ...}` plus the
  method's fields (tokens/isAnon, fromUser/toUser, media).
  The user's flags are nested under "user" so a stray user key can never overwrite `event_id`, which the
  database's one-interaction-per-event guard reads. That guard's key is (room, event id): a direct message's
  metadata also carries `room`, the feed it came through, since its `broadcaster` is empty.
* Names (usernames, broadcaster) are lowercased like `db.normalize_username`.
* This is the hot path (a backlog drains through it), so it works on plain dicts; each event is JSON-encoded
  exactly once, and that text is both the NUL/surrogate check and what the writer sends to PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import orjson

from daemon import json_depth

SOURCE = "cb_events"

# Column widths of migration 010 and the seed: a longer value would abort the whole response's transaction.
EVENT_ID_MAX = 64
METHOD_MAX = 50
NAME_MAX = 255

# A plausible 13-digit millisecond epoch (1973..5138); anything else in an id is not a server time.
_MS_MIN = 100_000_000_000
_MS_MAX = 99_999_999_999_999
_MS_DIGITS = len(str(_MS_MAX))
_EPOCH = dt.datetime(1970, 1, 1)
# One encoder for every event: json.dumps with options builds a new one per call, a measurable cost here.
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False)
_TOO_DEEP = f"nested deeper than {json_depth.MAX_DEPTH} levels"

# Methods whose person is the user object's `username`, with the interaction type and fixed description.
_USER_METHODS: dict[str, tuple[str, str]] = {
    "follow": ("FOLLOW", "followed"),
    "unfollow": ("UNFOLLOW", "unfollowed"),
    "userEnter": ("USER_ENTER", "entered the room"),
    "userLeave": ("USER_LEAVE", "left the room"),
    "fanclubJoin": ("FANCLUB_JOIN", "joined the fan club"),
}
_BROADCAST_METHODS: dict[str, tuple[str, str, str]] = {
    "broadcastStart": ("BROADCAST_START", "started broadcasting", "start"),
    "broadcastStop": ("BROADCAST_STOP", "stopped broadcasting", "stop"),
}
KNOWN_METHODS = frozenset(
    {
        *_USER_METHODS,
        *_BROADCAST_METHODS,
        "chatMessage",
        "privateMessage",
        "tip",
        "mediaPurchase",
        "roomSubjectChange",
    }
)


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One delivered event with a valid envelope, as the `events` table keeps it."""

    event_id: str
    method: str
    broadcaster: str
    event_time: dt.datetime  # naive UTC: the id's millisecond prefix, else the receipt time
    raw: dict[str, Any]
    raw_json: str  # `raw` encoded once here (NUL-checked); the writer sends this text as jsonb


@dataclass(frozen=True, slots=True)
class InteractionRow:
    """The interaction one event maps to; the writer resolves `username` to a person."""

    event_id: str
    broadcaster: str  # as its event's: (broadcaster, event_id) names the event across rooms
    username: str
    role: str  # VIEWER | MODEL
    type: str
    content: str
    timestamp: dt.datetime  # naive UTC
    metadata: dict[str, Any]
    metadata_json: str  # `metadata` encoded once, here, off the writer's turn


@dataclass(frozen=True, slots=True)
class SessionChange:
    event_id: str
    kind: str  # start | stop
    broadcaster: str
    at: dt.datetime  # naive UTC


@dataclass(frozen=True, slots=True)
class Quarantined:
    """An item that cannot be stored or mapped, kept as ASCII JSON text (a NUL survives as `\\u0000`)."""

    room: str  # the room whose feed delivered it: a fingerprint is unique within one room
    fingerprint: str  # the event id, or the sha256 hex of raw_text when the item has no usable id
    event_id: str | None
    method: str | None
    raw_text: str
    reason: str


@dataclass(frozen=True, slots=True)
class Asked:
    """How a page was asked for: the read position of the request (`i`, None for "all latest events"), the
    seconds from taking that position up to the answer (retries, backoff and back-pressure included), and
    whether the answer was the 400 continuation form."""

    event_id: str | None
    waited_seconds: float
    continuation: bool = False


@dataclass(frozen=True, slots=True)
class Gap:
    """A stretch of the feed the read position moved over without its events being delivered."""

    broadcaster: str
    after_event_id: str  # the last position whose events were delivered
    resumed_event_id: str  # where reading resumed
    gap_from: dt.datetime  # naive UTC: the time `after_event_id` encodes
    gap_to: dt.datetime  # naive UTC: the time `resumed_event_id` encodes
    reason: str  # one of GAP_REASONS
    detected_at: dt.datetime  # naive UTC: when the answer that moved the position arrived


@dataclass(frozen=True)
class Batch:
    """Everything one API response (or several consecutive ones, see `merge`) turns into; the writer stores
    it in one transaction."""

    events: list[StoredEvent]
    interactions: list[InteractionRow]
    session_changes: list[SessionChange]
    quarantined: list[Quarantined]
    unknown_methods: int
    next_event_id: str | None
    received_at: dt.datetime  # naive UTC
    # Receipt time of each of `events` when they came in different responses; None: all at `received_at`.
    events_received_at: list[dt.datetime] | None = None
    # Holes in the feed these responses moved the read position over; stored with the cursor move.
    gaps: tuple[Gap, ...] = ()

    def receipt_times(self) -> list[dt.datetime]:
        """When each of `events` was received."""
        if self.events_received_at is not None:
            return self.events_received_at
        return [self.received_at] * len(self.events)


class _Unmappable(Exception):
    """Internal signal: this item goes to quarantine with the message as its reason."""


def normalize_name(name: str) -> str:
    """The same rule as `db.normalize_username` (kept here so this module needs no database import)."""
    return name.strip().lower()


def event_time(event_id: str, fallback: dt.datetime) -> dt.datetime:
    """The server time encoded in an id such as `1755376889458-0`, else `fallback`."""
    milliseconds = _id_milliseconds(event_id)
    return fallback if milliseconds is None else _EPOCH + dt.timedelta(milliseconds=milliseconds)


def _id_milliseconds(event_id: str) -> int | None:
    """The server time in milliseconds an id such as `1755376889458-0` encodes, else None."""
    prefix = event_id.partition("-")[0]
    # The length first: a `nextUrl` may name any `i`, and int() refuses more than 4,300 digits.
    if len(prefix) <= _MS_DIGITS and prefix.isascii() and prefix.isdigit():
        milliseconds = int(prefix)
        if _MS_MIN <= milliseconds <= _MS_MAX:
            return milliseconds
    return None


# How far an answer may move the read position beyond the time it waited before the move counts as a gap.
# The API's and our clocks never meet here (both ends of the move are server times), so the margin only has
# to cover the server holding an answer a little longer than asked and the moments between our requests.
GAP_MARGIN_SECONDS = 30.0
GAP_REASONS = ("continuation_jump", "empty_page_jump", "jump_after_events")


def find_gap(
    asked: Asked,
    last_event_id: str | None,
    next_event_id: str | None,
    *,
    broadcaster: str,
    received_at: dt.datetime,
) -> Gap | None:
    """The gap one answer leaves, if any: O(1), from three ids and a duration.

    The rule: an answer covers the feed up to the later of the position asked for and its last delivered
    event. Its next position may lie beyond that by at most the time the position waited for the answer
    (`asked.waited_seconds`) plus `GAP_MARGIN_SECONDS`; a move further than that passed over events nobody
    delivered, and is a gap from the covered point to the next position.

    Why ordinary idling never makes a row: whether the API moves `i` on an empty long-poll is undocumented.
    If it keeps `i`, an idle answer moves nothing. If it moves `i` towards its own "now", it can move it at
    most by the time the request waited (the server cannot place the position after the moment it answers),
    and `waited_seconds` counts from when our position was taken up, so retries, 429s, 5xx, back-pressure and
    a full spool only widen the allowance. Re-deliveries move the position backwards, a null `nextUrl`
    resumes at the last event: neither moves it forwards. What is left is a position minutes past the one
    asked for with no events to show for the stretch: the 400 "start over" continuation, a given-up position.
    A position whose event is older than the moment we took it up (after a restart, at the end of a backlog)
    is the one case the rule cannot settle: if the API then answers "nothing, continue at my now", the room
    may have been silent or the API may have given the stretch up. It is recorded: the record can only say
    where it may have holes, never prove there were none. (The simulator's `advance_idle` moves a position by
    the time since it was handed out, as an API would that keeps a position's clock from then.)
    Ids without a millisecond time (a first request has none) measure nothing and make no gap.
    """
    if asked.event_id is None or next_event_id is None:
        return None
    asked_ms = _id_milliseconds(asked.event_id)
    next_ms = _id_milliseconds(next_event_id)
    if asked_ms is None or next_ms is None:
        return None
    covered_id, covered_ms = asked.event_id, asked_ms
    last_ms = _id_milliseconds(last_event_id) if last_event_id is not None else None
    if last_event_id is not None and last_ms is not None and last_ms > asked_ms:
        covered_id, covered_ms = last_event_id, last_ms
    if next_ms - covered_ms <= (asked.waited_seconds + GAP_MARGIN_SECONDS) * 1000:
        return None
    if not _storable(covered_id, EVENT_ID_MAX) or not _storable(next_event_id, EVENT_ID_MAX):
        return None  # not a position the API could have given us; nothing a row could name
    if last_event_id is not None:
        reason = "jump_after_events"
    else:
        reason = "continuation_jump" if asked.continuation else "empty_page_jump"
    return Gap(
        broadcaster=broadcaster,
        after_event_id=covered_id,
        resumed_event_id=next_event_id,
        gap_from=_EPOCH + dt.timedelta(milliseconds=covered_ms),
        gap_to=_EPOCH + dt.timedelta(milliseconds=next_ms),
        reason=reason,
        detected_at=received_at,
    )


def _utc_naive(moment: dt.datetime) -> dt.datetime:
    if moment.tzinfo is None:
        return moment
    return moment.astimezone(dt.UTC).replace(tzinfo=None)


def _has_nul(value: Any) -> bool:
    """Recursive, but only ever asked about a value that was encoded, hence within `json_depth.MAX_DEPTH`."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(key) or _has_nul(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_has_nul(item) for item in value)
    return False


def _fast_text(value: Any) -> str | None:
    """orjson's text of `value`, None for what orjson refuses (an integer beyond 64 bits, a lone surrogate,
    nesting deeper than `json_depth.MAX_DEPTH`). Only for values without NaN or infinite floats, which orjson
    would write as null."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # orjson.JSONEncodeError
        return None


def _encode(raw: dict[str, Any], finite_numbers: bool) -> str:
    """`raw` as JSON text PostgreSQL's jsonb accepts, or `_Unmappable`: orjson's text when the caller
    vouches for finite numbers, else (or when orjson refuses) the standard library's, which judges the
    rest."""
    text = _fast_text(raw) if finite_numbers else None
    exact = text is None
    if text is None:
        # orjson refuses what nests deeper than the limit; only this slower path has to measure it.
        if json_depth.deeper_than(raw):
            raise _Unmappable(_TOO_DEEP)
        try:
            text = _ENCODER.encode(raw)
        except ValueError as error:  # NaN/Infinity, or an integer too long to print
            raise _Unmappable(f"contains a number that cannot be stored as JSON ({error})") from error
    # Every NUL prints as \u0000, so its absence from the text proves there is none; its presence may be a
    # literal backslash sequence, hence the exact walk.
    if "\\u0000" in text and _has_nul(raw):
        raise _Unmappable("contains a NUL character, which PostgreSQL text and jsonb cannot store")
    # orjson refuses lone surrogates; the standard library writes them out, and PostgreSQL cannot store them.
    if exact and not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise _Unmappable("contains an unpaired surrogate, which PostgreSQL cannot store") from error
    return text


def _quarantine(item: Any, room: str, reason: str) -> Quarantined:
    try:
        raw_text = json.dumps(_pruned(item, json_depth.MAX_DEPTH), ensure_ascii=True)
    except (ValueError, TypeError):  # an integer too long to print, a non-JSON type: no decoder makes either
        raw_text = json.dumps(f"<{type(item).__name__} that cannot be written as JSON>")
    event_id: str | None = None
    method: str | None = None
    if isinstance(item, dict):
        candidate = item.get("id")
        if _storable(candidate, EVENT_ID_MAX):
            event_id = candidate
        candidate = item.get("method")
        if _storable(candidate, METHOD_MAX):
            method = candidate
    fingerprint = event_id or hashlib.sha256(raw_text.encode("ascii")).hexdigest()
    return Quarantined(room, fingerprint, event_id, method, raw_text, reason)


def _pruned(value: Any, room: int) -> Any:
    """`value` with every container more than `room` levels deep replaced by a note saying so: a quarantined
    item's text must be writable whatever it holds. Recursion is bounded by `room`."""
    if isinstance(value, dict):
        return {key: _pruned(item, room - 1) for key, item in value.items()} if room > 0 else f"<{_TOO_DEEP}>"
    if isinstance(value, list):
        return [_pruned(item, room - 1) for item in value] if room > 0 else f"<{_TOO_DEEP}>"
    return value


def _storable(value: Any, limit: int) -> bool:
    """A non-empty string a VARCHAR(limit) column can hold."""
    if not isinstance(value, str) or not value or len(value) > limit or "\x00" in value:
        return False
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _Unmappable(f"{what} without a username")
    name = normalize_name(value)
    if not name:
        raise _Unmappable(f"{what} without a username")
    if len(name) > NAME_MAX:
        raise _Unmappable(f"{what} username longer than {NAME_MAX} characters")
    return name


def _user(payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The user's lowercased username and flags (the user object minus username)."""
    user = payload.get("user")
    if not isinstance(user, dict):
        raise _Unmappable("user without a username")
    name = _name(user.get("username"), "user")
    return name, {key: value for key, value in user.items() if key != "username"}


def _flags(payload: dict[str, Any]) -> dict[str, Any]:
    user = payload.get("user")
    if not isinstance(user, dict):
        return {}
    return {key: value for key, value in user.items() if key != "username"}


def _tip(payload: dict[str, Any], metadata: dict[str, Any]) -> tuple[str, str]:
    name, metadata["user"] = _user(payload)
    tip = payload.get("tip")
    if not isinstance(tip, dict):
        tip = {}
    tokens = tip.get("tokens")
    if isinstance(tokens, float) and tokens.is_integer():
        tokens = int(tokens)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise _Unmappable("tip without a positive integer number of tokens")
    is_anon = tip.get("isAnon")
    metadata["tokens"] = tokens
    metadata["isAnon"] = is_anon if isinstance(is_anon, bool) else False
    note = tip.get("message")
    if isinstance(note, str):
        # The API prefixes a note with "| "; an empty note stays "".
        note = note[2:] if note.startswith("| ") else note[3:] if note.startswith(" | ") else note
    else:
        note = ""
    return name, note if note.strip() else f"tipped {tokens} tokens"


EMPTY_MESSAGE = "sent an empty message"


def _text(payload: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The message object and its text; an empty text is a real message the API sends, so it is stored with
    content saying so. Only a message with no text field at all is malformed."""
    message = payload.get("message")
    if not isinstance(message, dict):
        message = {}
    text = message.get("message")
    if not isinstance(text, str):
        raise _Unmappable("message without text")
    return message, text if text.strip() else EMPTY_MESSAGE


def _private(payload: dict[str, Any], metadata: dict[str, Any], owner: str) -> tuple[str, str, str]:
    """(counterpart, type, text): the party who is not the owner of the feed (the configured room), whichever
    way the message went and in whichever room it was sent. A direct message (empty `broadcaster`) keeps
    that empty value in its metadata: it was sent in no room."""
    message, text = _text(payload)
    metadata["user"] = _flags(payload)
    sender, recipient = message.get("fromUser"), message.get("toUser")
    metadata["fromUser"] = sender if isinstance(sender, str) else None
    metadata["toUser"] = recipient if isinstance(recipient, str) else None
    party: Any = None
    for candidate in (sender, recipient):
        if isinstance(candidate, str) and normalize_name(candidate) not in ("", owner):
            party = candidate
            break
    if party is None:
        user = payload.get("user")
        party = user.get("username") if isinstance(user, dict) else None
    name = _name(party, "private message")
    empty_room = not isinstance(payload.get("broadcaster"), str) or not payload["broadcaster"].strip()
    if empty_room:
        # Not sent in a room; `room` still names the feed it came through (the guard's key, migration 015).
        metadata["broadcaster"] = ""
        metadata["room"] = owner
    return name, "DIRECT_MESSAGE" if empty_room else "PRIVATE_MESSAGE", text


def _media(payload: dict[str, Any], metadata: dict[str, Any]) -> tuple[str, str]:
    name, metadata["user"] = _user(payload)
    media = payload.get("media")
    media = media if isinstance(media, dict) else None
    metadata["media"] = media
    if media is None:
        return name, "purchased media"
    kind = media.get("type") if isinstance(media.get("type"), str) else "media"
    title = media.get("name")
    tokens = media.get("tokens")
    text = f"purchased {kind}" + (f" '{title}'" if isinstance(title, str) and title else "")
    if isinstance(tokens, int | float) and not isinstance(tokens, bool):
        text += f" for {tokens} tokens"
    return name, text


def _map(
    method: str, payload: dict[str, Any], metadata: dict[str, Any], broadcaster: str, owner: str
) -> tuple[str, str, str]:
    """(username, type, content) of a known method's event; `metadata` gains the method's fields.
    `broadcaster` is the event's room, `owner` the configured one whose feed this is."""
    simple = _USER_METHODS.get(method)
    if simple is not None:
        name, metadata["user"] = _user(payload)
        return name, simple[0], simple[1]
    if method == "chatMessage":
        name, metadata["user"] = _user(payload)
        return name, "CHAT_MESSAGE", _text(payload)[1]
    if method == "tip":
        name, content = _tip(payload, metadata)
        return name, "TIP_EVENT", content
    if method == "privateMessage":
        return _private(payload, metadata, owner or broadcaster)
    if method == "mediaPurchase":
        name, content = _media(payload, metadata)
        return name, "MEDIA_PURCHASE", content
    metadata["user"] = _flags(payload)
    if not broadcaster:  # neither the event nor the configuration names the room's owner
        raise _Unmappable(f"{method} without a broadcaster")
    if method == "roomSubjectChange":
        subject = payload.get("subject")
        if not isinstance(subject, str):
            raise _Unmappable("subject change without a subject")
        return broadcaster, "ROOM_SUBJECT_CHANGE", subject if subject.strip() else "cleared the room subject"
    kind, content, _change = _BROADCAST_METHODS[method]
    return broadcaster, kind, content


def _envelope(item: Any) -> tuple[str, str, dict[str, Any]]:
    if not isinstance(item, dict):
        raise _Unmappable("not a JSON object")
    event_id, method, payload = item.get("id"), item.get("method"), item.get("object")
    if not isinstance(event_id, str) or not event_id:
        raise _Unmappable("envelope without a string id")
    if not isinstance(method, str) or not method:
        raise _Unmappable("envelope without a string method")
    if not isinstance(payload, dict):
        raise _Unmappable("envelope without an object")
    return event_id, method, payload


def _room(payload: dict[str, Any], configured: str) -> str:
    value = payload.get("broadcaster")
    name = (normalize_name(value) if isinstance(value, str) else "") or configured
    if len(name) > NAME_MAX:
        raise _Unmappable(f"broadcaster longer than {NAME_MAX} characters")
    # The configured fallback is not part of the raw event, so the raw text's NUL/surrogate check missed it.
    if name and not _storable(name, NAME_MAX):
        raise _Unmappable("broadcaster name PostgreSQL cannot store")
    return name


@dataclass
class _Collector:
    events: list[StoredEvent]
    interactions: list[InteractionRow]
    session_changes: list[SessionChange]
    quarantined: list[Quarantined]
    finite_numbers: bool
    unknown: int = 0


def _one(item: Any, configured: str, received: dt.datetime, out: _Collector) -> None:
    event_id, method, payload = _envelope(item)
    raw_json = _encode(item, out.finite_numbers)
    if len(event_id) > EVENT_ID_MAX:
        raise _Unmappable(f"id longer than {EVENT_ID_MAX} characters")
    if len(method) > METHOD_MAX:
        raise _Unmappable(f"method longer than {METHOD_MAX} characters")
    broadcaster = _room(payload, configured)
    at = event_time(event_id, received)
    if method not in KNOWN_METHODS:
        out.events.append(StoredEvent(event_id, method, broadcaster, at, item, raw_json))
        out.unknown += 1
        return
    metadata: dict[str, Any] = {"event_id": event_id, "broadcaster": broadcaster, "method": method}
    username, kind, content = _map(method, payload, metadata, broadcaster, configured)
    role = "MODEL" if username == broadcaster else "VIEWER"
    out.events.append(StoredEvent(event_id, method, broadcaster, at, item, raw_json))
    # Built from values `raw_json` already proved storable: no checks, only the encoding.
    metadata_json = (_fast_text(metadata) if out.finite_numbers else None) or _ENCODER.encode(metadata)
    out.interactions.append(
        InteractionRow(event_id, broadcaster, username, role, kind, content, at, metadata, metadata_json)
    )
    change = _BROADCAST_METHODS.get(method)
    if change is not None:
        out.session_changes.append(SessionChange(event_id, change[2], broadcaster, at))


def parse_page(
    events: list[Any],
    *,
    broadcaster: str,
    received_at: dt.datetime,
    next_event_id: str | None,
    finite_numbers: bool = False,
    asked: Asked | None = None,
) -> Batch:
    """Sort one response's items into stored events (with their rows) and quarantined items; never raises
    for any content of `events`. `broadcaster` is the configured room, used when an event names none.
    `finite_numbers`: the caller vouches that no float in `events` is NaN or infinite (orjson decoded them),
    which lets the faster encoder write them. A `next_event_id` the cursor column cannot hold (too long, a
    NUL, a lone surrogate: the API's text either way) becomes None, which keeps the committed cursor.
    With `asked` (how the page was asked for) the batch carries the gap the answer leaves (`find_gap`)."""
    configured = normalize_name(broadcaster)
    received = _utc_naive(received_at)
    out = _Collector([], [], [], [], finite_numbers)
    feed = configured if _storable(configured, NAME_MAX) else ""  # what a quarantine row can name
    for item in events:
        try:
            _one(item, configured, received, out)
        except _Unmappable as error:
            out.quarantined.append(_quarantine(item, feed, str(error)))
    next_id = next_event_id if _storable(next_event_id, EVENT_ID_MAX) else None
    gap = None
    if asked is not None:
        last_id = _last_id(events)
        gap = find_gap(asked, last_id, next_id, broadcaster=configured, received_at=received)
    return Batch(
        events=out.events,
        interactions=out.interactions,
        session_changes=out.session_changes,
        quarantined=out.quarantined,
        unknown_methods=out.unknown,
        next_event_id=next_id,
        received_at=received,
        gaps=(gap,) if gap is not None else (),
    )


def _last_id(events: list[Any]) -> str | None:
    """The id of the last item that has one: the end of what the page delivered (one step, nearly always)."""
    for item in reversed(events):
        event_id = item.get("id") if isinstance(item, dict) else None
        if isinstance(event_id, str) and event_id:
            return event_id
    return None


def merge(batches: list[Batch]) -> Batch:
    """Consecutive responses' batches as one, in order, for a single transaction while a backlog drains.

    Storing the merged batch stores what storing each in turn would: the first occurrence of a repeated id
    wins (as within one page), sessions are walked in event order, every event keeps its own receipt time,
    and the cursor ends after the last response that names a position (a null `nextUrl` keeps the previous).
    """
    if len(batches) == 1:
        return batches[0]
    return Batch(
        events=[event for batch in batches for event in batch.events],
        interactions=[row for batch in batches for row in batch.interactions],
        session_changes=[change for batch in batches for change in batch.session_changes],
        quarantined=[item for batch in batches for item in batch.quarantined],
        unknown_methods=sum(batch.unknown_methods for batch in batches),
        next_event_id=next(
            (batch.next_event_id for batch in reversed(batches) if batch.next_event_id is not None), None
        ),
        received_at=batches[-1].received_at,
        events_received_at=[moment for batch in batches for moment in batch.receipt_times()],
        gaps=tuple(gap for batch in batches for gap in batch.gaps),
    )


def refused(event: StoredEvent, reason: str) -> Quarantined:
    """`event` as a quarantine item: PostgreSQL refused to store it (see `split`)."""
    return _quarantine(event.raw, event.broadcaster, reason)


def split(batch: Batch) -> tuple[Batch, Batch]:
    """`batch` as two smaller batches that store, in turn, what it stores: its events halved in order (each
    with its own rows), its quarantine items with the first half, the read position with the second. A batch
    of one event splits into that event and its quarantine items. The writer halves a batch PostgreSQL
    refuses until the refused events stand alone. Gaps go with the read position, into the second."""
    events, quarantined = batch.events, batch.quarantined
    first: tuple[list[StoredEvent], list[Quarantined]]
    second: tuple[list[StoredEvent], list[Quarantined]]
    if len(events) >= 2:
        half = len(events) // 2
        first, second = (events[:half], quarantined), (events[half:], [])
    elif events and quarantined:
        first, second = ([], quarantined), (events, [])
    elif len(quarantined) >= 2:
        half = len(quarantined) // 2
        first, second = ([], quarantined[:half]), ([], quarantined[half:])
    else:
        raise ValueError("a batch of one item cannot be split")
    return _part(batch, *first, None, ()), _part(batch, *second, batch.next_event_id, batch.gaps)


def _part(
    batch: Batch,
    events: list[StoredEvent],
    quarantined: list[Quarantined],
    next_event_id: str | None,
    gaps: tuple[Gap, ...],
) -> Batch:
    ids = {(event.broadcaster, event.event_id) for event in events}
    times = batch.receipt_times()
    positions = {id(event): index for index, event in enumerate(batch.events)}
    return Batch(
        events=events,
        interactions=[row for row in batch.interactions if (row.broadcaster, row.event_id) in ids],
        session_changes=[
            change for change in batch.session_changes if (change.broadcaster, change.event_id) in ids
        ],
        quarantined=quarantined,
        unknown_methods=sum(1 for event in events if event.method not in KNOWN_METHODS),
        next_event_id=next_event_id,
        received_at=batch.received_at,
        events_received_at=[times[positions[id(event)]] for event in events],
        gaps=gaps,
    )
