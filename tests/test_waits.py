"""waits: the backoff of every retry and the stop-aware wait of every loop. Unit tests, no I/O."""

from __future__ import annotations

import asyncio

import pytest
import tenacity

from daemon import errors, waits


@pytest.mark.parametrize(("attempt", "ceiling"), [(1, 0.5), (2, 1.0), (3, 2.0), (7, 30.0), (100_000, 30.0)])
def test_backoff_doubles_with_jitter_up_to_its_maximum(attempt: int, ceiling: float) -> None:
    delays = [waits.Backoff(initial=0.5, maximum=30.0).delay(attempt) for _ in range(200)]
    assert all(ceiling / 2 <= delay <= ceiling for delay in delays)
    assert len(set(delays)) > 100, "jittered, so clients that failed together do not retry together"


def _failed(attempt: int, error: BaseException) -> tenacity.RetryCallState:
    state = tenacity.RetryCallState(tenacity.Retrying(), fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    state.set_exception((type(error), error, None))
    return state


def test_as_a_tenacity_wait_it_honours_retry_after() -> None:
    backoff = waits.Backoff(initial=1.0, maximum=60.0)
    assert backoff(_failed(3, errors.RateLimited(retry_after=7.0))) == 7.0
    assert 2.0 <= backoff(_failed(3, errors.ServerError())) <= 4.0
    assert 2.0 <= backoff(_failed(3, ValueError())) <= 4.0


async def test_wait_for_stop_says_whether_stop_was_set() -> None:
    stop = asyncio.Event()
    assert await waits.wait_for_stop(stop, 0.01) is False
    assert await waits.wait_for_stop(stop, 0) is False
    asyncio.get_running_loop().call_later(0.01, stop.set)
    assert await asyncio.wait_for(waits.wait_for_stop(stop, 3600), timeout=5) is True
    assert await waits.wait_for_stop(stop, 0) is True
