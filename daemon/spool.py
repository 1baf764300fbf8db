"""A disk spool for database outages: fetched pages, in order, fsync'd, drained once the database is back.

One append-only file of JSON lines under `MHC_DATA_DIR/spool/`. The poller appends a page and fsyncs it
before it moves its in-memory position past that page; the writer commits spooled pages in order through
the same idempotent writer and empties the file once every page in it is committed. A crash while spooling
loses at most a line that was never fsync'd (so the position never moved past it and the page is fetched
again); a crash while draining drains again from the first line, and the writer's idempotency skips what
was already committed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon import errors, logs

log = logs.get_logger(__name__)

FILE_NAME = "pages.jsonl"


@dataclass(frozen=True)
class SpooledPage:
    events: list[Any]
    next_event_id: str | None
    received_at: dt.datetime


def _line(page: SpooledPage) -> bytes:
    record = {
        "events": page.events,
        "next_event_id": page.next_event_id,
        "received_at": page.received_at.isoformat(),
    }
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


class SpoolFull(errors.DaemonError):
    """The disk spool reached MHC_SPOOL_MAX_MB; polling waits until the database takes pages again."""


class Spool:
    """Not thread-safe: the poller and the writer share it on one event loop."""

    def __init__(self, directory: Path, *, max_bytes: int) -> None:
        self.path = directory / FILE_NAME
        self.max_bytes = max_bytes
        directory.mkdir(parents=True, exist_ok=True)
        self._read_offset = 0  # bytes of the file already committed by the writer in this process
        self._drop_torn_tail()

    @property
    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    @property
    def pending_bytes(self) -> int:
        """Bytes of spooled pages not yet committed (what `/metrics` and `/status` show)."""
        return self.size - self._read_offset

    def has_pages(self) -> bool:
        return self.pending_bytes > 0

    def append(self, page: SpooledPage) -> None:
        """Append one page durably; raises SpoolFull (and writes nothing) when the limit would be passed."""
        self.append_many([page])

    def append_many(self, pages: list[SpooledPage]) -> None:
        """Append pages in order, all or none, with one fsync; SpoolFull (nothing written) past the limit."""
        data = b"".join(_line(page) for page in pages)
        if self.size + len(data) > self.max_bytes:
            raise SpoolFull
        created = not self.path.exists()
        with self.path.open("ab") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if created:
            # A new file's name is durable only once its directory is: fsync it, or a power cut could
            # forget the whole file while the position already moved past its pages.
            directory = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)

    def last_position(self) -> str | None:
        """The read position after the newest spooled page (where polling resumes), or None when empty."""
        last = None
        for _, page in self._pages(0):
            last = page
        return last.next_event_id if last else None

    def next_page(self) -> tuple[int, SpooledPage] | None:
        """The oldest page not yet committed, with the offset to pass to `committed` afterwards."""
        for end, page in self._pages(self._read_offset):
            return end, page
        return None

    def committed(self, end_offset: int) -> None:
        """Mark everything up to `end_offset` committed; an empty remainder empties the file."""
        self._read_offset = end_offset
        if self._read_offset >= self.size:
            self.path.unlink(missing_ok=True)
            self._read_offset = 0

    def _pages(self, offset: int) -> Iterator[tuple[int, SpooledPage]]:
        try:
            handle = self.path.open("rb")
        except FileNotFoundError:
            return
        with handle:
            handle.seek(offset)
            position = offset
            for line in handle:
                position += len(line)
                if not line.endswith(b"\n"):
                    return  # a torn final line: never fsync'd, so its page is fetched again
                record = json.loads(line)
                yield (
                    position,
                    SpooledPage(
                        events=record["events"],
                        next_event_id=record["next_event_id"],
                        received_at=dt.datetime.fromisoformat(record["received_at"]),
                    ),
                )

    def _drop_torn_tail(self) -> None:
        """Cut a partial last line left by a crash mid-append, so later appends start on a line boundary."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        keep = data.rfind(b"\n") + 1
        if keep != len(data):
            log.warning("spool_torn_tail_dropped", bytes=len(data) - keep)
            with self.path.open("r+b") as handle:
                handle.truncate(keep)
                os.fsync(handle.fileno())
