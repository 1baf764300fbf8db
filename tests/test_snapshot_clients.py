"""The Statbate and Stats API clients against the simulators: shapes, every failure kind, retries, masking."""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest

from daemon import api_http, errors, json_depth, logs, statbate_api, stats_api
from daemon.simulator import http_faults
from daemon.simulator import statbate as statbate_sim
from daemon.simulator import stats as stats_sim

STATBATE_TOKEN = "7|statbateSecretTokenValue0123456789abcdefghijklmn"
STATS_TOKEN = "StatsTokenSecret12345678"


class Failures:
    def __init__(self) -> None:
        self.rows: list[errors.ApiFailure] = []
        self.waits: list[float] = []

    async def record(self, failure: errors.ApiFailure) -> None:
        self.rows.append(failure)

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)

    @property
    def kinds(self) -> list[str]:
        return [row.error_kind for row in self.rows]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as opened:
        yield opened


@pytest.fixture
def log_text() -> io.StringIO:
    stream = io.StringIO()
    logs.configure("debug", "json", stream=stream)
    return stream


def _statbate(
    session: aiohttp.ClientSession,
    sim: statbate_sim.StatbateSimulator,
    failures: Failures,
    token: api_http.TokenProvider | None = None,
    **options: float,
) -> statbate_api.StatbateClient:
    return statbate_api.StatbateClient(
        session,
        base_url=sim.base_url,
        token=token or (lambda: sim.token),
        on_failure=failures.record,
        sleep=failures.sleep,
        timeout=options.get("timeout", 5.0),
        max_attempts=int(options.get("max_attempts", 4)),
    )


def _stats(
    session: aiohttp.ClientSession,
    sim: stats_sim.StatsSimulator,
    failures: Failures,
    token: api_http.TokenProvider | None = None,
) -> stats_api.StatsClient:
    return stats_api.StatsClient(
        session,
        url=sim.base_url,
        username=sim.username,
        token=token or (lambda: sim.token),
        on_failure=failures.record,
        sleep=failures.sleep,
    )


async def test_member_model_and_batch_shapes(session: aiohttp.ClientSession) -> None:
    failures = Failures()
    async with statbate_sim.running(token=STATBATE_TOKEN, seed=3) as sim:
        alice = sim.add_member("Alice", did=11)
        sim.add_member("bob")
        model = sim.add_model("hudson_cage", rid=5001)
        client = _statbate(session, sim, failures)

        answer = await client.member_info("ALICE")
        assert answer["data"] == alice and answer["meta"]["site"] == "chaturbate"
        assert (await client.model_info("hudson_cage"))["data"] == model

        items = await client.member_info_batch(["bob", "Alice", "ghost"])
        assert [(item.requested, item.found) for item in items] == [
            ("bob", True),
            ("alice", True),
            ("ghost", False),
        ]
        assert items[1].item == {**alice, "error": None}
        assert items[2].item is not None and items[2].item["did"] is None
        with pytest.raises(ValueError, match="at most 100"):
            await client.member_info_batch([f"user{n}" for n in range(101)])

        (request,) = [r for r in sim.recorder.requests if r.method == "POST"]
        assert request.names == ("bob", "alice", "ghost")
    assert failures.rows == []


