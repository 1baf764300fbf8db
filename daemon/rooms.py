"""Rooms: which Events API feeds a daemon polls, and where their tokens are.

A room is a row of `rooms` (`mhc-daemon rooms add NAME`) plus a token file in `MHC_TOKENS_DIR` (by default
systemd's `$CREDENTIALS_DIRECTORY`): `NAME.events` holds the room's Events API token and `NAME.stats`, when
present, its Stats API token. Tokens never go into the database. A daemon polls the enabled rooms it holds an
Events API token for, and the single-room settings (`MHC_CB_USERNAME` with `MHC_CB_EVENTS_TOKEN` or its file)
as one more room, whatever the table says. The files are read again on SIGHUP and every minute.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from daemon import config, credentials, errors, logs

log = logs.get_logger(__name__)

# Chaturbate usernames: letters, digits and underscores (stored lowercased, like every name here).
_NAME = re.compile(r"[a-z0-9_]{1,255}")
EVENTS_SUFFIX = ".events"
STATS_SUFFIX = ".stats"


def room_name(value: str) -> str:
    """`value` as a room name (lowercased), or a `ConfigError` saying what a name may hold."""
    name = value.strip().lower()
    if not _NAME.fullmatch(name):
        raise errors.ConfigError(
            f"invalid room name {value[:60]!r}: a Chaturbate username (letters, digits, underscores)"
        )
    return name


def tokens_dir(settings: config.Settings) -> Path | None:
    """Where the rooms' token files are: `MHC_TOKENS_DIR`, else systemd's credentials directory, else none."""
    if settings.tokens_dir is not None:
        return settings.tokens_dir
    directory = os.environ.get(config.CREDENTIALS_DIRECTORY)
    return Path(directory) if directory else None


@dataclass(frozen=True)
class RoomTokens:
    events: str
    stats: str | None = None


class TokenFiles:
    """The rooms' tokens as last read from the directory; `tokens(name)` is the current value."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._tokens: dict[str, RoomTokens] = {}

    def rooms(self) -> set[str]:
        """The rooms holding an Events API token."""
        return set(self._tokens)

    def get(self, name: str) -> RoomTokens | None:
        return self._tokens.get(name)

    def scan(self) -> set[str]:
        """Read the directory again; the rooms whose tokens changed (added, rotated or gone). A file that
        cannot be read, or is empty, keeps the room's previous token (logged): a half-written rotation must
        not blank it. A room whose `NAME.events` file is removed is gone."""
        if self.directory is None:
            return set()
        try:
            names = sorted(path.name for path in self.directory.iterdir())
        except OSError as error:
            log.error("tokens_dir_unreadable", path=str(self.directory), error=error.strerror)
            return set()
        found: dict[str, RoomTokens] = {}
        for file_name in names:
            if not file_name.endswith(EVENTS_SUFFIX):
                continue
            stem = file_name.removesuffix(EVENTS_SUFFIX)
            try:
                name = room_name(stem)
                events = self._read(file_name)
                stats_file = f"{stem}{STATS_SUFFIX}"
                stats = self._read(stats_file) if (self.directory / stats_file).is_file() else None
            except errors.ConfigError as error:
                log.error("room_token_file_unreadable", file=file_name, error=str(error))
                if (kept := self._tokens.get(stem.lower())) is not None:
                    found[stem.lower()] = kept
                continue
            if events:
                found[name] = RoomTokens(events, stats or None)
            elif (kept := self._tokens.get(name)) is not None:  # a rotation half written: keep the old one
                log.error("room_token_file_empty", file=file_name)
                found[name] = kept
        changed = {
            name for name in found.keys() | self._tokens.keys() if found.get(name) != self._tokens.get(name)
        }
        self._tokens = found
        return changed

    def _read(self, file_name: str) -> str:
        path = (self.directory or Path()) / file_name
        try:
            value = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
            raise errors.ConfigError(f"cannot read {path}: {reason}") from None
        credentials.register(value)
        return value
