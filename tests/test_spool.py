"""The disk spool: order, durability, torn tails, the size bound, and draining."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from daemon import spool

WHEN = dt.datetime(2025, 8, 16, 20, 0, tzinfo=dt.UTC)


def _page(number: int) -> spool.SpooledPage:
    events = [{"id": f"{1755376889000 + number}-0", "method": "chatMessage", "object": {"text": "a\u0000b"}}]
    return spool.SpooledPage(events=events, next_event_id=f"{1755376889000 + number}-0", received_at=WHEN)


def test_pages_come_back_in_order_and_the_file_empties(tmp_path: Path) -> None:
    queue = spool.Spool(tmp_path, max_bytes=1_000_000)
    for number in range(3):
        queue.append(_page(number))
    assert queue.last_position() == "1755376889002-0"
    drained = []
    while (item := queue.next_page()) is not None:
        end, page = item
        drained.append(page)
        queue.committed(end)
    assert drained == [_page(0), _page(1), _page(2)]
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
        handle.write(b'{"events": [{"id": "17553768')  # a crash in the middle of an append
    reopened = spool.Spool(tmp_path, max_bytes=1_000_000)
    reopened.append(_page(1))
    pages = []
    while (item := reopened.next_page()) is not None:
        pages.append(item[1])
        reopened.committed(item[0])
    assert pages == [_page(0), _page(1)]


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
