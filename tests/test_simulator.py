"""The Events API simulator: realistic seeded traffic and a server that speaks the API, faults included."""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from daemon.simulator import events, traffic
from tests.conftest import shared_path

ROOT = Path(__file__).resolve().parents[1]


def _fixture_user_keys() -> set[str]:
    body = json.loads(shared_path("fixtures", "testbed-response-cb-events.json").read_text())
    return set(body["events"][0]["object"]["user"])


def test_traffic_is_seeded_and_ids_strictly_increase() -> None:
    first = traffic.generate(500, seed=7)
    assert first == traffic.generate(500, seed=7)
    assert first != traffic.generate(500, seed=8)
    keys = [traffic.event_key(event["id"]) for event in first]
    assert None not in keys
    assert all(a < b for a, b in itertools.pairwise(keys))  # type: ignore[operator]
    assert all(len(event["id"].split("-")[0]) == 13 for event in first)
    assert first[0]["id"].startswith(str(traffic.DEFAULT_START_MS))


def test_traffic_has_every_method_in_a_realistic_mix() -> None:
    assert {event["method"] for event in traffic.generate(40, seed=1)} == set(traffic.METHODS)
    counts = collections.Counter(event["method"] for event in traffic.generate(5000, seed=3))
    assert set(counts) == set(traffic.METHODS)
    assert counts["chatMessage"] > counts["userEnter"] > counts["tip"] > counts["mediaPurchase"]
    assert counts["userLeave"] > counts["tip"] > counts["follow"] > counts["fanclubJoin"]


def test_traffic_payloads_are_shaped_like_the_testbed() -> None:
    user_keys = _fixture_user_keys()
    assert len(user_keys) == 17
    stream = traffic.generate(5000, seed=11, broadcaster="mrslaw")
    names = set()
    for event in stream:
        assert set(event) == {"method", "object", "id"}
        obj = event["object"]
        assert obj["broadcaster"] == "mrslaw"
        if event["method"] == "roomSubjectChange":
            assert set(obj) == {"broadcaster", "subject"}
            continue
        assert set(obj["user"]) == user_keys
        names.add(obj["user"]["username"])
        if event["method"] == "tip":
            assert set(obj["tip"]) == {"isAnon", "message", "tokens"}
            assert obj["tip"]["tokens"] > 0
            assert obj["tip"]["message"] == "" or obj["tip"]["message"].startswith("| ")
        if event["method"] in ("chatMessage", "privateMessage"):
            assert obj["message"]["message"]
            assert obj["message"]["orig"] is None and obj["message"]["bgColor"] is None
        if event["method"] == "mediaPurchase":
            assert set(obj["media"]) == {"id", "name", "tokens", "type"}
            assert obj["media"]["type"] in ("photos", "video")
        if event["method"] in ("broadcastStart", "broadcastStop"):
            assert obj["user"]["username"] == "mrslaw" and obj["user"]["isOwner"] is True
    assert "smk_lover" in names
    tips = [event["object"] for event in stream if event["method"] == "tip"]
    assert any(tip["tip"]["isAnon"] and tip["user"]["username"] for tip in tips)
    assert any(tip["tip"]["message"].startswith("| ") for tip in tips)
    pms = [event["object"]["message"] for event in stream if event["method"] == "privateMessage"]
    assert any(pm["fromUser"] == "mrslaw" and pm["toUser"] != "mrslaw" for pm in pms)
    assert any(pm["toUser"] == "mrslaw" and pm["fromUser"] != "mrslaw" for pm in pms)


def test_shows_open_with_start_and_close_with_stop() -> None:
    stream = traffic.generate(300, seed=2, shows=3)
    methods = [event["method"] for event in stream]
    assert methods.count("broadcastStart") == 3 and methods.count("broadcastStop") == 3
    assert methods[0] == "broadcastStart" and methods[-1] == "broadcastStop"
    live = False
    for method in methods:
        if method == "broadcastStart":
            assert not live
            live = True
        elif method == "broadcastStop":
            assert live
            live = False
    still_live = [event["method"] for event in traffic.generate(300, seed=2, shows=3, end_live=True)]
    assert still_live.count("broadcastStart") == 3 and still_live.count("broadcastStop") == 2
    assert still_live[-1] != "broadcastStop"


def _is_malformed(event: dict[str, Any], kind: str) -> bool:
    obj = event.get("object") or {}
    if kind == "tip_without_tokens":
        return bool(event["method"] == "tip" and "tokens" not in obj["tip"])
    if kind == "message_without_text":
        return "message" not in obj["message"]
    if kind == "user_without_username":
        return "username" not in obj["user"]
    if kind == "nul_in_text":
        return "\x00" in obj["message"]["message"]
    return kind.removeprefix("missing_") not in event