async def test_every_statbate_failure_kind(session: aiohttp.ClientSession, log_text: io.StringIO) -> None:
    failures = Failures()
    async with statbate_sim.running(token=STATBATE_TOKEN) as sim:
        sim.add_member("alice")
        client = _statbate(session, sim, failures, timeout=0.3)

        # Transient kinds are retried until the answer comes; 429 waits its Retry-After.
        for kind in ("http_5xx", "rate_limited", "hang"):
            sim.faults.add(kind, retry_after=7 if kind == "rate_limited" else None)
        assert (await client.member_info("alice"))["data"]["name"] == "alice"
        assert failures.kinds == ["http_5xx", "rate_limited", "timeout"]
        assert 7 in failures.waits
        sim.faults.add("drop")
        sim.faults.add("truncated")
        assert (await client.member_info("alice"))["data"]["name"] == "alice"
        assert failures.kinds[-2:] == ["connection", "bad_body"]

        # Kinds that are not retried: one attempt, one row.
        for kind, error in (
            ("not_found", errors.NotFound),
            ("unauthorized", errors.AuthRejected),
            ("forbidden", errors.AuthRejected),
            ("http_4xx", errors.ClientRejected),
        ):
            sim.faults.add(kind)
            before = len(sim.recorder.requests)
            with pytest.raises(error):
                await client.member_info("alice")
            assert len(sim.recorder.requests) == before + 1
        with pytest.raises(errors.NotFound):
            await client.model_info("nobody")  # a real 404 {"error": "Model not found"}

        # Out of attempts: the last transient error surfaces.
        sim.faults.add("http_5xx", times=4, status=502)
        with pytest.raises(errors.ServerError):
            await client.member_info("alice")

    assert set(failures.kinds) == {
        "http_5xx",
        "rate_limited",
        "timeout",
        "connection",
        "bad_body",
        "not_found",
        "auth_rejected",
        "http_4xx",
    }
    assert [row.attempt for row in failures.rows[-4:]] == [1, 2, 3, 4]
    assert all(row.api == "statbate" and "/api/" in row.url for row in failures.rows)
    dump = repr(failures.rows) + log_text.getvalue() + repr(client)
    assert STATBATE_TOKEN not in dump and "statbateSecretToken" not in dump


async def test_wrong_statbate_token_is_auth_rejected(session: aiohttp.ClientSession) -> None:
    failures = Failures()
    async with statbate_sim.running(token=STATBATE_TOKEN) as sim:
        sim.add_member("alice")
        client = statbate_api.StatbateClient(
            session,
            base_url=sim.base_url,
            token=lambda: "wrong-token",
            on_failure=failures.record,
            sleep=failures.sleep,
        )
        with pytest.raises(errors.AuthRejected):
            await client.member_info_batch(["alice"])
    assert [(row.error_kind, row.http_status) for row in failures.rows] == [("auth_rejected", 401)]


async def test_stats_client_shapes_and_failures(
    session: aiohttp.ClientSession, log_text: io.StringIO
) -> None:
    failures = Failures()
    async with stats_sim.running(username="hudson_cage", token=STATS_TOKEN, online=False) as sim:
        client = stats_api.StatsClient(
            session,
            url=sim.base_url,
            username="Hudson_Cage",
            token=lambda: STATS_TOKEN,
            on_failure=failures.record,
            sleep=failures.sleep,
            timeout=0.3,
        )
        answer = await client.fetch()
        assert answer["username"] == "hudson_cage" and answer["time_online"] == -1
        sim.faults.add("http_5xx")
        sim.faults.add("hang")
        assert "token_balance" in await client.fetch()
        for kind in ("forbidden", "rate_limited"):
            sim.faults.add(kind, retry_after=600)
            before = len(sim.recorder.requests)
            with pytest.raises((errors.AuthRejected, errors.RateLimited)):
                await client.fetch()
            assert len(sim.recorder.requests) == before + 1, f"{kind} is not retried inside the call"
        (request,) = sim.recorder.requests[:1]
        assert request.query == {"username": "hudson_cage", "token": STATS_TOKEN}

    assert failures.kinds == ["http_5xx", "timeout", "auth_rejected", "rate_limited"]
    assert all(row.url.endswith("?username=hudson_cage&token=***") for row in failures.rows)
    logging.getLogger("aiohttp.client").warning("probe %s", f"{sim.base_url}?token={STATS_TOKEN}")
    dump = repr(failures.rows) + log_text.getvalue() + repr(client)
    assert STATS_TOKEN not in dump
    assert "api_call_failed" in log_text.getvalue()


def test_off_when_no_token() -> None:
    from daemon import config

    settings = config.load(statbate_token=None, cb_stats_token=None, cb_username="hudson_cage")
    assert statbate_api.StatbateClient.from_settings(None, settings, Failures().record) is None  # type: ignore[arg-type]
    assert stats_api.StatsClient.from_settings(None, settings, Failures().record) is None  # type: ignore[arg-type]


