"""Replicas, supervision, graceful drain and request logs, with the real launcher, Envoy and
engine servers, and real SIGKILL / SIGTERM.

Two stacks, each used by the tests below in file order (the last test of each stops it):
``replicated`` (two engine servers, JSON logs) and ``single`` (one engine server, a long drain).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import grpc
import pytest
import requests
from conftest import REPO_ROOT, Stack, free_port, start_stack, stop_stack
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from test_stream_integrity import FORM, RawReply, raw_post

from gateway.envoy_config import STREAM_STATUS_TRAILER
from service.gen.cosyvoice.v1 import tts_pb2, tts_pb2_grpc

LONG_TEXT = "This sentence is one of many that keep the engine busy. " * 20


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports."""
    while True:
        first = free_port()
        try:
            for port in range(first, first + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue


def ready_line(stack: Stack) -> str:
    return next(line for line in stack.logs().splitlines() if line.startswith("Ready."))


def grpc_targets(stack: Stack) -> list[str]:
    return re.search(r"gRPC: (.*?)(   Metrics:|$)", ready_line(stack)).group(1).split(", ")


def metrics_urls(stack: Stack) -> list[str]:
    return re.search(r"Metrics: (.*)$", ready_line(stack)).group(1).split(", ")


def wait_for_log(stack: Stack, pattern: str, timeout: float, after: int = 0) -> re.Match:
    """The first match of ``pattern`` in the stack's log from offset ``after``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, stack.logs()[after:])
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} in the log after {timeout:.0f} s:\n"
                         + stack.logs()[-3000:])


def sft_form(text: str) -> dict[str, str]:
    return {"tts_text": text, "spk_id": "英文女"}


def sft_body(text: str) -> bytes:
    return urlencode(sft_form(text)).encode()


def server_pid(grpc_port: int) -> int:
    found = subprocess.run(["pgrep", "-f", f"python.* -m service .*--grpc-port {grpc_port}( |$)"],
                           capture_output=True, text=True).stdout.split()
    assert len(found) == 1, found
    return int(found[0])


def health(target: str) -> str:
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=2)
        except grpc.RpcError as error:
            return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


class InThread(threading.Thread):
    """Runs ``fn`` in the background; ``result()`` is its return value (or raises its error)."""

    def __init__(self, fn, *args, **kwargs):
        super().__init__(daemon=True)
        self._call = (fn, args, kwargs)
        self._value: object = None
        self._error: BaseException | None = None
        self.start()

    def run(self) -> None:
        fn, args, kwargs = self._call
        try:
            self._value = fn(*args, **kwargs)
        except BaseException as error:
            self._error = error

    def result(self, timeout: float = 300.0):
        self.join(timeout)
        assert not self.is_alive(), "still running"
        if self._error is not None:
            raise self._error
        return self._value


# ------------------------------------------------------------------ two replicas, JSON logs


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory):
    grpc_port, metrics_port = free_ports(2), free_ports(2)
    stack = start_stack(tmp_path_factory.mktemp("replicated"), max_concurrent=1, max_queue=2,
                        extra_args=("--replicas", "2", "--grpc-port", str(grpc_port),
                                    "--metrics-port", str(metrics_port),
                                    "--log-format", "json", "--drain-seconds", "90"))
    try:
        yield stack
    finally:
        stop_stack(stack, timeout=60)


def test_replicas_each_serve_their_own_metrics(replicated: Stack) -> None:
    targets, urls = grpc_targets(replicated), metrics_urls(replicated)
    assert len(targets) == 2 and len(urls) == 2 and len(set(targets)) == 2
    assert all(health(target) == "SERVING" for target in targets)
    calls = 3
    for _ in range(calls):
        reply = requests.post(replicated.rest_url + "/inference_sft", data=sft_form("Hello."),
                              headers=replicated.headers, timeout=120)
        assert reply.status_code == 200 and reply.content
    ok, builds = 0.0, 0
    for url in urls:  # each replica is a scrape target of its own: the counts add up
        samples = [sample for family in text_string_to_metric_families(
            requests.get(url, timeout=10).text) for sample in family.samples]
        ok += sum(s.value for s in samples if s.name == "cosyvoice_requests_total"
                  and s.labels == {"surface": "rest", "mode": "sft", "code": "OK"})
        builds += sum(s.name == "cosyvoice_build_info" for s in samples)
    assert ok == calls and builds == 2


def test_json_request_log_has_its_fields_and_never_the_key_or_text(replicated: Stack) -> None:
    word = "Zq" + secrets.token_hex(4)  # in the text only: it must not reach the log
    text = f"Hello {word} there."
    start = len(replicated.logs())
    ok = requests.post(replicated.rest_url + "/inference_sft", data=sft_form(text),
                       headers=replicated.headers, timeout=120)
    assert ok.status_code == 200
    missing = requests.post(replicated.rest_url + "/inference_sft",
                            data={"tts_text": text, "spk_id": "nobody"},
                            headers=replicated.headers, timeout=120)
    assert missing.status_code == 404
    wait_for_log(replicated, r'"code": "NOT_FOUND"', 30, after=start)
    lines = [json.loads(line) for line in replicated.logs()[start:].splitlines()
             if line.startswith("{")]
    calls = [entry for entry in lines if entry.get("call") == "/inference_sft"]
    assert [entry["code"] for entry in calls] == ["OK", "NOT_FOUND"], calls
    done, refused = calls
    assert done["surface"] == "rest" and done["mode"] == "sft" and done["http_status"] == 200
    assert 0 < done["time_to_first_audio_seconds"] <= done["duration_seconds"]
    assert done["audio_seconds"] > 0.3 and done["text_chars"] == len(text)
    assert refused["http_status"] == 404 and refused["time_to_first_audio_seconds"] is None
    assert done["request_id"] != refused["request_id"] and len(done["request_id"]) >= 16
    assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in lines)
    everything = replicated.logs()
    assert word.lower() not in everything.lower()
    assert replicated.api_key not in everything


def test_sigterm_lets_the_running_stream_finish_and_refuses_new_calls(replicated: Stack
                                                                      ) -> None:
    targets = grpc_targets(replicated)
    first_bytes = threading.Event()
    stream = InThread(raw_post, replicated.rest_url, "/inference_sft",
                      sft_body("Hello there. How are you today? I am fine, thank you."), FORM,
                      replicated.api_key, on_first_bytes=first_bytes.set)
    assert first_bytes.wait(120), "no audio came"
    replicated.process.send_signal(signal.SIGTERM)
    # At once: the health checks say NOT_SERVING (or the replica with nothing to finish is
    # gone already), and a new call gets 503 with a JSON error, not a closed connection.
    deadline = time.monotonic() + 3
    while {health(t) for t in targets} - {"NOT_SERVING", "UNAVAILABLE"}:
        assert time.monotonic() < deadline, [health(t) for t in targets]
        time.sleep(0.05)
    refused = requests.post(replicated.rest_url + "/inference_sft", data=sft_form("Hi."),
                            headers=replicated.headers, timeout=30)
    assert refused.status_code == 503 and refused.json()["code"] == 14, refused.text
    assert "retry" in refused.json()["message"]
    reply: RawReply = stream.result()
    assert reply.status == 200 and reply.trailers is not None, reply.headers
    assert reply.trailers.get(STREAM_STATUS_TRAILER) == "0", reply.trailers
    assert replicated.process.wait(60) == 0
    assert "drained: every synthesis call has ended" in replicated.logs()


# ------------------------------------------------------------------ one replica


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory):
    stack = start_stack(tmp_path_factory.mktemp("single"), max_concurrent=2, max_queue=1,
                        extra_args=("--drain-seconds", "120"))
    try:
        yield stack
    finally:
        stop_stack(stack, timeout=60)


def test_a_killed_engine_server_is_restarted_while_envoy_answers_503(single: Stack) -> None:
    port = int(single.grpc_target.rsplit(":", 1)[1])
    killed = server_pid(port)
    start = len(single.logs())
    os.kill(killed, signal.SIGKILL)
    wait_for_log(single, rf"engine server 0 \(pid {killed}\) was killed by signal SIGKILL "
                         r"after \d+ s serving; restarting in 1 s", 30, after=start)
    # Envoy stays up meanwhile and says so in a JSON 503 a client can act on.
    meanwhile = requests.post(single.rest_url + "/inference_sft", data=sft_form("Hi."),
                              headers=single.headers, timeout=30)
    assert meanwhile.status_code == 503, meanwhile.text
    assert meanwhile.json() == {"code": 14, "message": "the synthesis server is not reachable "
                                                       "right now; retry shortly"}
    serving = wait_for_log(single, r"engine server 0 serving on \S+ \(pid (\d+)\)", 300,
                           after=start)
    assert int(serving.group(1)) == server_pid(port) != killed
    deadline = time.monotonic() + 60  # Envoy's health check sees it back within seconds
    while True:
        reply = requests.post(single.rest_url + "/inference_sft", data=sft_form("Hello."),
                              headers=single.headers, timeout=120)
        if reply.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert reply.status_code == 200 and reply.content
    assert single.process.poll() is None


def _grpc_stream(target: str, key: str, started: threading.Event) -> grpc.RpcError | None:
    with grpc.insecure_channel(target) as channel:
        call = tts_pb2_grpc.TextToSpeechServiceStub(channel).Synthesize(
            tts_pb2.SynthesizeRequest(text=LONG_TEXT, sft=tts_pb2.SftMode(speaker_id="英文女")),
            metadata=(("x-api-token", key),))
        try:
            for reply in call:
                if reply.HasField("audio"):
                    started.set()
        except grpc.RpcError as error:
            return error
    return None


def test_queued_call_gets_503_and_a_second_sigterm_cuts_streams_visibly(single: Stack) -> None:
    rest_started, grpc_started = threading.Event(), threading.Event()
    rest = InThread(raw_post, single.rest_url, "/inference_sft", sft_body(LONG_TEXT), FORM,
                    single.api_key, on_first_bytes=rest_started.set)
    native = InThread(_grpc_stream, single.grpc_target, single.api_key, grpc_started)
    assert rest_started.wait(180) and grpc_started.wait(180), "no audio came"
    queued = InThread(requests.post, single.rest_url + "/inference_sft", data=sft_form("Hi."),
                      headers=single.headers, timeout=120)
    deadline = time.monotonic() + 30
    while single.status()["queued_syntheses"] != 1:
        assert time.monotonic() < deadline, single.status()
        time.sleep(0.1)

    single.process.send_signal(signal.SIGTERM)
    refused = queued.result(30)  # the waiting call: a proper 503 at once
    assert refused.status_code == 503 and refused.json()["code"] == 14, refused.text
    assert "shutting down" in refused.json()["message"]
    assert rest.is_alive() and native.is_alive(), "the running streams must go on draining"

    signalled = time.monotonic()
    single.process.send_signal(signal.SIGTERM)
    reply: RawReply = rest.result(60)
    assert reply.status == 200 and reply.body
    assert reply.trailers is None or reply.trailers.get(STREAM_STATUS_TRAILER) == "14", \
        reply.trailers  # never a complete-looking stream
    error = native.result(60)
    assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE
    assert "incomplete" in error.details()
    assert single.process.wait(30) == 0
    assert time.monotonic() - signalled < 15, "the cut must not wait for the drain time"
    assert "cut 2 running syntheses short" in single.logs()


# ------------------------------------------------------------------ giving up


def test_launcher_gives_up_on_an_engine_that_never_starts(tmp_path: Path) -> None:
    env = {**os.environ, "COSYVOICE_API_KEYS": secrets.token_urlsafe(24)}
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", str(free_port()),
         "--grpc-host", "127.0.0.1", "--grpc-port", str(free_port()),
         "--admin-port", str(free_port()), "--metrics-port", "0",
         "--state-dir", str(tmp_path / "state"), "--model-dir", str(tmp_path / "no-such-model")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 1
    assert "Ready." not in run.stdout
    assert "does not exist" in run.stderr
    assert re.search(r"engine server 0 exited with code 2 before it was serving, 3 times in a "
                     r"row; giving up", run.stderr), run.stderr
    assert time.monotonic() - started < 200


def test_replica_options_spread_ports_and_devices() -> None:
    from gateway.launch import parse_options, replica_options, service_command
    from service.options import parse_server_options

    options = parse_options(["--replicas", "3", "--grpc-port", "6000", "--metrics-port", "9000",
                             "--devices", "cuda:0, cuda:1", "--threads", "2",
                             "--drain-seconds", "12.5", "--log-format", "json"])
    replicas = replica_options(options.server, options.replicas, options.devices)
    assert [r.grpc_port for r in replicas] == [6000, 6001, 6002]
    assert [r.metrics_port for r in replicas] == [9000, 9001, 9002]
    assert [r.device for r in replicas] == ["cuda:0", "cuda:1", "cuda:0"]
    assert {r.threads for r in replicas} == {2}  # per replica
    server = parse_server_options(service_command(replicas[2], Path("/state"))[3:])
    assert (server.grpc_port, server.device, server.drain_seconds, server.log_format) == (
        6002, "cuda:0", 12.5, "json")
    any_port = parse_options(["--replicas", "2", "--grpc-port", "0", "--metrics-port", "0"])
    spread = replica_options(any_port.server, any_port.replicas)
    assert {r.metrics_port for r in spread} == {0} and {r.device for r in spread} == {"auto"}
    assert 0 not in {r.grpc_port for r in spread} and len({r.grpc_port for r in spread}) == 2
    with pytest.raises(SystemExit):
        parse_options(["--replicas", "0"])
    with pytest.raises(SystemExit):
        parse_options(["--log-format", "xml"])


def test_replicas_sharing_a_memory_divide_the_flow_cache_share() -> None:
    """Each CosyVoice replica would take half the memory it finds free for its flow caches:
    the launcher gives the replicas on one device (all of them on a CPU) their part of it."""
    from gateway.launch import parse_options, replica_options, service_command
    from service.options import parse_server_options

    def shares(*argv: str) -> list[float | None]:
        options = parse_options(["--model-dir", "/models/cv2", *argv])
        replicas = replica_options(options.server, options.replicas, options.devices)
        # what each replica process is told, through its command line
        return [parse_server_options(service_command(r, Path("/state"))[3:]).flow_cache_share
                for r in replicas]

    assert shares("--replicas", "3", "--device", "cpu") == [0.5 / 3] * 3
    assert shares("--replicas", "3", "--devices", "cuda:0,cuda:1") == [0.25, None, 0.25]
    assert shares("--replicas", "2", "--flow-cache-share", "0.3") == [0.15, 0.15]
    assert shares("--replicas", "2", "--flow-cache-memory", "8G") == [None, None]
    assert shares("--replicas", "1") == [None]
    embedded = parse_options(["--replicas", "2"])
    assert {r.flow_cache_share for r in replica_options(embedded.server, 2)} == {None}


def test_server_alone_cuts_at_its_drain_deadline_and_exits_in_time(tmp_path: Path) -> None:
    key = secrets.token_urlsafe(24)
    port_file = tmp_path / "port"
    server = subprocess.Popen(
        [sys.executable, "-m", "service", "--engine", "embedded", "--threads", "1",
         "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
         "--metrics-port", "0", "--state-dir", str(tmp_path / "state"),
         "--drain-seconds", "2"],
        cwd=REPO_ROOT, env={**os.environ, "COSYVOICE_API_KEYS": key},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (port_file.exists() and port_file.read_text().strip()):
            assert server.poll() is None and time.monotonic() < deadline, "did not start"
            time.sleep(0.2)
        target = f"127.0.0.1:{port_file.read_text().strip()}"
        started = threading.Event()
        stream = InThread(_grpc_stream, target, key, started)
        assert started.wait(180), "no audio came"
        server.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert health(target) in ("NOT_SERVING", "UNAVAILABLE")
        error = stream.result(30)
        assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE
        assert "drain time ran out" in error.details()
        assert server.wait(30) == 0
        # --drain-seconds, then at most ~1 s for the last trailers and ~1 s for engine threads
        assert time.monotonic() - signalled < 2 + 5
        assert "drain time is up: cut 1 running syntheses short" in server.stderr.read()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
