"""The disk spool: order, durability, torn tails, the size bound, draining, the record format, damaged
records, file modes, and memory that does not grow with the spool."""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import stat
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon import spool
from daemon.simulator import traffic

ROOT = Path(__file__).resolve().parents[1]
WHEN = dt.datetime(2025, 8, 16, 20, 0, tzinfo=dt.UTC)


def _page(number: int) -> spool.SpooledPage:
    events = [{"id": f"{1755376889000 + number}-0", "method": "chatMessage", "object": {"text": "a\u0000b"}}]
    return spool.SpooledPage(events=events, next_event_id=f"{1755376889000 + number}-0", received_at=WHEN)


def _drain(queue: spool.Spool) -> list[spool.SpooledPage]:
    pages = []
    while (item := queue.next_page()) is not None:
        pages.append(item[1])
        queue.committed(item[0])
    return pages


def _format_1(page: spool.SpooledPage) -> bytes:
    """A line as the spool wrote it before format 2: the bare JSON payload."""
    record = {"events": page.events, "next_event_id": page.next_event_id, "received_at": WHEN.isoformat()}
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def _framed(payload: bytes) -> bytes:
    """A format-2 line with a correct header around any payload (the format, spelled out independently)."""
    return b"2 %d %08x %s\n" % (len(payload), zlib.crc32(payload), payload)


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _replace_line(path: Path, index: int, new: bytes) -> None:
    lines = _lines(path)
    lines[index] = new
    path.write_bytes(b"".join(lines))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def test_pages_come_back_in_order_and_the_file_empties(tmp_path: Path) -> None:
    queue = spool.Spool(tmp_path, max_bytes=1_000_000)
    for number in range(3):
        queue.append(_page(number))
    assert queue.last_position() == "1755376889002-0"
    assert _drain(queue) == [_page(0), _page(1), _page(2)]
    assert not queue.has_pages() and not queue.path.exists()


def test_a_new_process_drains_everything_again(tmp_path: Path) -> None:
    """Committed-in-memory is not committed-on-disk: a restart re-drains, and the writer skips duplicates."""
    first = spool.Spool(tmp_path, max_bytes=1_000_000)
    first.append(_page(0))
    first.append(_page(1))
    item = first.next_page()
    assert item is not None and item[1] == _page(0)
    first.committed(item[0])
    assert first.next_page() == (first.size, _page(1))
    second = spool.Spool(tmp_path, max_bytes=1_000_000)
    assert second.next_page() == (item[0], _page(0))
    assert second.pending_bytes == second.size > first.pending_bytes


def test_a_torn_last_line_is_dropped(tmp_path: Path) -> None:
    queue = spool.Spool(tmp_path, max_bytes=1_000_000)
    queue.append(_page(0))
    with queue.path.open("ab") as handle:
        handle.write(spool.encode(_page(9))[:-30])  # a crash in the middle of an append
    reopened = spool.Spool(tmp_path, max_bytes=1_000_000)
    reopened.append(_page(1))
    assert _drain(reopened) == [_page(0), _page(1)]
    assert reopened.take_damaged() == []


