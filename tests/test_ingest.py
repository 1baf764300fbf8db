"""ingest.parse_page: lenient parsing, mapping, quarantine. Pure unit tests (no I/O but fixture reads)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon import db, ingest, json_depth
from tests import event_samples as sample
from tests.conftest import shared_path


def _fixture(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(shared_path("fixtures", name).read_text(encoding="utf-8"))
    return loaded


def test_recorded_testbed_response_maps_to_the_rows_a_reader_expects() -> None:
    body = _fixture("testbed-response-cb-events.json")
    batch = ingest.parse_page(
        body["events"], broadcaster="MrsLaw", received_at=sample.RECEIVED, next_event_id="1755377041589-0"
    )
    assert (len(batch.events), len(batch.quarantined), batch.unknown_methods) == (8, 0, 0)
    assert [event.broadcaster for event in batch.events] == ["mrslaw"] * 8
    rows = [(row.username, row.role, row.type, row.content) for row in batch.interactions]
    assert rows == [
        ("mountaingod2", "VIEWER", "CHAT_MESSAGE", "hi"),
        ("mountaingod2", "VIEWER", "PRIVATE_MESSAGE", "hi"),
        ("mountaingod2", "VIEWER", "TIP_EVENT", "hi"),
        ("mountaingod2", "VIEWER", "TIP_EVENT", "tipped 25 tokens"),
        ("mountaingod2", "VIEWER", "TIP_EVENT", "hi"),
        ("mountaingod2", "VIEWER", "UNFOLLOW", "unfollowed"),
        ("mountaingod2", "VIEWER", "FOLLOW", "followed"),
        ("mrslaw", "MODEL", "ROOM_SUBJECT_CHANGE", "Welcome"),
    ]
    tips = [row.metadata for row in batch.interactions if row.type == "TIP_EVENT"]
    assert [(m["tokens"], m["isAnon"]) for m in tips] == [(25, False), (25, True), (25, True)]
    first = batch.interactions[0]
    assert first.timestamp == dt.datetime(2025, 8, 16, 20, 41, 29, 458000)
    assert batch.events[-1].event_time == dt.datetime(2025, 8, 16, 20, 44, 1, 589000)
    assert first.metadata["event_id"] == "1755376889458-0"
    assert first.metadata["broadcaster"] == "mrslaw"
    assert first.metadata["method"] == "chatMessage"
    assert first.metadata["user"]["recentTips"] == "some" and "username" not in first.metadata["user"]
    assert batch.interactions[1].metadata["fromUser"] == "mountaingod2"
    assert batch.events[0].raw is body["events"][0], "the raw event is kept whole"
    assert json.loads(batch.events[0].raw_json) == body["events"][0]
    assert batch.session_changes == []
    assert batch.next_event_id == "1755377041589-0"


def test_recorded_response_with_null_next_url() -> None:
    body = _fixture("testbed-response-nexturl-null.json")
    assert body["nextUrl"] is None
    received = dt.datetime(2024, 2, 27, 0, 41, 25, tzinfo=dt.UTC)
    batch = ingest.parse_page(
        body["events"], broadcaster="test_broadcaster", received_at=received, next_event_id=None
    )
    (row,) = batch.interactions
    assert (row.username, row.type, row.content) == ("test_user", "CHAT_MESSAGE", "hi")
    assert row.timestamp == dt.datetime(2024, 2, 27, 0, 41, 24, 737000)
    assert batch.next_event_id is None
    assert batch.received_at == dt.datetime(2024, 2, 27, 0, 41, 25), "stored as naive UTC"


def test_private_message_is_attributed_to_the_other_party_whichever_way_it_went() -> None:
    def private(
        offset: int, sender: str, recipient: str, user: str, room: str = sample.ROOM
    ) -> dict[str, Any]:
        message = {"message": "psst", "fromUser": sender, "toUser": recipient}
        item = sample.envelope("privateMessage", offset, {"message": message, "user": sample.user(user)})
        item["object"]["broadcaster"] = room
        return item

    batch = sample.page(
        [
            private(1, "Bob42", sample.ROOM, "Bob42"),
            private(2, sample.ROOM, "carol_x", sample.ROOM),
            private(3, "dave", "Alice_Cam", "dave", room=""),
        ]
    )
    rows = [(row.username, row.role, row.type) for row in batch.interactions]
    assert rows == [
        ("bob42", "VIEWER", "PRIVATE_MESSAGE"),
        ("carol_x", "VIEWER", "PRIVATE_MESSAGE"),
        ("dave", "VIEWER", "DIRECT_MESSAGE"),
    ]
    assert batch.events[2].broadcaster == sample.ROOM, (
        "an empty broadcaster falls back to the configured room"
    )


def test_private_messages_in_another_room_and_direct_messages_keep_their_facts() -> None:
    """Issue 10: the person is whichever party is not the owner of the feed (the configured room), even in
    another broadcaster's room; a direct message keeps its empty broadcaster in the metadata."""

    def private(offset: int, sender: str, recipient: str, room: str) -> dict[str, Any]:
        message = {"message": "psst", "fromUser": sender, "toUser": recipient}
        item = sample.envelope("privateMessage", offset, {"message": message, "user": sample.user(sender)})
        item["object"]["broadcaster"] = room
        return item

    batch = sample.page(
        [
            private(1, sample.ROOM, "other_cam", room="other_cam"),  # the owner writes in other_cam's room
            private(2, "other_cam", sample.ROOM, room="other_cam"),  # and other_cam answers
            private(3, "dave", sample.ROOM, room=""),
        ]
    )
    rows = [(row.username, row.role, row.type, row.metadata["broadcaster"]) for row in batch.interactions]
    assert rows == [
        ("other_cam", "MODEL", "PRIVATE_MESSAGE", "other_cam"),
        ("other_cam", "MODEL", "PRIVATE_MESSAGE", "other_cam"),
        ("dave", "VIEWER", "DIRECT_MESSAGE", ""),
    ]


