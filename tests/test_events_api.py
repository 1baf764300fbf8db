"""The Events API client against the real simulator on 127.0.0.1: paging, faults, nextUrl rules, secrecy."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import io
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import hypothesis
import pytest
import yarl
from hypothesis import strategies as st

from daemon import api_http, config, errors, events_api, ingest, json_depth, logs, runtime_state
from daemon.simulator import events, http_faults, traffic

TOKEN = "q1w2e3r4t5y6u7i8o9p0asdf"
BACKOFF_MAX = 0.01
STREAM = traffic.generate(250, seed=21)


@dataclasses.dataclass
class Harness:
    """A client wired to a simulator, with its failures and chosen waits collected."""

    sim: events.EventsSimulator
    client: events_api.EventsClient
    state: runtime_state.RuntimeState
    failures: list[errors.ApiFailure]
    sleeps: list[float]

    def kinds(self) -> list[str]:
        return [failure.error_kind for failure in self.failures]

    def requested_ids(self) -> list[str | None]:
        return [request.event_id for request in self.sim.requests]


def _client(
    session: aiohttp.ClientSession,
    sim: events.EventsSimulator,
    failures: list[errors.ApiFailure],
    sleeps: list[float],
    state: runtime_state.RuntimeState,
    **overrides: Any,
) -> events_api.EventsClient:
    async def record(failure: errors.ApiFailure) -> None:
        failures.append(failure)

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        await asyncio.sleep(0)

    token = overrides.pop("token", sim.token)  # a string, or a provider
    settings: dict[str, Any] = {
        "base_url": sim.base_url,
        "username": sim.username,
        "token": token if callable(token) else lambda: token,
        "timeout": 0,
        "on_failure": record,
        "state": state,
        "backoff_initial": 0.001,
        "backoff_max": BACKOFF_MAX,
        "auth_retry_seconds": 300.0,
        "read_margin": 0.3,
        "sleep": sleep,
        **overrides,
    }
    return events_api.EventsClient(session, **settings)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    async with (
        events.EventsSimulator(token=TOKEN, events=STREAM, page_size=100) as sim,
        aiohttp.ClientSession() as session,
    ):
        failures: list[errors.ApiFailure] = []
        sleeps: list[float] = []
        state = runtime_state.RuntimeState()
        yield Harness(sim, _client(session, sim, failures, sleeps, state), state, failures, sleeps)


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    logs.configure(level="debug", fmt="json", stream=stream)
    yield stream
    logs.configure()


async def _drain(client: events_api.EventsClient, url: events_api.EventsUrl) -> list[dict[str, Any]]:
    """Follow the feed until an empty page, rebuilding from next_event_id when there is no nextUrl."""
    got: list[dict[str, Any]] = []
    while True:
        page = await client.fetch(url)
        got += page.events
        if not page.events:
            return got
        url = page.next_url or client.start_url(page.next_event_id)


# -- URLs ---------------------------------------------------------------------------------------------------


async def test_start_url_is_built_and_masked() -> None:
    async def record(failure: errors.ApiFailure) -> None:
        raise AssertionError(failure)

    async with aiohttp.ClientSession() as session:
        client = events_api.EventsClient(
            session,
            base_url="https://eventsapi.example:8443/",
            username="ali ce/x",
            token=lambda: "zq/en?with&odd=chars",
            timeout=30,
            on_failure=record,
            state=runtime_state.RuntimeState(),
        )
    first = client.start_url(None)
    assert first.reveal() == (
        "https://eventsapi.example:8443/events/ali%20ce%2Fx/zq%2Fen%3Fwith%26odd%3Dchars/?timeout=30"
    )
    assert first.event_id is None and first.server_timeout == 30
    later = client.start_url("1755376800000-3")
    assert later.reveal().endswith("/?i=1755376800000-3&timeout=30")
    assert later.event_id == "1755376800000-3"
    for text in (str(later), repr(later), repr(client), later.masked()):
        assert "zq" not in text and "odd" not in text, text
    assert "***" in str(later)
    assert later == client.start_url("1755376800000-3") and later != first
    assert len({later, client.start_url("1755376800000-3")}) == 1
    with pytest.raises(AttributeError):
        later._url = yarl.URL("https://evil.invalid/")


@pytest.mark.parametrize(("username", "token"), [("", TOKEN), ("alice", ""), ("   ", TOKEN), ("alice", "  ")])
async def test_empty_credentials_are_a_config_error(username: str, token: str) -> None:
    async def record(failure: errors.ApiFailure) -> None:
        raise AssertionError(failure)

    async with aiohttp.ClientSession() as session:
        with pytest.raises(errors.ConfigError) as raised:
            events_api.EventsClient(
                session,
                base_url="http://127.0.0.1:1",
                username=username,
                token=lambda: token,
                timeout=0,
                on_failure=record,
                state=runtime_state.RuntimeState(),
            )
    assert TOKEN not in str(raised.value)


# -- paging -------------------------------------------------------------------------------------------------


async def test_paging_through_a_backlog_gets_every_event_once_in_order(harness: Harness) -> None:
    stream = STREAM
    got = await _drain(harness.client, harness.client.start_url(None))
    assert got == stream
    assert harness.requested_ids() == [None, stream[99]["id"], stream[199]["id"], stream[249]["id"]]
    assert harness.failures == [] and harness.sleeps == []
    assert harness.state.poll_progress == 4 and harness.state.last_successful_poll is not None


async def test_a_page_carries_its_cursor_body_and_time(harness: Harness) -> None:
    stream = STREAM
    page = await harness.client.fetch(harness.client.start_url(stream[9]["id"]))
    assert page.events == stream[10:110]
    assert page.request_event_id == stream[9]["id"]
    assert page.next_event_id == stream[109]["id"]
    assert page.next_url is not None and page.next_url.event_id == stream[109]["id"]
    assert json.loads(page.body)["events"] == page.events
    assert page.received_at.tzinfo is not None and page.received_at.utcoffset() == dt.timedelta(0)
    assert TOKEN not in repr(page)


async def test_resuming_from_a_saved_id_continues_after_it(harness: Harness) -> None:
    stream = STREAM
    got = await _drain(harness.client, harness.client.start_url(stream[239]["id"]))
    assert got == stream[240:]


# -- faults -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [*events.SERVER_ERROR_STATUSES, *events.CLOUDFLARE_STATUSES])
async def test_server_errors_are_retried_and_recorded(harness: Harness, status: int) -> None:
    fault = events.Fault.cloudflare(status) if status >= 520 else events.Fault.server_error(status)
    harness.sim.schedule(fault, fault)
    page = await harness.client.fetch(harness.client.start_url(None))
    assert page.events == STREAM[:100]
    assert [(f.error_kind, f.http_status, f.attempt) for f in harness.failures] == [
        ("http_5xx", status, 1),
        ("http_5xx", status, 2),
    ]
    assert all(f.api == "cb_events" and f.operation == "poll" for f in harness.failures)
    assert all(f.url.endswith("/events/alice_cam/***/?timeout=0") for f in harness.failures)
    excerpt = harness.failures[0].body_excerpt
    assert excerpt is not None and len(excerpt) <= errors.BODY_EXCERPT_CHARS
    assert ("Cloudflare" in excerpt) == (status >= 520)
    assert len(harness.sleeps) == 2 and all(0 < wait <= BACKOFF_MAX for wait in harness.sleeps)


async def test_429_honours_retry_after(harness: Harness) -> None:
    harness.sim.schedule(events.Fault.rate_limited("7"), events.Fault.rate_limited(None))
    page = await harness.client.fetch(harness.client.start_url(None))
    assert len(page.events) == 100
    assert harness.kinds() == ["rate_limited", "rate_limited"]
    assert [f.http_status for f in harness.failures] == [429, 429]
    assert harness.sleeps[0] == 7.0
    assert 0 < harness.sleeps[1] <= BACKOFF_MAX  # no header: the ordinary backoff


def test_retry_after_parsing() -> None:
    now = dt.datetime(2025, 8, 16, 12, 0, 0, tzinfo=dt.UTC)
    assert api_http.parse_retry_after("120") == 120.0
    assert api_http.parse_retry_after("999999") == api_http.RETRY_AFTER_MAX_SECONDS
    assert api_http.parse_retry_after("Sat, 16 Aug 2025 12:00:30 GMT", now) == 30.0
    assert api_http.parse_retry_after("Sat, 16 Aug 2025 11:00:00 GMT", now) == 0.0
    assert api_http.parse_retry_after("soon") is None
    assert api_http.parse_retry_after(None) is None
    assert api_http.parse_retry_after("Mon, 01 Jan 99999999999 00:00:00 GMT") is None
    assert api_http.parse_retry_after("9" * 5000) == api_http.RETRY_AFTER_MAX_SECONDS


@hypothesis.given(
    value=st.one_of(
        st.text(),
        st.builds(
            "{}, {} Aug {} 12:00:30 {}".format, st.text(max_size=3), st.integers(), st.integers(), st.text()
        ),
    )
)
def test_any_retry_after_header_is_seconds_or_none(value: str) -> None:
    seconds = api_http.parse_retry_after(value)
    assert seconds is None or 0 <= seconds <= api_http.RETRY_AFTER_MAX_SECONDS


async def test_a_hang_past_the_read_timeout_is_a_timeout(harness: Harness) -> None:
    harness.sim.schedule(events.Fault.hang())
    page = await harness.client.fetch(harness.client.start_url(None))
    assert len(page.events) == 100
    assert harness.kinds() == ["timeout"]
    assert harness.failures[0].http_status is None


async def test_a_dropped_connection_is_retried(harness: Harness) -> None:
    # Two drops: aiohttp itself retries a GET once when its connection drops.
    harness.sim.schedule(events.Fault.drop(), events.Fault.drop())
    page = await harness.client.fetch(harness.client.start_url(None))
    assert len(page.events) == 100
    assert harness.kinds() == ["connection"]
    assert [request.fault for request in harness.sim.requests] == ["drop", "drop", None]


@pytest.mark.parametrize(
    "fault",
    [
        events.Fault.truncated(),
        events.Fault.raw(200, "<html>maintenance</html>", "text/html"),
        events.Fault.raw(200, '{"events": {"not": "a list"}, "nextUrl": null}'),
        events.Fault.raw(200, '{"nextUrl": null}'),
        events.Fault.raw(200, "[1, 2, 3]"),
        events.Fault.raw(200, ""),
    ],
    ids=["truncated", "html", "events-not-a-list", "no-events", "not-an-object", "empty"],
)
async def test_unparseable_bodies_are_retried(harness: Harness, fault: events.Fault) -> None:
    harness.sim.schedule(fault)
    page = await harness.client.fetch(harness.client.start_url(None))
    assert page.events == STREAM[:100]
    assert harness.kinds() == ["bad_body"]
    assert harness.failures[0].http_status == 200


@pytest.mark.parametrize(
    ("prefix", "tokens", "fast"),
    [
        ("", "25", True),
        ("", "123456789012345678901234567890", False),  # beyond 64 bits: orjson would make it a float
        ("", "-9223372036854775809", False),
        ("", "NaN", False),  # orjson refuses these; the standard library reads them
        ("", "1e400", False),
        ("\ufeff", "25", False),  # a byte-order mark
    ],
    ids=["small", "huge", "huge-negative", "nan", "overflow", "bom"],
)
async def test_a_body_means_the_same_whichever_decoder_reads_it(
    harness: Harness, prefix: str, tokens: str, fast: bool
) -> None:
    body = prefix + (
        '{"events": [{"id": "1755376889458-0", "method": "tip",'
        f' "object": {{"user": {{"username": "bob"}}, "tip": {{"tokens": {tokens}}}}}}}], "nextUrl": null}}'
    )
    harness.sim.schedule(events.Fault.raw(200, body))
    page = await harness.client.fetch(harness.client.start_url(None))
    assert page.finite_numbers is fast
    # As text, so NaN equals itself and a float in place of an integer shows.
    assert json.dumps(page.events) == json.dumps(json.loads(body.removeprefix("\ufeff"))["events"])
    assert harness.failures == []


@pytest.mark.parametrize("status", [404, 410, 302])
async def test_other_statuses_retry_slowly(harness: Harness, status: int) -> None:
    harness.sim.schedule(events.Fault.http_status(status))
    page = await harness.client.fetch(harness.client.start_url(None))
    assert len(page.events) == 100
    assert [(f.error_kind, f.http_status) for f in harness.failures] == [("http_4xx", status)]
    assert harness.sleeps == [BACKOFF_MAX]


async def test_a_400_without_next_url_is_a_failure(harness: Harness) -> None:
    harness.sim.schedule(events.Fault.raw(400, '{"status": "bad request"}'))
    await harness.client.fetch(harness.client.start_url(None))
    assert [(f.error_kind, f.http_status) for f in harness.failures] == [("http_4xx", 400)]


async def test_the_400_form_is_an_empty_continuation(harness: Harness) -> None:
    stream = STREAM
    harness.sim.schedule(events.Fault.empty_400())
    url = harness.client.start_url(stream[4]["id"])
    page = await harness.client.fetch(url)
    assert page.events == [] and harness.failures == []
    assert page.next_url is not None and page.next_url.event_id == stream[4]["id"]
    assert page.next_event_id == stream[4]["id"]
    assert (await harness.client.fetch(page.next_url)).events == stream[5:105]


async def test_an_empty_wait_in_the_400_form_keeps_polling() -> None:
    stream = traffic.generate(5, seed=2)
    async with (
        events.EventsSimulator(token=TOKEN, events=stream, empty_status=400) as sim,
        aiohttp.ClientSession() as session,
    ):
        failures: list[errors.ApiFailure] = []
        client = _client(session, sim, failures, [], runtime_state.RuntimeState())
        page = await client.fetch(client.start_url(stream[-1]["id"]))
        assert page.events == [] and failures == []
        assert sim.requests[-1].status == 400
        await sim.append(traffic.generate(8, seed=2)[5:])
        assert page.next_url is not None
        assert len((await client.fetch(page.next_url)).events) == 3


# -- nextUrl ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", [events.Fault.null_next_url(), events.Fault.missing_next_url()])
async def test_without_next_url_it_resumes_from_the_last_event(harness: Harness, fault: events.Fault) -> None:
    stream = STREAM
    harness.sim.schedule(fault)
    page = await harness.client.fetch(harness.client.start_url(None))
    assert page.next_url is None and page.next_event_id == stream[99]["id"]
    assert harness.failures == []
    page = await harness.client.fetch(harness.client.start_url(page.next_event_id))
    assert page.events == stream[100:200]
    assert harness.requested_ids() == [None, stream[99]["id"]]


async def test_an_empty_page_without_next_url_keeps_the_request_position(harness: Harness) -> None:
    stream = STREAM
    harness.sim.schedule(events.Fault.null_next_url())
    page = await harness.client.fetch(harness.client.start_url(stream[-1]["id"]))
    assert page.events == [] and page.next_url is None
    assert page.next_event_id == stream[-1]["id"]


async def test_a_foreign_next_url_is_never_requested(captured_logs: io.StringIO) -> None:
    stream = traffic.generate(150, seed=3)
    async with (
        events.EventsSimulator(token=TOKEN) as foreign,
        events.EventsSimulator(token=TOKEN, events=stream, page_size=100) as sim,
        aiohttp.ClientSession() as session,
    ):
        # Same scheme and host, other port: a real server that would notice any request.
        sim.foreign_base = foreign.base_url
        failures: list[errors.ApiFailure] = []
        client = _client(session, sim, failures, [], runtime_state.RuntimeState())
        sim.schedule(events.Fault.foreign_next_url())
        page = await client.fetch(client.start_url(None))
        assert page.events == stream[:100]
        assert page.next_url is None and page.next_event_id == stream[99]["id"]
        assert [(f.error_kind, f.http_status) for f in failures] == [("foreign_next_url", 200)]
        assert failures[0].url == f"{foreign.base_url}/events/alice_cam/***/?i={stream[99]['id']}&timeout=0"

        sim.foreign_base = "https://evil.invalid"
        sim.schedule(events.Fault.foreign_next_url())
        page = await client.fetch(client.start_url(page.next_event_id))
        assert page.events == stream[100:] and page.next_url is None
        assert failures[-1].url.startswith("https://evil.invalid/events/alice_cam/***/")
        assert (await client.fetch(client.start_url(page.next_event_id))).events == []

        assert foreign.request_count == 0
        assert {request.host for request in sim.requests} == {f"127.0.0.1:{sim.port}"}
        assert all("evil" not in request.path_qs for request in sim.requests)
    assert "events_next_url_refused" in captured_logs.getvalue()
    assert TOKEN not in captured_logs.getvalue()


async def test_a_relative_next_url_is_resolved_against_the_base(harness: Harness) -> None:
    stream = STREAM
    harness.sim.schedule(events.Fault.relative_next_url())
    page = await harness.client.fetch(harness.client.start_url(None))
    assert page.next_url is not None
    assert page.next_url.reveal() == f"{harness.sim.events_url}?i={stream[99]['id']}&timeout=0"
    assert (await harness.client.fetch(page.next_url)).events == stream[100:200]
    assert harness.failures == []


async def test_redelivered_events_come_again_as_delivered(harness: Harness) -> None:
    stream = STREAM
    harness.sim.schedule(events.Fault.redeliver(back=3))
    page = await harness.client.fetch(harness.client.start_url(None))
    assert page.next_event_id == stream[96]["id"]
    assert page.next_url is not None
    assert (await harness.client.fetch(page.next_url)).events == stream[97:197]


async def test_malformed_events_are_passed_through_untouched(harness: Harness) -> None:
    harness.sim.schedule(events.Fault.malformed(*traffic.MALFORMED_KINDS))
    page = await harness.client.fetch(harness.client.start_url(None))
    assert len(page.events) == 100 + len(traffic.MALFORMED_KINDS)
    assert [event for event in page.events if event in harness.sim.injected] == harness.sim.injected
    assert page.next_event_id == STREAM[99]["id"]
    assert harness.failures == []


def _origin(url: yarl.URL) -> tuple[str, str | None, int | None]:
    return (url.scheme, url.host, url.port)


BASE = yarl.URL("http://127.0.0.1:8123")
NEXT_URL_SAMPLES = [
    "https://evil.invalid/events/a/b/?i=1",
    "//evil.invalid/events/a/b/",
    "http://127.0.0.1:8124/events/a/b/",
    "https://127.0.0.1:8123/events/a/b/",
    "http://user@127.0.0.1:8123/events/a/b/",
    "http://127.0.0.1:8123@evil.invalid/events/a/b/",
    "http://evil.invalid#@127.0.0.1:8123/",
    "http://evil.invalid\\@127.0.0.1:8123/",
    " http://127.0.0.1:8123/events/a/b/",
    "http://127.0.0.1:8123/events/a/b/\n",
    "http://localhost:8123/events/a/b/",
    "http://127.0.0.1:99999/",
    "http:///events/a/b/",
    "javascript:alert(1)",
    "",
]


@pytest.mark.parametrize("raw", NEXT_URL_SAMPLES)
def test_foreign_next_urls_are_refused(raw: str) -> None:
    assert events_api.resolve_next_url(BASE, raw) is None


@pytest.mark.parametrize("raw", [None, 12, ["http://127.0.0.1:8123/"], {"url": "x"}])
def test_next_urls_that_are_not_strings_are_refused(raw: object) -> None:
    assert events_api.resolve_next_url(BASE, raw) is None


@pytest.mark.parametrize(
    "raw",
    [
        "http://127.0.0.1:8123/events/a/b/?i=1-0&timeout=10",
        "HTTP://127.0.0.1:8123/events/a/b/",
        "/events/a/b/?i=1-0",
        "events/a/b/",
        "?i=5",
    ],
)
def test_same_origin_next_urls_are_accepted(raw: str) -> None:
    resolved = events_api.resolve_next_url(BASE, raw)
    assert resolved is not None and _origin(resolved) == _origin(BASE)


_URLISH = st.one_of(
    st.text(),
    st.builds(
        "{}://{}{}/{}".format,
        st.sampled_from(["http", "https", "HTTP", "ftp", "", "javascript"]),
        st.sampled_from(["", "user@", "127.0.0.1:8123@", "a:b@"]),
        st.sampled_from(
            ["127.0.0.1", "127.0.0.1:8123", "evil.invalid", "127.0.0.1:80", "[::1]:8123", "", "%31"]
        ),
        st.text(),
    ),
    st.builds("{}{}".format, st.sampled_from(["/", "//", "./", "../", "?", "#", "\\\\"]), st.text()),
)


@hypothesis.given(raw=_URLISH)
@hypothesis.settings(max_examples=400, deadline=None)
def test_resolve_next_url_accepts_only_the_same_origin(raw: str) -> None:
    resolved = events_api.resolve_next_url(BASE, raw)
    if resolved is not None:
        assert _origin(resolved) == _origin(BASE)
        assert resolved.user is None and resolved.password is None


@hypothesis.given(raw=st.one_of(_URLISH, st.none(), st.integers(), st.lists(st.text(), max_size=2)))
@hypothesis.settings(max_examples=40, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow])
async def test_any_next_url_from_the_server_is_survived(raw: object) -> None:
    stream = traffic.generate(5, seed=8)
    async with (
        events.EventsSimulator(token=TOKEN, events=stream) as sim,
        aiohttp.ClientSession() as session,
    ):
        failures: list[errors.ApiFailure] = []
        client = _client(session, sim, failures, [], runtime_state.RuntimeState())
        sim.schedule(events.Fault.custom_next_url(raw))
        page = await client.fetch(client.start_url(None))
        assert page.events == stream
        if page.next_url is None:
            assert page.next_event_id == stream[-1]["id"]
            assert [f.error_kind for f in failures] == ([] if raw is None else ["foreign_next_url"])
        else:
            assert _origin(page.next_url.as_yarl()) == _origin(yarl.URL(sim.base_url))
            assert failures == []
        assert {request.host for request in sim.requests} == {f"127.0.0.1:{sim.port}"}


# -- auth, limits, secrecy ----------------------------------------------------------------------------------


async def test_a_rejected_token_flags_readiness_and_recovers(captured_logs: io.StringIO) -> None:
    stream = traffic.generate(10, seed=4)
    async with (
        events.EventsSimulator(token=TOKEN, events=stream, auth_status=403) as sim,
        aiohttp.ClientSession() as session,
    ):
        failures: list[errors.ApiFailure] = []
        state = runtime_state.RuntimeState()
        flags_while_waiting: list[bool] = []
        waits: list[float] = []

        async def sleep(seconds: float) -> None:
            waits.append(seconds)
            flags_while_waiting.append(state.token_rejected)
            if len(waits) == 2:
                sim.token = TOKEN  # the user fixed the token during the second wait

        sim.token = "a-token-made-later-0000"
        client = _client(session, sim, failures, [], state, sleep=sleep, token=TOKEN)
        page = await client.fetch(client.start_url(None))
        assert page.events == stream
        assert [(f.error_kind, f.http_status) for f in failures] == [("auth_rejected", 403)] * 2
        assert waits == [300.0, 300.0] and flags_while_waiting == [True, True]
        assert state.token_rejected is False

        sim.schedule(events.Fault.auth_rejected(401))
        waits.clear()
        await client.fetch(client.start_url(stream[-1]["id"]))
        assert failures[-1].http_status == 401 and waits == [300.0]
    text = captured_logs.getvalue()
    rejected = [json.loads(line) for line in text.splitlines() if "events_token_rejected" in line]
    assert len(rejected) == 3
    assert "https://chaturbate.com/statsapi/authtoken/" in rejected[0]["message"]
    assert '"Events API" scope' in rejected[0]["message"]
    assert "events_token_accepted" in text


async def test_requests_per_minute_are_limited(harness: Harness) -> None:
    async with aiohttp.ClientSession() as session:
        sleeps: list[float] = []
        client = _client(
            session, harness.sim, [], sleeps, runtime_state.RuntimeState(), max_requests_per_minute=2
        )
        url = client.start_url(None)
        for _ in range(5):
            await client.fetch(url)
        assert len(sleeps) == 3
        assert all(59.0 < wait <= 60.0 for wait in sleeps[:2])
        assert 119.0 < sleeps[2] <= 120.0


async def test_the_token_never_leaks(captured_logs: io.StringIO) -> None:
    token = "sekr3t t0ken+with=odd"
    stream = traffic.generate(120, seed=5)
    async with (
        events.EventsSimulator(token=token, events=stream, page_size=50) as sim,
        aiohttp.ClientSession() as session,
    ):
        failures: list[errors.ApiFailure] = []
        client = _client(session, sim, failures, [], runtime_state.RuntimeState())
        sim.schedule(
            events.Fault.server_error(500),
            events.Fault.cloudflare(524),
            events.Fault.rate_limited("0"),
            events.Fault.hang(),
            events.Fault.drop(),
            events.Fault.drop(),
            events.Fault.truncated(),
            events.Fault.http_status(404),
            events.Fault.auth_rejected(),
            events.Fault.raw(500, json.dumps({"echo": sim.events_url, "token": token})),
            events.Fault.foreign_next_url(),
        )
        pages = []
        url = client.start_url(None)
        for _ in range(4):
            page = await client.fetch(url)
            pages.append(page)
            url = page.next_url or client.start_url(page.next_event_id)
        assert sum(len(page.events) for page in pages) == len(stream)
        assert len(failures) == 10
    secrets = (token, quote(token, safe=""))
    texts = [
        captured_logs.getvalue(),
        repr(client),
        *(repr(page) for page in pages),
        *(str(page.next_url) for page in pages),
        *(repr(failure) for failure in failures),
        *(str(errors.ApiError(f"failed: {sim.events_url}")),),
    ]
    for text in texts:
        for secret in secrets:
            assert secret not in text, text


async def test_a_failing_recorder_does_not_stop_polling(harness: Harness, captured_logs: io.StringIO) -> None:
    async def broken(failure: errors.ApiFailure) -> None:
        raise errors.DatabaseUnavailable()

    async with aiohttp.ClientSession() as session:
        client = _client(session, harness.sim, [], [], runtime_state.RuntimeState(), on_failure=broken)
        harness.sim.schedule(events.Fault.server_error())
        assert len((await client.fetch(client.start_url(None))).events) == 100
    assert "api_failure_not_recorded" in captured_logs.getvalue()


# -- hostile answers ----------------------------------------------------------------------------------------

HOSTILE_OUTCOMES = {
    "nesting_bomb": ("bad_body", 200, "nests too deeply"),
    "gzip_bomb": ("bad_body", 200, "inflates to more than"),
    "over_cap": ("bad_body", 200, "larger than"),
    "invalid_utf8": ("bad_body", 200, "not JSON"),
    "unknown_encoding": ("bad_body", 200, "encoding"),
    "truncated_http": ("connection", None, "ClientPayloadError"),
    "malformed_http": ("connection", None, "ClientResponseError"),
    "redirect_loop": ("http_4xx", 302, "HTTP 302"),
}
TOO_MANY_DIGITS = (
    '{"events": [{"id": "1755376889458-0", "method": "tip", "object": {"tip": {"tokens": '
    + "9" * 5000
    + '}}}], "nextUrl": null}'
)


def test_every_hostile_answer_has_an_expected_outcome() -> None:
    assert set(HOSTILE_OUTCOMES) == set(http_faults.HOSTILE)


async def test_hostile_answers_are_recorded_failures_between_valid_pages(captured_logs: io.StringIO) -> None:
    stream = traffic.generate(250, seed=31)
    hostile = [events.Fault.hostile(kind) for kind in http_faults.HOSTILE]
    extra = [
        # A Content-Length over the cap: refused before a byte of the body is read.
        events.Fault.raw(200, " " * (config.DEFAULT_API_MAX_BODY_BYTES + 1)),
    ]
    async with (
        events.EventsSimulator(token=TOKEN, events=stream, page_size=50) as sim,
        aiohttp.ClientSession() as session,
    ):
        failures: list[errors.ApiFailure] = []
        client = _client(session, sim, failures, [], runtime_state.RuntimeState())
        got: list[dict[str, Any]] = []
        url = client.start_url(None)
        for fault in [*hostile, *extra]:  # one hostile answer before each page
            sim.schedule(fault)
            page = await client.fetch(url)
            got += page.events
            url = page.next_url or client.start_url(page.next_event_id)
        served = [request.fault for request in sim.requests]
    assert got == stream
    assert served == [kind for fault in [*hostile, *extra] for kind in (fault.kind, None)]
    outcomes = [(f.error_kind, f.http_status) for f in failures]
    expected = [HOSTILE_OUTCOMES[kind][:2] for kind in http_faults.HOSTILE]
    assert outcomes == [*expected, ("bad_body", 200)]
    text = captured_logs.getvalue()
    logged = [json.loads(line) for line in text.splitlines() if "events_poll_failed" in line]
    for line, kind in zip(logged, http_faults.HOSTILE, strict=False):
        assert HOSTILE_OUTCOMES[kind][2] in line["error"], line
    assert "larger than" in logged[-1]["error"]
    for failure in failures:
        assert failure.url.endswith("/events/alice_cam/***/?timeout=0") or "/***/?i=" in failure.url
    for dump in (text, repr(failures)):
        assert TOKEN not in dump and sim.base_url in dump


async def test_an_integer_over_the_digit_limit_quarantines_its_event_not_the_page(harness: Harness) -> None:
    """Python refuses integers over 4,300 digits; a page failed whole would be served again forever."""
    harness.sim.schedule(events.Fault.raw(200, TOO_MANY_DIGITS))
    page = await harness.client.fetch(harness.client.start_url(None))
    assert len(page.events) == 1 and harness.failures == []
    batch = ingest.parse_page(
        page.events, broadcaster="alice_cam", received_at=page.received_at, next_event_id=None
    )
    assert batch.events == [] and len(batch.quarantined) == 1
    assert "cannot be stored as JSON" in batch.quarantined[0].reason


async def test_a_deeply_nested_event_is_delivered_and_quarantined_by_ingest(harness: Harness) -> None:
    deep = '{"id": "1755376889458-0", "method": "tokenRain", "object": {"x": ' + "[" * 998 + "]" * 998 + "}}"
    body = f'{{"events": [{json.dumps(STREAM[0])}, {deep}, {json.dumps(STREAM[1])}], "nextUrl": null}}'
    harness.sim.schedule(events.Fault.raw(200, body))
    page = await harness.client.fetch(harness.client.start_url(None))
    assert len(page.events) == 3 and page.finite_numbers and harness.failures == []
    batch = ingest.parse_page(
        page.events,
        broadcaster="alice_cam",
        received_at=page.received_at,
        next_event_id=page.next_event_id,
        finite_numbers=page.finite_numbers,
    )
    assert [event.event_id for event in batch.events] == [STREAM[0]["id"], STREAM[1]["id"]]
    assert [item.reason for item in batch.quarantined] == [
        f"nested deeper than {json_depth.MAX_DEPTH} levels"
    ]


def _reset_peak_rss() -> bool:
    """Reset the peak resident size to the current one (Linux 4.0+), so growth is measured from here."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/self/status")


