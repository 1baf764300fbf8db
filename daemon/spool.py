"""A disk spool for database outages: fetched pages, in order, fsync'd, drained once the database is back.

One append-only file of lines under `MHC_DATA_DIR/spool/`. The poller appends a page and fsyncs it
before it moves its in-memory position past that page; the writer commits spooled pages in order through
the same idempotent writer and empties the file once every page in it is committed. A crash while spooling
loses at most a line that was never fsync'd (so the position never moved past it and the page is fetched
again); a crash while draining drains again from the first line, and the writer's idempotency skips what
was already committed.

Format 2, one record a line: `2 <payload bytes> <crc32 of the payload, 8 hex> <JSON payload>\\n`. The
payload is `{"events":…,"next_event_id":…,"received_at":…}` (plus `"asked":{"event_id":…,"waited_seconds":…,
"continuation":…}` when known) in ASCII JSON, which never holds a raw
newline, so one damaged record is one damaged line and the next line starts the next record. Format 1 (the
bare JSON payload as a line, without header) is still read; appends always write format 2.

A damaged record (bad header, wrong length, checksum mismatch, undecodable JSON, missing fields) never
raises: the drain copies its line to `damaged-<UTC time>-<offset>.record` beside the spool (fsync'd file and
directory), then overwrites the line in place with spaces (a tombstone of the same length, so no other
offset moves), fsyncs, and goes on with the next line. Readers skip tombstones silently, so the damaged bytes
are neither drained nor reported again, in this process or after a restart. A crash between the copy and
the tombstone sets the record aside a second time at the next start (a second copy, reported again): never
a loss. `take_damaged` hands the records set aside to the supervisor for `api_failures`.

Nothing reads the whole file: appends write, the drain reads forward one line at a time, and the torn-tail
cut and `last_position` read backwards from the end in chunks, so memory stays flat whatever the size.
Opening a 300 MB spool used to raise the peak RSS by 300 MB (the torn-tail cut read it whole); now
appending 300 MB of 100-event pages, reopening and draining them keeps it at 29 MB, and opening 1 GB adds
0.3 MB (tests/test_spool.py, chaos). The directory is 0700 and its files 0600 whatever the umask: they
hold the room's chat.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import stat
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from daemon import errors, ingest, logs

log = logs.get_logger(__name__)

FILE_NAME = "pages.jsonl"
FORMAT = 2
DIRECTORY_MODE = 0o700
FILE_MODE = 0o600
CHUNK_BYTES = 64 * 1024  # reading backwards; a page of 100 realistic events is some 45 KB
_HEADER = re.compile(rb"(\d{1,3}) (\d{1,12}) ([0-9a-f]{8}) ")


@dataclass(frozen=True)
class SpooledPage:
    events: list[Any]
    next_event_id: str | None
    received_at: dt.datetime
    # How the page was asked for (`ingest.Asked`), so that a gap it leaves is found again when it drains.
    asked: ingest.Asked | None = None


@dataclass(frozen=True)
class DamagedRecord:
    """A spooled record that could not be read, set aside for an operator to look at."""

    path: Path | None  # the copy of its bytes; None when the copy could not be written (then it stays)
    offset: int  # where its line started in the spool file
    length: int  # bytes, newline included
    reason: str  # never the content: the chat in it is not for logs
    found_at: dt.datetime


class SpoolFull(errors.DaemonError):
    """The disk spool reached MHC_SPOOL_MAX_MB; polling waits until the database takes pages again."""


class _Unreadable(Exception):
    """A damaged record; the message is the reason (it never quotes the record)."""


def encode(page: SpooledPage) -> bytes:
    """One page as a format-2 line."""
    record: dict[str, Any] = {
        "events": page.events,
        "next_event_id": page.next_event_id,
        "received_at": page.received_at.isoformat(),
    }
    if page.asked is not None:
        asked = page.asked
        record["asked"] = {
            "event_id": asked.event_id,
            "waited_seconds": asked.waited_seconds,
            "continuation": asked.continuation,
        }
    payload = json.dumps(record, separators=(",", ":")).encode()
    return b"%d %d %08x %s\n" % (FORMAT, len(payload), zlib.crc32(payload), payload)


def decode(line: bytes) -> SpooledPage | None:
    """The page in a format-1 or format-2 line; None for a tombstone; `_Unreadable` when damaged."""
    body = line.removesuffix(b"\n")
    if not body.strip(b" "):
        return None
    if body.startswith(b"{"):
        return _page(body)
    return _page(_checked_payload(body))


def _checked_payload(body: bytes) -> bytes:
    header = _HEADER.match(body)
    if header is None:
        raise _Unreadable("bad header")
    version, length, checksum = header.groups()
    if int(version) != FORMAT:
        raise _Unreadable(f"unknown format version {int(version)}")
    payload = body[header.end() :]
    if int(length) != len(payload):
        raise _Unreadable(f"length mismatch: header {int(length)}, payload {len(payload)}")
    if int(checksum, 16) != zlib.crc32(payload):
        raise _Unreadable("checksum mismatch")
    return payload


def _page(payload: bytes) -> SpooledPage:
    try:
        record = json.loads(payload)
    except (ValueError, RecursionError):
        raise _Unreadable("undecodable JSON") from None
    try:
        events, next_event_id = record["events"], record["next_event_id"]
        received_at = dt.datetime.fromisoformat(record["received_at"])
    except (KeyError, TypeError, ValueError):
        raise _Unreadable("missing or malformed fields") from None
    if not isinstance(events, list) or not isinstance(next_event_id, str | None):
        raise _Unreadable("fields of the wrong type")
    return SpooledPage(
        events=events, next_event_id=next_event_id, received_at=received_at, asked=_asked(record.get("asked"))
    )


def _asked(value: Any) -> ingest.Asked | None:
    """How a spooled page was asked for; None when the record does not say (or says it wrongly): a gap is
    then not looked for, as for a record of an older version."""
    if not isinstance(value, dict):
        return None
    event_id, waited, continuation = (
        value.get("event_id"),
        value.get("waited_seconds"),
        value.get("continuation"),
    )
    if not isinstance(event_id, str | None) or not isinstance(continuation, bool):
        return None
    if not isinstance(waited, int | float) or isinstance(waited, bool):
        return None
    return ingest.Asked(event_id, float(waited), continuation)


def _newlines_backwards(handle: BinaryIO, end: int) -> Iterator[int]:
    """Offsets of the newlines before `end`, newest first, reading `CHUNK_BYTES` at a time."""
    while end > 0:
        start = max(0, end - CHUNK_BYTES)
        handle.seek(start)
        chunk = handle.read(end - start)
        cut = chunk.rfind(b"\n")
        while cut >= 0:
            yield start + cut
            cut = chunk.rfind(b"\n", 0, cut)
        end = start


def _lines_backwards(handle: BinaryIO, end: int) -> Iterator[tuple[int, bytes]]:
    """(offset, line) of each line before `end`, newest first; one line in memory at a time."""
    line_end = end
    for newline in _newlines_backwards(handle, end - 1):  # the newline ending the last line ends no span
        line_start = newline + 1
        handle.seek(line_start)
        line = handle.read(line_end - line_start)
        yield line_start, line
        line_end = line_start
    if line_end > 0:
        handle.seek(0)
        yield 0, handle.read(line_end)


def _write_new_file(path: Path, data: bytes) -> None:
    """Create `path` (0600, never over an existing file) holding `data`; file and directory fsync'd."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        os.fchmod(descriptor, FILE_MODE)  # the umask may have taken more than the group's and others' bits
        _write_all(descriptor, data)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    _fsync_directory(path.parent)


