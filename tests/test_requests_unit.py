"""Request decoding and validation, in process: no sockets, no Envoy, a fake engine.

The rules live in ``tts_core/limits.py``; these tests check that every surface (native gRPC
messages, the reference REST API's forms, the options of both programs) reaches them and that
their errors carry the right gRPC code and HTTP status. The real-stack tests
(test_service_grpc.py, test_gateway_rest.py) cover the same paths over the wire.
"""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import soundfile
from conftest import assert_same_audio, decode_stream
from google.api import httpbody_pb2

from service import compat, convert, errors
from service.errors import ServiceError
from service.gen.cosyvoice.v1 import compat_pb2, openai_pb2, tts_pb2
from service.options import ServerOptions, parse_server_options
from service.server import Core, RestCompatService, TextToSpeechService
from service.synthesis import Synthesizer
from tts_core import limits
from tts_core.engine import (
    Capabilities,
    InvalidRequest,
    Mode,
    Speaker,
    SynthesisRequest,
    TooLarge,
    UnknownSpeaker,
    UnsupportedMode,
)

RATE = 24000


class FakeEngine:
    """Preset speakers "a" and "b"; sft only; each request yields three 0.1 s sweeps."""

    name = "fake"

    def __init__(self) -> None:
        self.requests: list[SynthesisRequest] = []

    def capabilities(self) -> Capabilities:
        return Capabilities(engine=self.name, sample_rate=RATE, modes=frozenset({Mode.SFT}),
                            unsupported_reasons={m: f"fake cannot do {m.value}" for m in Mode
                                                 if m is not Mode.SFT})

    def speakers(self) -> list[Speaker]:
        return [Speaker("a", "en"), Speaker("b", "zh")]

    def validate(self, request: SynthesisRequest) -> None:
        if request.mode is not Mode.SFT:
            raise UnsupportedMode(self.capabilities().unsupported_reasons[request.mode])
        if request.speaker_id not in ("a", "b"):
            raise UnknownSpeaker(f"unknown speaker {request.speaker_id!r}; choose a or b")
        limits.check_request(request)

    def synthesize(self, request: SynthesisRequest, cancel: threading.Event
                   ) -> Iterator[np.ndarray]:
        self.validate(request)
        self.requests.append(request)
        t = np.arange(RATE // 10) / RATE
        for k in range(3):  # rising sweeps: one alignment only, as speech has
            f0 = 200.0 * (k + 1)
            yield (0.3 * np.sin(2 * np.pi * (f0 * t + 2000 * t * t))).astype(np.float32)


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, metadata: tuple) -> None:
        super().__init__(message)
        self.code, self.message, self.metadata = code, message, dict(metadata)


class FakeContext:
    """What the servicers use of grpc.aio.ServicerContext."""

    def __init__(self) -> None:
        self.initial_metadata: tuple = ()

    async def abort(self, code, message, trailing_metadata=()):
        raise Aborted(code, message, trailing_metadata)

    async def send_initial_metadata(self, metadata):
        self.initial_metadata = tuple(metadata)

    def invocation_metadata(self):
        return ()


def run(coroutine):
    return asyncio.run(coroutine)


async def _collect(replies) -> list:
    return [reply async for reply in replies]


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def services(engine):
    def make():
        core = Core(engine, Synthesizer(engine, max_concurrent=1, max_queue=0))
        return TextToSpeechService(core), RestCompatService(core)
    return make


def sft(text: str = "Hello.", speaker: str = "a", **fields) -> tts_pb2.SynthesizeRequest:
    return tts_pb2.SynthesizeRequest(text=text, sft=tts_pb2.SftMode(speaker_id=speaker), **fields)


