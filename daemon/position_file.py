"""The last committed read position, kept on local disk too, so `run` can poll while PostgreSQL is down.

At start the committed cursor lives in the database. When the database cannot be reached and the spool is
empty, this file is the only other record of where to resume. It is written after commits (at most once a
second, and once more when the writer stops), never before, so it is never ahead of the database: at worst it
is a second behind, and the events re-read from there are skipped as duplicates. No fsync: a file lost to a
power cut only means waiting for the database, as on a first start.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from daemon import logs

log = logs.get_logger(__name__)

FILE_NAME = "position.json"
SAVE_EVERY_SECONDS = 1.0


@dataclass(frozen=True)
class SavedPosition:
    broadcaster: str
    last_event_id: str | None


class PositionFile:
    """`MHC_DATA_DIR/position.json`: the committed position of one broadcaster's feed (mode 0600)."""

    def __init__(self, directory: Path, broadcaster: str) -> None:
        self.path = directory / FILE_NAME
        self._broadcaster = broadcaster
        self._pending: str | None = None
        self._saved_at = 0.0
        self._directory_made = False

    def load(self) -> SavedPosition | None:
        """The saved position of this broadcaster, or None (no file, another room's, or unreadable)."""
        try:
            record = json.loads(self.path.read_text(encoding="utf-8"))
            saved = SavedPosition(str(record["broadcaster"]), record["last_event_id"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("position_file_unreadable", path=str(self.path), error=type(error).__name__)
            return None
        if saved.broadcaster != self._broadcaster or not isinstance(saved.last_event_id, str | None):
            return None
        return saved

    def committed(self, last_event_id: str | None) -> None:
        """Note a committed position (None: the commit named none, keep the previous); written at most once a
        second."""
        if last_event_id is None:
            return
        self._pending = last_event_id
        if time.monotonic() - self._saved_at >= SAVE_EVERY_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write the newest noted position, if any is not written yet. A disk error is logged, not raised:
        the database holds the real cursor."""
        if self._pending is None:
            return
        record = json.dumps({"broadcaster": self._broadcaster, "last_event_id": self._pending})
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            if not self._directory_made:  # once: with hundreds of rooms every saved syscall counts
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                self._directory_made = True
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.fchmod(descriptor, 0o600)
                os.write(descriptor, record.encode())
            finally:
                os.close(descriptor)
            os.replace(temporary, self.path)
        except OSError as error:
            log.warning("position_file_not_written", path=str(self.path), error=error.strerror)
            return
        self._pending = None
        self._saved_at = time.monotonic()