@pytest.mark.parametrize("text", ["", "   "])
def test_an_empty_chat_message_is_stored_saying_it_was_empty(text: str) -> None:
    batch = sample.page([sample.chat(1, "Bob42", text=text)])
    assert batch.quarantined == []
    (row,) = batch.interactions
    assert (row.username, row.type, row.content) == ("bob42", "CHAT_MESSAGE", ingest.EMPTY_MESSAGE)


def test_tip_note_prefix_removed_and_anonymous_tipper_kept() -> None:
    batch = sample.page(
        [
            sample.tip(1, "Bob42", note="| great show"),
            sample.tip(2, "carol", tokens=100, note="", anon=True),
            sample.tip(3, "dave", tokens=7.0, note="no prefix"),
        ]
    )
    rows = [
        (row.username, row.content, row.metadata["tokens"], row.metadata["isAnon"])
        for row in batch.interactions
    ]
    assert rows == [
        ("bob42", "great show", 25, False),
        ("carol", "tipped 100 tokens", 100, True),
        ("dave", "no prefix", 7, False),
    ]


def test_every_user_field_but_username_is_optional_and_unknown_fields_are_kept() -> None:
    bare = sample.envelope("userEnter", 1, {"user": {"username": "Eve", "brandNewFlag": [1, 2]}})
    odd = sample.envelope("follow", 2, {"user": {"username": "frank", "recentTips": "a great many"}})
    odd["object"]["novelty"] = {"x": 1}
    batch = sample.page([bare, odd])
    assert [(row.username, row.type, row.content) for row in batch.interactions] == [
        ("eve", "USER_ENTER", "entered the room"),
        ("frank", "FOLLOW", "followed"),
    ]
    assert batch.interactions[0].metadata["user"] == {"brandNewFlag": [1, 2]}
    assert batch.events[1].raw["object"]["novelty"] == {"x": 1}