async def test_a_gzip_bomb_never_inflates_in_memory(harness: Harness) -> None:
    http_faults.gzip_bomb()  # built (and cached) before the measurement: the server's cost, not the client's
    if not _reset_peak_rss():
        pytest.skip("the peak resident size cannot be reset here")
    before = _peak_rss_kib()
    harness.sim.schedule(*[events.Fault.hostile("gzip_bomb")] * 3)
    page = await harness.client.fetch(harness.client.start_url(None))
    grown_mib = (_peak_rss_kib() - before) / 1024
    assert page.events == STREAM[:100]
    assert harness.kinds() == ["bad_body"] * 3
    assert grown_mib < 60, f"the peak resident size grew by {grown_mib:.0f} MiB"


# -- token rotation -----------------------------------------------------------------------------------------


async def test_a_rotated_token_is_sent_at_once_and_the_old_one_never_again(
    captured_logs: io.StringIO,
) -> None:
    stream = traffic.generate(150, seed=32)
    old, new = TOKEN, "n3w-t0ken-after-rotation"
    current = [old]
    reloads: list[str] = []

    def reload() -> None:  # what the daemon does on a 401: read the token file again
        reloads.append(current[0])
        current[0] = new

    async with (
        events.EventsSimulator(token=old, events=stream, page_size=100) as sim,
        aiohttp.ClientSession() as session,
    ):
        failures: list[errors.ApiFailure] = []
        client = _client(
            session,
            sim,
            failures,
            [],
            runtime_state.RuntimeState(),
            token=lambda: current[0],
            on_auth_rejected=reload,
        )
        page = await client.fetch(client.start_url(None))
        assert page.next_url is not None and old in page.next_url.reveal(), "a nextUrl has the old token"
        sim.token = new  # rotated on the server; the daemon still reads the old token
        before = len(sim.requests)
        page = await client.fetch(page.next_url)
        assert page.events == stream[100:]
        assert reloads == [old] and [f.error_kind for f in failures] == ["auth_rejected"]
        after = [request.path_qs for request in sim.requests[before + 1 :]]
        assert after and all(f"/{new}/" in path and old not in path for path in after)
        current[0] = "an0ther-t0ken-rotated-quietly"  # rotated without a 401: the next request carries it
        sim.token = current[0]
        assert (await client.fetch(page.next_url or client.start_url(page.next_event_id))).events == []
        assert f"/{current[0]}/" in sim.requests[-1].path_qs
    text = captured_logs.getvalue()
    assert old not in text and new not in text and current[0] not in text
