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
