"""The REST gateway: real Envoy in front of the real gRPC server (the shared ``stack``).

Requests are made the way the reference CosyVoice client makes them (``requests`` with form
data, a ``prompt_wav`` file, ``stream=True`` and ``iter_content(chunk_size=16000)``).
"""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile
import soxr
from conftest import assert_same_audio, decode_stream

from gateway.envoy_config import content_type, web_files
from service import limits as service_limits
from service.errors import HTTP_STATUS_KEY
from tts_core import limits

REPO_ROOT = Path(__file__).resolve().parents[1]
TEXT = "你好，欢迎使用语音合成服务。"
LONG_TEXT = ("Streaming starts early. Each sentence is sent as soon as it is ready. "
             "The client hears the first words long before the last. "
             "This makes long answers feel fast. And it keeps memory small. Goodbye.")
PROMPT_TEXT = "希望你以后能够做的比我还好呦。"


def url(stack, path: str) -> str:
    return stack.rest_url + path


def reference_request(stack, endpoint: str, data: dict, prompt: bytes | None = None,
                      method: str = "GET", headers: dict | None = None) -> requests.Response:
    """Exactly what the reference client sends (multipart when there is a prompt file)."""
    files = None
    if prompt is not None:
        files = [("prompt_wav", ("prompt_wav", io.BytesIO(prompt), "application/octet-stream"))]
    return requests.request(method, url(stack, endpoint), data=data, files=files, stream=True,
                            headers=stack.headers if headers is None else headers, timeout=300)


def read_pcm(response: requests.Response) -> tuple[np.ndarray, list[float]]:
    """Concatenate iter_content(16000) like the reference client; also note arrival times."""
    started = time.monotonic()
    pieces, arrivals = [], []
    for piece in response.iter_content(chunk_size=16000):
        pieces.append(piece)
        arrivals.append(time.monotonic() - started)
    data = b"".join(pieces)
    assert len(data) % 2 == 0
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767, arrivals


def assert_error(response: requests.Response, status: int, fragment: str,
                 grpc_code: int | None = None) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    assert HTTP_STATUS_KEY not in response.headers
    body = response.json()
    assert fragment in body["message"], body
    if grpc_code is not None:
        assert body["code"] == grpc_code
    return body