def _write_all(descriptor: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(descriptor, view) :]


def _fsync_directory(directory: Path) -> None:
    """A new file's name is durable only once its directory is: a power cut could forget the file."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _restrict(path: Path, mode: int) -> None:
    """Narrow an existing file's or directory's mode (one made before modes were set, or by hand)."""
    try:
        if stat.S_IMODE(path.stat().st_mode) != mode:
            path.chmod(mode)
    except FileNotFoundError:
        pass


class Spool:
    """Not thread-safe: the poller and the writer share it on one event loop."""

    def __init__(self, directory: Path, *, max_bytes: int) -> None:
        self.path = directory / FILE_NAME
        self.max_bytes = max_bytes
        directory.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
        _restrict(directory, DIRECTORY_MODE)
        _restrict(self.path, FILE_MODE)
        self._read_offset = 0  # bytes of the file already committed (or skipped) in this process
        self.damaged_count = 0  # records set aside by this process
        self._damaged: list[DamagedRecord] = []  # set aside and not yet taken by the supervisor
        self._drop_torn_tail()
        # Steps over tombstones and damaged records at the front (an empty remainder empties the file), so
        # that has_pages() means a page to drain and last_position() has one to find.
        self.next_page()

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
        data = b"".join(encode(page) for page in pages)
        size = self.size
        if size + len(data) > self.max_bytes:
            raise SpoolFull
        created = not self.path.exists()
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
        try:
            if created:
                os.fchmod(descriptor, FILE_MODE)
            try:
                _write_all(descriptor, data)
                os.fsync(descriptor)
            except OSError:
                os.ftruncate(descriptor, size)  # a disk full mid-write leaves no partial line behind
                raise
        finally:
            os.close(descriptor)
        if created:
            _fsync_directory(self.path.parent)

    def last_position(self) -> str | None:
        """The read position after the newest spooled page (where polling resumes), or None when empty.

        Reads backwards from the end: the newest readable page is normally the last line. Damaged lines
        are skipped here and set aside when the drain reaches them.
        """
        try:
            handle = self.path.open("rb")
        except FileNotFoundError:
            return None
        with handle:
            for _, line in _lines_backwards(handle, os.fstat(handle.fileno()).st_size):
                try:
                    page = decode(line)
                except _Unreadable:
                    continue
                if page is not None:
                    return page.next_event_id
        return None

    def next_page(self) -> tuple[int, SpooledPage] | None:
        """The oldest page not yet committed, with the offset to pass to `committed` afterwards.

        Tombstones and damaged records before it are stepped over (the damaged ones set aside): they have
        nothing to commit.
        """
        try:
            handle = self.path.open("rb")
        except FileNotFoundError:
            return None
        with handle:
            handle.seek(self._read_offset)
            for line in handle:
                start = self._read_offset
                if not line.endswith(b"\n"):
                    break  # a torn last line (cut at the next start); its page was never spooled
                page = self._readable(start, line)
                if page is not None:
                    return start + len(line), page
                self._read_offset = start + len(line)
        self.committed(self._read_offset)
        return None

    def committed(self, end_offset: int) -> None:
        """Mark everything up to `end_offset` committed; an empty remainder empties the file."""
        self._read_offset = end_offset
        if self._read_offset >= self.size:
            self.path.unlink(missing_ok=True)
            self._read_offset = 0

    def discard(self) -> None:
        """Drop every page not yet committed: the room's lease moved to another host, which reads them from
        the API after the committed cursor."""
        self.committed(self.size)

    def take_damaged(self) -> list[DamagedRecord]:
        """The records set aside since the last call (each is handed out once), oldest first."""
        taken, self._damaged = self._damaged, []
        return taken

    def _readable(self, start: int, line: bytes) -> SpooledPage | None:
        """The page in `line`, or None for a tombstone or a damaged record (which is then set aside)."""
        try:
            return decode(line)
        except _Unreadable as damage:
            self._set_aside(start, line, str(damage))
            return None

    def _set_aside(self, start: int, line: bytes, reason: str) -> None:
        """Copy a damaged line to a file of its own, durably, then overwrite it with a tombstone."""
        found_at = dt.datetime.now(dt.UTC)
        aside = self.path.parent / f"damaged-{found_at:%Y%m%dT%H%M%S%fZ}-{start}.record"
        copy: Path | None = aside
        try:
            _write_new_file(aside, line)
        except OSError as error:
            # Skipped in this process only: without a copy the line stays, and the next start tries again.
            log.error(
                "spool_damaged_record_not_set_aside",
                offset=start,
                bytes=len(line),
                reason=reason,
                error=str(error),
            )
            copy = None
        else:
            self._overwrite(start, b" " * (len(line) - 1) + b"\n")
            log.warning(
                "spool_damaged_record_set_aside",
                path=str(aside),
                offset=start,
                bytes=len(line),
                reason=reason,
            )
        self.damaged_count += 1
        self._damaged.append(DamagedRecord(copy, start, len(line), reason, found_at))

    def _overwrite(self, start: int, data: bytes) -> None:
        with self.path.open("r+b") as handle:
            handle.seek(start)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    def _drop_torn_tail(self) -> None:
        """Cut a partial last line left by a crash mid-append, so later appends start on a line boundary."""
        try:
            handle = self.path.open("r+b")
        except FileNotFoundError:
            return
        with handle:
            size = os.fstat(handle.fileno()).st_size
            keep = next(_newlines_backwards(handle, size), -1) + 1
            if keep != size:
                log.warning("spool_torn_tail_dropped", bytes=size - keep)
                handle.truncate(keep)
                os.fsync(handle.fileno())
