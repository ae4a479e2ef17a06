"""Start batched requests together in tests, however fast the machine runs a tiny model."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from tts_core.batching.scheduler import BatchScheduler


@contextmanager
def held_until(scheduler: BatchScheduler, jobs: int, timeout: float = 30.0) -> Iterator[None]:
    """Inside the block the scheduler takes no step until ``jobs`` requests are in (or
    ``timeout`` seconds have passed), so they share their first step: on a fast machine a tiny
    request would otherwise finish before the next one arrives."""
    step, deadline = scheduler._step, time.monotonic() + timeout

    def gated_step() -> None:
        while scheduler.occupancy() < jobs and time.monotonic() < deadline:
            time.sleep(0.002)
        step()

    scheduler._step = gated_step  # type: ignore[method-assign]
    try:
        yield
    finally:
        scheduler._step = step  # type: ignore[method-assign]