@pytest.mark.parametrize("media_id", [1, "abc-123"])
def test_media_purchase_accepts_a_numeric_or_string_id(media_id: object) -> None:
    media = {"id": media_id, "name": "photoset1", "type": "photos", "tokens": 25}
    batch = sample.page([sample.envelope("mediaPurchase", 1, {"media": media, "user": sample.user("gina")})])
    (row,) = batch.interactions
    assert (row.type, row.content) == ("MEDIA_PURCHASE", "purchased photos 'photoset1' for 25 tokens")
    assert row.metadata["media"] == media


def test_simple_methods_and_broadcast_edges() -> None:
    methods = ["follow", "unfollow", "userEnter", "userLeave", "fanclubJoin"]
    items = (
        [sample.start(0)] + [sample.plain(m, i + 1, "Hank") for i, m in enumerate(methods)] + [sample.stop(9)]
    )
    batch = sample.page(items)
    assert [row.type for row in batch.interactions] == [
        "BROADCAST_START",
        "FOLLOW",
        "UNFOLLOW",
        "USER_ENTER",
        "USER_LEAVE",
        "FANCLUB_JOIN",
        "BROADCAST_STOP",
    ]
    assert all(row.content for row in batch.interactions)
    assert (batch.interactions[0].username, batch.interactions[0].role) == (sample.ROOM, "MODEL")
    assert [(c.kind, c.broadcaster, c.at) for c in batch.session_changes] == [
        ("start", sample.ROOM, sample.at(0)),
        ("stop", sample.ROOM, sample.at(9)),
    ]


def test_unknown_method_is_stored_raw_and_counted_without_interaction() -> None:
    batch = sample.page([sample.envelope("tokenRain", 1, {"amount": 3}), sample.chat(2, "bob")])
    assert [event.method for event in batch.events] == ["tokenRain", "chatMessage"]
    assert [row.event_id for row in batch.interactions] == [sample.event_id(2)]
    assert batch.unknown_methods == 1


def test_time_falls_back_to_receipt_when_the_id_has_no_millisecond_prefix() -> None:
    batch = sample.page([{"id": "abc", "method": "chatMessage", "object": sample.chat(1, "bob")["object"]}])
    assert batch.events[0].event_time == dt.datetime(2025, 8, 16, 21, 0, 0)
    assert ingest.event_time("99-0", sample.RECEIVED.replace(tzinfo=None)) == dt.datetime(2025, 8, 16, 21, 0)


