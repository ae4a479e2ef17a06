"""Runs engine syntheses off the event loop, with bounded concurrency and prompt cancellation.

The engine's generator is iterated in a worker thread. Chunks cross to the event loop through
an asyncio queue, and the worker may run at most ``LOOKAHEAD`` chunks ahead of the client, so
a client that goes away stops engine work within about one chunk: the cancel Event is set, the
engine checks it, and the worker stops asking for more.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import numpy as np

from service import errors
from tts_core.engine import Engine, EngineError, SynthesisRequest

log = logging.getLogger("service.synthesis")

LOOKAHEAD = 2  # chunks the worker may hold ready before the client has taken them
_END = object()


@dataclass
class Counters:
    """Server-wide counters (GetServerStatus reports them)."""

    started: float = field(default_factory=time.monotonic)
    active: int = 0
    queued: int = 0
    started_total: int = 0
    completed_total: int = 0
    cancelled_total: int = 0
    failed_total: int = 0
    rejected_total: int = 0
    engine_chunks_total: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


@dataclass
class _Failure:
    error: BaseException


class Synthesizer:
    """Admission control plus the worker-thread bridge for one engine."""

    def __init__(self, engine: Engine, max_concurrent: int, max_queue: int):
        if max_concurrent < 1 or max_queue < 0:
            raise ValueError("max_concurrent must be >= 1 and max_queue >= 0")
        self.engine = engine
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.counters = Counters()
        self._slots = asyncio.Semaphore(max_concurrent)
        self._workers = ThreadPoolExecutor(max_workers=max_concurrent,
                                           thread_name_prefix="synthesis")

    async def validate(self, request: SynthesisRequest) -> None:
        """The engine's own checks, in a thread (they may normalise text)."""
        try:
            await asyncio.to_thread(self.engine.validate, request)
        except EngineError as error:
            raise errors.from_engine_error(error) from None

    async def _admit(self) -> None:
        c = self.counters
        if c.active + c.queued >= self.max_concurrent + self.max_queue:
            c.rejected_total += 1
            raise errors.overloaded(
                f"the server is busy ({c.active} syntheses running, {c.queued} waiting, "
                f"limits {self.max_concurrent} + {self.max_queue}); retry in a few seconds")
        c.queued += 1
        try:
            await self._slots.acquire()
        finally:
            c.queued -= 1
        c.active += 1
        c.started_total += 1

    def _release(self, outcome: str) -> None:
        c = self.counters
        c.active -= 1
        if outcome == "completed":
            c.completed_total += 1
        elif outcome == "cancelled":
            c.cancelled_total += 1
        else:
            c.failed_total += 1
        self._slots.release()

    async def stream(self, request: SynthesisRequest) -> AsyncIterator[np.ndarray]:
        """Yield engine chunks; raises ServiceError before the first chunk if anything fails.

        Closing the iterator early (client gone) cancels the engine work.
        """
        await self._admit()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        credits = threading.Semaphore(LOOKAHEAD)
        cancel = threading.Event()
        state = {"finished": False, "failed": False}

        def push(item: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            try:
                chunks = self.engine.synthesize(request, cancel)
                try:
                    while not cancel.is_set():
                        if not credits.acquire(timeout=0.05):
                            continue  # the client has not taken the last chunks yet
                        chunk = next(chunks, _END)
                        if chunk is _END:
                            state["finished"] = not cancel.is_set()
                            break
                        with self.counters.lock:
                            self.counters.engine_chunks_total += 1
                        push(chunk)
                finally:
                    chunks.close()
            except BaseException as error:  # reported to the client; the server keeps going
                state["failed"] = not cancel.is_set()
                push(_Failure(error))
            finally:
                push(_END)

        def done(_: object) -> None:
            # The slot is freed only when the engine has really stopped, not when the client
            # left, so a cancelled synthesis never overlaps more than max_concurrent others.
            if state["finished"]:
                self._release("completed")
            elif state["failed"]:
                self._release("failed")
            else:
                self._release("cancelled")

        future = loop.run_in_executor(self._workers, work)
        future.add_done_callback(done)
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise _to_service_error(item.error)
                credits.release()
                yield item
        finally:
            cancel.set()

    def shutdown(self) -> None:
        self._workers.shutdown(wait=False, cancel_futures=True)


def _to_service_error(error: BaseException) -> errors.ServiceError:
    if isinstance(error, errors.ServiceError):
        return error
    if isinstance(error, EngineError):
        return errors.from_engine_error(error)
    log.error("engine failure", exc_info=error)
    return errors.ServiceError(grpc.StatusCode.INTERNAL, errors.INTERNAL_MESSAGE, 500)