def wav(seconds: float, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    out = io.BytesIO()
    soundfile.write(out, 0.3 * np.sin(2 * np.pi * 200 * t), rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


# ------------------------------------------------------------------ the rules themselves

@pytest.mark.parametrize("request_, error, fragment", [
    (SynthesisRequest(Mode.SFT, text=" ", speaker_id="a"), InvalidRequest, "text is empty"),
    (SynthesisRequest(Mode.SFT, text="x" * (limits.MAX_TEXT_CHARS + 1), speaker_id="a"),
     TooLarge, f"the limit is {limits.MAX_TEXT_CHARS}"),
    (SynthesisRequest(Mode.SFT, text="hi", speaker_id="a", speed=2.5), InvalidRequest,
     "between 0.5 and 2.0"),
    (SynthesisRequest(Mode.SFT, text="hi", speaker_id="a", speed=float("nan")), InvalidRequest,
     "out of range"),
    (SynthesisRequest(Mode.ZERO_SHOT, text="hi", speaker_id="a", prompt_text="words"),
     InvalidRequest, "prompt_text goes with prompt audio"),
    (SynthesisRequest(Mode.INSTRUCT, text="hi", speaker_id="a"), InvalidRequest,
     "instruct needs instruct_text"),
    (SynthesisRequest(Mode.INSTRUCT, text="hi", speaker_id="a",
                      instruct_text="x" * (limits.MAX_INSTRUCT_TEXT_CHARS + 1)), TooLarge,
     "instruct_text has"),
    (SynthesisRequest(Mode.SFT, text="hi", speaker_id="x" * (limits.MAX_SPEAKER_ID_CHARS + 1)),
     TooLarge, "speaker_id has"),
])
def test_request_rules(request_, error, fragment):
    with pytest.raises(error, match=fragment):
        limits.check_request(request_)


def test_rules_name_fields_as_the_callers_api_spells_them():
    prompt = object()  # the rule only asks whether there is one
    request = SynthesisRequest(Mode.ZERO_SHOT, text="hi", prompt=prompt)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="needs prompt_text, the transcript of prompt_wav "
                                             r"\(without one, use /inference_cross_lingual\)"):
        limits.check_request(request, compat.REST_NAMES)
    limits.check_request(SynthesisRequest(Mode.SFT, speaker_id="a"), streamed_text=True)
    limits.check_request(SynthesisRequest(Mode.VOICE_CONVERSION, speaker_id="a"))


def test_registration_rules():
    limits.check_registration("Speaker_1.v2-x", "transcript", "en-US", "calm")
    limits.check_registration("中文男")
    for bad in ("../etc/passwd", "", ".hidden", "x" * 65, "a..b", "with space"):
        with pytest.raises(InvalidRequest, match="not valid"):
            limits.check_registration(bad)
    with pytest.raises(TooLarge):
        limits.check_registration("ok", "x" * (limits.MAX_PROMPT_TEXT_CHARS + 1))
    with pytest.raises(InvalidRequest, match="language tag"):
        limits.check_registration("ok", language="english!")


def test_engine_errors_map_to_one_status_each():
    from tts_core.engine import SpeakerExists

    cases = [(InvalidRequest("x"), grpc.StatusCode.INVALID_ARGUMENT, 400),
             (TooLarge("x"), grpc.StatusCode.INVALID_ARGUMENT, 413),
             (SpeakerExists("x"), grpc.StatusCode.ALREADY_EXISTS, 409),
             (UnknownSpeaker("x"), grpc.StatusCode.NOT_FOUND, 404),
             (UnsupportedMode("x"), grpc.StatusCode.UNIMPLEMENTED, 501)]
    for engine_error, code, status in cases:
        mapped = errors.from_engine_error(engine_error)
        assert (mapped.code, mapped.http_status) == (code, status)


# ------------------------------------------------------------------ native messages

@pytest.mark.parametrize("message, status, fragment", [
    (tts_pb2.SynthesizeRequest(text="hi"), 400, "no mode"),
    (sft(" "), 400, "text is empty"),
    (sft(speaker=""), 400, "sft needs speaker_id"),
    (sft(speed=5.0), 400, "speed 5.0 is out of range"),
    (sft(sample_rate=12345), 400, "choose one of 8000"),
    (sft(encoding=42), 400, "unknown encoding"),
    (sft("字" * (limits.MAX_TEXT_CHARS + 1)), 413, f"limit is {limits.MAX_TEXT_CHARS}"),
    (tts_pb2.SynthesizeRequest(text="hi", zero_shot=tts_pb2.ZeroShotMode(
        speaker_id="a", prompt_text="x")), 400, "prompt_text goes with prompt_audio"),
    (tts_pb2.SynthesizeRequest(text="hi", zero_shot=tts_pb2.ZeroShotMode(
        prompt_audio=tts_pb2.PromptAudio(data=wav(1.0)))), 400,
     "zero_shot needs prompt_text, the transcript of prompt_audio"),
    (tts_pb2.SynthesizeRequest(text="hi", instruct=tts_pb2.InstructMode(instruct_text="calm")),
     400, "speaker_id or prompt_audio"),
    (tts_pb2.SynthesizeRequest(voice_conversion=tts_pb2.VoiceConversionMode(speaker_id="a")),
     400, "source audio is required"),
    (tts_pb2.SynthesizeRequest(voice_conversion=tts_pb2.VoiceConversionMode(
        speaker_id="a", source_audio=tts_pb2.PromptAudio(data=wav(0.1)))), 400,
     f"at least {limits.MIN_SOURCE_SECONDS:g} s"),
    (tts_pb2.SynthesizeRequest(text="hi", cross_lingual=tts_pb2.CrossLingualMode(
        prompt_audio=tts_pb2.PromptAudio(data=wav(0.3)))), 400,
     f"at least {limits.MIN_PROMPT_SECONDS:g} s"),
])
def test_native_request_errors(message, status, fragment):
    with pytest.raises(ServiceError) as caught:
        convert.to_engine_request(message)
    assert caught.value.http_status == status
    assert fragment in caught.value.message


def test_native_request_decodes_into_the_engine_request():
    request, output = convert.to_engine_request(sft("Hi.", speaker=" b ", speed=1.5,
                                                    sample_rate=16000,
                                                    stream_within_sentence=False))
    assert request == SynthesisRequest(Mode.SFT, text="Hi.", speaker_id="b", speed=1.5,
                                       stream=False)
    assert output == convert.OutputSpec(16000, tts_pb2.AUDIO_ENCODING_UNSPECIFIED)
    source = convert.to_engine_request(tts_pb2.SynthesizeRequest(
        voice_conversion=tts_pb2.VoiceConversionMode(
            speaker_id="a", source_audio=tts_pb2.PromptAudio(data=wav(0.3)))))[0].source
    assert source.duration == pytest.approx(0.3)  # sources may be shorter than prompts
    streamed, _ = convert.to_engine_request(tts_pb2.SynthesizeRequest(
        sft=tts_pb2.SftMode(speaker_id="a")), streamed_text=True)
    assert streamed.text == ""


# ------------------------------------------------------------------ reference REST forms

def rest(kind: str, fields: dict[str, str], body: bytes = b"", content_type: str = ""):
    message = getattr(compat_pb2, {
        "sft": "InferenceSftRequest", "zero_shot": "InferenceZeroShotRequest",
        "cross_lingual": "InferenceCrossLingualRequest", "instruct": "InferenceInstructRequest",
        "instruct2": "InferenceInstruct2Request", "vc": "InferenceVcRequest"}[kind])
    return message(**fields, body=httpbody_pb2.HttpBody(content_type=content_type, data=body))


def rest_request(kind: str, fields: dict[str, str], body: bytes = b"", content_type: str = ""):
    return convert.to_engine_request(compat.decode(kind, rest(kind, fields, body, content_type)),
                                     names=compat.REST_NAMES)


@pytest.mark.parametrize("kind, fields, body, status, fragment", [
    ("sft", {"tts_text": "hi"}, "", 400, "needs spk_id"),
    ("sft", {"tts_text": "hi", "spk_id": "a", "speed": "fast"}, "", 400, "speed must be a number"),
    ("sft", {"tts_text": "hi", "spk_id": "a", "speed": "9"}, "", 400, "out of range"),
    ("sft", {"tts_text": "hi", "spk_id": "a", "format": "ogg"}, "", 400, "format 'ogg'"),
    ("sft", {"tts_text": "长" * 2001, "spk_id": "a"}, "", 413, "tts_text has 2001"),
    ("sft", {"tts_text": "hi", "spk_id": "a"}, "voice=x", 400, "unknown field 'voice'"),
    ("zero_shot", {"tts_text": "hi", "spk_id": "a", "prompt_text": "x"}, "", 400,
     "prompt_text goes with prompt_wav; leave it out with spk_id"),
    ("cross_lingual", {"tts_text": "hi"}, "", 400, "needs the prompt recording"),
    ("instruct", {"tts_text": "hi", "spk_id": "a"}, "", 400, "needs instruct_text"),
])
def test_rest_request_errors(kind, fields, body, status, fragment):
    with pytest.raises(ServiceError) as caught:
        rest_request(kind, fields, body.encode(),
                     "application/x-www-form-urlencoded" if body else "")
    assert caught.value.http_status == status
    assert fragment in caught.value.message


def test_rest_fields_may_come_as_form_json_or_query():
    expected = SynthesisRequest(Mode.SFT, text="Hello.", speaker_id="a", speed=0.75)
    as_query = rest_request("sft", {"tts_text": "Hello.", "spk_id": "a", "speed": "0.75"})
    as_form = rest_request("sft", {}, b"tts_text=Hello.&spk_id=a&speed=0.75",
                           "application/x-www-form-urlencoded")
    as_json = rest_request("sft", {"tts_text": "ignored"},
                           b'{"tts_text": "Hello.", "spk_id": "a", "speed": 0.75}',
                           "application/json")
    for request, output in (as_query, as_form, as_json):
        assert request == expected
        assert output.sample_rate == 22050  # the reference API's rate


# ------------------------------------------------------------------ servicers, fake engine

def test_synthesize_streams_numbered_chunks_then_stats(services, engine):
    tts, _ = services()
    replies = run(_collect(tts.Synthesize(sft(sample_rate=16000), FakeContext())))
    chunks = [r.audio for r in replies if r.HasField("audio")]
    assert [c.index for c in chunks] == list(range(len(chunks))) and len(chunks) >= 3
    assert {c.sample_rate for c in chunks} == {16000}
    stats = replies[-1].stats
    assert stats.engine == "fake" and stats.chunks == len(chunks)
    assert stats.audio_seconds == pytest.approx(0.3)
    samples = sum(len(c.data) for c in chunks) // 2
    assert samples == pytest.approx(0.3 * 16000, abs=2)
    assert engine.requests[0].text == "Hello."


@pytest.mark.parametrize("message, code, status, fragment", [
    (sft(speaker="zzz"), grpc.StatusCode.NOT_FOUND, "404", "unknown speaker 'zzz'"),
    (tts_pb2.SynthesizeRequest(text="hi", instruct=tts_pb2.InstructMode(
        speaker_id="a", instruct_text="calm")), grpc.StatusCode.UNIMPLEMENTED, "501",
     "fake cannot do instruct"),
    (sft(" "), grpc.StatusCode.INVALID_ARGUMENT, "400", "text is empty"),
])
def test_synthesize_errors_come_before_any_audio(services, engine, message, code, status,
                                                 fragment):
    tts, _ = services()
    with pytest.raises(Aborted) as caught:
        run(_collect(tts.Synthesize(message, FakeContext())))
    assert caught.value.code == code and fragment in caught.value.message
    assert caught.value.metadata[errors.HTTP_STATUS_KEY] == status
    assert engine.requests == []


def test_rest_endpoint_streams_bodies_with_the_content_type(services):
    _, compat_service = services()
    bodies = run(_collect(compat_service.InferenceSft(
        rest("sft", {"tts_text": "Hi.", "spk_id": "a", "format": "wav"}), FakeContext())))
    assert {b.content_type for b in bodies} == {"audio/wav"}
    data = b"".join(b.data for b in bodies)
    assert data[:4] == b"RIFF" and (len(data) - 44) // 2 == pytest.approx(0.3 * 22050, abs=2)


def test_text_stream_needs_an_engine_that_can(services):
    tts, _ = services()

    async def messages():
        yield tts_pb2.SynthesizeTextStreamRequest(config=sft(""))

    with pytest.raises(Aborted) as caught:
        run(_collect(tts.SynthesizeTextStream(messages(), FakeContext())))
    assert caught.value.code == grpc.StatusCode.UNIMPLEMENTED
    assert "send the whole text to Synthesize" in caught.value.message


# ------------------------------------------------------------------ options

def test_one_options_object_for_launcher_and_server(tmp_path):
    from gateway.launch import parse_options, service_command

    gateway = parse_options(["--port", "8080", "--grpc-port", "6000", "--engine", "cosyvoice2",
                             "--model-dir", str(tmp_path), "--precision", "bfloat16",
                             "--threads", "3", "--api-key-file", str(tmp_path / "keys")])
    assert gateway.port == 8080
    assert gateway.server == ServerOptions(engine="cosyvoice2", model_dir=tmp_path,
                                           precision="bfloat16", threads=3, grpc_port=6000,
                                           api_key_file=tmp_path / "keys")
    command = service_command(gateway.server, tmp_path / "state")
    assert command[1:3] == ["-m", "service"]
    assert "--api-key-file" not in command  # keys go through the environment
    server = parse_server_options(command[3:])
    assert server == ServerOptions(engine="cosyvoice2", model_dir=tmp_path, precision="bfloat16",
                                   threads=3, grpc_port=6000, state_dir=tmp_path / "state")
    assert parse_server_options(["--port", "7", "--host", "::1"]).grpc_port == 7
    with pytest.raises(SystemExit):
        parse_server_options(["--precision", "float8"])


# ------------------------------------------------------------------ OpenAI's JSON

def speech_body(**fields) -> bytes:
    import json

    return json.dumps({"model": "tts-1", "input": "Hello.", "voice": "a", **fields}).encode()


def test_openai_speech_decodes_into_the_engine_request():
    from service import openai_api

    speech = openai_api.decode_speech(speech_body(), "application/json", "fake")
    assert speech.request == SynthesisRequest(Mode.SFT, text="Hello.", speaker_id="a")
    assert speech.response_format == "mp3" and not speech.sse  # OpenAI's defaults
    assert speech.output == convert.OutputSpec(24000, tts_pb2.AUDIO_ENCODING_MP3)
    styled = openai_api.decode_speech(
        speech_body(instructions="Speak calmly.", voice={"id": "b"}, speed=0.25,
                    response_format="opus", stream_format="sse", model="fake"),
        "application/json; charset=utf-8", "fake")
    assert styled.request == SynthesisRequest(Mode.INSTRUCT, text="Hello.", speaker_id="b",
                                               instruct_text="Speak calmly.", speed=0.5)
    assert styled.speed_applied == limits.MIN_SPEED and styled.sse


@pytest.mark.parametrize("body, content_type, status, param, fragment", [
    (speech_body(), "text/plain", 415, None, "application/json"),
    (b"[1, 2]", "application/json", 400, None, "must be an object"),
    (b"{not json", "application/json", 400, None, "malformed"),
    (speech_body(model="whisper-1"), "application/json", 404, "model", "tts-1"),
    (speech_body(voice=""), "application/json", 400, "voice", "'voice' is required"),
    (speech_body(input=None), "application/json", 400, "input", "'input' is required"),
    (speech_body(input=" "), "application/json", 400, None, "input is empty"),
    (speech_body(input="x" * 2001), "application/json", 413, None, "input has 2001"),
    (speech_body(speed=0.1), "application/json", 400, "speed", "0.25 to 4.0"),
    (speech_body(speed="fast"), "application/json", 400, "speed", "must be a number"),
    (speech_body(response_format="ogg"), "application/json", 400, "response_format",
     "mp3, opus, aac, flac"),
    (speech_body(stream_format="chunks"), "application/json", 400, "stream_format", "sse"),
    (speech_body(instructions="x" * 501), "application/json", 413, None, "instructions has"),
    (speech_body(seed=3), "application/json", 400, "seed", "unrecognized request argument"),
])
def test_openai_speech_errors(body, content_type, status, param, fragment):
    import json

    from service import openai_api

    with pytest.raises(ServiceError) as caught:
        openai_api.decode_speech(body, content_type, "fake")
    error = caught.value
    assert (error.http_status, error.param) == (status, param)
    assert fragment in error.message
    shaped = json.loads(openai_api.error_body(error))["error"]
    assert shaped == {"message": error.message, "param": param, "type": shaped["type"],
                      "code": shaped["code"]}
    assert shaped["type"] == "invalid_request_error"


def test_openai_speech_over_the_servicer(engine):
    import json

    from service import openai_api
    from service.server import OpenAiSpeechService

    service = OpenAiSpeechService(Core(engine, Synthesizer(engine, 1, 0)))
    request = openai_pb2.CreateSpeechRequest(body=httpbody_pb2.HttpBody(
        content_type="application/json", data=speech_body(response_format="pcm")))
    context = FakeContext()
    bodies = run(_collect(service.CreateSpeech(request, context)))
    assert dict(context.initial_metadata) == {openai_api.SPEED_HEADER: "1"}
    assert {b.content_type for b in bodies} == {"audio/L16; rate=24000; channels=1"}
    assert len(b"".join(b.data for b in bodies)) == 2 * int(0.3 * RATE)

    missing = openai_pb2.CreateSpeechRequest(body=httpbody_pb2.HttpBody(
        content_type="application/json", data=speech_body(voice="zzz")))
    context = FakeContext()
    (body,) = run(_collect(service.CreateSpeech(missing, context)))
    assert dict(context.initial_metadata) == {errors.HTTP_STATUS_KEY: "404"}
    assert body.content_type == "application/json"
    assert json.loads(body.data)["error"]["param"] == "voice"
    models = json.loads(run(service.ListModels(openai_pb2.ListModelsRequest(), None)).data)
    assert [m["id"] for m in models["data"]] == ["fake", *openai_api.OPENAI_MODELS]
    voices = json.loads(run(service.ListVoices(openai_pb2.ListVoicesRequest(), None)).data)
    assert [v["id"] for v in voices["voices"]] == ["a", "b"]


# ------------------------------------------------------------------ encoded output

@pytest.mark.parametrize("name", ["wav", "flac", "mp3", "opus", "aac"])
def test_every_encoding_decodes_back_to_what_the_engine_said(services, engine, name):
    """Synthesize in each encoding; the decoded stream matches the engine's samples."""
    from service.audio import FORMAT_ENCODINGS

    tts, _ = services()
    replies = run(_collect(tts.Synthesize(sft(encoding=FORMAT_ENCODINGS[name]), FakeContext())))
    chunks = [r.audio for r in replies if r.HasField("audio")]
    assert {c.encoding for c in chunks} == {FORMAT_ENCODINGS[name]}
    spoken = np.concatenate(list(FakeEngine().synthesize(
        SynthesisRequest(Mode.SFT, text="x", speaker_id="a"), threading.Event())))
    assert_same_audio(*decode_stream(b"".join(c.data for c in chunks)), spoken, RATE,
                      lossless=name in ("wav", "flac"))
