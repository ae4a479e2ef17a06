"""Unknown JSON fields on the transcoded JSON routes are refused, through real Envoy.

Envoy's transcoder drops fields the request message does not define (envoyproxy/envoy#46623);
the gateway's Lua check (gateway/json_fields.py) refuses them at every nesting level, after the
key check, with a 400 naming the field.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
import requests

from gateway.envoy_config import TRANSCODED_SERVICES
from gateway.json_fields import json_schema
from service.gen.cosyvoice.v1 import tts_pb2
from service.protogen import build_descriptor_set

SPEAKER = "英文女"


def post_json(stack, path: str, body: str | bytes | dict, headers: dict | None = None
              ) -> requests.Response:
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    return requests.post(stack.rest_url + path, data=data, timeout=300,
                         headers={"content-type": "application/json",
                                  **(stack.headers if headers is None else headers)})


@pytest.mark.parametrize("path,body,field", [
    ("/v1/synthesize", {"text": "Hi.", "sft": {"speaker_id": SPEAKER}, "sped": 1.5}, "sped"),
    ("/v1/synthesize", {"text": "Hi.", "sft": {"speaker_id": SPEAKER, "voice": "x"}},
     "sft.voice"),
    ("/v1/synthesize", {"text": "Hi.", "zeroShot": {"promptText": "x", "promptAudio": {
        "data": "AAAA", "rate": 16000}}}, "zeroShot.promptAudio.rate"),
    ("/v1/synthesize", '{"text": "Hi.", "\\u0062ogus": [1, {"a": [2]}], "sft": {}}', "bogus"),
    ("/v1/speakers", {"speaker_id": "new", "prompt_audio": {"data": "AAAA"}, "name": "x"},
     "name"),
])
def test_unknown_json_fields_are_refused_and_named(stack, path, body, field):
    reply = post_json(stack, path, body)
    assert reply.status_code == 400, reply.text
    message = reply.json()["message"]
    assert reply.json()["code"] == 3
    assert f"unknown field '{field}'" in message, message


def test_known_fields_in_both_spellings_and_escaped_keys_pass(stack):
    body = ('{"\\u0074ext": "Hi.", "sft": {"speakerId": "' + SPEAKER + '"}, '
            '"sample_rate": 16000, "streamWithinSentence": false}')
    reply = post_json(stack, "/v1/synthesize", body.encode())
    assert reply.status_code == 200, reply.text
    lines = [json.loads(line) for line in reply.text.splitlines() if line.strip()]
    assert lines[0]["audio"]["sample_rate"] == 16000
    assert "stats" in lines[-1]


def test_the_key_is_checked_before_the_body(stack):
    reply = post_json(stack, "/v1/synthesize", {"bogus": 1}, headers={})
    assert reply.status_code == 401
    assert "bogus" not in reply.text


def test_a_large_json_body_is_read_whole_and_still_reaches_the_server(stack):
    # 6 MB of base64 (over Envoy's default 1 MiB stream window): not a 413 from the check,
    # the server's own verdict on the (undecodable) audio.
    data = base64.b64encode(b"\x01" * 4_500_000).decode()
    reply = post_json(stack, "/v1/synthesize", {"text": "Hi.", "zero_shot": {
        "prompt_text": "x", "prompt_audio": {"data": data}}})
    assert reply.status_code == 400, reply.text[:300]
    assert "prompt audio" in reply.json()["message"]


@pytest.mark.parametrize("body", ['{"text": "Hi.", "sft": {', "[" * 10000, '{"text": 1e999}'])
def test_malformed_json_gets_the_gateways_message_not_the_parsers(stack, body):
    reply = post_json(stack, "/v1/synthesize", body)
    assert reply.status_code == 400
    message = reply.json()["message"]
    assert "the README lists each endpoint's fields" in message, message


def test_the_access_log_names_the_refusal(stack):
    before = stack.logs().count('"POST /v1/synthesize')
    post_json(stack, "/v1/synthesize", {"text": "Hi.", "unheard_of_field": 1})
    deadline = time.monotonic() + 10
    while stack.logs().count('"POST /v1/synthesize') == before and time.monotonic() < deadline:
        time.sleep(0.1)  # Envoy writes the line once the reply is sent
    line = [line for line in stack.logs().splitlines() if '"POST /v1/synthesize' in line][-1]
    assert " 400 " in line and "grpc=3" in line, line


def test_the_tables_cover_every_field_of_the_request_messages(tmp_path: Path):
    schema = json_schema(build_descriptor_set(tmp_path / "d.pb"), TRANSCODED_SERVICES)
    routes = {(route.method, route.path_regex): route.message for route in schema.routes}
    assert routes[("POST", "^/v1/synthesize$")] == "cosyvoice.v1.SynthesizeRequest"
    for message in (tts_pb2.SynthesizeRequest, tts_pb2.ZeroShotMode, tts_pb2.PromptAudio):
        keys = schema.fields[message.DESCRIPTOR.full_name]
        for field in message.DESCRIPTOR.fields:
            assert field.name in keys and field.json_name in keys
            if field.message_type is not None:
                assert keys[field.name] == f"m:{field.message_type.full_name}"
    # Bodies Envoy passes through whole (google.api.HttpBody) are parsed by the server itself.
    assert all("Compat" not in message for message in routes.values())
