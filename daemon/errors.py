"""Our own exception tree. Each class's docstring is its default message."""

from __future__ import annotations

EX_CONFIG = 78  # sysexits.h: configuration error; systemd's unit refuses to restart on it.


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


class MigrationError(DaemonError):
    """The database schema cannot be migrated."""


class ApiError(DaemonError):
    """An external API call failed."""
