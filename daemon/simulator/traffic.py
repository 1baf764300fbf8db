"""Seeded, realistic Events API traffic: envelopes shaped like the real testbed payloads.

Every envelope is `{"method": ..., "id": "<13-digit ms>-<seq>", "object": {...}}`, ids strictly increasing.
User objects carry the 17 fields the testbed sends; tip notes carry the API's `"| "` prefix; anonymous tips
still name the tipper; roomSubjectChange has no user. Malformed envelopes (the kinds the ingest side must
quarantine) are made only on request, and `Traffic.malformed` says which positions hold them.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

METHODS = (
    "broadcastStart",
    "broadcastStop",
    "chatMessage",
    "privateMessage",
    "tip",
    "follow",
    "unfollow",
    "userEnter",
    "userLeave",
    "fanclubJoin",
    "mediaPurchase",
    "roomSubjectChange",
)

# Relative frequency within a show; start/stop are placed by the show structure, not drawn.
_MIX: dict[str, float] = {
    "chatMessage": 40.0,
    "userEnter": 18.0,
    "userLeave": 15.0,
    "tip": 8.0,
    "privateMessage": 5.0,
    "follow": 3.0,
    "unfollow": 1.0,
    "roomSubjectChange": 0.6,
    "fanclubJoin": 0.5,
    "mediaPurchase": 0.3,
}

MALFORMED_KINDS = (
    "tip_without_tokens",
    "message_without_text",
    "user_without_username",
    "nul_in_text",
    "missing_id",
    "missing_method",
    "missing_object",
)

DEFAULT_BROADCASTER = "alice_cam"
DEFAULT_START_MS = 1_755_376_800_000  # 2025-08-16, the testbed recordings' era

VIEWER_NAMES = (
    "smk_lover",
    "bob42",
    "carol_x",
    "dave_77",
    "erin_q",
    "frank_z",
    "mountaingod2",
    "night_owl",
    "tokenking",
    "lurker_99",
    "sunny_day",
    "quiet_guy",
    "mr_green",
    "blue_jay",
    "roxy_fan",
    "pixel_pete",
    "jazzhands",
    "coffee_bean",
    "vinyl_vic",
    "hiker_hal",
    "moonwalker",
    "sam_i_am",
    "tex_ranger",
    "lucky_7",
    "gamer_gus",
    "berlin_ben",
    "paris_pau",
    "tokyo_taro",
    "madrid_mar",
    "oslo_ola",
    "kiwi_kate",
    "maple_max",
    "desert_rose",
    "snow_fox",
    "red_panda",
    "old_timer",
    "newbie_ned",
    "chef_cara",
    "poet_pia",
    "drummer_d",
)

_CHAT_LINES = (
    "hi",
    "hello!",
    "hey everyone",
    "how are you today?",
    "love the music",
    "lol",
    "good evening from Berlin",
    "what song is this?",
    "you look great",
    "brb",
    "back",
    "¡hola! 😊",
    "nice setup",
    "first time here",
    "happy friday",
    "haha that was funny",
    "goal is close!",
    "こんにちは",
    "thanks for the show",
    "gn all",
)
_TIP_NOTES = ("hi", "great show", "for the goal", "song request", "you rock", "❤️", "keep going", "pm me")
_SUBJECTS = (
    "Welcome! #goal 500 tokens",
    "Chill night, chat & music #relax",
    "Goal reached, thank you all! Next goal 1000",
    "Q&A night - ask me anything",
    "Back after a short break",
)
_MEDIA = (("photoset1", "photos", 25), ("beach_day", "photos", 50), ("behind_scenes", "video", 100))
_LANGUAGES = ("en", "en", "en", "de", "es", "fr", "it", "pt", "ru", "ja", "pl")
_TIP_LEVELS = ("none", "none", "none", "few", "some", "some", "lots", "tons")
_COLOR_BY_TIPS = {"none": "g", "few": "t", "some": "tr", "lots": "p", "tons": "l"}

_ID_PATTERN = re.compile(r"^(\d{13})-(\d+)$")


def event_key(event_id: object) -> tuple[int, int] | None:
    """`(ms, seq)` of a well-formed event id, else None. Ids compare by this key, not as strings."""
    if not isinstance(event_id, str):
        return None
    match = _ID_PATTERN.match(event_id)
    return (int(match.group(1)), int(match.group(2))) if match else None


@dataclass
class _Viewer:
    username: str
    gender: str
    subgender: str
    language: str
    recent_tips: str
    in_fanclub: bool
    is_mod: bool
    is_follower: bool
    dark_mode: bool

    def user_object(self) -> dict[str, Any]:
        if self.is_mod:
            color = "m"
        elif self.in_fanclub:
            color = "f"
        else:
            color = _COLOR_BY_TIPS[self.recent_tips]
        return {
            "colorGroup": color,
            "fcAutoRenew": self.in_fanclub,
            "gender": self.gender,
            "hasDarkmode": self.dark_mode,
            "hasTokens": self.recent_tips != "none" or self.in_fanclub,
            "inFanclub": self.in_fanclub,
            "inPrivateShow": False,
            "isBroadcasting": False,
            "isFollower": self.is_follower,
            "isMod": self.is_mod,
            "isOwner": False,
            "isSilenced": False,
            "isSpying": False,
            "language": self.language,
            "recentTips": self.recent_tips,
            "subgender": self.subgender,
            "username": self.username,
        }


def broadcaster_user(broadcaster: str) -> dict[str, Any]:
    """The owner's own user object (as in broadcastStart/Stop and PMs the broadcaster sends)."""
    return {
        "colorGroup": "o",
        "fcAutoRenew": False,
        "gender": "f",
        "hasDarkmode": False,
        "hasTokens": True,
        "inFanclub": False,
        "inPrivateShow": False,
        "isBroadcasting": True,
        "isFollower": False,
        "isMod": False,
        "isOwner": True,
        "isSilenced": False,
        "isSpying": False,
        "language": "en",
        "recentTips": "none",
        "subgender": "",
        "username": broadcaster,
    }


