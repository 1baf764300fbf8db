"""Our own exception tree. Each class's docstring is its default message."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from daemon import logs  # a cycle through logs -> waits -> errors, harmless: names are used at call time

EX_CONFIG = 78  # sysexits.h: configuration error; systemd's unit refuses to restart on it.
BODY_EXCERPT_CHARS = 200  # the longest body excerpt a failure row keeps


class DaemonError(Exception):
    """mhc-daemon failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(DaemonError):
    """The configuration is invalid."""


class StorageError(DaemonError):
    """The database refused or failed an operation."""


class DatabaseUnavailable(StorageError):
    """The database cannot be reached."""


class LeaseLost(DaemonError):
    """The rooms' leases moved to another holder: their write was rolled back and must not be retried."""

    def __init__(self, rooms: set[str]) -> None:
        super().__init__(f"lease lost for {len(rooms)} room(s): {', '.join(sorted(rooms))}")
        self.rooms = rooms


class MigrationError(DaemonError):
    """The database schema cannot be migrated."""


class ApiError(DaemonError):
    """An external API call failed.

    `kind` is the failure kind stored in `api_failures`; message and excerpt are masked on the way in.
    """

    kind = "http_4xx"

    def __init__(
        self,
        message: str | None = None,
        *,
        status: int | None = None,
        body_excerpt: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(logs.mask(message) if message else None)
        self.status = status
        self.body_excerpt = logs.mask(body_excerpt) if body_excerpt else None
        self.retry_after = retry_after


class NotFound(ApiError):
    """The API does not know this name."""

    kind = "not_found"


class AuthRejected(ApiError):
    """The API rejected the token (401/403)."""

    kind = "auth_rejected"


class RateLimited(ApiError):
    """The API asked us to slow down (429)."""

    kind = "rate_limited"


class ServerError(ApiError):
    """The API failed on its side (5xx, Cloudflare 52x)."""

    kind = "http_5xx"


class RequestTimeout(ApiError):
    """The API did not answer in time."""

    kind = "timeout"


class ConnectionFailed(ApiError):
    """The connection to the API failed or was dropped."""

    kind = "connection"


class BadBody(ApiError):
    """The API answered with a body that is not the JSON we expect."""

    kind = "bad_body"


class ClientRejected(ApiError):
    """The API refused the request (another 4xx)."""

    kind = "http_4xx"


@dataclass(frozen=True)
class ApiFailure:
    """One failed call of an external API, as `api_failures` keeps it. `url` and `body_excerpt` must already
    be masked."""

    api: str  # cb_events | cb_stats | statbate
    operation: str  # e.g. poll, member_info, member_info_batch, model_info, stats
    url: str
    error_kind: str  # e.g. http_5xx, rate_limited, timeout, connection, bad_body, auth_rejected, not_found
    http_status: int | None = None
    body_excerpt: str | None = None
    attempt: int = 1
    occurred_at: dt.datetime | None = None