# The failure kind of each hostile answer. A redirect is neither followed nor retried: a 302 is a refused
# request like any other 3xx/4xx; every other kind is retried, and the retry gets the real answer.
HOSTILE_KINDS = {
    "nesting_bomb": "bad_body",
    "gzip_bomb": "bad_body",
    "over_cap": "bad_body",
    "invalid_utf8": "bad_body",
    "unknown_encoding": "bad_body",
    "truncated_http": "connection",
    "malformed_http": "connection",
    "redirect_loop": "http_4xx",
}


def test_every_hostile_answer_is_covered() -> None:
    assert set(HOSTILE_KINDS) == set(http_faults.HOSTILE)


@pytest.mark.parametrize("kind", sorted(HOSTILE_KINDS))
async def test_hostile_answers_are_our_errors(session: aiohttp.ClientSession, kind: str) -> None:
    failures = Failures()
    async with (
        statbate_sim.running(token=STATBATE_TOKEN) as statbate,
        stats_sim.running(token=STATS_TOKEN) as stats,
    ):
        statbate.add_member("alice")
        statbate_client = _statbate(session, statbate, failures)
        stats_client = _stats(session, stats, failures)
        calls = {
            "member_info": lambda: statbate_client.member_info("alice"),
            "member_info_batch": lambda: statbate_client.member_info_batch(["alice"]),
            "stats": stats_client.fetch,
        }
        for operation, call in calls.items():
            (statbate if operation != "stats" else stats).faults.add(kind)
            try:
                answer = await call()
            except errors.ApiError as error:
                assert kind == "redirect_loop" and isinstance(error, errors.ClientRejected)
            else:
                assert answer, "the retry after the hostile answer is the real one"
            assert failures.rows[-1].operation == operation
    assert [(row.error_kind, row.attempt) for row in failures.rows] == [(HOSTILE_KINDS[kind], 1)] * 3
    assert STATBATE_TOKEN not in repr(failures.rows) and STATS_TOKEN not in repr(failures.rows)


async def test_absurd_integers_are_values(session: aiohttp.ClientSession) -> None:
    failures = Failures()
    absurd = int("9" * http_faults.ABSURD_DIGITS)
    async with (
        statbate_sim.running(token=STATBATE_TOKEN) as statbate,
        stats_sim.running(token=STATS_TOKEN) as stats,
    ):
        statbate.add_member("alice")
        statbate.add_model("hudson_cage")
        client = _statbate(session, statbate, failures)
        statbate.faults.add("absurd_integers", times=2)
        assert (await client.member_info("alice"))["data"]["did"] == absurd
        assert (await client.model_info("hudson_cage"))["data"]["rid"] == absurd
        stats.faults.add("absurd_integers")
        assert (await _stats(session, stats, failures).fetch())["token_balance"] == absurd
    assert failures.rows == []


async def test_a_body_nested_past_the_limit_is_a_bad_body(session: aiohttp.ClientSession) -> None:
    failures = Failures()
    deep: list[object] = []
    for _ in range(json_depth.MAX_DEPTH):
        deep = [deep]  # with the answer's envelope, data and the member: past the limit
    async with statbate_sim.running(token=STATBATE_TOKEN) as sim:
        sim.add_member("alice", notes=deep)
        client = _statbate(session, sim, failures)
        with pytest.raises(errors.BadBody, match=f"deeper than {json_depth.MAX_DEPTH} levels"):
            await client.member_info("alice")
    assert failures.kinds == ["bad_body"] * 4


async def test_each_attempt_sends_the_current_token(session: aiohttp.ClientSession) -> None:
    failures = Failures()
    current = ["7|first-statbate-token", "first-stats-token"]
    async with (
        statbate_sim.running(token=current[0]) as statbate,
        stats_sim.running(token=current[1]) as stats,
    ):
        statbate.add_member("alice")
        statbate_client = _statbate(session, statbate, failures, token=lambda: current[0])
        stats_client = _stats(session, stats, failures, token=lambda: current[1])
        await statbate_client.member_info("alice")
        await stats_client.fetch()
        statbate.token = current[0] = "7|second-statbate-token"  # rotated: the clients are not rebuilt
        stats.token = current[1] = "second-stats-token"
        await statbate_client.member_info("alice")
        await stats_client.fetch()
        assert stats.recorder.requests[-1].query["token"] == "second-stats-token"
    assert failures.rows == []
    assert "second-stats-token" not in stats_client.masked_url