def _with(item: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """A deep copy of `item` with the key at `path` set to `value` (or removed when value is ...)."""
    copy: dict[str, Any] = json.loads(json.dumps(item))
    target = copy
    for key in path[:-1]:
        target = target[key]
    if value is ...:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return copy


MALFORMED: list[tuple[str, Any, str]] = [
    ("a bare string", "just text", "not a JSON object"),
    ("no id", _with(sample.chat(1, "x"), ("id",), ...), "without a string id"),
    ("numeric id", _with(sample.chat(1, "x"), ("id",), 17), "without a string id"),
    ("no method", _with(sample.chat(1, "x"), ("method",), ...), "without a string method"),
    ("object is a list", _with(sample.chat(1, "x"), ("object",), []), "without an object"),
    ("tip without tokens", _with(sample.tip(1, "x"), ("object", "tip", "tokens"), ...), "tokens"),
    ("tip with string tokens", sample.tip(1, "x", tokens="25"), "tokens"),
    ("tip with boolean tokens", sample.tip(1, "x", tokens=True), "tokens"),
    ("tip with fractional tokens", sample.tip(1, "x", tokens=2.5), "tokens"),
    (
        "message without text",
        _with(sample.chat(1, "x"), ("object", "message", "message"), ...),
        "without text",
    ),
    ("user without username", _with(sample.chat(1, "x"), ("object", "user", "username"), ...), "username"),
    ("user absent", _with(sample.plain("follow", 1, "x"), ("object", "user"), ...), "username"),
    ("NUL in the text", sample.chat(1, "x", text="a\x00b"), "NUL"),
    ("NUL in a key", _with(sample.chat(1, "x"), ("object", "user", "we\x00ird"), 1), "NUL"),
    ("NUL in an unknown method", sample.envelope("tokenRain", 1, {"a": ["\x00"]}), "NUL"),
    ("unpaired surrogate", sample.chat(1, "x", text="bad \ud800"), "surrogate"),
    ("NaN", sample.envelope("tokenRain", 1, {"a": float("nan")}), "number"),
    ("overlong id", _with(sample.chat(1, "x"), ("id",), "9" * 65), "id longer"),
    ("overlong username", sample.chat(1, "x" * 300), "longer than 255"),
    ("subject missing", sample.envelope("roomSubjectChange", 1, {}), "subject"),
]


@pytest.mark.parametrize(("item", "reason"), [(m[1], m[2]) for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_items_are_quarantined_and_the_batch_goes_on(item: Any, reason: str) -> None:
    batch = sample.page([sample.chat(100, "before"), item, sample.chat(101, "after")])
    assert [row.username for row in batch.interactions] == ["before", "after"]
    assert len(batch.events) == 2
    (bad,) = batch.quarantined
    assert reason in bad.reason
    assert bad.raw_text.isascii() and "\x00" not in bad.raw_text
    assert json.loads(bad.raw_text) == item or item != item or reason == "number"
    if isinstance(item, dict) and isinstance(item.get("id"), str) and len(item["id"]) <= 64:
        assert (bad.fingerprint, bad.event_id) == (item["id"], item["id"])
    else:
        assert bad.fingerprint == hashlib.sha256(bad.raw_text.encode()).hexdigest()
        assert bad.event_id is None


def test_nul_survives_as_escaped_text_in_quarantine() -> None:
    batch = sample.page([sample.chat(1, "x", text="a\x00b")])
    (bad,) = batch.quarantined
    assert "a\\u0000b" in bad.raw_text
    assert (bad.method, bad.event_id) == ("chatMessage", sample.event_id(1))


def test_escaped_backslash_text_is_not_mistaken_for_nul() -> None:
    batch = sample.page([sample.chat(1, "x", text="literally \\u0000")])
    assert batch.quarantined == [] and batch.interactions[0].content == "literally \\u0000"


def test_orjson_encodes_exactly_up_to_the_nesting_limit() -> None:
    # The fast path relies on orjson refusing what nests past the limit: an upgrade that moves its
    # boundary must move json_depth.MAX_DEPTH too.
    limit = json_depth.MAX_DEPTH
    orjson.dumps(sample.nested(limit))
    with pytest.raises(orjson.JSONEncodeError):
        orjson.dumps(sample.nested(limit + 1))
    assert not json_depth.deeper_than(sample.nested(limit)) and json_depth.deeper_than(
        sample.nested(limit + 1)
    )
    assert not json_depth.deeper_than("text", 0) and json_depth.deeper_than([], 0)
    assert json_depth.deeper_than(sample.nested(100_000))  # iterative: no RecursionError


@pytest.mark.parametrize("finite_numbers", [True, False], ids=["orjson", "stdlib"])
@pytest.mark.parametrize("depth", [json_depth.MAX_DEPTH, json_depth.MAX_DEPTH + 1, 1000])
def test_an_event_nested_past_the_limit_is_quarantined_on_either_path(
    depth: int, finite_numbers: bool
) -> None:
    deep = sample.deep_chat(2, "deep", depth)
    batch = ingest.parse_page(
        [sample.chat(1, "before"), deep, sample.chat(3, "after")],
        broadcaster=sample.ROOM,
        received_at=sample.RECEIVED,
        next_event_id=None,
        finite_numbers=finite_numbers,
    )
    if depth <= json_depth.MAX_DEPTH:
        assert [row.username for row in batch.interactions] == ["before", "deep", "after"]
        assert json.loads(batch.events[1].raw_json) == deep and batch.quarantined == []
        return
    assert [row.username for row in batch.interactions] == ["before", "after"]
    (bad,) = batch.quarantined
    assert bad.reason == f"nested deeper than {json_depth.MAX_DEPTH} levels"
    assert (bad.event_id, bad.method) == (sample.event_id(2), "chatMessage")
    kept = json.loads(bad.raw_text)  # pruned below the limit, so it is written and read back without fail
    assert not json_depth.deeper_than(kept) and bad.reason in bad.raw_text and bad.raw_text.isascii()
    assert kept["object"]["message"] == deep["object"]["message"]


def test_a_deep_item_that_is_no_envelope_is_quarantined_too() -> None:
    batch = sample.page([sample.chat(1, "before"), [sample.nested(5000)], sample.chat(2, "after")])
    (bad,) = batch.quarantined
    assert bad.reason == "not a JSON object" and bad.event_id is None
    assert not json_depth.deeper_than(json.loads(bad.raw_text))


@given(st.text())
def test_name_rule_matches_the_database_layer(name: str) -> None:
    assert ingest.normalize_name(name) == db.normalize_username(name)


# Wild payloads: JSON values mixed with the hazards PostgreSQL refuses, and envelopes that are nearly right.
_texts = st.text(max_size=8) | st.sampled_from(
    ["", " ", "\x00", "a\x00", "\ud800", "| hi", "ALICE_CAM", "1-0"]
)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | _texts
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_texts, inner, max_size=3),
    max_leaves=8,
)
_users = st.fixed_dictionaries(
    {}, optional={"username": _texts | _values, "isMod": _values, "recentTips": _texts}
)
_objects = st.fixed_dictionaries(
    {},
    optional={
        "broadcaster": _texts | _values,
        "user": _users | _values,
        "tip": st.fixed_dictionaries({}, optional={"tokens": _values, "isAnon": _values, "message": _values}),
        "message": st.fixed_dictionaries(
            {}, optional={"message": _texts | _values, "fromUser": _texts, "toUser": _texts}
        ),
        "media": st.fixed_dictionaries({}, optional={"id": _values, "type": _values, "tokens": _values}),
        "subject": _texts | _values,
    },
)
_ids = st.integers(min_value=0, max_value=10**14).map(lambda n: f"{n}-0") | _texts | _values
_methods = st.sampled_from(sorted(ingest.KNOWN_METHODS)) | _texts | _values
_items = (
    st.fixed_dictionaries({}, optional={"id": _ids, "method": _methods, "object": _objects | _values})
    | _values
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_items, max_size=6), _texts)
def test_every_wild_item_lands_in_exactly_one_place(items: list[Any], room: str) -> None:
    batch = ingest.parse_page(items, broadcaster=room, received_at=sample.RECEIVED, next_event_id=None)
    stored, quarantined = iter(batch.events), iter(batch.quarantined)
    next_stored = next(stored, None)
    placed_quarantined = 0
    for item in items:
        if next_stored is not None and next_stored.raw is item:
            next_stored = next(stored, None)
        else:
            placed_quarantined += 1
            next(quarantined)
    assert next_stored is None and next(quarantined, None) is None
    assert placed_quarantined == len(batch.quarantined)
    known = [event for event in batch.events if event.method in ingest.KNOWN_METHODS]
    assert [row.event_id for row in batch.interactions] == [event.event_id for event in known]
    assert batch.unknown_methods == len(batch.events) - len(known)
    for event in batch.events:
        assert "\x00" not in event.raw_json and json.loads(event.raw_json) == event.raw
        event.raw_json.encode("utf-8")
        assert len(event.event_id) <= ingest.EVENT_ID_MAX and len(event.method) <= ingest.METHOD_MAX
    for row in batch.interactions:
        assert row.content and row.username and row.username == row.username.lower()
        assert row.role in ("VIEWER", "MODEL") and row.metadata["event_id"] == row.event_id
        json.dumps(row.metadata, allow_nan=False).encode("utf-8")
    for bad in batch.quarantined:
        assert bad.raw_text.isascii() and len(bad.fingerprint) <= 64 and bad.reason
