"""Runs engine syntheses off the event loop, with bounded concurrency and prompt cancellation.

The engine's generator is iterated in a worker thread of its own, which ends with the
synthesis: libgomp (torch's OpenMP runtime on CPU) keeps a pool of worker threads for every live
thread that ever ran a parallel region, and while pools outnumber the cores every parallel
region pays a wake-up (tts_core/short_thread.py). Pooled worker threads kept theirs after a
burst of requests, so later requests ran slower than the first (one stream through threads per
request, after a round of 8: 1.48 s to first audio). Chunks cross to the event loop through
an asyncio queue, and the worker may run at most ``LOOKAHEAD`` chunks ahead of the client, so
a client that goes away stops engine work within about one chunk: the cancel Event is set, the
engine checks it, and the worker stops asking for more.

For text streamed by the client (SynthesizeTextStream) the pieces travel the other way, from
the event loop to the worker, through a :class:`TextFeed` (a thread-safe queue the engine reads
as an iterator).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
import numpy as np

from service import errors
from tts_core import limits
from tts_core.engine import Engine, EngineError, SynthesisRequest

log = logging.getLogger("service.synthesis")

T = TypeVar("T")
LOOKAHEAD = 2  # chunks the worker may hold ready before the client has taken them
_END = object()


@dataclass
class Counters:
    """Server-wide counters (GetServerStatus reports them).

    All but ``engine_chunks_total`` change on the event loop only (admission, and the done
    callbacks of the worker futures), so they need no lock; the worker threads count engine
    chunks under ``lock``.
    """

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


@dataclass
class _Cut:
    """Put in a running stream's queue by ``Synthesizer.cut`` (server shutdown)."""

    error: errors.ServiceError


