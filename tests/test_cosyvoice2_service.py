"""The whole stack with the CosyVoice 2 engine: real Envoy + gRPC server + a generated model.

The model directory is random (tiny preset, with two preset speakers), so the audio is noise:
what is checked is that every mode, streaming, speaker registration and its persistence, the
bidirectional text stream and the errors work end to end through REST (the reference client's
request style) and gRPC, judged by lengths, chunk counts and formats.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import soundfile
import torch
from conftest import AUDIO_DIR, Stack, collect_replies, rpc_error, start_stack, stop_stack

from service import limits as service_limits
from service.gen.cosyvoice.v1 import tts_pb2, tts_pb2_grpc
from tts_core import limits
from tts_core.cosyvoice2.testing.make_model_dir import make_model_dir

PROMPT_WAV = AUDIO_DIR / "zero_shot_prompt.wav"  # 24 kHz float, 3.5 s, Mandarin
CROSS_LINGUAL_WAV = AUDIO_DIR / "cross_lingual_prompt.wav"  # 22.05 kHz PCM, 13.75 s, English
PROMPT_TEXT = "希望你以后能够做的比我还好呦。"
TEXT = "收到好友从远方寄来的生日礼物。"
EN_TEXT = "Hello there, this is a quick test."
NATIVE_RATE = 24000
SAMPLES_PER_TOKEN = 960  # 25 speech tokens per second at 24 kHz
REST_RATE = service_limits.REST_DEFAULT_SAMPLE_RATE
PRESET = "中文女"  # written by make_model_dir(spk2info=True), like the official presets


# ------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="session")
def cv2_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return make_model_dir(tmp_path_factory.mktemp("cv2-model") / "tiny", "tiny", seed=3,
                          spk2info=True)


def engine_args(model_dir: Path, *extra: str) -> tuple[str, ...]:
    return ("--engine", "cosyvoice2", "--model-dir", str(model_dir), *extra)


@pytest.fixture(scope="module")
def cv2(cv2_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = start_stack(tmp_path_factory.mktemp("cv2-stack"),
                          extra_args=engine_args(cv2_model_dir))
    try:
        yield running
    finally:
        stop_stack(running)


@pytest.fixture(scope="module")
def stub(cv2: Stack) -> Iterator[tts_pb2_grpc.TextToSpeechServiceStub]:
    with grpc.insecure_channel(cv2.grpc_target) as channel:
        yield tts_pb2_grpc.TextToSpeechServiceStub(channel)


def clip(tmp_path: Path, source: Path, seconds: float, name: str) -> Path:
    """The first ``seconds`` of ``source`` (tiled if shorter) as a 16-bit WAV file."""
    speech, rate = soundfile.read(source, dtype="float32")
    reps = int(np.ceil(seconds * rate / len(speech)))
    path = tmp_path / name
    soundfile.write(path, np.tile(speech, reps)[: int(seconds * rate)], rate, subtype="PCM_16")
    return path


# ------------------------------------------------------------------------------------- helpers

def reference_call(stack: Stack, endpoint: str, data: dict, files: dict[str, Path] | None = None,
                   method: str = "GET") -> requests.Response:
    """Exactly how the reference client calls the server (one multipart file per upload)."""
    handles = [(name, (name, open(path, "rb"), "application/octet-stream"))
               for name, path in (files or {}).items()]
    try:
        return requests.request(method, stack.rest_url + endpoint, data=data,
                                files=handles or None, stream=True, headers=stack.headers,
                                timeout=300)
    finally:
        for _, (_, handle, _) in handles:
            handle.close()


def rest_pcm(response: requests.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == f"audio/L16; rate={REST_RATE}; channels=1"
    data = b"".join(response.iter_content(chunk_size=16000))
    assert len(data) % 2 == 0
    return np.frombuffer(data, "<i2").astype(np.float32) / 32767


def assert_rest_audio(samples: np.ndarray) -> float:
    """Some noise of a plausible length; returns its duration in seconds."""
    seconds = len(samples) / REST_RATE
    assert 0.2 < seconds < 60, seconds
    # Tokens give whole 960-sample blocks at 24 kHz, i.e. 882 samples at 22.05 kHz.
    assert abs(len(samples) / 882 - round(len(samples) / 882)) < 0.01
    assert float(np.sqrt(np.mean(samples ** 2))) > 1e-3
    return seconds


def rest_error(response: requests.Response, status: int, fragment: str) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    assert fragment in response.json()["message"], response.json()


collect = collect_replies


def assert_grpc_audio(chunks: list[tts_pb2.AudioChunk], stats: tts_pb2.SynthesisStats) -> int:
    """Native 24 kHz s16le chunks, numbered, whole tokens; returns the sample count."""
    assert chunks and [c.index for c in chunks] == list(range(len(chunks)))
    assert {c.sample_rate for c in chunks} == {NATIVE_RATE}
    assert {c.encoding for c in chunks} == {tts_pb2.AUDIO_ENCODING_PCM_S16LE}
    samples = sum(len(c.data) for c in chunks) // 2
    assert samples > 0 and samples % SAMPLES_PER_TOKEN == 0
    assert stats.chunks == len(chunks) and stats.sample_rate == NATIVE_RATE
    assert stats.engine == "cosyvoice2"
    assert stats.audio_seconds == pytest.approx(samples / NATIVE_RATE)
    return samples


def synthesize(stub, stack: Stack, **fields) -> tuple[list[tts_pb2.AudioChunk],
                                                      tts_pb2.SynthesisStats]:
    request = tts_pb2.SynthesizeRequest(**fields)
    return collect(stub.Synthesize(request, metadata=stack.metadata, timeout=300))


def audio(path: Path) -> tts_pb2.PromptAudio:
    return tts_pb2.PromptAudio(data=path.read_bytes(), format=tts_pb2.PROMPT_AUDIO_FORMAT_CONTAINER)


def speakers(stack: Stack) -> dict[str, dict]:
    reply = requests.get(stack.rest_url + "/v1/speakers", headers=stack.headers, timeout=30)
    assert reply.status_code == 200
    return {s["id"]: s for s in reply.json()["speakers"]}


# ---------------------------------------------------------------------------- engine and modes

def test_speakers_report_every_mode_and_both_extras(cv2, stub):
    body = requests.get(cv2.rest_url + "/v1/speakers", headers=cv2.headers, timeout=30).json()
    assert body["engine"] == "cosyvoice2" and body["sample_rate"] == NATIVE_RATE
    assert all(m["supported"] for m in body["modes"]) and len(body["modes"]) == 5
    assert body["supports_speaker_registration"] is True
    assert body["supports_text_streaming"] is True
    assert {"中文女", "英文男"} <= set(speakers(cv2))
    assert body["limits"]["max_stream_text_chars"] == limits.MAX_STREAM_TEXT_CHARS
    reply = stub.ListSpeakers(tts_pb2.ListSpeakersRequest(), metadata=cv2.metadata, timeout=30)
    assert reply.supports_text_streaming and reply.supports_speaker_registration
    assert reply.limits.text_stream_idle_seconds == limits.TEXT_STREAM_IDLE_SECONDS


REST_MODES = {
    "sft": ("/inference_sft", {"tts_text": TEXT, "spk_id": PRESET}, {}),
    "zero_shot": ("/inference_zero_shot", {"tts_text": TEXT, "prompt_text": PROMPT_TEXT},
                  {"prompt_wav": PROMPT_WAV}),
    "cross_lingual": ("/inference_cross_lingual", {"tts_text": EN_TEXT},
                      {"prompt_wav": CROSS_LINGUAL_WAV}),
    "instruct": ("/inference_instruct", {"tts_text": TEXT, "spk_id": PRESET,
                                         "instruct_text": "用开心的语气说"}, {}),
    "instruct2": ("/inference_instruct2", {"tts_text": TEXT, "instruct_text": "用四川话说这句话"},
                  {"prompt_wav": PROMPT_WAV}),
}


@pytest.mark.parametrize("mode", list(REST_MODES))
def test_every_mode_over_rest_like_the_reference_client(cv2, mode):
    endpoint, data, files = REST_MODES[mode]
    assert_rest_audio(rest_pcm(reference_call(cv2, endpoint, data, files)))


def test_voice_conversion_over_rest_keeps_the_source_length(cv2, tmp_path):
    source = clip(tmp_path, CROSS_LINGUAL_WAV, 3.0, "source.wav")
    for method in ("GET", "POST"):
        reply = reference_call(cv2, "/inference_vc", {},
                               {"source_wav": source, "prompt_wav": PROMPT_WAV}, method=method)
        # 25 tokens per second of source speech, each 40 ms of output.
        assert assert_rest_audio(rest_pcm(reply)) == pytest.approx(3.0, abs=0.08)


def grpc_modes(tmp_path: Path) -> dict[str, dict]:
    prompt, en = audio(PROMPT_WAV), audio(CROSS_LINGUAL_WAV)
    return {
        "sft": dict(text=TEXT, sft=tts_pb2.SftMode(speaker_id=PRESET)),
        "zero_shot": dict(text=TEXT, zero_shot=tts_pb2.ZeroShotMode(
            prompt_audio=prompt, prompt_text=PROMPT_TEXT)),
        "cross_lingual": dict(text=EN_TEXT, cross_lingual=tts_pb2.CrossLingualMode(
            prompt_audio=en)),
        "instruct2": dict(text=TEXT, instruct=tts_pb2.InstructMode(
            instruct_text="用四川话说这句话", prompt_audio=prompt)),
        "instruct_spk_id": dict(text=TEXT, instruct=tts_pb2.InstructMode(
            instruct_text="用开心的语气说", speaker_id=PRESET)),
        "voice_conversion": dict(voice_conversion=tts_pb2.VoiceConversionMode(
            source_audio=audio(clip(tmp_path, CROSS_LINGUAL_WAV, 2.0, "source.wav")),
            prompt_audio=prompt)),
    }


@pytest.mark.parametrize("mode", ["sft", "zero_shot", "cross_lingual", "instruct2",
                                  "instruct_spk_id", "voice_conversion"])
def test_every_mode_over_grpc(cv2, stub, tmp_path, mode):
    samples = assert_grpc_audio(*synthesize(stub, cv2, **grpc_modes(tmp_path)[mode]))
    if mode == "voice_conversion":
        assert samples == 2 * 25 * SAMPLES_PER_TOKEN  # 2 s of source: 50 tokens


def test_streaming_yields_several_chunks_and_whole_sentences_do_not(cv2, stub):
    text = "我们今天学习了第3课，内容非常有趣。" * 3
    voice = tts_pb2.ZeroShotMode(prompt_audio=audio(PROMPT_WAV), prompt_text=PROMPT_TEXT)
    streamed, stats = synthesize(stub, cv2, text=text, zero_shot=voice)
    assert_grpc_audio(streamed, stats)
    assert len(streamed) >= 3
    whole, stats = synthesize(stub, cv2, text=text, zero_shot=voice,
                              stream_within_sentence=False)
    assert_grpc_audio(whole, stats)
    assert len(whole) < len(streamed)


def test_output_options_apply_to_the_cosyvoice2_engine(cv2):
    reply = reference_call(cv2, "/inference_sft", {"tts_text": TEXT, "spk_id": PRESET,
                                                   "format": "wav", "sample_rate": "16000"})
    assert reply.status_code == 200 and reply.headers["content-type"] == "audio/wav"
    data = reply.content
    assert data[:4] == b"RIFF" and int.from_bytes(data[24:28], "little") == 16000
    assert len(data) > 44 + 16000 * 2 * 0.2


# ------------------------------------------------------------------------ registered speakers

def register_json(stack: Stack, speaker_id: str, wav: Path, prompt_text: str = "",
                  **extra) -> requests.Response:
    body = {"speaker_id": speaker_id, "prompt_text": prompt_text,
            "prompt_audio": {"data": base64.b64encode(wav.read_bytes()).decode(),
                             "format": "PROMPT_AUDIO_FORMAT_CONTAINER"}, **extra}
    return requests.post(stack.rest_url + "/v1/speakers", json=body, headers=stack.headers,
                         timeout=120)


def test_registered_speakers_serve_every_prompt_mode_and_survive_a_restart(
        cv2_model_dir, launch_stack, tmp_path):
    state = tmp_path / "shared-state"
    args = engine_args(cv2_model_dir, "--state-dir", str(state))
    first = launch_stack(extra_args=args)

    # JSON (base64 through the transcoder), with a transcript: serves zero_shot too.
    reply = register_json(first, "alice", PROMPT_WAV, PROMPT_TEXT, description="test voice")
    assert reply.status_code == 200, reply.text
    assert reply.json()["speaker"] == {"id": "alice", "language": "zh",
                                       "description": "test voice", "registered": True}
    # Multipart upload, no transcript: serves cross_lingual, instruct, voice conversion, sft.
    en_clip = clip(tmp_path, CROSS_LINGUAL_WAV, 5.0, "en.wav")
    upload = reference_call(first, "/register_speaker", {"spk_id": "bob", "language": "en"},
                            {"prompt_wav": en_clip}, method="POST")
    assert upload.status_code == 200, upload.text
    assert upload.json()["speaker"]["registered"] is True
    assert {"alice", "bob", PRESET} <= set(speakers(first))
    assert speakers(first)["alice"]["registered"] and not speakers(first)[PRESET]["registered"]
    assert (state / "speakers").is_dir() and list(state.rglob("alice.safetensors"))

    # Taken ids: 409, for registered and preset speakers alike; replace=true overwrites.
    rest_error(register_json(first, "alice", PROMPT_WAV, PROMPT_TEXT), 409, "already registered")
    rest_error(register_json(first, PRESET, PROMPT_WAV), 409, "preset speaker")
    assert register_json(first, "bob", en_clip, replace=True).status_code == 200

    # The registered ids stand in for prompt_wav on every cloning endpoint.
    use = {
        "/inference_zero_shot": {"tts_text": TEXT, "spk_id": "alice"},
        "/inference_cross_lingual": {"tts_text": EN_TEXT, "spk_id": "bob"},
        "/inference_instruct2": {"tts_text": TEXT, "instruct_text": "慢一点说", "spk_id": "bob"},
        "/inference_sft": {"tts_text": TEXT, "spk_id": "alice"},
    }
    for endpoint, data in use.items():
        assert_rest_audio(rest_pcm(reference_call(first, endpoint, data)))
    source = clip(tmp_path, CROSS_LINGUAL_WAV, 1.0, "source.wav")
    vc = reference_call(first, "/inference_vc", {"spk_id": "alice"}, {"source_wav": source})
    assert assert_rest_audio(rest_pcm(vc)) == pytest.approx(1.0, abs=0.08)
    rest_error(reference_call(first, "/inference_zero_shot", {"tts_text": TEXT, "spk_id": "bob"}),
               400, "registered without a transcript")
    native = requests.post(first.rest_url + "/v1/synthesize", headers=first.headers, timeout=120,
                           json={"text": TEXT, "zero_shot": {"speaker_id": "alice"}})
    lines = [json.loads(line) for line in native.text.splitlines()]
    assert native.status_code == 200 and "audio" in lines[0] and "stats" in lines[-1]
    first.stop()

    # Same state directory, new server: the speakers are still there and still work.
    second = launch_stack(extra_args=args)
    assert {"alice", "bob"} <= set(speakers(second))
    with grpc.insecure_channel(second.grpc_target) as channel:
        stub = tts_pb2_grpc.TextToSpeechServiceStub(channel)
        for mode in (dict(zero_shot=tts_pb2.ZeroShotMode(speaker_id="alice")),
                     dict(cross_lingual=tts_pb2.CrossLingualMode(speaker_id="alice")),
                     dict(instruct=tts_pb2.InstructMode(instruct_text="慢一点说",
                                                        speaker_id="bob"))):
            assert_grpc_audio(*synthesize(stub, second, text=TEXT, **mode))

        # Delete: gone from the list, 404 on use and on a second delete.
        gone = requests.delete(second.rest_url + "/v1/speakers/alice", headers=second.headers,
                               timeout=30)
        assert gone.status_code == 200 and gone.json() == {}
        assert "alice" not in speakers(second) and not list(state.rglob("alice.safetensors"))
        rest_error(reference_call(second, "/inference_zero_shot",
                                  {"tts_text": TEXT, "spk_id": "alice"}), 404, "alice")
        error = rpc_error(stub.Synthesize(tts_pb2.SynthesizeRequest(
            text=TEXT, cross_lingual=tts_pb2.CrossLingualMode(speaker_id="alice")),
            metadata=second.metadata, timeout=30))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as caught:
            stub.DeleteSpeaker(tts_pb2.DeleteSpeakerRequest(speaker_id="alice"),
                               metadata=second.metadata, timeout=30)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        preset = requests.delete(second.rest_url + f"/v1/speakers/{PRESET}",
                                 headers=second.headers, timeout=30)
        rest_error(preset, 400, "preset")


def test_grpc_registration_and_its_errors(cv2, stub, tmp_path):
    before = cv2.wait_idle()
    registered = stub.RegisterSpeaker(tts_pb2.RegisterSpeakerRequest(
        speaker_id="grpc-voice", prompt_audio=audio(PROMPT_WAV), prompt_text=PROMPT_TEXT),
        metadata=cv2.metadata, timeout=120)
    assert registered.speaker.id == "grpc-voice" and registered.speaker.registered
    # Registration is engine work: it took (and gave back) a synthesis slot.
    after = cv2.status()
    assert int(after["started_total"]) == int(before["started_total"]) + 1
    assert int(after["completed_total"]) == int(before["completed_total"]) + 1
    assert after["active_syntheses"] == 0
    try:
        assert_grpc_audio(*synthesize(stub, cv2, text=TEXT,
                                      zero_shot=tts_pb2.ZeroShotMode(speaker_id="grpc-voice")))
        cases = [
            (tts_pb2.RegisterSpeakerRequest(speaker_id="grpc-voice",
                                            prompt_audio=audio(PROMPT_WAV)),
             grpc.StatusCode.ALREADY_EXISTS, "already registered"),
            (tts_pb2.RegisterSpeakerRequest(speaker_id="../escape",
                                            prompt_audio=audio(PROMPT_WAV)),
             grpc.StatusCode.INVALID_ARGUMENT, "not valid"),
            (tts_pb2.RegisterSpeakerRequest(speaker_id="no-audio"),
             grpc.StatusCode.INVALID_ARGUMENT, "prompt_audio is required"),
            (tts_pb2.RegisterSpeakerRequest(
                speaker_id="long", prompt_audio=audio(clip(tmp_path, PROMPT_WAV, 40, "l.wav"))),
             grpc.StatusCode.INVALID_ARGUMENT, "the limit is 30 s"),
        ]
        for request, code, fragment in cases:
            with pytest.raises(grpc.RpcError) as caught:
                stub.RegisterSpeaker(request, metadata=cv2.metadata, timeout=60)
            assert caught.value.code() == code and fragment in caught.value.details()
    finally:
        stub.DeleteSpeaker(tts_pb2.DeleteSpeakerRequest(speaker_id="grpc-voice"),
                           metadata=cv2.metadata, timeout=30)


# --------------------------------------------------------------- bidirectional text streaming

def text_stream(config: tts_pb2.SynthesizeRequest, pieces: list[str],
                wait: threading.Event | None = None, later: Sequence[str] = ()):
    """The request messages: config, pieces, then (after ``wait``) the ``later`` pieces."""
    yield tts_pb2.SynthesizeTextStreamRequest(config=config)
    for piece in pieces:
        yield tts_pb2.SynthesizeTextStreamRequest(text=piece)
    if wait is not None:
        assert wait.wait(60), "no audio came back before the rest of the text was sent"
    for piece in later:
        yield tts_pb2.SynthesizeTextStreamRequest(text=piece)


WORDS = ("Streaming text arrives word by word from a language model, and the speech should "
         "start long before the last word has been written, which is the whole point of the "
         "bidirectional call. ").split(" ")


def test_text_stream_speaks_pieces_while_they_arrive(cv2, stub):
    before = cv2.wait_idle()
    config = tts_pb2.SynthesizeRequest(zero_shot=tts_pb2.ZeroShotMode(
        prompt_audio=audio(PROMPT_WAV), prompt_text=PROMPT_TEXT))
    chunks, stats = collect(stub.SynthesizeTextStream(
        text_stream(config, [w + " " for w in WORDS]), metadata=cv2.metadata, timeout=300))
    assert assert_grpc_audio(chunks, stats) > 20 * SAMPLES_PER_TOKEN
    after = cv2.wait_idle()
    assert int(after["started_total"]) == int(before["started_total"]) + 1
    assert int(after["completed_total"]) == int(before["completed_total"]) + 1

    # The rest of the text is only sent once audio came back: the server cannot be waiting
    # for the end of the text before it speaks.
    first_audio = threading.Event()
    config = tts_pb2.SynthesizeRequest(text="Hello. ", sft=tts_pb2.SftMode(speaker_id="英文男"))
    messages = text_stream(config, [w + " " for w in WORDS], wait=first_audio,
                           later=["And ", "this ", "is ", "the ", "end."])
    replies = []
    for reply in stub.SynthesizeTextStream(messages, metadata=cv2.metadata, timeout=300):
        first_audio.set()
        replies.append(reply)
    assert_grpc_audio(*collect(replies))


def test_text_stream_can_be_cancelled(cv2, stub):
    before = cv2.wait_idle()
    config = tts_pb2.SynthesizeRequest(sft=tts_pb2.SftMode(speaker_id="英文男"))
    call = stub.SynthesizeTextStream(text_stream(config, [w + " " for w in WORDS * 4]),
                                     metadata=cv2.metadata, timeout=300)
    assert next(call).HasField("audio")
    call.cancel()
    after = cv2.wait_idle()
    assert int(after["cancelled_total"]) == int(before["cancelled_total"]) + 1


def test_text_streams_share_the_synthesis_limits(cv2, stub):
    # A CosyVoice engine batches by default, so the server runs --max-batch syntheses at once
    # (not the stack's --max-concurrent): its status says how many.
    running = int(cv2.wait_idle()["max_concurrent"])
    assert running == int(cv2.status()["max_batch"]) > 1
    release = threading.Event()
    held = [stub.SynthesizeTextStream(text_stream(sft_config(), ["Hello "], wait=release,
                                                  later=["world, ", "how are you?"]),
                                      metadata=cv2.metadata, timeout=120)
            for _ in range(running + cv2.max_queue)]
    try:
        # Engines waiting for text hold their slots; the next stream waits in the queue.
        deadline = time.monotonic() + 60
        while True:
            status = cv2.status()
            if (status["active_syntheses"], status["queued_syntheses"]) == (running,
                                                                             cv2.max_queue):
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
        extra = rpc_error(stub.SynthesizeTextStream(
            text_stream(sft_config(), ["Hello."]), metadata=cv2.metadata, timeout=60))
        assert extra.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "server is busy" in extra.details()
    finally:
        release.set()
    for call in held:
        assert_grpc_audio(*collect(call))
    assert cv2.wait_idle()["active_syntheses"] == 0


def sft_config(**fields) -> tts_pb2.SynthesizeRequest:
    return tts_pb2.SynthesizeRequest(sft=tts_pb2.SftMode(speaker_id=PRESET), **fields)


TEXT_STREAM_ERRORS = {
    "text-first": ([tts_pb2.SynthesizeTextStreamRequest(text="hi")],
                   grpc.StatusCode.INVALID_ARGUMENT, "first message must carry config"),
    "empty-stream": ([], grpc.StatusCode.INVALID_ARGUMENT, "before its first message"),
    "no-text": ([tts_pb2.SynthesizeTextStreamRequest(config=sft_config())],
                grpc.StatusCode.INVALID_ARGUMENT, "without any text"),
    "second-config": ([tts_pb2.SynthesizeTextStreamRequest(config=sft_config()),
                       tts_pb2.SynthesizeTextStreamRequest(config=sft_config())],
                      grpc.StatusCode.INVALID_ARGUMENT, "only the first message"),
    "voice-conversion": ([tts_pb2.SynthesizeTextStreamRequest(config=tts_pb2.SynthesizeRequest(
        voice_conversion=tts_pb2.VoiceConversionMode(speaker_id=PRESET)))],
        grpc.StatusCode.INVALID_ARGUMENT, "takes no text"),
    "unknown-speaker": ([tts_pb2.SynthesizeTextStreamRequest(config=tts_pb2.SynthesizeRequest(
        cross_lingual=tts_pb2.CrossLingualMode(speaker_id="nobody"))),
        tts_pb2.SynthesizeTextStreamRequest(text="hello")],
        grpc.StatusCode.NOT_FOUND, "unknown speaker 'nobody'"),
    "too-much-text": ([tts_pb2.SynthesizeTextStreamRequest(config=sft_config())]
                      + [tts_pb2.SynthesizeTextStreamRequest(text="字" * 1000)]
                      * (limits.MAX_STREAM_TEXT_CHARS // 1000 + 1),
                      grpc.StatusCode.INVALID_ARGUMENT,
                      f"more than {limits.MAX_STREAM_TEXT_CHARS} characters"),
    "bad-output": ([tts_pb2.SynthesizeTextStreamRequest(config=sft_config(sample_rate=1234))],
                   grpc.StatusCode.INVALID_ARGUMENT, "sample_rate 1234"),
}


@pytest.mark.parametrize("name", list(TEXT_STREAM_ERRORS))
def test_text_stream_errors(cv2, stub, name):
    messages, code, fragment = TEXT_STREAM_ERRORS[name]
    error = rpc_error(stub.SynthesizeTextStream(iter(messages), metadata=cv2.metadata,
                                                timeout=60))
    assert error.code() == code and fragment in error.details(), error.details()


def test_text_stream_fails_when_the_text_stops_coming(cv2_model_dir, tmp_path):
    import asyncio

    from service.server import start_server
    from tts_core.registry import create_engine

    engine = create_engine("cosyvoice2", model_dir=cv2_model_dir, threads=1, device="cpu",
                           state_dir=tmp_path)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    key = "k" * 24
    running = asyncio.run_coroutine_threadsafe(start_server(
        engine, host="127.0.0.1", port=0, api_keys=[key], text_idle_seconds=0.5), loop).result(30)
    release = threading.Event()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            local = tts_pb2_grpc.TextToSpeechServiceStub(channel)
            started = time.monotonic()
            error = rpc_error(local.SynthesizeTextStream(
                text_stream(sft_config(), ["Hello "], wait=release), timeout=60,
                metadata=(("x-api-token", key),)))
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "no text arrived for 0.5 s" in error.details()
            assert time.monotonic() - started < 30
            status = local.GetServerStatus(tts_pb2.GetServerStatusRequest(),
                                           metadata=(("x-api-token", key),))
            assert status.active_syntheses == 0
    finally:
        release.set()
        asyncio.run_coroutine_threadsafe(running.stop(0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_text_stream_is_unimplemented_on_the_embedded_engine(stack, grpc_channel):
    embedded = tts_pb2_grpc.TextToSpeechServiceStub(grpc_channel)
    error = rpc_error(embedded.SynthesizeTextStream(
        iter([tts_pb2.SynthesizeTextStreamRequest(config=sft_config()),
              tts_pb2.SynthesizeTextStreamRequest(text="hello")]),
        metadata=stack.metadata, timeout=60))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "send the whole text to Synthesize" in error.details()


# ---------------------------------------------------------------------------------- errors

def test_rest_errors(cv2, tmp_path):
    long_prompt = clip(tmp_path, PROMPT_WAV, 40, "long.wav")
    cases = [
        ("/inference_zero_shot", {"tts_text": TEXT, "spk_id": "nobody"}, {}, 404,
         "unknown speaker 'nobody'"),
        ("/inference_cross_lingual", {"tts_text": EN_TEXT}, {}, 400,
         "needs the prompt recording"),
        ("/inference_zero_shot", {"tts_text": TEXT}, {"prompt_wav": PROMPT_WAV}, 400,
         "needs prompt_text"),
        ("/inference_zero_shot", {"tts_text": TEXT, "prompt_text": PROMPT_TEXT},
         {"prompt_wav": long_prompt}, 413, "the limit is 30 s"),
        ("/inference_vc", {}, {"prompt_wav": PROMPT_WAV}, 400, "source_wav"),
        ("/inference_vc", {}, {"source_wav": long_prompt, "prompt_wav": PROMPT_WAV}, 413,
         "source audio is 40.0 s long"),
        ("/inference_vc", {"spk_id": PRESET}, {"source_wav": PROMPT_WAV,
                                               "prompt_wav": PROMPT_WAV}, 400, "not both"),
        ("/inference_vc", {"tts_text": TEXT}, {"source_wav": PROMPT_WAV}, 400,
         "unknown field 'tts_text'"),
        ("/inference_zero_shot", {"tts_text": TEXT, "spk_id": PRESET, "prompt_text": "x"}, {},
         400, "prompt_text goes with prompt_wav"),
        ("/inference_sft", {"tts_text": TEXT, "spk_id": PRESET}, {"source_wav": PROMPT_WAV}, 400,
         "takes no source_wav"),
        ("/register_speaker", {"spk_id": "x"}, {}, 400, "needs the voice recording"),
        ("/register_speaker", {"spk_id": "x"}, {"prompt_wav": long_prompt}, 413,
         "the limit is 30 s"),
    ]
    for endpoint, data, files, status, fragment in cases:
        method = "POST" if endpoint == "/register_speaker" else "GET"
        rest_error(reference_call(cv2, endpoint, data, files, method=method), status, fragment)


def test_grpc_errors(cv2, stub, tmp_path):
    long_audio = audio(clip(tmp_path, PROMPT_WAV, 40, "long.wav"))
    cases = [
        (dict(text=TEXT, zero_shot=tts_pb2.ZeroShotMode(speaker_id="nobody")),
         grpc.StatusCode.NOT_FOUND, "unknown speaker 'nobody'"),
        (dict(text=TEXT, zero_shot=tts_pb2.ZeroShotMode(prompt_text=PROMPT_TEXT)),
         grpc.StatusCode.INVALID_ARGUMENT, "zero_shot needs a voice"),
        (dict(text=TEXT, cross_lingual=tts_pb2.CrossLingualMode()),
         grpc.StatusCode.INVALID_ARGUMENT, "cross_lingual needs a voice"),
        (dict(voice_conversion=tts_pb2.VoiceConversionMode(prompt_audio=audio(PROMPT_WAV))),
         grpc.StatusCode.INVALID_ARGUMENT, "source audio is required"),
        (dict(text=TEXT, cross_lingual=tts_pb2.CrossLingualMode(prompt_audio=long_audio)),
         grpc.StatusCode.INVALID_ARGUMENT, "the limit is 30 s"),
        (dict(voice_conversion=tts_pb2.VoiceConversionMode(source_audio=long_audio,
                                                           speaker_id=PRESET)),
         grpc.StatusCode.INVALID_ARGUMENT, "source audio is 40.0 s long"),
        (dict(text=TEXT, zero_shot=tts_pb2.ZeroShotMode(speaker_id=PRESET, prompt_text="x")),
         grpc.StatusCode.INVALID_ARGUMENT, "prompt_text goes with prompt_audio"),
    ]
    for fields, code, fragment in cases:
        error = rpc_error(stub.Synthesize(tts_pb2.SynthesizeRequest(**fields),
                                          metadata=cv2.metadata, timeout=60))
        assert error.code() == code and fragment in error.details(), error.details()
    # Errors never leave the server busy.
    assert cv2.wait_idle()["active_syntheses"] == 0


def test_json_body_carries_both_files_as_base64(cv2, tmp_path):
    source = clip(tmp_path, CROSS_LINGUAL_WAV, 1.0, "s.wav")
    body = {"source_wav": base64.b64encode(source.read_bytes()).decode(),
            "prompt_wav": base64.b64encode(PROMPT_WAV.read_bytes()).decode(), "format": "wav"}
    reply = requests.post(cv2.rest_url + "/inference_vc", json=body, headers=cv2.headers,
                          timeout=120)
    assert reply.status_code == 200 and reply.headers["content-type"] == "audio/wav"
    assert reply.content[:4] == b"RIFF"
    pcm = np.frombuffer(reply.content[44:], "<i2")
    assert len(pcm) / REST_RATE == pytest.approx(1.0, abs=0.08)


# ------------------------------------------------------------------- OpenAI-compatible API

def test_openai_client_streams_every_format_and_instructions(cv2):
    import openai
    from conftest import decode_stream

    from service.openai_api import FORMATS

    client = openai.OpenAI(base_url=f"{cv2.rest_url}/v1", api_key=cv2.api_key, max_retries=0,
                           timeout=300)
    assert "cosyvoice2" in {m.id for m in client.models.list()}
    for response_format in FORMATS:
        with client.audio.speech.with_streaming_response.create(
                model="cosyvoice2", voice=PRESET, input=TEXT,
                response_format=response_format) as reply:
            assert reply.status_code == 200
            data = b"".join(reply.iter_bytes())
        if response_format == "pcm":
            samples = np.frombuffer(data, "<i2").astype(np.float32) / 32768
            rate = NATIVE_RATE
        else:
            samples, rate = decode_stream(data)
        seconds = len(samples) / rate
        assert 0.2 < seconds < 60 and float(np.sqrt(np.mean(samples ** 2))) > 1e-3
        if response_format in ("pcm", "wav", "flac"):  # lossless: whole speech tokens
            assert rate == NATIVE_RATE and len(samples) % SAMPLES_PER_TOKEN == 0
    # instructions: the engine's instruct mode with the chosen voice
    styled = client.audio.speech.create(model="tts-1", voice=PRESET, input=TEXT,
                                        instructions="用开心的语气说", response_format="pcm")
    assert len(styled.content) // 2 % SAMPLES_PER_TOKEN == 0 and len(styled.content) > 0
