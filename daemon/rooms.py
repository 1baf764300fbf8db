"""Rooms: which Events API feeds a daemon polls, and where their tokens are.

A room is a row of `rooms` (`mhc-daemon rooms add NAME`) plus a token file in `MHC_TOKENS_DIR` (by default
systemd's `$CREDENTIALS_DIRECTORY`): `NAME.events` holds the room's Events API token and `NAME.stats`, when
present, its Stats API token. Tokens never go into the database. A daemon polls the enabled rooms it holds an
Events API token for, and the single-room settings (`MHC_CB_USERNAME` with `MHC_CB_EVENTS_TOKEN` or its file)
as one more room, whatever the table says. The files are read again on SIGHUP and every minute.
"""

from __future__ import annotations

import json
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
KNOWN_ROOMS_FILE = "rooms.json"  # in MHC_DATA_DIR: the enabled rooms as last read from the database


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


def load_known(data_dir: Path) -> set[str]:
    """The rooms this host last held the lease of (empty when never, or unreadable): a daemon that starts
    while PostgreSQL is away polls them into their spools instead of polling nothing (or every room of the
    cluster)."""
    path = data_dir / KNOWN_ROOMS_FILE
    try:
        names = json.loads(path.read_text(encoding="utf-8"))["rooms"]
        return {room_name(name) for name in names}
    except FileNotFoundError:
        return set()
    except (OSError, ValueError, KeyError, TypeError, errors.ConfigError) as error:
        log.warning("known_rooms_unreadable", path=str(path), error=type(error).__name__)
        return set()


def save_known(data_dir: Path, names: set[str]) -> None:
    """Keep `names` for `load_known` (mode 0600, replaced whole). A disk error is logged: the table is the
    truth, this file only bridges a start without the database."""
    path = data_dir / KNOWN_ROOMS_FILE
    temporary = path.with_name(path.name + ".tmp")
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(descriptor, 0o600)
            os.write(descriptor, json.dumps({"rooms": sorted(names)}).encode())
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
    except OSError as error:
        log.warning("known_rooms_not_written", path=str(path), error=error.strerror)
