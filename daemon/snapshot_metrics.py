"""Snapshot normalization, pure: an API answer in, the `normalized_metrics` the seed describes out.

`normalize_member` (Statbate member info), `normalize_stats` (the Chaturbate Stats API) and `normalize_model`
(Statbate model info) never raise for any input: a value of the wrong type becomes None, an absurd integer is
refused, and the raw answer is stored beside the result anyway. `external_id` reads a did/rid the INTEGER
columns can hold. No network, no database, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# persons.did and persons.rid are INTEGER (sql/migrations/001): an id outside this range cannot be stored.
EXTERNAL_ID_RANGE = range(-(2**31), 2**31)

_MEMBER_NUMBERS = (
    "did",
    "all_time_tokens",
    "last_tip_amount",
    "models_tipped_2weeks",
    "models_messaged_2weeks",
)
_MEMBER_DATES = ("first_tip_date", "last_tip_date", "first_message_date")
_STATS_NUMBERS = (
    "token_balance",
    "num_followers",
    "tips_in_last_hour",
    "votes_up",
    "votes_down",
    "satisfaction_score",
    "num_viewers",
    "num_registered_viewers",
    "num_tokened_viewers",
)


def _number(value: Any) -> int | float | None:
    """A JSON number (or a numeric string) as int or float that jsonb can store; anything else is None.

    jsonb holds any integer but no NaN or infinity: "nan", "1e999", a float already infinite and a digit
    string beyond Python's 4,300-digit int limit (whose float is infinite) all become None.
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                return _number(float(text))
            except ValueError:
                return None
    return None


def unwrap(payload: Mapping[str, Any]) -> Mapping[str, Any]:
    """The entity of a single-entity answer (`{"data": {...}}`) or the item itself (a batch item)."""
    data = payload.get("data")
    return data if isinstance(data, Mapping) else payload


def normalize_member(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Member info (whole answer or batch item) → metrics. Only keys present in the answer appear, so a field
    the API stops sending gives a null delta rather than a fake one."""
    data = unwrap(payload)
    metrics_: dict[str, Any] = {}
    for key in _MEMBER_NUMBERS:
        if key in data:
            metrics_[key] = _number(data[key])
    for key in _MEMBER_DATES:
        if key in data:
            metrics_[key] = data[key] if isinstance(data[key], str) and data[key] else None
    return metrics_


def _sentinel(value: Any) -> Any:
    """The Stats API's -1 means "none" (never broadcast, not online): stored as null."""
    return None if _number(value) == -1 else value


def normalize_stats(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Stats API object → metrics; `time_online` becomes `time_online_minutes`, every -1 becomes null."""
    metrics_: dict[str, Any] = {}
    for key in _STATS_NUMBERS:
        if key in payload:
            metrics_[key] = _number(_sentinel(payload[key]))
    if "time_online" in payload:
        metrics_["time_online_minutes"] = _number(_sentinel(payload["time_online"]))
    if "last_broadcast" in payload:
        last = _sentinel(payload["last_broadcast"])
        metrics_["last_broadcast"] = last if isinstance(last, str) and last else None
    return metrics_


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def normalize_model(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Model info → metrics. Session durations keep the API's unit, which its documentation leaves open."""
    data = unwrap(payload)
    sessions: Mapping[str, Any] = _mapping(data.get("sessions"))
    income: Mapping[str, Any] = _mapping(data.get("income"))
    metrics_: dict[str, Any] = {}
    for key in ("rid", "gender", "rank"):
        if key in data:
            metrics_[key] = _number(data[key])
    for key, source, field in (
        ("session_count", sessions, "count"),
        ("session_total_duration", sessions, "total_duration"),
        ("session_average_duration", sessions, "average_duration"),
        ("income_tokens", income, "tokens"),
        ("income_usd", income, "usd"),
    ):
        if field in source:
            metrics_[key] = _number(source[field])
    return metrics_


def external_id(payload: Mapping[str, Any], key: str) -> int | None:
    """`did` or `rid` of an answer as an int (the batch schema allows a numeric string), else None.

    An id the persons table cannot hold (hundreds of digits, beyond INTEGER) is None too: storing it would
    fail the whole batch on every retry, and a clamped or rounded one would be somebody else's.
    """
    value = _number(unwrap(payload).get(key))
    if isinstance(value, float):
        value = int(value) if value.is_integer() else None
    return value if value is not None and value in EXTERNAL_ID_RANGE else None


# --- the token bucket ---
