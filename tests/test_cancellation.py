"""A client that hangs up stops the engine mid-model-call: no chunk is made after the cancel,
the engine serves the next request normally, and (real server) the slot is freed."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np

from service.gen.cosyvoice.v1 import tts_pb2, tts_pb2_grpc
from tts_core.engine import Mode, SynthesisRequest

LONG_CLAUSE = "Well, " + " ".join(["people like to hear long sentences"] * 50)


def test_embedded_engine_stops_inside_a_model_call() -> None:
    from tts_core.embedded.engine import EmbeddedEngine

    engine = EmbeddedEngine(threads=1)
    cancel = threading.Event()
    chunks = engine.synthesize(SynthesisRequest(Mode.SFT, text=LONG_CLAUSE, speaker_id="英文女"),
                               cancel)
    assert next(chunks).size  # "Well," - the next call is the long clause
    rest: list[np.ndarray] = []
    puller = threading.Thread(target=lambda: rest.extend(chunks))
    puller.start()
    time.sleep(0.3)  # inside the long call (it takes seconds)
    cancel.set()
    puller.join(timeout=60)
    assert not puller.is_alive() and rest == []
    # The session is not harmed by a stopped run.
    again = list(engine.synthesize(SynthesisRequest(Mode.SFT, text="Hello.", speaker_id="英文女"),
                                   threading.Event()))
    assert again and np.concatenate(again).size > 0.3 * 24000


def test_hang_up_frees_the_slot(stack) -> None:
    with grpc.insecure_channel(stack.grpc_target) as channel:
        stub = tts_pb2_grpc.TextToSpeechServiceStub(channel)
        before = stack.status()["cancelled_total"]
        call = stub.Synthesize(tts_pb2.SynthesizeRequest(
            text=LONG_CLAUSE, sft=tts_pb2.SftMode(speaker_id="英文女")),
            metadata=stack.metadata, timeout=300)
        for reply in call:
            if reply.HasField("audio"):
                break
        call.cancel()
    status = stack.wait_idle(timeout=30)
    assert int(status["cancelled_total"]) == int(before) + 1
