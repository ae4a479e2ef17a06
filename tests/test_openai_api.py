"""The OpenAI-compatible API through the real Envoy gateway, called with the real ``openai``
client (unchanged, ``base_url`` pointed at the gateway) and the embedded engine (shared
``stack``). The decoding rules themselves are unit-tested in test_requests_unit.py.
"""

from __future__ import annotations

import base64
import json
import time

import numpy as np
import openai
import pytest
import requests
from conftest import assert_same_audio, decode_stream

from service import openai_api

VOICE = "英文女"
CONTENT_TYPES = {"pcm": "audio/L16; rate=24000; channels=1", "wav": "audio/wav",
                 "mp3": "audio/mpeg", "opus": "audio/ogg; codecs=opus", "aac": "audio/aac",
                 "flac": "audio/flac"}
SHORT = "Hello there."
LONG = ("Streaming starts early. Each sentence is sent as soon as it is ready. "
        "The client hears the first words long before the last. "
        "This makes long answers feel fast. And it keeps memory small. Goodbye.")


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.rest_url}/v1", api_key=stack.api_key, max_retries=0,
                         timeout=120)


def decode(data: bytes, response_format: str) -> tuple[np.ndarray, int]:
    """Samples (float32 mono) and rate of an answer in ``response_format``."""
    if response_format == "pcm":
        return np.frombuffer(data, "<i2").astype(np.float32) / 32768, openai_api.OUTPUT_RATE
    return decode_stream(data)


@pytest.fixture(scope="module")
def reference_pcm(client) -> np.ndarray:
    """What the engine says for SHORT, as raw PCM (the engine is deterministic)."""
    data = client.audio.speech.create(model="tts-1", voice=VOICE, input=SHORT,
                                      response_format="pcm").content
    return decode(data, "pcm")[0]


@pytest.mark.parametrize("response_format", list(openai_api.FORMATS))
def test_every_format_streams_through_the_openai_client(client, reference_pcm, response_format):
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice=VOICE, input=SHORT, response_format=response_format) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"] == CONTENT_TYPES[response_format]
        data = b"".join(reply.iter_bytes())
    samples, rate = decode(data, response_format)
    if response_format == openai_api.DEFAULT_FORMAT:
        # The plain call (and OpenAI's default format) gets the same audio: the engine and the
        # encoders are deterministic. (reference_pcm is a plain call too.)
        plain = client.audio.speech.create(model="tts-1", voice=VOICE, input=SHORT).content
        np.testing.assert_array_equal(decode(plain, response_format)[0], samples)
    expected_rate = 48000 if response_format == "opus" else openai_api.OUTPUT_RATE
    assert rate == expected_rate
    assert_same_audio(samples, rate, reference_pcm, openai_api.OUTPUT_RATE,
                      lossless=response_format in ("pcm", "wav", "flac"))


def test_first_bytes_arrive_long_before_the_last(client):
    started = time.monotonic()
    arrivals, size = [], 0
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice=VOICE, input=LONG, response_format="pcm") as reply:
        for piece in reply.iter_bytes(4096):
            arrivals.append(time.monotonic() - started)
            size += len(piece)
    assert size / 2 / openai_api.OUTPUT_RATE > 5
    assert len({round(t, 1) for t in arrivals}) >= 3, arrivals
    assert arrivals[0] < 0.5 * arrivals[-1], arrivals


def test_server_sent_events_carry_the_same_audio(stack, client, reference_pcm):
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice=VOICE, input=SHORT, response_format="pcm",
            extra_body={"stream_format": "sse"}) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: "):]) for line in reply.iter_lines()
                  if line.startswith("data: ")]
    assert len(events) >= 2
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    assert events[-1]["type"] == "speech.audio.done"
    assert events[-1]["usage"]["input_tokens"] == len(SHORT)
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    np.testing.assert_allclose(decode(pcm, "pcm")[0], reference_pcm, atol=2 / 32768)


def test_models_and_voices_are_listed(stack, client):
    models = {m.id for m in client.models.list()}
    assert models == {"embedded", *openai_api.OPENAI_MODELS}
    reply = requests.get(f"{stack.rest_url}/v1/audio/voices",
                         headers={"Authorization": f"Bearer {stack.api_key}"}, timeout=30)
    assert reply.status_code == 200
    voices = {v["id"]: v for v in reply.json()["voices"]}
    assert voices[VOICE]["language"] == "en" and "中文女" in voices


def test_speed_is_clamped_and_the_client_is_told(client, reference_pcm):
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice=VOICE, input=SHORT, response_format="pcm", speed=4.0) as reply:
        assert reply.headers[openai_api.SPEED_HEADER] == "2"
        fast = decode(reply.read(), "pcm")[0]
    assert len(fast) < 0.7 * len(reference_pcm)


def error_of(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value


def test_errors_use_openais_shape_and_status(stack, client):
    def speech(**fields):
        return lambda: client.audio.speech.create(**{"model": "tts-1", "voice": VOICE,
                                                     "input": SHORT, **fields})

    cases = [
        (speech(voice="nobody"), 404, "voice", "nobody"),
        (speech(model="dall-e-3"), 404, "model", "tts-1"),
        (speech(input=""), 400, None, "input is empty"),
        (speech(speed=5.0), 400, "speed", "0.25 to 4.0"),
        (speech(response_format="ogg"), 400, "response_format", "use one of"),
        (speech(input="长" * 2001), 413, None, "the limit is 2000"),
        (speech(instructions="Speak cheerfully."), 501, None, "embedded engine cannot follow"),
        (speech(extra_body={"temperature": 1}), 400, "temperature", "unrecognized"),
    ]
    for call, status, param, fragment in cases:
        error = error_of(call)
        assert error.status_code == status, (status, error.body)
        body = error.response.json()
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["param"] == param
        assert fragment in body["error"]["message"], body
    wrong_key = openai.OpenAI(base_url=f"{stack.rest_url}/v1", api_key="not-the-key-012345",
                              max_retries=0)
    error = error_of(lambda: wrong_key.audio.speech.create(model="tts-1", voice=VOICE,
                                                           input=SHORT))
    assert isinstance(error, openai.AuthenticationError)
    assert error.response.json()["error"]["code"] == "invalid_api_key"
