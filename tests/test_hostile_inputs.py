"""Hostile and careless inputs, through real Envoy and the real gRPC server: each class gets a
4xx (or INVALID_ARGUMENT) with a message a person can act on, never a 500 / UNKNOWN, and never
the words of a parser, codec or library (Python exception text, libsndfile's, gRPC core's).
"""

from __future__ import annotations

import io
import json
import re

import grpc
import numpy as np
import pytest
import requests
import soundfile

from service import limits as service_limits
from service.gen.cosyvoice.v1 import tts_pb2, tts_pb2_grpc

SPEAKER = "英文女"
# What a leaked internal message looks like.
LEAK = re.compile(r"codec|Expecting|line \d+ column|set_int_max_str_digits|RecursionError|"
                  r"Traceback|recogni[sz]ed\.|W64|RF64|chunk\.|invalid character|\bint\b|"
                  r"\bfloat\b|NoneType|metadata|soft limit|\.py\b|Exception", re.I)


def check(reply: requests.Response, status: int, fragment: str) -> str:
    assert reply.status_code == status, (reply.status_code, reply.text[:500])
    body = reply.json()
    message = body["message"] if "message" in body else body["error"]["message"]
    assert fragment in message, message
    assert not LEAK.search(message), message
    return message


def post(stack, path: str, data: bytes, content_type: str) -> requests.Response:
    return requests.post(stack.rest_url + path, data=data, timeout=120,
                         headers={**stack.headers, "content-type": content_type})


# --- JSON the server parses itself: the reference endpoints and OpenAI's ----------------------

BAD_JSON = [
    (b'{"tts_text": "\xff\xfe", "spk_id": "x"}', "not UTF-8"),
    (b'{"tts_text": ', "not valid JSON at line 1"),
    (b'{"tts_text": "hi", "sample_rate": ' + b"9" * 5000 + b"}", "too many digits"),
    (b'{"tts_text": "hi", "speed": NaN}', "NaN is not a JSON number"),
    (b'{"tts_text": ' + b"[" * 100_000 + b"}", "nested too deeply"),
]


@pytest.mark.parametrize("body,fragment", BAD_JSON)
def test_malformed_json_on_the_reference_endpoints(stack, body, fragment):
    check(post(stack, "/inference_sft", body, "application/json"), 400, fragment)


@pytest.mark.parametrize("body,fragment", BAD_JSON)
def test_malformed_json_on_the_openai_endpoint(stack, body, fragment):
    body = body.replace(b"tts_text", b"input").replace(b"sample_rate", b"speed")
    check(post(stack, "/v1/audio/speech", body, "application/json"), 400, fragment)


@pytest.mark.parametrize("fields,fragment", [
    ({"input": 5}, "'input' must be a string, not a number"),
    ({"speed": "fast"}, "'speed' must be a number, not a string"),
    ({"speed": 1e999}, "out of range"),
    ({"voice": {"id": SPEAKER, "style": "x"}}, "voice.style"),
])
def test_openai_field_types_are_named_in_json_terms(stack, fields, fragment):
    body = {"model": "tts-1", "input": "Hi.", "voice": SPEAKER, **fields}
    data = json.dumps(body).replace("Infinity", "1e999")  # a number beyond float64
    check(post(stack, "/v1/audio/speech", data.encode(), "application/json"), 400, fragment)


# --- numbers in form fields and query strings -----------------------------------------------

@pytest.mark.parametrize("query,fragment", [
    ("speed=nan", "speed must be a number such as 1.0"),
    ("speed=1_0", "speed must be a number such as 1.0"),
    ("speed=-1", "speed must be a positive number"),
    ("speed=1e309", "speed must be a positive number"),
    ("sample_rate=22_050", "whole number of Hz"),
    ("sample_rate=99999999999999999999", "out of range"),
    ("sample_rate=-22050", "not offered"),
])
def test_numbers_in_query_strings(stack, query, fragment):
    reply = requests.get(f"{stack.rest_url}/inference_sft?tts_text=hi&spk_id={SPEAKER}&{query}",
                         headers=stack.headers, timeout=120)
    check(reply, 400, fragment)


def test_a_malformed_multipart_part_gets_our_message_not_the_parsers(stack):
    body = b"--XyZ\r\n\xff\xff: \xff\r\n\r\nx\r\n--XyZ--\r\n"
    check(post(stack, "/inference_sft", body, "multipart/form-data; boundary=XyZ"), 400,
          "multipart/form-data body is malformed")


# --- uploads that are not audio ---------------------------------------------------------------

def _wav(samples: int) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, np.zeros(samples, dtype=np.float32), 16000, format="WAV")
    return out.getvalue()


@pytest.mark.parametrize("data,fragment", [
    (b"hello, this is text and not audio at all" * 10, "its format is not recognised"),
    (b"\x89PNG\r\n\x1a\n" + bytes(200), "its format is not recognised"),
    (_wav(8000)[:30], "starts like a WAV file but is damaged or cut short"),
    (_wav(0), "0.00 s long"),
])
def test_prompt_uploads_that_are_not_usable_audio(stack, data, fragment):
    reply = requests.post(stack.rest_url + "/inference_zero_shot", headers=stack.headers,
                          data={"tts_text": "hi", "prompt_text": "hello"}, timeout=120,
                          files=[("prompt_wav", ("p.wav", io.BytesIO(data), "audio/wav"))])
    check(reply, 400, fragment)


def test_grpc_prompt_bytes_that_are_not_audio(stack, grpc_channel):
    stub = tts_pb2_grpc.TextToSpeechServiceStub(grpc_channel)
    request = tts_pb2.SynthesizeRequest(text="hi", zero_shot=tts_pb2.ZeroShotMode(
        prompt_text="a", prompt_audio=tts_pb2.PromptAudio(data=b"not audio at all" * 100)))
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Synthesize(request, metadata=stack.metadata, timeout=120))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "its format is not recognised" in caught.value.details()
    assert not LEAK.search(caught.value.details())


# --- sizes: long query strings, headers, bodies -----------------------------------------------

def test_a_long_text_in_a_get_query_string_is_served(stack):
    # 1 500 Chinese characters, percent-encoded: ~13.5 kB of URL, above gRPC's default 8 KiB
    # metadata limit (Envoy forwards the URL to the server as a header).
    text = "你好，欢迎使用语音合成服务。" * 107
    reply = requests.get(stack.rest_url + "/inference_sft", headers=stack.headers, timeout=300,
                         params={"tts_text": text, "spk_id": "nobody"})
    check(reply, 404, "unknown speaker")  # refused for the speaker, after the URL was read


def test_query_strings_over_the_header_limit_get_431(stack):
    query = "&".join(["tts_text=hi"] * (service_limits.MAX_REQUEST_HEADERS_KB * 100))
    reply = requests.get(f"{stack.rest_url}/inference_sft?{query}", headers=stack.headers,
                         timeout=120)
    assert reply.status_code == 431


def test_a_100_mb_body_gets_413(stack):
    reply = post(stack, "/inference_sft", b"a" * (100 * 1024 * 1024),
                 "application/x-www-form-urlencoded")
    check(reply, 413, "request body too large")


def test_the_server_still_serves_after_the_hostile_inputs(stack):
    reply = requests.get(stack.rest_url + "/inference_sft", headers=stack.headers, timeout=300,
                         params={"tts_text": "Hello.", "spk_id": SPEAKER})
    assert reply.status_code == 200 and len(reply.content) > 0
