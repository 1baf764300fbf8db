"""The Chaturbate Stats API client: one flat JSON object about the broadcaster's own account.

The token rides in the query string (`?username=&token=`), asked of its provider at every attempt, so it is
registered as a secret and every URL that reaches a log line or a failure row goes through `logs.mask`. 5xx,
timeouts, dropped connections and unreadable bodies are retried a few times; 403 and 429 are not: the API
answers those to over-eager pollers for many minutes, so the scheduler waits at least five minutes instead.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from daemon import api_http, config, errors, logs

API = "cb_stats"
DEFAULT_TIMEOUT = 30.0
DEFAULT_ATTEMPTS = 3


class StatsClient:
    """The Stats API for one broadcaster over one shared aiohttp session."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        url: str,
        username: str,
        token: api_http.TokenProvider,
        on_failure: api_http.FailureRecorder,
        timeout: float = DEFAULT_TIMEOUT,
        max_attempts: int = DEFAULT_ATTEMPTS,
        max_body_bytes: int = config.DEFAULT_API_MAX_BODY_BYTES,
        sleep: api_http.Sleep = asyncio.sleep,
    ) -> None:
        api_http.current_token(token)
        self._session = session
        self._url = url
        self._username = username.strip().lower()
        self._token = token
        self._on_failure = on_failure
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._max_body_bytes = max_body_bytes
        self._sleep = sleep

    @classmethod
    def from_settings(
        cls,
        session: aiohttp.ClientSession,
        settings: config.Settings,
        on_failure: api_http.FailureRecorder,
        *,
        token: api_http.TokenProvider | None = None,
        **options: Any,
    ) -> StatsClient | None:
        """A client, or None when no Stats token or `MHC_CB_USERNAME` is set (the source is off). `token`
        gives the current token (by default the setting's value, fixed)."""
        fixed = settings.cb_stats_token.get_secret_value() if settings.cb_stats_token else ""
        provider = token or (lambda: fixed)
        if not provider() or not settings.cb_username:
            return None
        return cls(
            session,
            url=settings.cb_stats_url,
            username=settings.cb_username,
            token=provider,
            on_failure=on_failure,
            max_body_bytes=settings.api_max_body_bytes,
            **options,
        )

    def __repr__(self) -> str:
        return f"StatsClient(url={self._url!r}, username={self._username!r})"

    @property
    def username(self) -> str:
        return self._username

    @property
    def masked_url(self) -> str:
        return logs.mask(f"{self._url}?username={self._username}&token={logs.MASK}")

    async def fetch(self) -> dict[str, Any]:
        """The Stats API's object, exactly as sent."""

        async def attempt() -> dict[str, Any]:
            body = await api_http.request_json(
                self._session,
                "GET",
                self._url,
                api=API,
                timeout=self._timeout,
                max_body_bytes=self._max_body_bytes,
                headers={"Accept": "application/json"},
                params={"username": self._username, "token": api_http.current_token(self._token)},
            )
            if not isinstance(body, dict):
                raise errors.BadBody("the answer is not a JSON object", status=200)
            return body

        result: dict[str, Any] = await api_http.call(
            attempt,
            api=API,
            operation="stats",
            url=self.masked_url,
            on_failure=self._on_failure,
            retry_on=api_http.TRANSIENT,
            max_attempts=self._max_attempts,
            sleep=self._sleep,
        )
        return result
