"""Builders of Events API items for the ingest and writer tests (shapes from the reference's section 1.7)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from daemon import ingest

ROOM = "alice_cam"
BASE_MS = 1_755_376_889_458
RECEIVED = dt.datetime(2025, 8, 16, 21, 0, 0, tzinfo=dt.UTC)


def event_id(offset_ms: int, sequence: int = 0) -> str:
    return f"{BASE_MS + offset_ms}-{sequence}"


def at(offset_ms: int) -> dt.datetime:
    """The naive UTC time an id built by `event_id(offset_ms)` encodes."""
    return dt.datetime(1970, 1, 1) + dt.timedelta(milliseconds=BASE_MS + offset_ms)


def user(username: str, **flags: Any) -> dict[str, Any]:
    return {"username": username, "inFanclub": False, "isMod": False, "recentTips": "some", **flags}


def envelope(method: str, offset_ms: int, payload: dict[str, Any], sequence: int = 0) -> dict[str, Any]:
    return {"method": method, "id": event_id(offset_ms, sequence), "object": {"broadcaster": ROOM, **payload}}


def chat(offset_ms: int, username: str, text: str = "hello!", sequence: int = 0) -> dict[str, Any]:
    message = {"color": "", "bgColor": None, "font": "default", "message": text, "orig": None}
    return envelope("chatMessage", offset_ms, {"message": message, "user": user(username)}, sequence)


def tip(
    offset_ms: int, username: str, tokens: Any = 25, note: str = "| thanks", anon: bool = False
) -> dict[str, Any]:
    payload = {"tip": {"tokens": tokens, "isAnon": anon, "message": note}, "user": user(username)}
    return envelope("tip", offset_ms, payload)


def plain(method: str, offset_ms: int, username: str) -> dict[str, Any]:
    """follow, unfollow, userEnter, userLeave, fanclubJoin, broadcastStart/Stop: broadcaster and user only."""
    return envelope(method, offset_ms, {"user": user(username)})


def start(offset_ms: int) -> dict[str, Any]:
    return plain("broadcastStart", offset_ms, ROOM)


def stop(offset_ms: int) -> dict[str, Any]:
    return plain("broadcastStop", offset_ms, ROOM)


def page(items: list[Any], next_event_id: str | None = "auto", room: str = ROOM) -> ingest.Batch:
    """A parsed page; by default the cursor moves to the last item's id, as the API's nextUrl does."""
    if next_event_id == "auto":
        ids = [item.get("id") for item in items if isinstance(item, dict) and isinstance(item.get("id"), str)]
        next_event_id = ids[-1] if ids else None
    return ingest.parse_page(items, broadcaster=room, received_at=RECEIVED, next_event_id=next_event_id)


def nested(depth: int) -> Any:
    """A JSON value `depth` containers deep: arrays and objects in turn, a string at the bottom."""
    value: Any = "bottom"
    for level in range(depth):
        value = {"down": value} if level % 2 else [value]
    return value


def deep_chat(offset_ms: int, username: str, depth: int) -> dict[str, Any]:
    """A valid chat message whose envelope nests `depth` containers deep (an extra field holds the rest)."""
    item = chat(offset_ms, username)
    item["object"]["extra"] = nested(depth - 2)  # the envelope and its object are the first two levels
    return item
