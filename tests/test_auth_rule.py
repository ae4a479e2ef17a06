"""One rule for the API key, the same at Envoy and at the gRPC server (RFC 7235: the
``Authorization`` scheme is case-insensitive): a non-empty X-API-TOKEN is the key; without one,
``Authorization: Bearer KEY`` (scheme in any case, one or more spaces) is. Each case is tried
through the gateway and straight at the gRPC port, and both must agree."""

from __future__ import annotations

import grpc
import pytest
import requests

from service.auth import presented_key
from service.gen.cosyvoice.v1 import tts_pb2, tts_pb2_grpc

# (headers as a function of the key, accepted?)
CASES = [
    (lambda k: {"X-API-TOKEN": k}, True),
    (lambda k: {"Authorization": f"Bearer {k}"}, True),
    (lambda k: {"Authorization": f"bearer {k}"}, True),
    (lambda k: {"Authorization": f"BEARER   {k}"}, True),
    (lambda k: {"Authorization": f"bEaReR {k}"}, True),
    (lambda k: {"X-API-TOKEN": "", "Authorization": f"bearer {k}"}, True),
    (lambda k: {"Authorization": f"Bearer{k}"}, False),
    (lambda k: {"Authorization": f"Basic {k}"}, False),
    (lambda k: {"Authorization": k}, False),
    (lambda k: {"Authorization": f"Bearer {k} {k}"}, False),
    (lambda k: {"Authorization": f"Bearer {k}x"}, False),
    (lambda k: {"X-API-TOKEN": "wrong-key-wrong-key", "Authorization": f"Bearer {k}"}, False),
    (lambda k: {}, False),
]


@pytest.mark.parametrize("make_headers, accepted", CASES)
def test_gateway_and_server_apply_the_same_key_rule(stack, make_headers, accepted) -> None:
    headers = make_headers(stack.api_key)
    rest = requests.get(f"{stack.rest_url}/v1/speakers", headers=headers, timeout=30)
    assert rest.status_code == (200 if accepted else 401), (headers.keys(), rest.text)
    metadata = tuple((name.lower(), value) for name, value in headers.items())
    with grpc.insecure_channel(stack.grpc_target) as channel:
        stub = tts_pb2_grpc.TextToSpeechServiceStub(channel)
        try:
            stub.ListSpeakers(tts_pb2.ListSpeakersRequest(), metadata=metadata, timeout=30)
            direct = True
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
            direct = False
    assert direct is accepted


def test_presented_key_rule() -> None:
    assert presented_key([("authorization", "  BeArEr  abc  ")]) == "abc"
    assert presented_key([("x-api-token", " abc "), ("authorization", "Bearer xyz")]) == "abc"
    assert presented_key([("x-api-token", " "), ("authorization", "bearer xyz")]) == "xyz"
    assert presented_key([("authorization", "Bearer")]) is None
    assert presented_key([("authorization", "Token abc")]) is None
    assert presented_key([]) is None