def test_malformed_positions_are_reported() -> None:
    built = traffic.build(2000, seed=4, malformed_rate=0.05)
    assert set(built.malformed.values()) == set(traffic.MALFORMED_KINDS)
    for index, kind in built.malformed.items():
        assert _is_malformed(built.events[index], kind), (index, kind)
    good = built.well_formed()
    assert len(good) == len(built.events) - len(built.malformed)
    assert all({"id", "method", "object"} <= set(event) for event in good)
    assert all("username" in event["object"].get("user", {"username": ""}) for event in good)
    ids = [traffic.event_key(event.get("id")) for event in built.events if "id" in event]
    assert all(a < b for a, b in itertools.pairwise(ids))  # type: ignore[operator]
    for kind in traffic.MALFORMED_KINDS:
        assert _is_malformed(traffic.malformed_event(kind, event_id="1755376800000-5"), kind)


async def _get(
    session: aiohttp.ClientSession, url: str
) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
    async with session.get(url) as response:
        text = await response.text()
        return response.status, (json.loads(text) if text.startswith("{") else {"text": text}), response


async def test_backlog_pages_follow_next_url() -> None:
    stream = traffic.generate(250, seed=5)
    async with (
        events.EventsSimulator(events=stream, page_size=100) as sim,
        aiohttp.ClientSession() as session,
    ):
        status, body, _ = await _get(session, sim.events_url + "?timeout=0")
        assert status == 200 and body["events"] == stream[:100]
        assert body["nextUrl"] == f"{sim.events_url}?i={stream[99]['id']}&timeout=0"
        seen = list(body["events"])
        while body["events"]:
            status, body, _ = await _get(session, body["nextUrl"])
            seen += body["events"]
        assert seen == stream
        assert body["nextUrl"] == f"{sim.events_url}?i={stream[-1]['id']}&timeout=0"
        assert [request.event_id for request in sim.requests] == [None] + [
            stream[i]["id"] for i in (99, 199, 249)
        ]


@pytest.mark.parametrize("auth_status", [401, 403])
async def test_wrong_credentials_are_rejected(auth_status: int) -> None:
    async with events.EventsSimulator(auth_status=auth_status) as sim, aiohttp.ClientSession() as session:
        wrong_token = f"{sim.base_url}/events/{sim.username}/not-the-token/?timeout=0"
        wrong_user = f"{sim.base_url}/events/someone_else/{sim.token}/?timeout=0"
        assert (await _get(session, wrong_token))[0] == auth_status
        assert (await _get(session, wrong_user))[0] == auth_status
        assert (await _get(session, sim.events_url + "?timeout=0"))[0] == 200


async def test_empty_wait_answers_200_or_the_400_form() -> None:
    stream = traffic.generate(3, seed=1)
    async with events.EventsSimulator(events=stream) as sim, aiohttp.ClientSession() as session:
        url = f"{sim.events_url}?i={stream[-1]['id']}&timeout=0"
        status, body, _ = await _get(session, url)
        assert (status, body) == (200, {"events": [], "nextUrl": url})
    async with (
        events.EventsSimulator(events=stream, empty_status=400) as sim,
        aiohttp.ClientSession() as session,
    ):
        url = f"{sim.events_url}?i={stream[-1]['id']}&timeout=0"
        status, body, _ = await _get(session, url)
        assert status == 400
        assert body == {"events": [], "nextUrl": url, "status": "waited too long for events"}


async def test_a_waiting_long_poll_gets_appended_events() -> None:
    stream = traffic.generate(6, seed=1)
    async with events.EventsSimulator(events=stream[:3]) as sim, aiohttp.ClientSession() as session:
        url = f"{sim.events_url}?i={stream[2]['id']}&timeout=30"
        waiting = asyncio.create_task(_get(session, url))
        while not sim.waiting:  # noqa: ASYNC110  # the simulator exposes a counter, not an event
            await asyncio.sleep(0.01)
        await sim.append(stream[3:])
        status, body, _ = await waiting
        assert status == 200 and body["events"] == stream[3:]


async def test_paced_mode_records_when_each_event_became_available() -> None:
    stream = traffic.generate(20, seed=9)
    async with (
        events.EventsSimulator(events=stream, rate=500.0) as sim,
        aiohttp.ClientSession() as session,
    ):
        got: list[dict[str, Any]] = []
        url = sim.events_url + "?timeout=5"
        while len(got) < len(stream):
            _, body, _ = await _get(session, url)
            got += body["events"]
            url = body["nextUrl"]
        assert got == stream
        times = [sim.available_at(event["id"]) for event in stream]
        assert None not in times
        gaps = [b - a for a, b in itertools.pairwise(times)]  # type: ignore[operator]
        assert all(gap == pytest.approx(1 / 500, abs=1e-5) for gap in gaps)
        assert sim.available_at("1-0") is None


