"""A hang-up stops the CosyVoice 2 engine within one model step: between the flow's Euler steps
and the vocoder's upsampling stages, not only between chunks (tts_core/cancellation.py).

The engine tests watch the real model with forward hooks (observers, nothing replaced): the
estimator's output projection runs once per Euler step, the vocoder's ``conv_post`` once per
vocoder call. The server test hangs up on a real gRPC server and reads its status counters.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from conftest import Stack, start_stack, stop_stack

from service.gen.cosyvoice.v1 import tts_pb2, tts_pb2_grpc
from tts_core.cosyvoice2.engine import CosyVoice2Engine
from tts_core.cosyvoice2.native_decode import NativeDecoder
from tts_core.cosyvoice2.testing.make_model_dir import make_model_dir
from tts_core.engine import Mode, SynthesisRequest

PRESET = "中文女"  # written by make_model_dir(spk2info=True)
LONG_TEXT = "收到好友从远方寄来的生日礼物，那份意外的惊喜与深深的祝福让我心中充满了甜蜜的快乐。" * 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return make_model_dir(tmp_path_factory.mktemp("cv2-cancel") / "tiny", "tiny", seed=5,
                          spk2info=True)


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> CosyVoice2Engine:
    engine = CosyVoice2Engine.from_model_dir(model_dir, threads=1)
    # First use of a preset builds its flow prompt cache (Euler steps of its own): done here,
    # so the hooks below count only the request's steps.
    list(engine.synthesize(SynthesisRequest(Mode.SFT, text="你好。", speaker_id=PRESET),
                           threading.Event()))
    return engine


def request(stream: bool) -> SynthesisRequest:
    return SynthesisRequest(Mode.SFT, text=LONG_TEXT, speaker_id=PRESET, stream=stream)


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole-sentence"])
def test_a_cancel_during_the_flow_stops_at_the_next_euler_step(engine, stream):
    cancel = threading.Event()
    steps: list[int] = []

    def on_euler_step(module, inputs) -> None:
        steps.append(1)
        if len(steps) == 3:  # inside the first chunk's (or sentence's) ten steps
            cancel.set()

    vocoder_calls: list[int] = []
    estimator = engine.token2wav.flow.decoder.estimator
    # the time MLP runs once per Euler step, in the whole-sentence and the chunked estimator
    hooks = [estimator.time_mlp.register_forward_pre_hook(on_euler_step),
             engine.token2wav.hift.conv_post.register_forward_pre_hook(
                 lambda module, inputs: vocoder_calls.append(1))]
    try:
        chunks = list(engine.synthesize(request(stream), cancel))
    finally:
        for hook in hooks:
            hook.remove()
    assert len(steps) == 3, "the flow went on after the cancel"
    assert vocoder_calls == [] and chunks == []


def test_a_cancel_inside_the_vocoder_stops_before_its_next_stage(engine):
    cancel = threading.Event()
    stages: list[int] = []
    vocoder_calls: list[int] = []

    def on_first_stage(module, inputs) -> None:
        stages.append(1)
        cancel.set()

    hift = engine.token2wav.hift
    hooks = [hift.ups[0].register_forward_pre_hook(on_first_stage),
             hift.ups[1].register_forward_pre_hook(lambda module, inputs: stages.append(2)),
             hift.conv_post.register_forward_pre_hook(
                 lambda module, inputs: vocoder_calls.append(1))]
    try:
        chunks = list(engine.synthesize(request(True), cancel))
    finally:
        for hook in hooks:
            hook.remove()
    assert stages == [1] and vocoder_calls == [] and chunks == []


@pytest.mark.parametrize("step", [0, 5], ids=["first-step", "later-step"])
def test_a_cancel_inside_an_lm_step_stops_before_its_next_layer(engine, step, monkeypatch):
    cancel = threading.Event()
    layers = engine.models.lm.llm.model.model.layers
    calls: list[int] = []

    def on_layer(index: int):
        def hook(module, inputs) -> None:
            calls.append(index)
            if index == 0 and calls.count(0) == step + 1:
                cancel.set()  # inside LM step ``step`` (the first one holds the whole text)
        return hook

    hooks = [layer.register_forward_pre_hook(on_layer(i)) for i, layer in enumerate(layers)]
    # decode steps of an int8 stack run each layer as one native call instead of the module
    run_layer = NativeDecoder._run_layer

    def native_layer(self: NativeDecoder, index: int, *args: object) -> None:
        on_layer(index)(None, None)
        run_layer(self, index, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(NativeDecoder, "_run_layer", native_layer)
    try:
        chunks = list(engine.synthesize(request(True), cancel))
    finally:
        for hook in hooks:
            hook.remove()
    assert calls.count(0) == step + 1 and calls[-1] == 0, "the LM went on after the cancel"
    assert chunks == []


def test_the_engine_serves_normally_after_cancelled_model_calls(engine):
    for stream in (True, False):
        cancel = threading.Event()
        chunks = engine.synthesize(request(stream), cancel)
        cancel_in_flow = engine.token2wav.flow.decoder.estimator.time_mlp \
            .register_forward_pre_hook(lambda module, inputs, event=cancel: event.set())
        try:
            assert list(chunks) == []
        finally:
            cancel_in_flow.remove()
    audio = list(engine.synthesize(SynthesisRequest(Mode.SFT, text="你好。", speaker_id=PRESET),
                                   threading.Event()))
    assert audio and np.concatenate(audio).size > 0


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = start_stack(tmp_path_factory.mktemp("cv2-cancel-stack"),
                          extra_args=("--engine", "cosyvoice2", "--model-dir", str(model_dir)))
    try:
        yield running
    finally:
        stop_stack(running)


@pytest.mark.parametrize("whole_sentences", [False, True])
def test_hang_ups_leave_the_cosyvoice2_server_idle(server, whole_sentences):
    before = int(server.status()["cancelled_total"])
    text = LONG_TEXT.replace("。", "。\n")  # several sentences: audio starts before the end
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = tts_pb2_grpc.TextToSpeechServiceStub(channel)
        for _ in range(3):
            call = stub.Synthesize(tts_pb2.SynthesizeRequest(
                text=text, sft=tts_pb2.SftMode(speaker_id=PRESET),
                stream_within_sentence=not whole_sentences), metadata=server.metadata,
                timeout=300)
            for reply in call:
                if reply.HasField("audio"):
                    break  # the engine is now making the next chunk: LM, flow or vocoder
            call.cancel()
            status = server.wait_idle(timeout=60)
        assert int(status["cancelled_total"]) == before + 3
        replies = list(stub.Synthesize(tts_pb2.SynthesizeRequest(
            text="你好。", sft=tts_pb2.SftMode(speaker_id=PRESET)), metadata=server.metadata,
            timeout=300))
    assert replies[-1].HasField("stats") and replies[-1].stats.audio_seconds > 0
