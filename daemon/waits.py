"""Waits and retry pacing, one of each: the stop-aware wait of every loop and the backoff of every retry."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import tenacity

from daemon import errors


async def wait_for_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Wait `seconds`, or less when `stop` is set meanwhile; True when it is set."""
    if seconds <= 0:
        await asyncio.sleep(0)
        return stop.is_set()
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        return False
    return True


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff from `initial` seconds, doubling per attempt up to `maximum`, with jitter.

    As a tenacity `wait` it honours the Retry-After an `errors.ApiError` carries instead.
    """

    initial: float = 1.0
    maximum: float = 60.0

    def delay(self, attempt: int) -> float:
        """The wait after failed attempt number `attempt` (1-based)."""
        ceiling = min(self.maximum, self.initial * 2.0 ** min(attempt - 1, 60))
        # Between half and all of it: callers that failed together do not retry in lockstep, even at the cap.
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311  # timing jitter, not a secret

    def __call__(self, state: tenacity.RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome is not None else None
        if isinstance(error, errors.ApiError) and error.retry_after is not None:
            return error.retry_after
        return self.delay(state.attempt_number)