async def test_scheduled_faults_answer_as_designed() -> None:
    stream = traffic.generate(30, seed=6)
    async with (
        events.EventsSimulator(events=stream, page_size=10, foreign_base="https://evil.invalid") as sim,
        aiohttp.ClientSession() as session,
    ):
        start = sim.events_url + "?timeout=0"
        sim.schedule(
            events.Fault.server_error(502), events.Fault.cloudflare(521), events.Fault.rate_limited("9")
        )
        status, _, _ = await _get(session, start)
        assert status == 502
        status, body, _ = await _get(session, start)
        assert status == 521 and "<html>" in body["text"]
        async with session.get(start) as response:
            assert (response.status, response.headers["Retry-After"]) == (429, "9")

        sim.schedule(events.Fault.truncated())
        async with session.get(start) as response:
            with pytest.raises(json.JSONDecodeError):
                json.loads(await response.read())

        sim.schedule(
            events.Fault.null_next_url(), events.Fault.missing_next_url(), events.Fault.relative_next_url()
        )
        assert (await _get(session, start))[1]["nextUrl"] is None
        assert "nextUrl" not in (await _get(session, start))[1]
        assert (await _get(session, start))[1][
            "nextUrl"
        ] == f"/events/{sim.username}/{sim.token}/?i={stream[9]['id']}&timeout=0"

        sim.schedule(
            events.Fault.foreign_next_url(), events.Fault.redeliver(back=3), events.Fault.empty_400()
        )
        foreign = (await _get(session, start))[1]["nextUrl"]
        assert urlsplit(foreign).hostname == "evil.invalid"
        redeliver = (await _get(session, start))[1]["nextUrl"]
        assert parse_qs(urlsplit(redeliver).query)["i"] == [stream[6]["id"]]
        status, body, _ = await _get(session, f"{sim.events_url}?i={stream[4]['id']}&timeout=0")
        assert status == 400 and body["events"] == [] and "i=" + stream[4]["id"] in body["nextUrl"]

        sim.schedule(events.Fault.malformed("missing_id", "tip_without_tokens"))
        body = (await _get(session, start))[1]
        assert len(body["events"]) == 12 and body["events"][-1] == stream[9]
        assert body["events"][9:11] == sim.injected

        # aiohttp silently retries an idempotent request once when its connection drops: drop both.
        sim.schedule(events.Fault.drop(), events.Fault.drop())
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await _get(session, start)
        assert [request.fault for request in sim.requests][-2:] == ["drop", "drop"]
        assert sim.requests[-1].status is None


async def test_fault_probabilities_are_seeded() -> None:
    rates = events.FaultRates(server_error=0.2, cloudflare=0.1, rate_limited=0.1, null_next_url=0.1)

    async def kinds(seed: int) -> list[str | None]:
        async with (
            events.EventsSimulator(events=traffic.generate(5, seed=1), seed=seed, rates=rates) as sim,
            aiohttp.ClientSession() as session,
        ):
            for _ in range(40):
                await _get(session, sim.events_url + "?timeout=0")
            return [request.fault for request in sim.requests]

    first = await kinds(1)
    assert first == await kinds(1)
    assert first != await kinds(2)
    assert {"server_error", "cloudflare", "rate_limited", "null_next_url", None} == set(first)


async def test_a_hang_outlasts_the_client_and_ends_at_shutdown() -> None:
    async with events.EventsSimulator() as sim, aiohttp.ClientSession() as session:
        sim.schedule(events.Fault.hang())
        with pytest.raises(TimeoutError):
            async with session.get(sim.events_url, timeout=aiohttp.ClientTimeout(total=0.3)):
                pass
    assert sim.requests[0].fault == "hang"


def test_the_simulator_runs_standalone() -> None:
    with subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daemon.simulator",
            "--backlog",
            "50",
            "--token",
            "standalone-token",
            "--seed",
            "3",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ) as process:
        try:
            assert process.stdout is not None
            base_url = process.stdout.readline().strip()
            assert base_url.startswith("http://127.0.0.1:")

            async def first_page() -> dict[str, Any]:
                async with aiohttp.ClientSession() as session:
                    return (await _get(session, f"{base_url}/events/alice_cam/standalone-token/?timeout=0"))[
                        1
                    ]

            body = asyncio.run(first_page())
            assert body["events"] == traffic.generate(50, seed=3)
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0
