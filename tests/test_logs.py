"""Log lines: JSON off a TTY with stable keys, stdlib loggers through the same chain, secrets masked."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web

from daemon import logs, metrics, runtime_state

SECRET = "registered-secret-0a9s8d7f"
URL_TOKEN = "urltoken5k4j3h2g1f"
STABLE_KEYS = {"timestamp", "level", "event", "logger"}


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """A non-TTY stream that the logs are configured to; the global logging set-up is restored after."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    out = io.StringIO()
    logs.configure("debug", "auto", stream=out)
    logs.register_secret(SECRET)
    try:
        yield out
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        structlog.reset_defaults()


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    text = stream.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def _assert_stable(line: dict[str, Any]) -> None:
    assert set(line) >= STABLE_KEYS, line
    moment = dt.datetime.fromisoformat(line["timestamp"])
    assert moment.utcoffset() == dt.timedelta(0)


def test_structlog_and_stdlib_lines_are_json_with_stable_keys(stream: io.StringIO) -> None:
    logs.get_logger("daemon.test").info("batch_stored", events=3, lag_s=0.25)
    logging.getLogger("asyncpg.pool").warning("connection %s lost", "#1")
    logging.getLogger("aiohttp.client").error("plain %d", 7)
    lines = _lines(stream)
    assert len(lines) == 3
    for line in lines:
        _assert_stable(line)
    assert lines[0] | {"timestamp": None} == {
        "event": "batch_stored",
        "level": "info",
        "logger": "daemon.test",
        "events": 3,
        "lag_s": 0.25,
        "timestamp": None,
    }
    assert (lines[1]["event"], lines[1]["level"], lines[1]["logger"]) == (
        "connection #1 lost",
        "warning",
        "asyncpg.pool",
    )
    assert lines[2]["logger"] == "aiohttp.client"


def test_secrets_are_masked_in_messages_values_and_tracebacks(stream: io.StringIO) -> None:
    url = f"https://eventsapi.chaturbate.com/events/alice/{URL_TOKEN}/?timeout=30"
    log = logs.get_logger("daemon.test")
    log.info(f"calling {url} with {SECRET}", url=url, nested={"token": SECRET, "urls": [url]})
    try:
        raise RuntimeError(f"request to {url} failed, bearer Bearer {SECRET}")
    except RuntimeError:
        log.exception("poll_failed")
        logging.getLogger("asyncpg").exception("stdlib saw %s", SECRET)
    text = stream.getvalue()
    assert SECRET not in text
    assert URL_TOKEN not in text
    lines = _lines(stream)
    assert lines[0]["url"] == "https://eventsapi.chaturbate.com/events/alice/***/?timeout=30"
    assert lines[0]["nested"]["token"] == "***"
    masked_url = "https://eventsapi.chaturbate.com/events/alice/***/"
    assert f"RuntimeError: request to {masked_url}" in lines[1]["exception"]
    assert lines[2]["event"] == "stdlib saw ***"
    assert "Traceback" in lines[2]["exception"]
    for line in lines:
        _assert_stable(line)


def test_console_format_masks_tracebacks_too() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    out = io.StringIO()
    logs.configure("info", "console", stream=out)
    logs.register_secret(SECRET)
    try:
        try:
            raise ValueError(f"token {SECRET} refused")
        except ValueError:
            logs.get_logger("daemon.test").exception("refused", key=SECRET)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        structlog.reset_defaults()
    text = out.getvalue()
    assert "ValueError: token *** refused" in text
    assert SECRET not in text
    assert not text.lstrip().startswith("{")


async def test_a_real_aiohttp_server_error_is_one_masked_json_line(stream: io.StringIO) -> None:
    async def broken(_request: web.Request) -> web.Response:
        raise RuntimeError(f"handler saw {SECRET}")

    app = web.Application()
    app.router.add_get("/", broken)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        async with aiohttp.ClientSession() as session, session.get(f"http://{host}:{port}/") as response:
            assert response.status == 500
    finally:
        await runner.cleanup()
    lines = _lines(stream)
    errors = [line for line in lines if line["logger"] == "aiohttp.server"]
    assert errors, lines
    assert "RuntimeError: handler saw ***" in errors[0]["exception"]
    assert SECRET not in stream.getvalue()
    for line in lines:
        _assert_stable(line)
    # Health probes would otherwise add one access line each.
    assert not [line for line in lines if line["logger"] == "aiohttp.access"]


def test_summary_line_reports_totals_and_the_minute_s_change(stream: io.StringIO) -> None:
    state = runtime_state.RuntimeState(events_stored=10, failures=1, live_session_id="s-7", database_up=True)
    state.poll_succeeded()
    summary = logs.SummaryLogger()
    rows_before = summary.fields(state)["rows_total"]
    metrics.ROWS.labels(table="interactions").inc(5)
    metrics.ROWS.labels(table="persons").inc(2)
    metrics.INGEST_LAG.set(0.75)
    state.events_stored = 14
    summary.log(state)
    (line,) = _lines(stream)
    _assert_stable(line)
    assert (line["event"], line["level"], line["logger"]) == ("summary", "info", "daemon.summary")
    assert (line["events"], line["events_total"]) == (4, 14)
    assert (line["rows"], line["rows_total"]) == (7, rows_before + 7)
    assert (line["failures"], line["failures_total"]) == (0, 1)
    assert line["lag_s"] == 0.75
    assert line["session"] == "s-7"
    assert line["last_poll_age_s"] >= 0


async def test_run_summary_logs_a_last_line_on_stop(stream: io.StringIO) -> None:
    state = runtime_state.RuntimeState(events_stored=2)
    stop = asyncio.Event()
    stop.set()
    await asyncio.wait_for(logs.run_summary(state, stop, interval=60), timeout=10)
    (line,) = _lines(stream)
    assert line["event"] == "summary"
    assert line["events_total"] == 2
