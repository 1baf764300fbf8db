"""Show summaries: `mhc-daemon sessions --json` over generated shows equals what this test computes on its
own from the events it generated (the view of migration 014 is not consulted for the expectation)."""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import asyncpg

from daemon import db, ingest
from daemon.simulator import traffic
from tests.daemon_process import run_command

ROOM = traffic.DEFAULT_BROADCASTER
EXCLUDED = "smk_lover"  # one of the simulator's viewers, excluded by the seed's rule
EPOCH = dt.datetime(1970, 1, 1)


def _time(event: dict[str, Any]) -> dt.datetime:
    key = traffic.event_key(event["id"])
    assert key is not None
    return EPOCH + dt.timedelta(milliseconds=key[0])


def _iso(moment: dt.datetime) -> str:
    return moment.replace(tzinfo=dt.UTC).isoformat()


def _shows(generated: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The events of each show, broadcastStart to broadcastStop inclusive."""
    shows: list[list[dict[str, Any]]] = []
    for event in generated:
        if event["method"] == "broadcastStart":
            shows.append([])
        shows[-1].append(event)
    return shows


def _expected(show: list[dict[str, Any]], *, include_excluded: bool) -> dict[str, Any]:
    """The summary of one show, from its raw envelopes: counted here, by hand."""
    start, stop = show[0], show[-1]
    assert (start["method"], stop["method"]) == ("broadcastStart", "broadcastStop")

    def who(event: dict[str, Any]) -> str:
        return str(event["object"]["user"]["username"]).lower()

    counted = [
        event for event in show if include_excluded or "user" not in event["object"] or who(event) != EXCLUDED
    ]
    by_method: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for event in counted:
        by_method[event["method"]].append(event)
    tokens: collections.Counter[str] = collections.Counter()
    tips: collections.Counter[str] = collections.Counter()
    for event in by_method["tip"]:
        tokens[who(event)] += event["object"]["tip"]["tokens"]
        tips[who(event)] += 1
    total = sum(tokens.values())
    duration = (_time(stop) - _time(start)).total_seconds()
    ranked = sorted(tokens, key=lambda name: (-tokens[name], name))[:5]
    return {
        "broadcaster": ROOM,
        "status": "ENDED",
        "started_at": _iso(_time(start)),
        "ended_at": _iso(_time(stop)),
        "duration_s": duration,
        "tokens_tipped": total,
        "tips": len(by_method["tip"]),
        "tokens_per_hour": round(total * 3600 / duration, 1),
        "unique_chatters": len({who(event) for event in by_method["chatMessage"]} - {ROOM}),
        "unique_tippers": len(tokens),
        "unique_visitors": len({who(event) for event in by_method["userEnter"]}),
        "new_followers": len(by_method["follow"]),
        "unfollows": len(by_method["unfollow"]),
        "fan_club_joins": len(by_method["fanclubJoin"]),
        "media_purchases": len(by_method["mediaPurchase"]),
        "top_tippers": [{"username": name, "tokens": tokens[name], "tips": tips[name]} for name in ranked],
    }


def _all_tips(show: list[dict[str, Any]]) -> int:
    return sum(event["object"]["tip"]["tokens"] for event in show if event["method"] == "tip")


async def _store(pool: asyncpg.Pool, generated: list[dict[str, Any]]) -> None:
    """Through the real writer, a page of 100 at a time, as the daemon stores them."""
    for first in range(0, len(generated), 100):
        page = generated[first : first + 100]
        batch = ingest.parse_page(
            page, broadcaster=ROOM, received_at=dt.datetime.now(dt.UTC), next_event_id=page[-1]["id"]
        )
        assert not batch.quarantined
        await db.write_batch(pool, batch, cursor_broadcaster=ROOM, timeout_seconds=10)


async def _balance(pool: asyncpg.Pool, person: db.Person, at: dt.datetime, balance: int) -> None:
    await db.record_snapshot(
        pool,
        person_id=person.id,
        source="cb_stats",
        captured_at=at,
        raw_payload={"username": ROOM, "token_balance": balance},
        normalized_metrics={"token_balance": balance, "num_followers": 10},
    )


def _sessions_json(database_url: str, tmp_path: Path, *extra: str) -> list[dict[str, Any]]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MHC_")}
    env.update({"MHC_DATABASE_URL": database_url, "MHC_DATA_DIR": str(tmp_path / "data")})
    result = run_command(["sessions", "--json", *extra], env, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    parsed: list[dict[str, Any]] = json.loads(result.stdout)
    return parsed


async def test_sessions_json_equals_the_figures_of_the_generated_shows(
    pool: asyncpg.Pool, database_url: str, tmp_path: Path
) -> None:
    generated = traffic.generate(3_000, seed=71, broadcaster=ROOM, shows=3)
    shows = _shows(generated)
    assert len(shows) == 3 and any(
        event["method"] == "tip" and event["object"]["user"]["username"] == EXCLUDED for event in shows[0]
    ), "the first show must hold a tip of the excluded viewer for this test to mean much"
    await _store(pool, generated)
    await pool.execute(
        "UPDATE stream_sessions SET end_reason = 'broadcast_stop' WHERE started_at = $1", _time(shows[0][0])
    )
    owner = await db.find_person(pool, ROOM)
    assert owner is not None
    # The first show is bracketed: the last snapshot at or before its start, the first at or after its end;
    # the others (earlier, inside, later) do not count. No snapshot follows the second and third shows.
    start, end = _time(shows[0][0]), _time(shows[0][-1])
    for at, balance in (
        (start - dt.timedelta(hours=2), 100),
        (start - dt.timedelta(minutes=3), 1_000),
        (start + (end - start) / 2, 1_500),
        (end + dt.timedelta(minutes=4), 9_000),
        (end + dt.timedelta(minutes=9), 9_999),
    ):
        await _balance(pool, owner, at, balance)

    for include_excluded in (False, True):
        flags = ["--last", "2"] + (["--include-excluded"] if include_excluded else [])
        newest_two = await asyncio.to_thread(_sessions_json, database_url, tmp_path, *flags)
        every = await asyncio.to_thread(_sessions_json, database_url, tmp_path, "--last", "10", *flags[2:])
        assert every[1:] == newest_two, "--last N gives the newest N, oldest first"
        assert len(every) == 3
        for show, summary in zip(shows, every, strict=True):
            expected = _expected(show, include_excluded=include_excluded)
            got = {key: summary[key] for key in expected}
            assert got == expected, (include_excluded, got, expected)
        first, second, third = every
        assert first["end_reason"] == "broadcast_stop", "the view passes stream_sessions.end_reason through"
        assert (first["token_balance_before"], first["token_balance_after"]) == (1_000, 9_000)
        assert first["token_balance_change"] == 8_000
        # Every tip reaches the balance, excluded persons' too: the rest came from elsewhere.
        assert first["tokens_not_in_events"] == 8_000 - _all_tips(shows[0])
        assert second["token_balance_before"] == 9_999 and second["token_balance_after"] is None
        assert second["token_balance_change"] is None and second["tokens_not_in_events"] is None
        assert third["token_balance_change"] is None
    print(
        f"\n{len(generated)} events, 3 shows: tokens {[s['tokens_tipped'] for s in every]}, "
        f"visitors {[s['unique_visitors'] for s in every]}, first show's balance +8000 "
        f"({first['tokens_not_in_events']} not in events)"
    )