class TextFeed:
    """Text pieces from the event loop (``put``, ``close``, ``fail``) to the engine's worker
    thread (``pieces``), for one SynthesizeTextStream call."""

    def __init__(self, max_chars: int = limits.MAX_STREAM_TEXT_CHARS,
                 idle_seconds: float = limits.TEXT_STREAM_IDLE_SECONDS):
        self.max_chars = max_chars
        self.idle_seconds = idle_seconds
        self.chars = 0  # characters received so far
        self._speakable = False  # any non-space text yet
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    def put(self, piece: str) -> None:
        """Queue a piece; raises a ServiceError when the call's text gets too long."""
        self.chars += len(piece)
        if self.chars > self.max_chars:
            raise errors.too_large(f"the streamed text has more than {self.max_chars} "
                                   "characters; the limit is for one call: start a new one")
        if piece:
            self._speakable = self._speakable or not piece.isspace()
            self._queue.put(piece)

    def close(self) -> None:
        """The client half-closed: no more text. Raises if no text came at all."""
        if not self._speakable:
            raise errors.bad_request("the stream ended without any text: send text messages "
                                     "after the config, then half-close")
        self._queue.put(_END)

    def fail(self, error: errors.ServiceError) -> None:
        """End the text with an error; the engine's read raises it."""
        self._queue.put(_Failure(error))

    def pieces(self, cancel: threading.Event) -> Iterator[str]:
        """What the engine iterates (in the worker thread): pieces until close or cancel."""
        while True:
            # Idle time counts from when the engine asks, not from the last piece: an engine
            # busy with earlier text is the server's delay, not the client's.
            asked = time.monotonic()
            while True:
                if cancel.is_set():
                    return
                try:
                    item = self._queue.get(timeout=0.05)
                    break
                except queue.Empty:
                    if time.monotonic() - asked > self.idle_seconds:
                        raise errors.ServiceError(
                            grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"no text arrived for {self.idle_seconds:g} s: send the next piece "
                            "sooner, or half-close the stream when the text is complete"
                        ) from None
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item


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
        # Shutdown: once ``_refusal`` is set new work and waiting work get it (``drain``);
        # ``_streams`` are the running ones, which ``cut`` ends.
        self._refusal: errors.ServiceError | None = None
        self._drained = asyncio.Event()
        self._streams: set[tuple[asyncio.Queue, threading.Event]] = set()

    def check_open(self) -> None:
        """Raise the shutdown refusal once ``drain`` has been called."""
        if self._refusal is not None:
            self.counters.rejected_total += 1
            raise self._refusal

    def drain(self, refusal: errors.ServiceError) -> None:
        """Refuse new work, and the work waiting for a slot, with ``refusal``; running work goes
        on (server shutdown)."""
        self._refusal = refusal
        self._drained.set()

    def cut(self, error: errors.ServiceError) -> int:
        """End every running synthesis stream now with ``error``; returns how many."""
        for chunks, cancel in list(self._streams):
            cancel.set()
            chunks.put_nowait(_Cut(error))
        return len(self._streams)

    async def validate(self, request: SynthesisRequest, *, streamed_text: bool = False) -> None:
        """The engine's own checks, in a thread (they may normalise text).

        ``streamed_text``: the request's text arrives later (SynthesizeTextStream).
        """
        check = self.engine.validate_text_stream if streamed_text else self.engine.validate
        try:
            await asyncio.to_thread(check, request)
        except EngineError as error:
            raise errors.from_engine_error(error) from None

    async def _admit(self) -> None:
        c = self.counters
        self.check_open()
        if c.active + c.queued >= self.max_concurrent + self.max_queue:
            c.rejected_total += 1
            raise errors.overloaded(
                f"the server is busy ({c.active} syntheses running, {c.queued} waiting, "
                f"limits {self.max_concurrent} + {self.max_queue}); retry in a few seconds")
        c.queued += 1
        try:
            await self._wait_for_slot()
        finally:
            c.queued -= 1
        c.active += 1
        c.started_total += 1

    async def _wait_for_slot(self) -> None:
        """Take a slot; a shutdown (``drain``) while waiting refuses the call instead."""
        acquire = asyncio.ensure_future(self._slots.acquire())
        drained = asyncio.ensure_future(self._drained.wait())
        acquired = False
        try:
            await asyncio.wait((acquire, drained), return_when=asyncio.FIRST_COMPLETED)
            acquired = acquire.done() and not acquire.cancelled()
        finally:
            drained.cancel()
            if not acquired:
                if acquire.done() and not acquire.cancelled():
                    self._slots.release()  # taken just as the caller was cancelled
                else:
                    acquire.cancel()
        if not acquired:
            self.check_open()  # raises: the only other way out of the wait

    async def run(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """Run other engine work (speaker registration) in a synthesis slot.

        It is as heavy as a short synthesis, so it is admitted, queued and counted like one;
        the slot is freed when ``fn`` has returned, even if the caller went away before.
        """
        await self._admit()
        future = _on_own_thread(functools.partial(fn, *args, **kwargs))
        future.add_done_callback(lambda done: self._release(
            "completed" if not done.cancelled() and done.exception() is None else "failed"))
        return await asyncio.shield(future)

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

    async def stream(self, request: SynthesisRequest, text: TextFeed | None = None
                     ) -> AsyncIterator[np.ndarray]:
        """Yield engine chunks; raises ServiceError before the first chunk if anything fails.

        With ``text`` the engine's ``synthesize_text_stream`` speaks the pieces fed there
        (``request.text`` is not used). Closing the iterator early (client gone) cancels the
        engine work.
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
                if text is None:
                    chunks = self.engine.synthesize(request, cancel)
                else:
                    chunks = self.engine.synthesize_text_stream(request, text.pieces(cancel),
                                                                cancel)
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
            # Called as the future's callback and, at the stream's end, directly (a future is
            # done before its callbacks have run): once.
            if state.get("released"):
                return
            state["released"] = True
            if state["finished"]:
                self._release("completed")
            elif state["failed"]:
                self._release("failed")
            else:
                self._release("cancelled")

        future = _on_own_thread(work)
        future.add_done_callback(done)
        running = (queue, cancel)
        self._streams.add(running)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _Cut):  # shutdown: no waiting for the engine's step
                    raise item.error
                if item is _END or isinstance(item, _Failure):
                    # The worker is returning: wait for it (and so for ``done``), so that the
                    # slot is free before the client hears that the call has ended.
                    await asyncio.shield(future)
                    done(future)
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise _to_service_error(item.error)
                credits.release()
                yield item
        finally:
            self._streams.discard(running)
            cancel.set()

    def shutdown(self) -> None:
        """Nothing to stop: work waiting for a slot was refused by ``drain`` and running work
        ended by ``cut``; each worker thread ends with its synthesis. They are not daemon
        threads: the interpreter waits for them at exit (as it did for the pool it replaced),
        since one stopped inside a native model call while the runtime is torn down aborts the
        process (SIGABRT after a drain that had to cut streams)."""


def _on_own_thread(fn: Callable[[], T]) -> asyncio.Future[T]:
    """Run ``fn`` on a new thread that ends with it; a future of the running loop for its
    result (see the module docstring for why no pool)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: object) -> None:
        if future.cancelled():
            return
        if ok:
            future.set_result(value)  # type: ignore[arg-type]
        else:
            future.set_exception(value)  # type: ignore[arg-type]

    def run() -> None:
        try:
            outcome = (True, fn())
        except StopIteration as error:  # a future cannot hold one (asyncio refuses it)
            outcome = (False, RuntimeError(f"engine work raised StopIteration: {error!r}"))
        except BaseException as error:  # noqa: BLE001 - handed to the awaiting coroutine
            outcome = (False, error)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop closed first (server gone): nobody is waiting
            pass

    threading.Thread(target=run, name="synthesis").start()
    return future


def _to_service_error(error: BaseException) -> errors.ServiceError:
    if isinstance(error, errors.ServiceError):
        return error
    if isinstance(error, EngineError):
        return errors.from_engine_error(error)
    log.error("engine failure", exc_info=error)
    return errors.ServiceError(grpc.StatusCode.INTERNAL, errors.INTERNAL_MESSAGE, 500)