def wav_file(seconds: float, source) -> bytes:
    speech, rate = soundfile.read(source, dtype="float32")
    samples = np.tile(speech, int(np.ceil(seconds * rate / len(speech))))[: int(seconds * rate)]
    out = io.BytesIO()
    soundfile.write(out, samples, rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


# ------------------------------------------------------------------------ page, health, auth

def test_web_page_and_its_files_load_without_a_key(stack):
    files = web_files(REPO_ROOT / "web")
    if "/index.html" not in files:
        pytest.skip("web/ has no index.html yet")
    for path, file in files.items():
        reply = requests.get(url(stack, path), timeout=30)
        assert reply.status_code == 200, path
        assert reply.content == file.read_bytes(), path
        assert reply.headers["content-type"] == content_type(file), path
    page = requests.get(url(stack, "/"), timeout=30)
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.content == (REPO_ROOT / "web" / "index.html").read_bytes()


def test_healthz_reflects_the_grpc_health_check_without_a_key(stack):
    reply = requests.get(url(stack, "/healthz"), timeout=30)
    assert reply.status_code == 200


@pytest.mark.parametrize("headers", [{}, {"X-API-TOKEN": "not-the-key-0123456789"},
                                     {"Authorization": "Bearer not-the-key-0123456789"}],
                         ids=["none", "wrong", "wrong-bearer"])
def test_api_calls_need_the_key_at_envoy(stack, headers):
    for method, path in [("GET", "/v1/speakers"), ("GET", "/inference_sft"),
                         ("POST", "/inference_zero_shot"), ("GET", "/v1/status")]:
        reply = requests.request(method, url(stack, path), headers=headers,
                                 data={"tts_text": "hi", "spk_id": "中文女"}, timeout=30)
        assert_error(reply, 401, "API key", grpc_code=16)


def test_key_works_as_x_api_token_and_as_bearer(stack):
    for headers in [stack.headers, {"Authorization": f"Bearer {stack.api_key}"}]:
        reply = requests.get(url(stack, "/v1/speakers"), headers=headers, timeout=30)
        assert reply.status_code == 200


def test_speakers_json_has_stable_field_names(stack):
    reply = requests.get(url(stack, "/v1/speakers"), headers=stack.headers, timeout=30)
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert set(body) == {"speakers", "engine", "sample_rate", "modes",
                         "supports_speaker_registration", "supports_text_streaming", "limits"}
    assert body["engine"] == "embedded" and body["sample_rate"] == 24000
    assert body["supports_speaker_registration"] is False
    assert body["supports_text_streaming"] is False
    for speaker in body["speakers"]:
        assert set(speaker) == {"id", "language", "description", "registered"}
        assert speaker["registered"] is False  # primitive defaults are printed
    assert "中文女" in {s["id"] for s in body["speakers"]}
    modes = {m["mode"]: m for m in body["modes"]}
    assert set(modes) == {"SYNTHESIS_MODE_SFT", "SYNTHESIS_MODE_ZERO_SHOT",
                          "SYNTHESIS_MODE_CROSS_LINGUAL", "SYNTHESIS_MODE_INSTRUCT",
                          "SYNTHESIS_MODE_VOICE_CONVERSION"}
    assert modes["SYNTHESIS_MODE_SFT"] == {"mode": "SYNTHESIS_MODE_SFT", "supported": True,
                                           "reason": ""}
    assert modes["SYNTHESIS_MODE_ZERO_SHOT"]["supported"] is False
    assert "cosyvoice2" in modes["SYNTHESIS_MODE_ZERO_SHOT"]["reason"]
    lim = body["limits"]
    assert lim["max_text_chars"] == limits.MAX_TEXT_CHARS
    # a number, not an int64 string
    assert lim["max_upload_bytes"] == service_limits.MAX_UPLOAD_BYTES
    assert lim["output_sample_rates"] == list(service_limits.OUTPUT_SAMPLE_RATES)


# ------------------------------------------------------------------- the reference endpoints

def test_inference_sft_like_the_reference_client(stack):
    reply = reference_request(stack, "/inference_sft", {"tts_text": TEXT, "spk_id": "中文女"})
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "audio/L16; rate=22050; channels=1"
    audio, _ = read_pcm(reply)
    assert len(audio) / 22050 > 1.0 and np.sqrt(np.mean(audio ** 2)) > 0.01


def test_first_bytes_arrive_long_before_the_last(stack):
    reply = reference_request(stack, "/inference_sft", {"tts_text": LONG_TEXT, "spk_id": "英文女"})
    assert reply.status_code == 200
    audio, arrivals = read_pcm(reply)
    assert len(audio) / 22050 > 5
    assert len(arrivals) >= 4
    # Several distinct arrival moments, and the first audio long before the end.
    assert len({round(t, 1) for t in arrivals}) >= 3, arrivals
    assert arrivals[0] < 0.5 * arrivals[-1], arrivals


@pytest.mark.parametrize("style", ["post-form", "post-json", "get-query", "post-multipart"])
def test_inference_sft_accepts_form_json_query_and_multipart(stack, style):
    fields = {"tts_text": "Hello.", "spk_id": "英文男"}
    if style == "post-form":
        reply = requests.post(url(stack, "/inference_sft"), data=fields, headers=stack.headers,
                              timeout=120)
    elif style == "post-json":
        reply = requests.post(url(stack, "/inference_sft"), json=fields, headers=stack.headers,
                              timeout=120)
    elif style == "get-query":
        reply = requests.get(url(stack, "/inference_sft"), params=fields, headers=stack.headers,
                             timeout=120)
    else:
        multipart = {name: (None, value) for name, value in fields.items()}
        reply = requests.post(url(stack, "/inference_sft"), files=multipart,
                              headers=stack.headers, timeout=120)
    assert reply.status_code == 200, reply.text
    audio = np.frombuffer(reply.content, dtype="<i2")
    assert len(audio) > 0.3 * 22050


def test_sample_rate_and_wav_format_parameters(stack):
    fields = {"tts_text": "One two three.", "spk_id": "英文女"}
    base = requests.post(url(stack, "/inference_sft"), data=fields, headers=stack.headers,
                         timeout=120)
    low = requests.post(url(stack, "/inference_sft"), data={**fields, "sample_rate": "16000"},
                        headers=stack.headers, timeout=120)
    assert low.headers["content-type"] == "audio/L16; rate=16000; channels=1"
    assert len(low.content) == pytest.approx(len(base.content) * 16000 / 22050, rel=0.01)
    expected = soxr.resample(np.frombuffer(base.content, "<i2").astype(np.float32), 22050, 16000)
    got = np.frombuffer(low.content, "<i2").astype(np.float32)
    n = min(len(expected), len(got))
    assert np.corrcoef(expected[:n], got[:n])[0, 1] > 0.98

    wav = requests.post(url(stack, "/inference_sft"), data={**fields, "format": "wav"},
                        headers=stack.headers, timeout=120)
    assert wav.headers["content-type"] == "audio/wav"
    assert wav.content[:4] == b"RIFF" and struct.unpack("<I", wav.content[4:8])[0] == 0xFFFFFFFF
    assert struct.unpack("<I", wav.content[24:28])[0] == 22050
    # Same audio as the raw stream (two runs of a deterministic engine, so at most rounding).
    body = np.frombuffer(wav.content[44:], "<i2").astype(int)
    raw = np.frombuffer(base.content, "<i2").astype(int)
    assert len(body) == len(raw) and np.abs(body - raw).max() <= 2

    # Compressed formats through the same field: FLAC is the same audio, Opus at 22050 Hz is
    # sent at 24000 Hz (Opus has no 22.05 kHz mode); both decode back (PyAV).
    reference = raw.astype(np.float32) / 32768
    for fmt, mime, lossless in (("flac", "audio/flac", True),
                                ("opus", "audio/ogg; codecs=opus", False)):
        reply = requests.post(url(stack, "/inference_sft"), data={**fields, "format": fmt},
                              headers=stack.headers, timeout=120)
        assert reply.status_code == 200 and reply.headers["content-type"] == mime
        assert_same_audio(*decode_stream(reply.content), reference, 22050, lossless=lossless)


def test_cloning_endpoints_decode_the_upload_then_answer_501(stack, prompt_wav,
                                                             cross_lingual_wav):
    cases = [
        ("/inference_zero_shot", {"tts_text": TEXT, "prompt_text": PROMPT_TEXT},
         prompt_wav.read_bytes()),
        ("/inference_cross_lingual", {"tts_text": "Hello."}, cross_lingual_wav.read_bytes()),
        ("/inference_instruct", {"tts_text": TEXT, "spk_id": "中文女",
                                 "instruct_text": "用开心的语气说"}, None),
        ("/inference_instruct2", {"tts_text": TEXT, "instruct_text": "用四川话说"},
         prompt_wav.read_bytes()),
    ]
    for endpoint, data, prompt in cases:
        for method in ("GET", "POST"):
            reply = reference_request(stack, endpoint, data, prompt, method=method)
            body = assert_error(reply, 501, "--engine cosyvoice2", grpc_code=12)
            assert "embedded engine cannot" in body["message"], endpoint


def test_upload_errors_come_before_the_mode_check(stack, prompt_wav):
    data = {"tts_text": TEXT, "prompt_text": PROMPT_TEXT}
    corrupt = reference_request(stack, "/inference_zero_shot", data, b"not audio at all" * 64)
    assert_error(corrupt, 400, "could not be decoded", grpc_code=3)
    too_long = reference_request(stack, "/inference_zero_shot", data, wav_file(40, prompt_wav))
    assert_error(too_long, 413, "the limit is 30 s", grpc_code=3)
    missing = reference_request(stack, "/inference_zero_shot", data)
    assert_error(missing, 400, "prompt_wav", grpc_code=3)
    big = reference_request(stack, "/inference_zero_shot", data,
                            b"\0" * (service_limits.MAX_UPLOAD_BYTES + 1024))
    assert_error(big, 413, f"the limit is {service_limits.MAX_UPLOAD_BYTES} bytes", grpc_code=3)


def test_json_body_may_carry_the_prompt_as_base64(stack, prompt_wav):
    body = {"tts_text": TEXT, "prompt_text": PROMPT_TEXT,
            "prompt_wav": base64.b64encode(prompt_wav.read_bytes()).decode()}
    reply = requests.post(url(stack, "/inference_zero_shot"), json=body, headers=stack.headers,
                          timeout=60)
    assert_error(reply, 501, "--engine cosyvoice2")
    body["prompt_wav"] = "%%% not base64"
    reply = requests.post(url(stack, "/inference_zero_shot"), json=body, headers=stack.headers,
                          timeout=60)
    assert_error(reply, 400, "base64")


ERRORS = {
    "missing-spk_id": ("/inference_sft", {"tts_text": "hi"}, 400, "needs spk_id"),
    "unknown-speaker": ("/inference_sft", {"tts_text": "hi", "spk_id": "nobody"}, 404,
                        "unknown speaker 'nobody'"),
    "bad-speed": ("/inference_sft", {"tts_text": "hi", "spk_id": "中文女", "speed": "fast"}, 400,
                  "speed must be a number"),
    "speed-range": ("/inference_sft", {"tts_text": "hi", "spk_id": "中文女", "speed": "9"}, 400,
                    "out of range"),
    "bad-rate": ("/inference_sft", {"tts_text": "hi", "spk_id": "中文女", "sample_rate": "11025"},
                 400, "choose one of 8000"),
    "unknown-field": ("/inference_sft", {"tts_text": "hi", "spk_id": "中文女", "voice": "x"}, 400,
                      "unknown field 'voice'"),
    "bad-format": ("/inference_sft", {"tts_text": "hi", "spk_id": "中文女", "format": "ogg"}, 400,
                   "format 'ogg'"),
    "text-too-long": ("/inference_sft", {"tts_text": "长" * 2001, "spk_id": "中文女"}, 413,
                      "the limit is 2000"),
    "prompt-on-sft": ("/inference_sft", {"tts_text": "hi", "spk_id": "中文女"}, 400,
                      "takes no prompt_wav"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_errors_have_the_right_status_and_a_json_message(stack, name, prompt_wav):
    endpoint, data, status, fragment = ERRORS[name]
    prompt = prompt_wav.read_bytes() if name == "prompt-on-sft" else None
    reply = reference_request(stack, endpoint, data, prompt)
    assert_error(reply, status, fragment)


def test_gateway_level_errors(stack):
    unknown_path = requests.get(url(stack, "/inference_nothing"), headers=stack.headers,
                                timeout=30)
    assert_error(unknown_path, 404, "/inference_nothing", grpc_code=5)
    unknown_query = requests.get(url(stack, "/inference_sft"), headers=stack.headers,
                                 params={"tts_text": "hi", "spk": "x"}, timeout=30)
    assert_error(unknown_query, 400, "unknown field or query parameter", grpc_code=3)
    wrong_type = requests.post(url(stack, "/inference_sft"), data=b"tts_text=hi",
                               headers={**stack.headers, "Content-Type": "text/plain"},
                               timeout=30)
    assert_error(wrong_type, 415, "multipart/form-data", grpc_code=3)
    # Bigger than Envoy's body limit: refused by Envoy itself, with the same JSON shape.
    huge = requests.post(url(stack, "/inference_zero_shot"), headers=stack.headers,
                         files={"prompt_wav": (
                             "p.wav", b"\0" * (service_limits.MAX_REQUEST_BODY_BYTES + 1))},
                         timeout=120)
    assert_error(huge, 413, "request body too large", grpc_code=3)


def test_native_synthesize_over_rest_streams_ndjson(stack):
    request = {"text": "Hello.", "sft": {"speaker_id": "英文女"}, "sample_rate": 16000}
    reply = requests.post(url(stack, "/v1/synthesize"), json=request, headers=stack.headers,
                          stream=True, timeout=120)
    assert reply.status_code == 200
    messages = [json.loads(line) for line in reply.iter_lines() if line.strip()]
    audio = b"".join(base64.b64decode(m["audio"]["data"]) for m in messages if "audio" in m)
    assert messages[-1]["stats"]["engine"] == "embedded"
    assert messages[0]["audio"]["encoding"] == "AUDIO_ENCODING_PCM_S16LE"
    assert len(audio) / 2 / 16000 == pytest.approx(messages[-1]["stats"]["audio_seconds"],
                                                   rel=0.02)


# ----------------------------------------------------------------- overload, disconnect, logs

def test_overload_answers_503_at_once(stack, grpc_channel):
    from service.gen.cosyvoice.v1 import tts_pb2, tts_pb2_grpc

    stack.wait_idle()
    stub = tts_pb2_grpc.TextToSpeechServiceStub(grpc_channel)
    capacity = stack.max_concurrent + stack.max_queue
    long_request = tts_pb2.SynthesizeRequest(text=LONG_TEXT * 6,
                                             sft=tts_pb2.SftMode(speaker_id="英文女"))
    # gRPC blockers: a queued HTTP request would not return its headers until admitted.
    blockers = [stub.Synthesize(long_request, metadata=stack.metadata, timeout=300)
                for _ in range(capacity)]
    try:
        deadline = time.monotonic() + 60
        while True:
            now = stack.status()
            if now["active_syntheses"] + now["queued_syntheses"] == capacity:
                break
            assert time.monotonic() < deadline, now
            time.sleep(0.05)
        started = time.monotonic()
        reply = reference_request(stack, "/inference_sft", {"tts_text": "hi", "spk_id": "中文女"})
        assert time.monotonic() - started < 5
        assert_error(reply, 503, "server is busy", grpc_code=8)
    finally:
        for blocker in blockers:
            blocker.cancel()
    stack.wait_idle()


def test_dropping_the_connection_cancels_the_synthesis(stack):
    before = stack.wait_idle()
    reply = reference_request(stack, "/inference_sft",
                              {"tts_text": LONG_TEXT * 6, "spk_id": "英文女"})
    assert reply.status_code == 200
    assert next(reply.iter_content(chunk_size=16000))
    reply.close()
    after = stack.wait_idle(timeout=30)
    assert int(after["cancelled_total"]) == int(before["cancelled_total"]) + 1
    assert int(after["completed_total"]) == int(before["completed_total"])
    produced = int(after["engine_chunks_total"]) - int(before["engine_chunks_total"])
    assert produced < 10, f"the engine made {produced} chunks of a ~40-sentence text"


def test_server_keeps_serving_after_errors(stack):
    for data in [{"tts_text": ""}, {"tts_text": "hi", "spk_id": "?"}, {"spk_id": "中文女"}]:
        assert reference_request(stack, "/inference_sft", data).status_code >= 400
    ok = reference_request(stack, "/inference_sft", {"tts_text": "还在。", "spk_id": "中文女"})
    assert ok.status_code == 200 and len(ok.content) > 1000


def wait_for_log(stack, fragment: str, timeout: float = 30.0) -> str:
    """The stack's logs once ``fragment`` is in them (Envoy writes its access log late)."""
    deadline = time.monotonic() + timeout
    while fragment not in (logs := stack.logs()):
        assert time.monotonic() < deadline, f"{fragment!r} never reached the log"
        time.sleep(0.1)
    return logs


def test_api_key_never_reaches_logs_and_config_is_private(stack):
    # Make sure wrong keys were tried too, then look at everything the stack has logged.
    requests.get(url(stack, "/v1/speakers"), headers={"X-API-TOKEN": "wrong-key-xyz-987654321"},
                 timeout=30)
    requests.get(url(stack, "/v1/speakers"), headers=stack.headers, timeout=30)
    # A last request whose path marks the end: once it is logged, so are the ones above.
    marker = f"/log-marker-{time.monotonic_ns()}"
    requests.get(url(stack, marker), headers={"X-API-TOKEN": "wrong-key-xyz-987654321"},
                 timeout=30)
    logs = wait_for_log(stack, marker)
    assert "/v1/speakers" in logs, "the access log should record requests"
    assert stack.api_key not in logs
    assert "wrong-key-xyz-987654321" not in logs
    assert "tts_text" not in logs and "还在" not in logs  # no query strings or texts either
    config = stack.state_dir / "envoy.yaml"
    assert stack.api_key in config.read_text()
    assert oct(config.stat().st_mode & 0o777) == "0o600"
    assert oct(stack.state_dir.stat().st_mode & 0o777) == "0o700"


def test_envoy_admin_is_loopback_only_and_hides_the_keys(stack):
    admin_port = int(stack.admin_url.rsplit(":", 1)[1])
    dump = requests.get(stack.admin_url + "/config_dump", timeout=30)
    assert dump.status_code == 200
    assert stack.api_key not in dump.text, "config_dump must redact the API keys"
    bootstrap = next(c["bootstrap"] for c in dump.json()["configs"] if "bootstrap" in c)
    assert bootstrap["admin"]["address"]["socket_address"] == {"address": "127.0.0.1",
                                                               "port_value": admin_port}
    monitors = {m["name"]: m["typed_config"]
                for m in bootstrap["overload_manager"]["resource_monitors"]}
    limit = monitors["envoy.resource_monitors.global_downstream_max_connections"]
    assert int(limit["max_active_downstream_connections"]) == service_limits.MAX_GATEWAY_CONNECTIONS
    # Envoy warns at start-up about production settings it finds missing (such as that one).
    start_up = stack.logs().split("Ready.", 1)[0]
    assert "[envoy][warning]" not in start_up and "[envoy][error]" not in start_up


def test_launcher_generates_a_key_and_stops_both_processes_on_sigterm(launch_stack):
    extra = launch_stack(generate_key=True, max_concurrent=1, max_queue=0)
    key_file = extra.state_dir / "api_keys"
    assert extra.api_key in key_file.read_text()
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert extra.logs().count(extra.api_key) == 1, "the generated key is shown exactly once"
    assert requests.get(url(extra, "/v1/speakers"), headers=extra.headers,
                        timeout=30).status_code == 200
    assert requests.get(url(extra, "/v1/speakers"), timeout=30).status_code == 401

    assert extra.stop() == 0
    rest_port = int(extra.rest_url.rsplit(":", 1)[1])
    grpc_port = int(extra.grpc_target.rsplit(":", 1)[1])
    for port in (rest_port, grpc_port):  # both children are gone, their ports closed
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, port