def _make_viewer(rng: random.Random, name: str) -> _Viewer:
    gender = rng.choices("mftc", weights=(70, 15, 7, 8))[0]
    subgender = rng.choice(("tf", "tm", "tn")) if gender == "t" else ""
    return _Viewer(
        username=name,
        gender=gender,
        subgender=subgender,
        language=rng.choice(_LANGUAGES),
        recent_tips=rng.choice(_TIP_LEVELS),
        in_fanclub=rng.random() < 0.1,
        is_mod=rng.random() < 0.04,
        is_follower=rng.random() < 0.4,
        dark_mode=rng.random() < 0.5,
    )


def _message(text: str, **extra: str) -> dict[str, Any]:
    return {"bgColor": None, "color": "", "font": "default", **extra, "message": text, "orig": None}


@dataclass
class _Room:
    """The state a realistic stream needs: who is in the room, who follows, the id clock."""

    rng: random.Random
    broadcaster: str
    now_ms: int
    viewers: list[_Viewer]
    present: list[_Viewer] = field(default_factory=list)
    last_key: tuple[int, int] | None = None

    def next_id(self, gap_ms: int | None = None) -> str:
        if self.last_key is None:
            gap_ms = 0  # the first event happens at start_ms exactly
        elif gap_ms is None:
            # Bursts share a millisecond now and then, which exercises the sequence part of the id.
            gap_ms = 0 if self.rng.random() < 0.05 else max(1, int(self.rng.expovariate(1 / 700)))
        self.now_ms += gap_ms
        if self.last_key is not None and self.last_key[0] == self.now_ms:
            key = (self.now_ms, self.last_key[1] + 1)
        else:
            key = (self.now_ms, 0)
        self.last_key = key
        return f"{key[0]}-{key[1]}"

    def envelope(self, method: str, obj: dict[str, Any], gap_ms: int | None = None) -> dict[str, Any]:
        return {
            "method": method,
            "object": {"broadcaster": self.broadcaster, **obj},
            "id": self.next_id(gap_ms),
        }

    def someone_present(self) -> _Viewer:
        if not self.present:
            self.present.append(self.rng.choice(self.viewers))
        return self.rng.choice(self.present)

    def event(self, method: str) -> dict[str, Any]:
        """One envelope of `method`, updating the room (presence, follows, fan club)."""
        rng = self.rng
        if method in ("broadcastStart", "broadcastStop"):
            return self.envelope(method, {"user": broadcaster_user(self.broadcaster)})
        if method == "roomSubjectChange":
            return self.envelope(method, {"subject": rng.choice(_SUBJECTS)})
        if method == "userEnter":
            absent = [viewer for viewer in self.viewers if viewer not in self.present]
            viewer = rng.choice(absent or self.viewers)
            if viewer not in self.present:
                self.present.append(viewer)
            return self.envelope(method, {"user": viewer.user_object()})
        viewer = self.someone_present()
        if method == "userLeave":
            self.present.remove(viewer)
        elif method in ("follow", "unfollow"):
            viewer.is_follower = method == "follow"  # the flag shows the state after the event
        elif method == "fanclubJoin":
            viewer.in_fanclub = True
            viewer.is_follower = True
        return self.envelope(method, self._payload(method, viewer))

    def _payload(self, method: str, viewer: _Viewer) -> dict[str, Any]:
        rng = self.rng
        user = viewer.user_object()
        if method == "chatMessage":
            return {"message": _message(rng.choice(_CHAT_LINES)), "user": user}
        if method == "privateMessage":
            text = rng.choice(_CHAT_LINES)
            if rng.random() < 0.3:
                # The broadcaster answers: the sender (and the user object) is the owner.
                message = _message(text, fromUser=self.broadcaster, toUser=viewer.username)
                return {"message": message, "user": broadcaster_user(self.broadcaster)}
            message = _message(text, fromUser=viewer.username, toUser=self.broadcaster)
            return {"message": message, "user": user}
        if method == "tip":
            tokens = rng.choice((1, 5, 10, 20, 25, 25, 50, 100, 111, 200, 500))
            note = "| " + rng.choice(_TIP_NOTES) if rng.random() < 0.6 else ""
            return {"tip": {"isAnon": rng.random() < 0.1, "message": note, "tokens": tokens}, "user": user}
        if method == "mediaPurchase":
            index = rng.randrange(len(_MEDIA))
            name, kind, tokens = _MEDIA[index]
            # The docs say a number; a client project models it as a string. Send both now and then.
            media_id: int | str = index + 1 if rng.random() < 0.8 else str(index + 1)
            return {"media": {"id": media_id, "name": name, "tokens": tokens, "type": kind}, "user": user}
        return {"user": user}  # follow, unfollow, userLeave, fanclubJoin


