"""A REST client can always tell a broken stream from a complete one: every streamed reply ends
with the HTTP/1.1 trailer ``x-cosyvoice-status`` (the gRPC status of the stream, "0" when
complete), and one cut off by a crash has no terminating chunk at all. Also: the access log's
``grpc=`` field is the call's real gRPC code.

A raw HTTP/1.1 client reads the chunked framing itself, so the test sees exactly what is sent.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from urllib.parse import urlencode

import pytest

from gateway.envoy_config import STREAM_STATUS_TRAILER


@dataclass
class RawReply:
    status: int
    headers: str
    body: bytes
    trailers: dict[str, str] | None  # None: no terminating chunk (the stream was cut off)


def raw_post(rest_url: str, path: str, body: bytes, content_type: str, key: str,
             on_first_bytes=None) -> RawReply:
    host, port = rest_url.split("//")[1].rsplit(":", 1)
    request = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nX-API-TOKEN: {key}\r\n"
               f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
               "Connection: close\r\n\r\n").encode() + body
    data = b""
    with socket.create_connection((host, int(port)), timeout=300) as sock:
        sock.sendall(request)
        while True:
            try:
                piece = sock.recv(65536)
            except ConnectionResetError:
                break
            if not piece:
                break
            data += piece
            if on_first_bytes is not None and b"\r\n\r\n" in data and len(data) > 20000:
                on_first_bytes()
                on_first_bytes = None
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    payload, trailers = b"", None
    while rest:
        line, _, rest = rest.partition(b"\r\n")
        size = int(line.split(b";")[0], 16) if re.fullmatch(rb"[0-9a-fA-F]+(;.*)?", line) else -1
        if size < 0 or (size > 0 and len(rest) < size + 2):
            break  # cut off inside a chunk
        if size == 0:
            block = rest.split(b"\r\n\r\n")[0].decode("latin-1")
            trailers = dict(line.split(": ", 1) for line in block.split("\r\n") if ": " in line)
            break
        payload += rest[:size]
        rest = rest[size + 2:]
    return RawReply(status, head.decode("latin-1"), payload, trailers)


FORM = "application/x-www-form-urlencoded"


@pytest.mark.parametrize("path, body, content_type", [
    ("/inference_sft", urlencode({"tts_text": "Hello there.", "spk_id": "英文女"}), FORM),
    ("/inference_sft", urlencode({"tts_text": "Hello there.", "spk_id": "英文女",
                                  "format": "wav"}), FORM),
    ("/v1/synthesize", json.dumps({"text": "Hello there.", "sft": {"speaker_id": "英文女"}}),
     "application/json"),
    ("/v1/audio/speech", json.dumps({"model": "tts-1", "input": "Hello there.",
                                     "voice": "英文女"}), "application/json"),
    ("/v1/audio/speech", json.dumps({"model": "tts-1", "input": "Hello there.",
                                     "voice": "英文女", "stream_format": "sse"}),
     "application/json"),
])
def test_complete_streams_end_with_status_zero(stack, path, body, content_type) -> None:
    reply = raw_post(stack.rest_url, path, body.encode(), content_type, stack.api_key)
    assert reply.status == 200, reply.headers
    assert reply.body and reply.trailers is not None, reply.headers
    assert reply.trailers.get(STREAM_STATUS_TRAILER) == "0", reply.trailers


def _log_line(stack, path: str, status: int, timeout: float = 15.0) -> str:
    pattern = re.compile(rf'"\w+ {re.escape(path)} HTTP/1.1" {status} .*grpc=(\S+)')
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = pattern.findall(stack.logs())
        if found:
            return found[-1]
        time.sleep(0.3)
    raise AssertionError(f"no access log line for {path} {status}:\n{stack.logs()[-2000:]}")


def test_access_log_names_the_real_grpc_code(stack) -> None:
    import requests

    cases = [  # (path, fields, headers, HTTP status, gRPC code)
        ("/inference_instruct", {"tts_text": "Hi.", "spk_id": "英文女", "instruct_text": "Slowly"},
         stack.headers, 501, "12"),
        ("/inference_cross_lingual", {"tts_text": "Hi."}, stack.headers, 400, "3"),
        ("/inference_vc", {}, {}, 401, "16"),
        ("/inference_sft", {"tts_text": "Hi.", "spk_id": "nobody"}, stack.headers, 404, "5"),
        ("/inference_sft", {"tts_text": "Hi.", "spk_id": "英文女"}, stack.headers, 200, "0"),
    ]
    for path, fields, headers, status, code in cases:
        reply = requests.post(stack.rest_url + path, data=fields, headers=headers, timeout=120)
        assert reply.status_code == status, (path, reply.text[:200])
        assert _log_line(stack, path, status) == code, path


def _server_pid(state_dir) -> int:
    found = subprocess.run(["pgrep", "-f", f"python.* -m service .*--state-dir {state_dir}"],
                           capture_output=True, text=True).stdout.split()
    assert found, "the gRPC server process was not found"
    return int(found[0])


def test_stream_broken_by_server_shutdown_never_looks_complete(launch_stack) -> None:
    stack = launch_stack()
    pid = _server_pid(stack.state_dir)
    body = urlencode({"tts_text": "This sentence is one of many. " * 40, "spk_id": "英文男"})

    def shut_down() -> None:  # the first SIGTERM drains, the second cuts the stream
        os.kill(pid, signal.SIGTERM)
        time.sleep(0.5)
        os.kill(pid, signal.SIGTERM)

    reply = raw_post(stack.rest_url, "/inference_sft", body.encode(), FORM, stack.api_key,
                     on_first_bytes=shut_down)
    assert reply.status == 200 and reply.body
    # Either no terminating chunk at all, or a trailer that names the failure.
    assert reply.trailers is None or reply.trailers.get(STREAM_STATUS_TRAILER) not in (None, "0"), \
        reply.trailers
