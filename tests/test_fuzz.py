"""Fuzzing across boundaries the other suites test one at a time.

tests/test_ingest.py fuzzes items through `parse_page`; tests/test_events_api.py fuzzes `nextUrl`. Here:
whole response bodies served by the simulator and read by the real client, wild items through the real
writer into PostgreSQL, and wild pages through the disk spool. The property every time: nothing escapes the
quarantine boundary as an exception, and nothing valid is lost.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import hypothesis
from hypothesis import strategies as st

from daemon import db, errors, ingest, runtime_state, spool
from daemon.simulator import events, traffic
from tests import event_samples as sample
from tests.test_events_api import TOKEN, _client
from tests.test_ingest import _items, _texts, _values


def _fuzz(examples: int) -> hypothesis.settings:
    return hypothesis.settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[
            hypothesis.HealthCheck.too_slow,
            hypothesis.HealthCheck.function_scoped_fixture,
        ],
    )


def _encoded(value: Any) -> str:
    return json.dumps(value)  # NaN and Infinity too: Python's JSON parser accepts them


_bodies = st.one_of(
    st.binary(max_size=64).map(lambda raw: raw.decode("latin-1")),
    st.text(max_size=64),
    _values.map(_encoded),
    st.fixed_dictionaries({"events": st.lists(_items, max_size=5)}, optional={"nextUrl": st.none()}).map(
        _encoded
    ),
    st.fixed_dictionaries({"events": _values}).map(_encoded),
    # A body cut anywhere: what a dropped connection with a matching Content-Length leaves.
    st.tuples(st.lists(_items, max_size=4), st.integers(min_value=0, max_value=400)).map(
        lambda pair: _encoded({"events": pair[0]})[: pair[1]]
    ),
)


def _same_json(left: Any, right: Any) -> bool:
    """Equality that treats NaN as equal to itself (what came over the wire is compared as text)."""
    return json.dumps(left, sort_keys=True) == json.dumps(right, sort_keys=True)


def _decoded_events(body: bytes) -> list[Any] | None:
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    events_ = payload.get("events") if isinstance(payload, dict) else None
    return events_ if isinstance(events_, list) else None


@_fuzz(120)
@hypothesis.given(body=_bodies, status=st.sampled_from([200, 200, 200, 400]))
async def test_any_response_body_is_a_page_or_a_recorded_failure(body: str, status: int) -> None:
    stream = traffic.generate(4, seed=12)
    async with (
        events.EventsSimulator(token=TOKEN, events=stream) as sim,
        aiohttp.ClientSession() as session,
    ):
        failures: list[errors.ApiFailure] = []
        client = _client(session, sim, failures, [], runtime_state.RuntimeState())
        sim.schedule(events.Fault.raw(status, body))
        page = await client.fetch(client.start_url(None))
    served = sim.requests[0]
    delivered = _decoded_events(body.encode())
    if status == 200 and delivered is not None:
        assert failures == [] and _same_json(page.events, delivered)
    else:
        # Refused bodies are one failure row each, then the next (good) response is read.
        assert [failure.error_kind for failure in failures] in (["bad_body"], ["http_4xx"], [])
        assert failures or (status == 400 and page.events == [])
        if failures:
            assert page.events == stream
    assert served.fault == "raw"
    batch = ingest.parse_page(
        page.events,
        broadcaster="alice_cam",
        received_at=sample.RECEIVED,
        next_event_id=None,
        finite_numbers=page.finite_numbers,
    )
    assert len(batch.events) + len(batch.quarantined) == len(page.events)
    # The fast decoder and encoder (orjson) change nothing: the same rows as the standard library's.
    exact = ingest.parse_page(
        page.events, broadcaster="alice_cam", received_at=sample.RECEIVED, next_event_id=None
    )
    assert _rows(batch) == _rows(exact)


def _rows(batch: ingest.Batch) -> tuple[Any, ...]:
    """What the writer stores of a batch, with JSON texts compared as values."""
    return (
        [
            (event.event_id, event.method, event.broadcaster, json.loads(event.raw_json))
            for event in batch.events
        ],
        [
            (row.event_id, row.username, row.type, row.content, json.loads(row.metadata_json))
            for row in batch.interactions
        ],
        [(item.fingerprint, item.raw_text, item.reason) for item in batch.quarantined],
    )


@_fuzz(80)
@hypothesis.given(items=st.lists(_items, max_size=6), room=_texts)
async def test_the_writer_stores_every_parsed_item_and_never_raises(
    items: list[Any], room: str, pool: asyncpg.Pool
) -> None:
    batch = ingest.parse_page(items, broadcaster=room, received_at=sample.RECEIVED, next_event_id=None)
    await db.write_batch(pool, batch, cursor_broadcaster=None, timeout_seconds=30)
    ids = [event.event_id for event in batch.events]
    fingerprints = [item.fingerprint for item in batch.quarantined]
    async with pool.acquire() as connection:
        stored = {
            row[0]
            for row in await connection.fetch("SELECT event_id FROM events WHERE event_id = ANY($1)", ids)
        }
        kept = {
            row[0]
            for row in await connection.fetch(
                "SELECT fingerprint FROM quarantined_events WHERE fingerprint = ANY($1)", fingerprints
            )
        }
        with_rows = {
            row[0]
            for row in await connection.fetch(
                "SELECT metadata->>'event_id' FROM interactions WHERE metadata->>'event_id' = ANY($1)", ids
            )
        }
    assert stored == set(ids)
    assert kept == set(fingerprints)
    assert {row.event_id for row in batch.interactions} <= with_rows


@_fuzz(100)
@hypothesis.given(pages=st.lists(st.lists(_items, max_size=4), min_size=1, max_size=4))
def test_the_spool_gives_back_every_page_as_fetched(pages: list[list[Any]], tmp_path: Path) -> None:
    queue = spool.Spool(tmp_path / f"spool-{id(pages)}", max_bytes=10_000_000)
    for number, items in enumerate(pages):
        queue.append(spool.SpooledPage(items, f"{number}-0", sample.RECEIVED))
    reopened = spool.Spool(queue.path.parent, max_bytes=10_000_000)  # as after a crash
    assert reopened.last_position() == f"{len(pages) - 1}-0"
    drained = []
    while (item := reopened.next_page()) is not None:
        drained.append(item[1])
        reopened.committed(item[0])
    assert [page.next_event_id for page in drained] == [f"{number}-0" for number in range(len(pages))]
    for page, items in zip(drained, pages, strict=True):
        assert _same_json(page.events, items)
        assert page.received_at == sample.RECEIVED
    assert not reopened.has_pages()
