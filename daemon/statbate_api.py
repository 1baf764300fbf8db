"""The Statbate Plus API client: member info (single and batch) and model info, for one site.

Names are sent lowercased (Statbate stores them so). The token, asked of its provider at every attempt,
travels only in the Authorization header and is registered as a secret, so no log line or failure row can
carry it. 429 (after Retry-After), 5xx, timeouts,
dropped connections and unreadable bodies are retried; 404, 401/403 and other 4xx are not.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

from daemon import api_http, config, errors

API = "statbate"
SITE = "chaturbate"
MAX_BATCH = 100  # the documented ceiling of names per batch call
DEFAULT_TIMEOUT = 30.0
DEFAULT_ATTEMPTS = 4
RETRY_ON: tuple[type[errors.ApiError], ...] = (errors.RateLimited, *api_http.TRANSIENT)


@dataclass(frozen=True)
class BatchItem:
    """One requested name of a batch call and what came back for it.

    `item` is the response's item exactly as sent (None when the answer had none for this name); `found` is
    False when the item carries an `error` or a null `did`.
    """

    requested: str
    item: dict[str, Any] | None

    @property
    def error(self) -> str | None:
        if self.item is None:
            return "no item in the answer"
        error = self.item.get("error")
        if error:
            return str(error)
        return None if self.item.get("did") is not None else "did is null"

    @property
    def found(self) -> bool:
        return self.error is None


class StatbateClient:
    """Statbate Plus over one shared aiohttp session."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        token: api_http.TokenProvider,
        on_failure: api_http.FailureRecorder,
        site: str = SITE,
        timeout: float = DEFAULT_TIMEOUT,
        max_attempts: int = DEFAULT_ATTEMPTS,
        max_body_bytes: int = config.DEFAULT_API_MAX_BODY_BYTES,
        sleep: api_http.Sleep = asyncio.sleep,
    ) -> None:
        api_http.current_token(token)
        self._session = session
        self._base = base_url.rstrip("/")
        self._token = token
        self._on_failure = on_failure
        self._site = site
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
    ) -> StatbateClient | None:
        """A client, or None when no Statbate token is set (the source is off). `token` gives the current
        token (by default the setting's value, fixed)."""
        fixed = settings.statbate_token.get_secret_value() if settings.statbate_token else ""
        provider = token or (lambda: fixed)
        if not provider():
            return None
        return cls(
            session,
            base_url=settings.statbate_base_url,
            token=provider,
            on_failure=on_failure,
            max_body_bytes=settings.api_max_body_bytes,
            **options,
        )

    def __repr__(self) -> str:
        return f"StatbateClient(base_url={self._base!r}, site={self._site!r})"

    async def member_info(self, name: str) -> dict[str, Any]:
        """The whole `/members/{site}/{name}/info` answer; `NotFound` on 404."""
        url = f"{self._base}/members/{self._site}/{quote(_name(name), safe='')}/info"
        body: dict[str, Any] = await self._call("GET", url, operation="member_info", check=_object_with_data)
        return body

    async def model_info(self, name: str) -> dict[str, Any]:
        """The whole `/model/{site}/{name}/info` answer; `NotFound` on 404 ("Model not found")."""
        url = f"{self._base}/model/{self._site}/{quote(_name(name), safe='')}/info"
        body: dict[str, Any] = await self._call("GET", url, operation="model_info", check=_object_with_data)
        return body

    async def member_info_batch(self, names: Sequence[str]) -> list[BatchItem]:
        """One POST for up to `MAX_BATCH` names; one `BatchItem` per requested name, in request order."""
        requested = list(dict.fromkeys(_name(name) for name in names))
        if not requested:
            return []
        if len(requested) > MAX_BATCH:
            raise ValueError(f"at most {MAX_BATCH} names per batch call, got {len(requested)}")
        url = f"{self._base}/members/{self._site}/info/batch"
        data: list[dict[str, Any]] = await self._call(
            "POST",
            url,
            operation="member_info_batch",
            json_body={"names": requested, "timezone": "UTC"},
            check=_data_list,
        )
        return match_batch(requested, data)

    async def _call(
        self, method: str, url: str, *, operation: str, check: Callable[[Any], Any], json_body: Any = None
    ) -> Any:
        async def attempt() -> Any:
            token = api_http.current_token(self._token)
            body = await api_http.request_json(
                self._session,
                method,
                url,
                api=API,
                timeout=self._timeout,
                max_body_bytes=self._max_body_bytes,
                headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
                params={"timezone": "UTC"} if method == "GET" else None,
                json_body=json_body,
            )
            return check(body)

        return await api_http.call(
            attempt,
            api=API,
            operation=operation,
            url=url,
            on_failure=self._on_failure,
            retry_on=RETRY_ON,
            max_attempts=self._max_attempts,
            sleep=self._sleep,
        )


def _name(name: str) -> str:
    return name.strip().lower()


def _object_with_data(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict) or not isinstance(body.get("data"), dict):
        raise errors.BadBody("the answer has no data object", status=200)
    return body


def _data_list(body: Any) -> list[dict[str, Any]]:
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise errors.BadBody("the batch answer has no data list", status=200)
    return data


def match_batch(requested: Sequence[str], data: Sequence[dict[str, Any]]) -> list[BatchItem]:
    """Pair each requested name with its item.

    Items are matched by name first. A renamed member can come back under its new name, so when the answer
    holds one item per name, the leftovers are paired by position (the answer keeps the request's order).
    """
    by_name = {str(item.get("name", "")).lower(): item for item in data}
    matched: dict[str, dict[str, Any]] = {name: by_name[name] for name in requested if name in by_name}
    if len(data) == len(requested):
        used = {id(item) for item in matched.values()}
        for name, item in zip(requested, data, strict=True):
            if name not in matched and id(item) not in used:
                matched[name] = item
    return [BatchItem(requested=name, item=matched.get(name)) for name in requested]