@dataclass
class Traffic:
    """Generated envelopes plus which positions hold a malformed one (position → kind)."""

    events: list[dict[str, Any]]
    malformed: dict[int, str] = field(default_factory=dict)

    def well_formed(self) -> list[dict[str, Any]]:
        return [event for index, event in enumerate(self.events) if index not in self.malformed]


def _show_plan(count: int, shows: int) -> list[int]:
    """How many events each show gets (the first shows take the remainder)."""
    shows = max(1, min(shows, count // 2 or 1))
    base, extra = divmod(count, shows)
    return [base + (1 if index < extra else 0) for index in range(shows)]


def build(
    count: int,
    *,
    seed: int,
    broadcaster: str = DEFAULT_BROADCASTER,
    start_ms: int = DEFAULT_START_MS,
    shows: int = 1,
    end_live: bool = False,
    every_method: bool = True,
    malformed_rate: float = 0.0,
    malformed_kinds: tuple[str, ...] = MALFORMED_KINDS,
) -> Traffic:
    """`count` envelopes in `shows` shows, each opened by broadcastStart and closed by broadcastStop.

    `end_live` leaves the last show open (no stop), as when a daemon starts mid-show. `every_method` puts one
    of each method right after the first start so even short runs cover all 12. With `malformed_rate`, that
    share of the non-session events is replaced by malformed ones (never the first event: a cursor exists).
    """
    rng = random.Random(seed)
    room = _Room(rng, broadcaster, start_ms, [_make_viewer(rng, name) for name in VIEWER_NAMES])
    methods, weights = list(_MIX), list(_MIX.values())
    traffic = Traffic(events=[])
    plan = _show_plan(count, shows)
    for show_index, size in enumerate(plan):
        if show_index:
            room.now_ms += rng.randint(2, 6) * 3_600_000  # offline for a few hours between shows
        last_show = show_index == len(plan) - 1
        with_stop = size >= 2 and not (end_live and last_show)
        body = size - 1 - (1 if with_stop else 0)
        forced = list(_MIX) if every_method and show_index == 0 and body >= len(_MIX) else []
        rng.shuffle(forced)
        traffic.events.append(room.event("broadcastStart"))
        for position in range(body):
            method = forced[position] if position < len(forced) else rng.choices(methods, weights)[0]
            event = room.event(method)
            if malformed_rate and rng.random() < malformed_rate:
                kind = rng.choice(malformed_kinds)
                traffic.malformed[len(traffic.events)] = kind
                event = spoil(event, kind, room.broadcaster)
            traffic.events.append(event)
        if with_stop:
            traffic.events.append(room.event("broadcastStop"))
    return traffic


def generate(
    count: int,
    *,
    seed: int,
    broadcaster: str = DEFAULT_BROADCASTER,
    start_ms: int = DEFAULT_START_MS,
    shows: int = 1,
    end_live: bool = False,
) -> list[dict[str, Any]]:
    """`count` well-formed envelopes (see `build`)."""
    return build(
        count, seed=seed, broadcaster=broadcaster, start_ms=start_ms, shows=shows, end_live=end_live
    ).events


def spoil(event: dict[str, Any], kind: str, broadcaster: str) -> dict[str, Any]:
    """A malformed copy of `event` of the given kind (its id is kept unless the kind removes it).

    Kinds about the payload turn the event into one of the method they need (a tip, a chat message).
    """
    spoiled: dict[str, Any] = {key: value for key, value in event.items()}
    obj: dict[str, Any] = dict(spoiled.get("object") or {})
    user = obj.get("user") or broadcaster_user(broadcaster)
    if kind == "tip_without_tokens":
        spoiled["method"] = "tip"
        obj = {"broadcaster": broadcaster, "tip": {"isAnon": False, "message": "| no tokens"}, "user": user}
    elif kind in ("message_without_text", "nul_in_text"):
        spoiled["method"] = "chatMessage"
        message = _message("null\x00byte") if kind == "nul_in_text" else _message("")
        if kind == "message_without_text":
            del message["message"]
        obj = {"broadcaster": broadcaster, "message": message, "user": user}
    elif kind == "user_without_username":
        spoiled["method"] = "userEnter"
        obj = {"broadcaster": broadcaster, "user": {k: v for k, v in user.items() if k != "username"}}
    elif kind == "missing_id":
        del spoiled["id"]
    elif kind == "missing_method":
        del spoiled["method"]
    elif kind == "missing_object":
        del spoiled["object"]
        return spoiled
    else:
        raise ValueError(f"unknown malformed kind {kind!r}")
    spoiled["object"] = obj
    return spoiled


def malformed_event(kind: str, *, event_id: str, broadcaster: str = DEFAULT_BROADCASTER) -> dict[str, Any]:
    """A stand-alone malformed envelope of `kind` with id `event_id` (dropped when the kind has no id)."""
    room = _Room(random.Random(0), broadcaster, 0, [_make_viewer(random.Random(0), "bob42")])
    event = room.event("chatMessage")
    event["id"] = event_id
    return spoil(event, kind, broadcaster)
