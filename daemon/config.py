"""Configuration: every setting is an `MHC_` environment variable (or a line in `.env`)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import platformdirs
import pydantic
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from daemon import errors

ENV_PREFIX = "MHC_"
# The secret settings that may also come from a file: `MHC_<NAME>_FILE`, or systemd's `LoadCredential=<name>`
# (a file named <name> in $CREDENTIALS_DIRECTORY). Files are read at start and again on SIGHUP.
TOKEN_SETTINGS = ("cb_events_token", "cb_stats_token", "statbate_token")
CREDENTIALS_DIRECTORY = "CREDENTIALS_DIRECTORY"
# A full 100-event Events API page measures 45-55 KB (the realistic simulator traffic: 52 KB at most over 400
# pages; the recorded testbed fixtures: 45-54 KB per 100 events), and snapshot answers are a few KB. 2 MiB is
# ~40 times that, and bounds what a hostile body can cost once decoded: 2 MiB of `[{},{},...]` is ~700,000
# objects, ~60 MB, within the 150 MB memory target (8 MiB would be ~235 MB).
DEFAULT_API_MAX_BODY_BYTES = 2 * 1024 * 1024


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("mhc-daemon", appauthor=False))


class Settings(BaseSettings):
    """All settings of the daemon. The README's configuration table mirrors this class."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # Storage
    database_url: SecretStr | None = None
    data_dir: Path = Field(default_factory=default_data_dir)
    migrate_on_start: bool = True
    # true when MHC_DATABASE_URL is a transaction-pooling proxy (PgBouncer, pool_mode = transaction)
    database_transaction_pooler: bool = False

    # Chaturbate Events API
    cb_username: str = ""
    cb_events_token: SecretStr | None = None
    cb_events_token_file: Path | None = None
    cb_events_base_url: str = "https://eventsapi.chaturbate.com"
    cb_events_timeout: int = Field(default=30, ge=0, le=90)
    # Many rooms: one `NAME.events` token file per room (and `NAME.stats`) here; default: systemd's
    # $CREDENTIALS_DIRECTORY when set
    tokens_dir: Path | None = None
    # Events API requests per minute of every room together (each room also keeps to the API's 2,000): by
    # default 60 rooms at the per-room maximum, a guard against a runaway; 2000 if the limit is per client
    cb_events_max_requests_per_minute: int = Field(default=120_000, ge=60, le=1_000_000)

    # Chaturbate Stats API
    cb_stats_url: str = "https://chaturbate.com/statsapi/"
    cb_stats_token: SecretStr | None = None
    cb_stats_token_file: Path | None = None

    # Statbate Plus API
    statbate_base_url: str = "https://plus.statbate.com/api"
    statbate_token: SecretStr | None = None
    statbate_token_file: Path | None = None
    statbate_requests_per_minute: int = Field(default=60, ge=1, le=119)
    member_snapshot_ttl_hours: float = Field(default=24.0, gt=0, le=24 * 365)

    # Stream sessions: a LIVE session this long without an event, while the Stats API says the room is
    # offline (twice this long without a Stats report), is ended at its last event
    session_stale_minutes: float = Field(default=30.0, gt=0, le=7 * 24 * 60)

    # Every API answer: its body at most this many bytes, on the wire and decompressed
    api_max_body_bytes: int = Field(default=DEFAULT_API_MAX_BODY_BYTES, ge=64 * 1024, le=64 * 1024 * 1024)

    # Many hosts: rooms are leased in PostgreSQL. This daemon's name among them (default: the host name),
    # how long a lease lasts on the database's clock, and how often it is renewed
    host_id: str = Field(default_factory=socket.gethostname, min_length=1, max_length=200)
    lease_seconds: float = Field(default=20.0, ge=2, le=600)
    lease_renew_seconds: float = Field(default=5.0, ge=0.5, le=120)

    # Operations
    health_host: str = "127.0.0.1"
    health_port: int = Field(default=8787, ge=0, le=65535)
    shutdown_timeout: float = Field(default=10.0, gt=0, le=300)
    spool_max_mb: int = Field(default=512, ge=1, le=1024 * 1024)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"

    @pydantic.model_validator(mode="after")
    def _renewed_within_the_lease(self) -> Settings:
        if self.lease_renew_seconds * 2 > self.lease_seconds:
            renew, lease = f"{ENV_PREFIX}LEASE_RENEW_SECONDS", f"{ENV_PREFIX}LEASE_SECONDS"
            raise ValueError(f"{renew} must be at most half of {lease}")
        return self

    @field_validator("host_id")
    @classmethod
    def _host_id(cls, value: str) -> str:
        if ":" in value or any(character.isspace() for character in value):
            raise ValueError("must not contain ':' or spaces (it is the first part of a lease holder's name)")
        return value

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        scheme = urlsplit(value.get_secret_value()).scheme
        if scheme not in ("postgresql", "postgres"):
            raise ValueError("must be a postgresql:// URL")
        return value

    @field_validator("cb_events_base_url", "cb_stats_url", "statbate_base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lowercase(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


def token_file(settings: Settings, name: str) -> Path | None:
    """Where the secret setting `name` is read from: `MHC_<NAME>_FILE`, else the systemd credential of that
    name, else nowhere (the variable itself, or unset)."""
    explicit: Path | None = getattr(settings, f"{name}_file")
    if explicit is not None:
        return explicit
    directory = os.environ.get(CREDENTIALS_DIRECTORY)
    if directory and (Path(directory) / name).is_file():
        return Path(directory) / name
    return None


def read_token(path: Path, name: str) -> str:
    """The token in `path`, whitespace stripped; a `ConfigError` names the setting, never the value."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise errors.ConfigError(
            f"invalid configuration: {ENV_PREFIX}{name.upper()}_FILE: cannot read {path}: {reason}"
        ) from None


def _with_token_files(settings: Settings) -> Settings:
    tokens: dict[str, SecretStr] = {}
    for name in TOKEN_SETTINGS:
        path = token_file(settings, name)
        if path is None:
            continue
        if getattr(settings, name) is not None and getattr(settings, f"{name}_file") is not None:
            variable = f"{ENV_PREFIX}{name.upper()}"
            raise errors.ConfigError(f"invalid configuration: set {variable} or {variable}_FILE, not both")
        tokens[name] = SecretStr(read_token(path, name))
    return settings.model_copy(update=tokens) if tokens else settings


def load(**overrides: object) -> Settings:
    """Read the settings (token files included), turning any validation error into one readable
    `ConfigError` line. Input values are never echoed: some of them are secrets.
    """
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]  # pydantic-settings accepts field overrides
    except pydantic.ValidationError as error:
        problems = []
        for item in error.errors():
            message = str(item["msg"]).removeprefix("Value error, ")
            # A rule across settings (no field of its own) names its variables itself.
            field = f"{ENV_PREFIX}{str(item['loc'][0]).upper()}: " if item["loc"] else ""
            problems.append(field + message)
        raise errors.ConfigError("invalid configuration: " + "; ".join(problems)) from None
    return _with_token_files(settings)
