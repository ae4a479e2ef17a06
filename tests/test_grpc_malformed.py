"""Bytes that are not the method's message, over the gRPC port: the key is checked before the body
is read, and a body that does not parse (bad protobuf, invalid UTF-8 in a text field) is
INVALID_ARGUMENT with a message for a person, never the parser's text or a type name."""

from __future__ import annotations

import grpc
import pytest

from service.auth import MALFORMED_MESSAGE, UNAUTHENTICATED_MESSAGE
from service.gen.cosyvoice.v1 import tts_pb2, tts_pb2_grpc

SYNTHESIZE = "/cosyvoice.v1.TextToSpeechService/Synthesize"
LIST_SPEAKERS = "/cosyvoice.v1.TextToSpeechService/ListSpeakers"
TEXT_STREAM = "/cosyvoice.v1.TextToSpeechService/SynthesizeTextStream"
GARBAGE = b"\xff\xff\xff\xff\x0f\x08"
BAD_UTF8_TEXT = b"\x0a\x03\xff\xfe\xfd"  # field 1 (text), length 3, not UTF-8
LEAKS = ("DecodeError", "Error parsing", "cosyvoice.v1", "utf-8", "Exception", "Traceback")


def _assert_human(error: grpc.RpcError, code: grpc.StatusCode, message: str) -> None:
    assert error.code() == code, (error.code(), error.details())
    assert error.details() == message
    assert not any(leak in error.details() for leak in LEAKS[:3])


def _stream_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        for _ in call:
            pass
    return caught.value


@pytest.mark.parametrize("body", [GARBAGE, BAD_UTF8_TEXT])
def test_key_is_checked_before_the_body_is_read(stack, body: bytes) -> None:
    with grpc.insecure_channel(stack.grpc_target) as channel:
        call = channel.unary_stream(SYNTHESIZE)(body, timeout=30)
        _assert_human(_stream_error(call), grpc.StatusCode.UNAUTHENTICATED,
                      UNAUTHENTICATED_MESSAGE)
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary(LIST_SPEAKERS)(body, timeout=30)
        _assert_human(caught.value, grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


@pytest.mark.parametrize("body", [GARBAGE, BAD_UTF8_TEXT])
def test_unparsable_messages_are_invalid_argument(stack, body: bytes) -> None:
    with grpc.insecure_channel(stack.grpc_target) as channel:
        call = channel.unary_stream(SYNTHESIZE)(body, metadata=stack.metadata, timeout=30)
        _assert_human(_stream_error(call), grpc.StatusCode.INVALID_ARGUMENT, MALFORMED_MESSAGE)
        if body is GARBAGE:  # (ListSpeakersRequest has no fields: field 1 is merely unknown)
            with pytest.raises(grpc.RpcError) as caught:
                channel.unary_unary(LIST_SPEAKERS)(body, metadata=stack.metadata, timeout=30)
            _assert_human(caught.value, grpc.StatusCode.INVALID_ARGUMENT, MALFORMED_MESSAGE)
        config = tts_pb2.SynthesizeTextStreamRequest().SerializeToString()
        call = channel.stream_stream(TEXT_STREAM)(iter([config, body]), metadata=stack.metadata,
                                                  timeout=30)
        error = _stream_error(call)
        # The embedded engine has no text streaming; either way no parser text reaches anyone.
        assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED)
        assert not any(leak in error.details() for leak in LEAKS[:3])
        # The server keeps serving.
        stub = tts_pb2_grpc.TextToSpeechServiceStub(channel)
        assert stub.ListSpeakers(tts_pb2.ListSpeakersRequest(), metadata=stack.metadata,
                                 timeout=30).speakers


def test_rest_inputs_the_parsers_reject_get_a_plain_400(stack) -> None:
    import requests

    cases = [
        ("GET", "/inference_sft?tts_text=%FF%FEhi&spk_id=x", None, None),
        ("POST", "/inference_sft", {"tts_text": "hi", "spk_id": "英文女",
                                    "sample_rate": "99999999999"}, None),
        ("GET", "/inference_sft?tts_text=hi&spk_id=x&sample_rate=99999999999", None, None),
        ("POST", "/v1/synthesize", None, {"text": "hi", "sft": {"speaker_id": "英文女"},
                                          "sample_rate": 99999999999}),
        ("POST", "/v1/synthesize", None, b'{"text":"\xff\xfe","sft":{"speaker_id":"x"}}'),
    ]
    for method, path, form, body in cases:
        kwargs = {"data": form} if form else {}
        headers = dict(stack.headers)
        if isinstance(body, bytes):
            kwargs, headers["Content-Type"] = {"data": body}, "application/json"
        elif body is not None:
            kwargs = {"json": body}
        reply = requests.request(method, stack.rest_url + path, headers=headers, timeout=60,
                                 **kwargs)
        assert reply.status_code == 400, (path, reply.text[:300])
        message = reply.json()["message"]
        assert not any(leak in message for leak in ("TYPE_", "cosyvoice.v1.", "Encountered",
                                                    "Traceback")), message