def test_the_backwards_readers_work_across_chunk_boundaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks far smaller than a line: the torn-tail cut and last_position read backwards in chunks."""
    monkeypatch.setattr(spool, "CHUNK_BYTES", 7)
    queue = spool.Spool(tmp_path, max_bytes=1_000_000)
    queue.append_many([_page(0), _page(1), _page(2)])
    whole = queue.path.read_bytes()
    with queue.path.open("ab") as handle:
        handle.write(spool.encode(_page(3))[:50])
    reopened = spool.Spool(tmp_path, max_bytes=1_000_000)
    assert reopened.path.read_bytes() == whole
    assert reopened.last_position() == "1755376889002-0"
    queue.path.write_bytes(spool.encode(_page(3))[:-1])  # one torn line and nothing before it
    assert not spool.Spool(tmp_path, max_bytes=1_000_000).has_pages()
    assert not queue.path.exists()


def test_full_spool_refuses_and_writes_nothing(tmp_path: Path) -> None:
    queue = spool.Spool(tmp_path, max_bytes=400)
    queue.append(_page(0))
    size = queue.size
    with pytest.raises(spool.SpoolFull):
        for number in range(1, 10):
            queue.append(_page(number))
    assert queue.size <= 400
    assert queue.size >= size


def test_several_pages_go_in_together_or_not_at_all(tmp_path: Path) -> None:
    """The pages still in memory when spooling starts are appended with the new one in one write."""
    queue = spool.Spool(tmp_path, max_bytes=400)
    with pytest.raises(spool.SpoolFull):
        queue.append_many([_page(0), _page(1), _page(2), _page(3)])
    assert queue.size == 0 and not queue.has_pages()
    queue.append_many([_page(0), _page(1)])
    assert queue.last_position() == "1755376889001-0"
    assert queue.next_page() == (queue.size // 2, _page(0))


def test_a_failed_write_leaves_no_partial_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    queue = spool.Spool(tmp_path, max_bytes=1_000_000)
    queue.append(_page(0))
    size = queue.size

    def disk_full(descriptor: int, data: bytes) -> None:
        os.write(descriptor, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool, "_write_all", disk_full)
    with pytest.raises(OSError, match="No space"):
        queue.append_many([_page(1), _page(2)])
    monkeypatch.undo()
    assert queue.size == size
    queue.append(_page(3))
    assert _drain(queue) == [_page(0), _page(3)]


# -- the record format ---------------------------------------------------------------------------------------


def test_format_2_round_trip(tmp_path: Path) -> None:
    queue = spool.Spool(tmp_path, max_bytes=1_000_000)
    queue.append_many([_page(0), _page(1)])
    for line, number in zip(_lines(queue.path), (0, 1), strict=True):
        version, length, checksum, payload = line.removesuffix(b"\n").split(b" ", 3)
        assert (version, int(length), int(checksum, 16)) == (b"2", len(payload), zlib.crc32(payload))
        assert line == _framed(_format_1(_page(number)).removesuffix(b"\n"))
    assert spool.decode(spool.encode(_page(5))) == _page(5)
    reopened = spool.Spool(tmp_path, max_bytes=1_000_000)
    assert reopened.last_position() == "1755376889001-0"
    assert _drain(reopened) == [_page(0), _page(1)]


def test_a_format_1_file_still_drains_and_takes_format_2_appends(tmp_path: Path) -> None:
    """A spool written before format 2 (plain JSON lines) drains after an upgrade, appends and all."""
    (tmp_path / spool.FILE_NAME).write_bytes(_format_1(_page(0)) + _format_1(_page(1)))
    queue = spool.Spool(tmp_path, max_bytes=1_000_000)
    assert queue.has_pages() and queue.last_position() == "1755376889001-0"
    queue.append(_page(2))
    assert queue.last_position() == "1755376889002-0"
    assert _drain(queue) == [_page(0), _page(1), _page(2)]
    assert queue.take_damaged() == []


# -- damaged records -----------------------------------------------------------------------------------------


def _flip_a_payload_byte(line: bytes) -> bytes:
    """ "+00:00" becomes "+00:01": still valid JSON of the right shape; only the checksum can tell."""
    return line[:-4] + bytes([line[-4] ^ 0x01]) + line[-3:]


DAMAGE: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "flipped byte": (_flip_a_payload_byte, "checksum mismatch"),
    "broken header": (lambda line: b"2x" + line[2:], "bad header"),
    "no header": (lambda line: b"\x00\x01garbage\n", "bad header"),
    "truncated": (lambda line: line[:40] + line[60:], "length mismatch: header"),
    "unknown version": (lambda line: b"3" + line[1:], "unknown format version 3"),
    "undecodable JSON": (lambda line: _framed(b'{"events": [tru'), "undecodable JSON"),
    "missing key": (lambda line: _framed(b'{"events": [], "received_at": "2025-08-16"}'), "missing"),
    "wrong type": (
        lambda line: _framed(b'{"events": {}, "next_event_id": "1-0", "received_at": "2025-08-16"}'),
        "wrong type",
    ),
    "format 1, broken": (lambda line: b'{"events": [{"id": 1}\n', "undecodable JSON"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_record_is_set_aside_once_and_the_rest_drains(
    kind: str, tmp_path: Path, umask_022: None
) -> None:
    damage, reason = DAMAGE[kind]
    queue = spool.Spool(tmp_path, max_bytes=1_000_000)
    queue.append_many([_page(number) for number in range(5)])
    original = _lines(queue.path)[2]
    damaged = damage(original)
    _replace_line(queue.path, 2, damaged)
    offset = sum(len(line) for line in _lines(queue.path)[:2])
    size = queue.size
    pages = []
    for _ in range(3):  # stop before the end: the file stays for the reopen below
        item = queue.next_page()
        assert item is not None
        pages.append(item[1])
        queue.committed(item[0])
    assert pages == [_page(0), _page(1), _page(3)]
    assert queue.size == size and queue.damaged_count == 1
    [record] = queue.take_damaged()
    assert queue.take_damaged() == []
    assert (record.offset, record.length) == (offset, len(damaged))
    assert reason in record.reason
    assert record.path is not None and record.path.parent == tmp_path
    assert record.path.name.startswith("damaged-") and record.path.name.endswith(f"-{offset}.record")
    assert record.path.read_bytes() == damaged and _mode(record.path) == 0o600
    assert _lines(queue.path)[2] == b" " * (len(damaged) - 1) + b"\n"  # the tombstone

    reopened = spool.Spool(tmp_path, max_bytes=1_000_000)  # a restart: everything drains again but that
    assert _drain(reopened) == [_page(0), _page(1), _page(3), _page(4)]
    assert reopened.take_damaged() == [] and reopened.damaged_count == 0
    assert list(tmp_path.glob("damaged-*")) == [record.path]


def test_damaged_records_at_the_front_are_set_aside_at_the_start(tmp_path: Path) -> None:
    """has_pages() means a page: a spool holding nothing readable is emptied when it is opened."""
    path = tmp_path / spool.FILE_NAME
    path.write_bytes(_flip_a_payload_byte(spool.encode(_page(0))) + b"   \n" + b"2 9 nonsense\n")
    queue = spool.Spool(tmp_path, max_bytes=1_000_000)
    assert not queue.has_pages() and queue.last_position() is None and not path.exists()
    assert [record.reason for record in queue.take_damaged()] == ["checksum mismatch", "bad header"]
    assert len(list(tmp_path.glob("damaged-*.record"))) == 2


def test_last_position_skips_a_damaged_last_record(tmp_path: Path) -> None:
    queue = spool.Spool(tmp_path, max_bytes=1_000_000)
    queue.append_many([_page(0), _page(1), _page(2)])
    _replace_line(queue.path, 2, _flip_a_payload_byte(_lines(queue.path)[2]))
    reopened = spool.Spool(tmp_path, max_bytes=1_000_000)
    assert reopened.last_position() == "1755376889001-0"
    assert reopened.take_damaged() == []  # set aside by the drain, not by a look at the end
    assert _drain(reopened) == [_page(0), _page(1)]
    assert [record.reason for record in reopened.take_damaged()] == ["checksum mismatch"]
    assert not reopened.has_pages() and not reopened.path.exists()


# -- modes ---------------------------------------------------------------------------------------------------


def test_the_directory_is_0700_and_its_files_0600_under_umask_022(tmp_path: Path, umask_022: None) -> None:
    directory = tmp_path / "data" / "spool"
    queue = spool.Spool(directory, max_bytes=1_000_000)
    queue.append(_page(0))
    assert _mode(directory) == 0o700 and _mode(queue.path) == 0o600


def test_wider_modes_left_by_an_older_version_are_narrowed(tmp_path: Path, umask_022: None) -> None:
    directory = tmp_path / "spool"
    directory.mkdir(mode=0o755)
    (directory / spool.FILE_NAME).write_bytes(_format_1(_page(0)))
    os.chmod(directory / spool.FILE_NAME, 0o644)
    queue = spool.Spool(directory, max_bytes=1_000_000)
    assert _mode(directory) == 0o700 and _mode(queue.path) == 0o600
    assert _drain(queue) == [_page(0)]


# -- memory --------------------------------------------------------------------------------------------------

_OPEN_A_BIG_SPOOL = """
import sys
from pathlib import Path
from daemon import spool

def peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")

before = peak_kib()
queue = spool.Spool(Path(sys.argv[1]), max_bytes=1 << 40)
assert queue.has_pages()
print(queue.last_position())
item = queue.next_page()
assert item is not None
print(item[1].next_event_id)
print(before, peak_kib())
"""


@pytest.mark.chaos
@pytest.mark.timeout(180)
def test_opening_a_1_gb_spool_raises_peak_memory_by_under_50_mb(tmp_path: Path) -> None:
    """The torn-tail cut, has_pages, last_position and the first next_page stream: opening a 1 GB spool
    (some 22,000 realistic pages of 100 events) must not hold it in memory."""
    events = traffic.generate(100 * 64, seed=5)
    block = b"".join(
        spool.encode(spool.SpooledPage(events[first : first + 100], events[first + 99]["id"], WHEN))
        for first in range(0, len(events), 100)
    )
    directory = tmp_path / "spool"
    directory.mkdir()
    path = directory / spool.FILE_NAME
    last = spool.SpooledPage(events[:100], "1755999999999-0", WHEN)
    try:
        with path.open("wb") as handle:
            for _ in range(-(-(1 << 30) // len(block))):
                handle.write(block)
            handle.write(spool.encode(last))
        result = subprocess.run(
            [sys.executable, "-c", _OPEN_A_BIG_SPOOL, str(directory)],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        size = path.stat().st_size
    finally:
        path.unlink(missing_ok=True)
    last_position, first_page, peaks = result.stdout.split("\n")[:3]
    before, after = (int(kib) for kib in peaks.split())
    print(
        f"[open a {size / 2**30:.2f} GiB spool] VmHWM {before / 1024:.1f} MiB before, "
        f"{after / 1024:.1f} MiB after: +{(after - before) / 1024:.1f} MiB"
    )
    assert (last_position, first_page) == ("1755999999999-0", events[99]["id"])
    assert after - before < 50 * 1024
