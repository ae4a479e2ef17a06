"""The whole stack with the CosyVoice 3 engine: real Envoy + gRPC server + a generated model.

The model directory is random (tiny CosyVoice 3 preset with two preset speakers), so the audio is
noise: what is checked is that the engine is picked from the directory, that every mode,
streaming, text streaming, registration (also across a restart, and the refusal of a CosyVoice 2
speaker) and the errors work end to end through REST in the reference client's style and gRPC.
The request helpers are those of the CosyVoice 2 service tests.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import requests
import torch
from conftest import Stack, rpc_error, start_stack, stop_stack
from test_cosyvoice2_service import (
    CROSS_LINGUAL_WAV,
    EN_TEXT,
    NATIVE_RATE,
    PROMPT_TEXT,
    PROMPT_WAV,
    SAMPLES_PER_TOKEN,
    TEXT,
    WORDS,
    assert_rest_audio,
    audio,
    clip,
    collect,
    reference_call,
    register_json,
    rest_error,
    rest_pcm,
    speakers,
    text_stream,
)

from service.gen.cosyvoice.v1 import tts_pb2, tts_pb2_grpc
from tts_core.cosyvoice2.model_dir import MissingModelFile
from tts_core.cosyvoice2.speakers import SpeakerProfile, SpeakerRegistry
from tts_core.registry import create_engine

PRESET = "中文女"
INSTRUCTION = "请用四川话表达。"  # from the list CosyVoice 3 was trained on


@pytest.fixture(scope="module")
def cv3(cv3_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # auto (the default with --model-dir, see test_engine_choice) must find CosyVoice 3.
    running = start_stack(tmp_path_factory.mktemp("cv3-stack"),
                          extra_args=("--engine", "auto", "--model-dir", str(cv3_model_dir)))
    try:
        yield running
    finally:
        stop_stack(running)


@pytest.fixture(scope="module")
def stub(cv3: Stack) -> Iterator[tts_pb2_grpc.TextToSpeechServiceStub]:
    with grpc.insecure_channel(cv3.grpc_target) as channel:
        yield tts_pb2_grpc.TextToSpeechServiceStub(channel)


def assert_grpc_audio(chunks: list[tts_pb2.AudioChunk], stats: tts_pb2.SynthesisStats) -> int:
    """Native 24 kHz s16le chunks, numbered, whole tokens, from the cosyvoice3 engine."""
    assert chunks and [c.index for c in chunks] == list(range(len(chunks)))
    assert {c.sample_rate for c in chunks} == {NATIVE_RATE}
    samples = sum(len(c.data) for c in chunks) // 2
    assert samples > 0 and samples % SAMPLES_PER_TOKEN == 0
    assert stats.engine == "cosyvoice3" and stats.chunks == len(chunks)
    return samples


def synthesize(stub, stack: Stack, **fields) -> tuple[list, tts_pb2.SynthesisStats]:
    return collect(stub.Synthesize(tts_pb2.SynthesizeRequest(**fields), metadata=stack.metadata,
                                   timeout=300))


# ---------------------------------------------------------------------------- engine and modes

def test_auto_picks_cosyvoice3_and_reports_every_mode(cv3):
    assert "using the cosyvoice3 engine" in cv3.logs()
    body = requests.get(cv3.rest_url + "/v1/speakers", headers=cv3.headers, timeout=30).json()
    assert body["engine"] == "cosyvoice3" and body["sample_rate"] == NATIVE_RATE
    assert all(m["supported"] for m in body["modes"]) and len(body["modes"]) == 5
    assert body["supports_speaker_registration"] and body["supports_text_streaming"]
    assert {"中文女", "英文男"} <= set(speakers(cv3))


REST_MODES = {
    "sft": ("/inference_sft", {"tts_text": TEXT, "spk_id": PRESET}, {}),
    "zero_shot": ("/inference_zero_shot", {"tts_text": TEXT, "prompt_text": PROMPT_TEXT},
                  {"prompt_wav": PROMPT_WAV}),
    # the reference's own CosyVoice 3 prompt string works unchanged
    "zero_shot_system": ("/inference_zero_shot", {
        "tts_text": "高管也通过电话对报道[j][ǐ]予好评。",
        "prompt_text": f"You are a helpful assistant.<|endofprompt|>{PROMPT_TEXT}"},
        {"prompt_wav": PROMPT_WAV}),
    "cross_lingual": ("/inference_cross_lingual", {"tts_text": EN_TEXT},
                      {"prompt_wav": CROSS_LINGUAL_WAV}),
    "instruct": ("/inference_instruct", {"tts_text": TEXT, "spk_id": PRESET,
                                         "instruct_text": INSTRUCTION}, {}),
    "instruct2": ("/inference_instruct2", {
        "tts_text": TEXT,
        "instruct_text": f"You are a helpful assistant. {INSTRUCTION}<|endofprompt|>"},
        {"prompt_wav": PROMPT_WAV}),
}


@pytest.mark.parametrize("mode", list(REST_MODES))
def test_every_mode_over_rest_like_the_reference_client(cv3, mode):
    endpoint, data, files = REST_MODES[mode]
    assert_rest_audio(rest_pcm(reference_call(cv3, endpoint, data, files)))


def test_voice_conversion_over_rest_keeps_the_source_length(cv3, tmp_path):
    source = clip(tmp_path, CROSS_LINGUAL_WAV, 3.0, "source.wav")
    reply = reference_call(cv3, "/inference_vc", {},
                           {"source_wav": source, "prompt_wav": PROMPT_WAV}, method="POST")
    assert assert_rest_audio(rest_pcm(reply)) == pytest.approx(3.0, abs=0.08)


@pytest.mark.parametrize("mode", ["sft", "zero_shot", "cross_lingual", "instruct",
                                  "voice_conversion"])
def test_every_mode_over_grpc(cv3, stub, tmp_path, mode):
    prompt = audio(PROMPT_WAV)
    fields = {
        "sft": dict(text=TEXT, sft=tts_pb2.SftMode(speaker_id=PRESET)),
        "zero_shot": dict(text=TEXT, zero_shot=tts_pb2.ZeroShotMode(
            prompt_audio=prompt, prompt_text=PROMPT_TEXT)),
        "cross_lingual": dict(text=EN_TEXT, cross_lingual=tts_pb2.CrossLingualMode(
            prompt_audio=audio(CROSS_LINGUAL_WAV))),
        "instruct": dict(text=TEXT, instruct=tts_pb2.InstructMode(
            instruct_text=INSTRUCTION, prompt_audio=prompt)),
        "voice_conversion": dict(voice_conversion=tts_pb2.VoiceConversionMode(
            source_audio=audio(clip(tmp_path, CROSS_LINGUAL_WAV, 2.0, "source.wav")),
            prompt_audio=prompt)),
    }[mode]
    samples = assert_grpc_audio(*synthesize(stub, cv3, **fields))
    if mode == "voice_conversion":
        assert samples == 2 * 25 * SAMPLES_PER_TOKEN


def test_streaming_yields_several_chunks(cv3, stub):
    text = "我们今天学习了第3课，内容非常有趣。" * 3
    voice = tts_pb2.ZeroShotMode(prompt_audio=audio(PROMPT_WAV), prompt_text=PROMPT_TEXT)
    streamed, stats = synthesize(stub, cv3, text=text, zero_shot=voice)
    assert_grpc_audio(streamed, stats)
    assert len(streamed) >= 3
    whole, stats = synthesize(stub, cv3, text=text, zero_shot=voice, stream_within_sentence=False)
    assert_grpc_audio(whole, stats)
    assert len(whole) < len(streamed)


def test_text_stream_speaks_pieces_while_they_arrive(cv3, stub):
    config = tts_pb2.SynthesizeRequest(zero_shot=tts_pb2.ZeroShotMode(
        prompt_audio=audio(PROMPT_WAV), prompt_text=PROMPT_TEXT))
    chunks, stats = collect(stub.SynthesizeTextStream(
        text_stream(config, [w + " " for w in WORDS]), metadata=cv3.metadata, timeout=300))
    assert assert_grpc_audio(chunks, stats) > 20 * SAMPLES_PER_TOKEN
    # the rest of the text is only sent once audio came back
    first_audio = threading.Event()
    config = tts_pb2.SynthesizeRequest(instruct=tts_pb2.InstructMode(
        instruct_text=INSTRUCTION, speaker_id=PRESET))
    replies = []
    for reply in stub.SynthesizeTextStream(
            text_stream(config, [w + " " for w in WORDS], wait=first_audio,
                        later=["And ", "this ", "is ", "the ", "end."]),
            metadata=cv3.metadata, timeout=300):
        first_audio.set()
        replies.append(reply)
    assert_grpc_audio(*collect(replies))


# ------------------------------------------------------------------------ registered speakers

def test_registration_survives_a_restart_and_cosyvoice2_speakers_are_refused(
        cv3_model_dir, launch_stack, tmp_path):
    state = tmp_path / "state"
    args = ("--engine", "cosyvoice3", "--model-dir", str(cv3_model_dir), "--state-dir",
            str(state))
    # A voice the CosyVoice 2 engine registered earlier in the same state directory.
    SpeakerRegistry(state, features="cosyvoice2").add(SpeakerProfile(
        id="old", embedding=torch.zeros(1, 192),
        speech_tokens=torch.zeros(1, 30, dtype=torch.int32),
        speech_feat=torch.zeros(1, 60, 80), prompt_text=PROMPT_TEXT, registered=True))

    first = launch_stack(extra_args=args)
    reply = register_json(first, "alice", PROMPT_WAV, PROMPT_TEXT)
    assert reply.status_code == 200, reply.text
    upload = reference_call(first, "/register_speaker", {"spk_id": "bob", "language": "en"},
                            {"prompt_wav": clip(tmp_path, CROSS_LINGUAL_WAV, 5.0, "en.wav")},
                            method="POST")
    assert upload.status_code == 200, upload.text
    assert {"alice", "bob"} <= set(speakers(first)) and "old" not in speakers(first)
    rest_error(reference_call(first, "/inference_zero_shot", {"tts_text": TEXT, "spk_id": "old"}),
               404, "registered with cosyvoice2 features")
    first.stop()

    second = launch_stack(extra_args=args)
    assert {"alice", "bob"} <= set(speakers(second))
    for endpoint, data in {
        "/inference_zero_shot": {"tts_text": TEXT, "spk_id": "alice"},
        "/inference_cross_lingual": {"tts_text": EN_TEXT, "spk_id": "bob"},
        "/inference_instruct2": {"tts_text": TEXT, "instruct_text": INSTRUCTION,
                                 "spk_id": "bob"},
    }.items():
        assert_rest_audio(rest_pcm(reference_call(second, endpoint, data)))
    with grpc.insecure_channel(second.grpc_target) as channel:
        stub = tts_pb2_grpc.TextToSpeechServiceStub(channel)
        assert_grpc_audio(*synthesize(stub, second, text=TEXT,
                                      zero_shot=tts_pb2.ZeroShotMode(speaker_id="alice")))
        error = rpc_error(stub.Synthesize(tts_pb2.SynthesizeRequest(
            text=TEXT, cross_lingual=tts_pb2.CrossLingualMode(speaker_id="old")),
            metadata=second.metadata, timeout=30))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert "register the voice again" in error.details()


# ---------------------------------------------------------------------------------- errors

def test_rest_and_grpc_errors(cv3, stub):
    for endpoint, data, files, status, fragment in [
        ("/inference_zero_shot", {"tts_text": TEXT, "spk_id": "nobody"}, {}, 404,
         "unknown speaker 'nobody'"),
        ("/inference_zero_shot", {"tts_text": TEXT}, {"prompt_wav": PROMPT_WAV}, 400,
         "needs prompt_text"),
        ("/inference_vc", {}, {"prompt_wav": PROMPT_WAV}, 400, "source_wav"),
    ]:
        rest_error(reference_call(cv3, endpoint, data, files), status, fragment)
    error = rpc_error(stub.Synthesize(tts_pb2.SynthesizeRequest(
        text=TEXT, cross_lingual=tts_pb2.CrossLingualMode()), metadata=cv3.metadata, timeout=60))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert cv3.wait_idle()["active_syntheses"] == 0


def test_engine_choice(tmp_path):
    from gateway.launch import parse_options, service_command
    from service.options import parse_server_options

    assert parse_server_options(["--model-dir", str(tmp_path)]).engine_name == "auto"
    assert parse_server_options([]).engine_name == "embedded"
    chosen = parse_server_options(["--engine", "cosyvoice3", "--model-dir", str(tmp_path)])
    assert chosen.engine_name == "cosyvoice3"
    # the launcher passes the choice on as given; the server applies the same default
    server = parse_options(["--model-dir", str(tmp_path)]).server
    command = service_command(server, tmp_path / "state")
    assert "--engine" not in command
    assert parse_server_options(command[3:]).engine_name == "auto"


def test_engine_choice_errors(tmp_path):
    (tmp_path / "cosyvoice2.yaml").write_text("sample_rate: 24000\n")
    with pytest.raises(MissingModelFile, match="cosyvoice3.yaml"):
        create_engine("cosyvoice3", model_dir=tmp_path, device="cpu")
    with pytest.raises(ValueError, match="needs --model-dir"):
        create_engine("auto")
