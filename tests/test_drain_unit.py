"""The synthesizer's shutdown steps in one process: ``drain`` refuses new and waiting work and
lets running work finish; ``cut`` ends running streams at once, even while the engine is in
the middle of a step; a waiter that gives up never keeps its slot. (tests/test_supervision.py
runs the same through real processes and signals.)"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from service import errors
from service.synthesis import Synthesizer
from tts_core.engine import Mode, SynthesisRequest


class GatedEngine:
    """Yields one chunk, then one more each time ``gate`` is set (cleared again after)."""

    name = "gated"

    def __init__(self, chunks: int = 2) -> None:
        self.chunks = chunks
        self.gate = threading.Event()

    def synthesize(self, request: SynthesisRequest, cancel: threading.Event
                   ) -> Iterator[np.ndarray]:
        for k in range(self.chunks):
            if k:
                while not self.gate.wait(0.01):
                    if cancel.is_set():
                        return
                self.gate.clear()
            yield np.zeros(240, np.float32)


REQUEST = SynthesisRequest(mode=Mode.SFT, text="Hello.", speaker_id="a")


async def _drain_all(stream) -> int:
    return sum([1 async for _ in stream])


def test_drain_refuses_waiting_work_and_lets_running_work_finish() -> None:
    async def scenario() -> None:
        engine = GatedEngine()
        synth = Synthesizer(engine, max_concurrent=1, max_queue=2)
        running = synth.stream(REQUEST)
        assert (await anext(running)).size == 240  # holds the one slot
        waiting = asyncio.create_task(_drain_all(synth.stream(REQUEST)))
        await asyncio.sleep(0.05)
        assert synth.counters.queued == 1
        synth.drain(errors.unavailable("shutting down"))
        with pytest.raises(errors.ServiceError) as refused:
            await waiting
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        assert refused.value.http_status == 503 and synth.counters.queued == 0
        with pytest.raises(errors.ServiceError):
            synth.check_open()  # new work too
        engine.gate.set()
        assert await _drain_all(running) == 1  # the running stream goes on to its end
        assert synth.counters.completed_total == 1 and synth.counters.active == 0
        synth.shutdown()

    asyncio.run(scenario())


def test_cut_ends_a_running_stream_while_the_engine_is_mid_step() -> None:
    async def scenario() -> None:
        synth = Synthesizer(GatedEngine(), max_concurrent=1, max_queue=0)
        running = synth.stream(REQUEST)
        await anext(running)
        rest = asyncio.create_task(_drain_all(running))  # waits on the gate: never opened
        await asyncio.sleep(0.05)
        assert synth.cut(errors.unavailable("cut short")) == 1
        with pytest.raises(errors.ServiceError) as cut:
            await asyncio.wait_for(rest, 2)
        assert cut.value.code == grpc.StatusCode.UNAVAILABLE and cut.value.message == "cut short"
        synth.shutdown()

    asyncio.run(scenario())


def test_a_waiter_that_gives_up_leaves_the_slot_free() -> None:
    async def scenario() -> None:
        engine = GatedEngine()
        synth = Synthesizer(engine, max_concurrent=1, max_queue=1)
        running = synth.stream(REQUEST)
        await anext(running)
        waiting = asyncio.create_task(_drain_all(synth.stream(REQUEST)))
        await asyncio.sleep(0.05)
        waiting.cancel()  # the client hung up while queued
        with pytest.raises(asyncio.CancelledError):
            await waiting
        engine.gate.set()
        assert await _drain_all(running) == 1
        assert synth.counters.queued == 0 and synth.counters.active == 0
        engine.gate.set()
        assert await asyncio.wait_for(_drain_all(synth.stream(REQUEST)), 2) == 2
        synth.shutdown()

    asyncio.run(scenario())


def test_each_synthesis_runs_on_a_thread_that_ends_with_it() -> None:
    """No pooled workers: a thread that ran torch keeps an OpenMP pool while it lives, and
    later requests paid for those pools (service/synthesis.py)."""
    seen: list[threading.Thread] = []

    class RecordingEngine(GatedEngine):
        def synthesize(self, request: SynthesisRequest, cancel: threading.Event
                       ) -> Iterator[np.ndarray]:
            seen.append(threading.current_thread())
            yield np.zeros(240, np.float32)

    async def scenario() -> None:
        synth = Synthesizer(RecordingEngine(), max_concurrent=1, max_queue=0)
        assert await _drain_all(synth.stream(REQUEST)) == 1
        assert await _drain_all(synth.stream(REQUEST)) == 1
        registered = await synth.run(lambda: threading.current_thread())
        seen.append(registered)
        failing = synth.run(lambda: next(iter(())))  # StopIteration cannot cross a future
        with pytest.raises(RuntimeError, match="StopIteration"):
            await failing
        assert synth.counters.active == 0 and synth.counters.failed_total == 1

    asyncio.run(scenario())
    assert len(seen) == 3 and len({id(t) for t in seen}) == 3
    assert all(t is not threading.main_thread() for t in seen)
    for thread in seen:
        thread.join(timeout=5)
        assert not thread.is_alive()
