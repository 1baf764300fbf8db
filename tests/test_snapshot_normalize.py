"""Pure parts of the snapshot module: normalization, batch matching, the token bucket. No I/O."""

from __future__ import annotations

import json
from typing import Any

from daemon import snapshot_metrics, snapshots, statbate_api
from tests.seed_examples import json_blocks_under


def test_member_example_of_the_seed() -> None:
    raw, expected = json_blocks_under("Statbate Member Info")
    assert snapshot_metrics.normalize_member(raw) == expected
    assert snapshot_metrics.normalize_member(raw["data"]) == expected, "a batch item normalizes the same"


def test_stats_example_of_the_seed() -> None:
    raw, expected = json_blocks_under("Chaturbate Stats API")
    assert snapshot_metrics.normalize_stats(raw) == expected


def test_member_keeps_every_numeric_field_and_nullable_dates() -> None:
    item = {
        "name": "bob",
        "did": "42",
        "first_message_date": None,
        "first_tip_date": "2024-01-01T12:00:00Z",
        "last_tip_date": None,
        "last_tip_amount": 25,
        "models_messaged_2weeks": 2,
        "models_messaged_2weeks_list": ["a", "b"],
        "models_tipped_2weeks": 0,
        "models_tipped_2weeks_list": [],
        "per_day_tokens": [{"date": "2025-08-16", "tokens": 3}],
        "all_time_tokens": 900,
        "error": None,
    }
    assert snapshot_metrics.normalize_member(item) == {
        "did": 42,
        "all_time_tokens": 900,
        "last_tip_amount": 25,
        "models_tipped_2weeks": 0,
        "models_messaged_2weeks": 2,
        "first_tip_date": "2024-01-01T12:00:00Z",
        "last_tip_date": None,
        "first_message_date": None,
    }
    assert snapshot_metrics.external_id(item, "did") == 42


def test_stats_minus_one_means_none() -> None:
    raw: dict[str, Any] = {
        "username": "hudson_cage",
        "token_balance": 10,
        "tips_in_last_hour": 0,
        "votes_up": 5,
        "votes_down": 1,
        "satisfaction_score": 83,
        "last_broadcast": -1,
        "time_online": -1,
        "num_followers": 7,
        "num_viewers": 0,
        "num_registered_viewers": 0,
        "num_tokened_viewers": 0,
    }
    assert snapshot_metrics.normalize_stats(raw) == {
        "token_balance": 10,
        "num_followers": 7,
        "tips_in_last_hour": 0,
        "time_online_minutes": None,
        "votes_up": 5,
        "votes_down": 1,
        "satisfaction_score": 83,
        "last_broadcast": None,
        "num_viewers": 0,
        "num_registered_viewers": 0,
        "num_tokened_viewers": 0,
    }
    online = snapshot_metrics.normalize_stats({"time_online": 95, "last_broadcast": "2025-08-16T20:00:00"})
    assert online == {"time_online_minutes": 95, "last_broadcast": "2025-08-16T20:00:00"}


def test_model_normalization() -> None:
    answer = {
        "data": {
            "name": "hudson_cage",
            "rid": 5001,
            "gender": 0,
            "rank": 1234,
            "sessions": {"count": 10, "total_duration": 1200, "average_duration": 120},
            "income": {"tokens": 20000, "usd": 1000.0},
            "tags": [{"name": "muscle", "category": "body"}],
        },
        "meta": {"site": "chaturbate"},
    }
    assert snapshot_metrics.normalize_model(answer) == {
        "rid": 5001,
        "gender": 0,
        "rank": 1234,
        "session_count": 10,
        "session_total_duration": 1200,
        "session_average_duration": 120,
        "income_tokens": 20000,
        "income_usd": 1000.0,
    }
    assert snapshot_metrics.external_id(answer, "rid") == 5001
    assert snapshot_metrics.external_id({"data": {"rid": None}}, "rid") is None


def test_absurd_numbers_are_stored_as_jsonb_can_hold_them() -> None:
    """jsonb holds any integer but no NaN or infinity; a digit string past Python's 4,300-digit int limit
    would otherwise raise, and its float is infinite."""
    huge = 10**300
    metrics = snapshot_metrics.normalize_member(
        {
            "did": huge,
            "all_time_tokens": "9" * 5000,
            "last_tip_amount": "nan",
            "models_tipped_2weeks": "1e999",
        }
    )
    assert metrics == {
        "did": huge,
        "all_time_tokens": None,
        "last_tip_amount": None,
        "models_tipped_2weeks": None,
    }
    assert snapshot_metrics.normalize_stats({"token_balance": float("inf"), "votes_up": float("nan")}) == {
        "token_balance": None,
        "votes_up": None,
    }
    json.dumps(metrics, allow_nan=False)


def test_an_id_the_persons_table_cannot_hold_is_no_id() -> None:
    """persons.did/rid are INTEGER: beyond it (let alone BIGINT or 300 digits) an id would fail the write."""
    for value in (10**300, "1" * 300, "9" * 5000, 2**63, -(2**63) - 1, 2**31, -(2**31) - 1, 1e300, 2.5):
        assert snapshot_metrics.external_id({"did": value}, "did") is None, value
    for value, expected in ((2**31 - 1, 2**31 - 1), (-(2**31), -(2**31)), ("42", 42), (42.0, 42)):
        assert snapshot_metrics.external_id({"data": {"rid": value}}, "rid") == expected


def test_batch_items_match_by_name_then_position() -> None:
    data: list[dict[str, Any]] = [
        {"name": "alice", "did": 1, "error": None},
        {"name": "carol_new", "did": 3, "error": None},  # asked as "carol": renamed
        {"name": "dave", "did": None, "error": "Member not found"},
    ]
    items = statbate_api.match_batch(["alice", "carol", "dave"], data)
    assert [(i.requested, i.item["name"] if i.item else None, i.found) for i in items] == [
        ("alice", "alice", True),
        ("carol", "carol_new", True),
        ("dave", "dave", False),
    ]
    assert items[2].error == "Member not found"
    short = statbate_api.match_batch(["alice", "zed"], data[:1])
    assert short[1].item is None and short[1].error == "no item in the answer"


async def test_token_bucket_spaces_requests_within_the_limit() -> None:
    now = [1234.5]  # the monotonic clock's origin is arbitrary
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    bucket = snapshots.TokenBucket(6, monotonic=lambda: now[0], sleep=sleep, jitter=lambda: 0.5)
    moments = []
    for _ in range(20):
        await bucket.acquire()
        moments.append(now[0])
    for index in range(len(moments) - 6):
        assert moments[index + 6] - moments[index] >= 60, "7 requests inside a minute"
    assert waits and all(wait >= 10 for wait in waits), "6 per minute means 10 s apart, jitter only adds"
