"""Prometheus metrics: scraped from the real server after real calls through every surface, and
the Metrics object in-process.

The shared ``stack`` serves other tests too, so the end-to-end test compares a scrape before
its calls with one after and checks the differences.
"""

from __future__ import annotations

import socket
import time
import urllib.request

import grpc
import pytest
import requests
from conftest import free_port
from prometheus_client.parser import text_string_to_metric_families

from gateway.launch import parse_options, service_command
from service.gen.cosyvoice.v1 import tts_pb2, tts_pb2_grpc
from service.metrics import SECONDS_BUCKETS, Metrics, surface_of
from service.options import ServerOptions, parse_server_options

SHORT = "Hello there. This is a short test."
LONG_ZH = "这是一个用来测试指标的很长的句子。" * 40

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape(stack) -> Samples:
    reply = requests.get(stack.metrics_url, timeout=10)
    assert reply.status_code == 200
    assert reply.headers["Content-Type"].startswith("text/plain")
    return parse(reply.text)


def sft(text: str = SHORT, speaker: str = "英文女") -> tts_pb2.SynthesizeRequest:
    return tts_pb2.SynthesizeRequest(text=text, sft=tts_pb2.SftMode(speaker_id=speaker))


def wait_for(stack, check, timeout: float = 30.0) -> Samples:
    """Scrape until ``check(samples)`` holds (a call is counted as its handler unwinds,
    which may be just after the client has heard its end)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(stack)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


# ------------------------------------------------------------------ the real server

def test_calls_through_every_surface_are_counted(stack, grpc_channel):
    stack.wait_idle()
    before = scrape(stack)
    stub = tts_pb2_grpc.TextToSpeechServiceStub(grpc_channel)

    # gRPC: two that end OK, one refused (empty text), one the client cancels mid-stream.
    for _ in range(2):
        assert list(stub.Synthesize(sft(), metadata=stack.metadata, timeout=120))
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.Synthesize(sft(text=""), metadata=stack.metadata, timeout=30))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    call = stub.Synthesize(sft(LONG_ZH, "中文女"), metadata=stack.metadata, timeout=300)
    assert next(call).audio.data
    call.cancel()

    # REST (the reference server's endpoints): one OK, one unknown speaker.
    ok = requests.get(f"{stack.rest_url}/inference_sft", headers=stack.headers, timeout=120,
                      params={"tts_text": SHORT, "spk_id": "英文女"})
    assert ok.status_code == 200 and ok.content
    missing = requests.get(f"{stack.rest_url}/inference_sft", headers=stack.headers, timeout=30,
                           params={"tts_text": SHORT, "spk_id": "nobody"})
    assert missing.status_code == 404

    # OpenAI: one OK.
    speech = requests.post(f"{stack.rest_url}/v1/audio/speech", headers=stack.headers,
                           timeout=120, json={"model": "tts-1", "input": SHORT,
                                              "voice": "英文女", "response_format": "wav"})
    assert speech.status_code == 200 and speech.content
    stack.wait_idle()

    # The empty text is refused while the request is decoded, before its mode is known.
    expected = {("grpc", "sft", "OK"): 2, ("grpc", "unknown", "INVALID_ARGUMENT"): 1,
                ("grpc", "sft", "CANCELLED"): 1, ("rest", "sft", "OK"): 1,
                ("rest", "sft", "NOT_FOUND"): 1, ("openai", "sft", "OK"): 1}

    def delta(samples: Samples, name: str, **labels: str) -> float:
        return value(samples, name, **labels) - value(before, name, **labels)

    def counted(samples: Samples) -> bool:
        return all(delta(samples, "cosyvoice_requests_total", surface=s, mode=m, code=c) >= n
                   for (s, m, c), n in expected.items())

    after = wait_for(stack, counted)
    for (surface, mode, code), count in expected.items():
        assert delta(after, "cosyvoice_requests_total", surface=surface, mode=mode,
                     code=code) == count, (surface, mode, code)
    assert delta(after, "cosyvoice_cancelled_total", surface="grpc") == 1
    assert delta(after, "cosyvoice_engine_errors_total", surface="grpc") == 0

    # Histograms moved: every call has a duration; those that spoke, a first audio chunk.
    assert delta(after, "cosyvoice_request_duration_seconds_count", surface="grpc") == 4
    assert delta(after, "cosyvoice_request_duration_seconds_count", surface="rest") == 2
    assert delta(after, "cosyvoice_time_to_first_audio_seconds_count", surface="grpc") == 3
    assert delta(after, "cosyvoice_time_to_first_audio_seconds_count", surface="openai") == 1
    assert delta(after, "cosyvoice_time_to_first_audio_seconds_sum", surface="grpc") > 0
    assert delta(after, "cosyvoice_time_to_first_audio_seconds_bucket", surface="grpc",
                 le="+Inf") == 3
    assert delta(after, "cosyvoice_real_time_factor_count", surface="grpc") == 2
    # The short sentence is over a second of speech, each time.
    assert delta(after, "cosyvoice_audio_seconds_total", surface="grpc") > 2.0
    assert delta(after, "cosyvoice_audio_seconds_total", surface="openai") > 1.0

    # Gauges and what the process runs.
    assert value(after, "cosyvoice_active_streams") == 0
    assert value(after, "cosyvoice_queue_depth") == 0
    assert value(after, "cosyvoice_model_load_seconds") > 0
    assert value(after, "cosyvoice_build_info", engine="embedded", model="", device="cpu",
                 precision="int8") == 1


def test_gauges_show_calls_in_flight(stack, grpc_channel):
    stack.wait_idle()
    stub = tts_pb2_grpc.TextToSpeechServiceStub(grpc_channel)
    calls = [stub.Synthesize(sft(LONG_ZH, "中文女"), metadata=stack.metadata, timeout=300)
             for _ in range(stack.max_concurrent + stack.max_queue)]
    try:
        for call in calls[:stack.max_concurrent]:
            assert next(call).audio.data
        busy = wait_for(stack, lambda s: value(s, "cosyvoice_queue_depth") == stack.max_queue)
        assert value(busy, "cosyvoice_queue_depth") == stack.max_queue
        assert value(busy, "cosyvoice_active_streams") == len(calls)
    finally:
        for call in calls:
            call.cancel()
    stack.wait_idle()
    idle = wait_for(stack, lambda s: value(s, "cosyvoice_active_streams") == 0)
    assert value(idle, "cosyvoice_active_streams") == 0


def test_envoy_stats_are_a_second_scrape_target_on_loopback(stack):
    reply = requests.get(f"{stack.admin_url}/stats/prometheus", timeout=10)
    assert reply.status_code == 200
    names = {family.name for family in text_string_to_metric_families(reply.text)}
    assert "envoy_http_downstream_rq" in names  # HTTP requests the gateway received
    assert "127.0.0.1" in stack.admin_url


# ------------------------------------------------------------------ in-process

def test_metrics_object_counts_a_call_once_per_outcome():
    metrics = Metrics()
    for _ in range(2):
        metrics.call_started()
    metrics.call_ended("openai", "sft", "OK", duration=1.5, first_audio=0.07, audio_seconds=3.0)
    metrics.call_ended("rest", "-", "INTERNAL", duration=0.02, first_audio=None,
                       audio_seconds=0.0)
    samples = parse(generate(metrics))
    assert value(samples, "cosyvoice_requests_total", surface="openai", mode="sft",
                 code="OK") == 1
    assert value(samples, "cosyvoice_requests_total", surface="rest", mode="unknown",
                 code="INTERNAL") == 1
    assert value(samples, "cosyvoice_engine_errors_total", surface="rest") == 1
    assert value(samples, "cosyvoice_active_streams") == 0
    # 0.07 s falls in the 0.1 s bucket, not the 0.05 s one.
    first = "cosyvoice_time_to_first_audio_seconds_bucket"
    assert value(samples, first, surface="openai", le="0.05") == 0
    assert value(samples, first, surface="openai", le="0.1") == 1
    assert value(samples, "cosyvoice_real_time_factor_sum", surface="openai") == 0.5
    assert value(samples, "cosyvoice_audio_seconds_total", surface="openai") == 3.0
    assert value(samples, "cosyvoice_request_duration_seconds_count", surface="rest") == 1
    assert SECONDS_BUCKETS[0] == 0.05 and SECONDS_BUCKETS[-2] == 30.0


def test_surface_follows_the_api_a_call_came_through():
    assert surface_of("Synthesize") == surface_of("SynthesizeTextStream") == "grpc"
    assert surface_of("/inference_zero_shot") == "rest"
    assert surface_of("/v1/audio/speech") == "openai"


def generate(metrics: Metrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


def test_metrics_are_served_over_http_and_a_taken_port_is_a_clear_error():
    metrics = Metrics()
    metrics.engine_loaded(engine="cosyvoice2", model_dir=None, device="cuda:0",
                          precision="bfloat16", seconds=12.5)
    metrics.watch_queue(lambda: 3)
    assert value(parse(generate(metrics)), "cosyvoice_max_batch") == 1  # no scheduler yet
    occupancy = [2]
    metrics.watch_batch(lambda: (occupancy[0], 4))
    port = free_port()
    stop = metrics.serve("127.0.0.1", port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            samples = parse(reply.read().decode())
        assert value(samples, "cosyvoice_queue_depth") == 3
        assert value(samples, "cosyvoice_batch_occupancy") == 2
        assert value(samples, "cosyvoice_max_batch") == 4
        occupancy[0] = 0  # read at each scrape, not when watched
        assert value(parse(generate(metrics)), "cosyvoice_batch_occupancy") == 0
        assert value(samples, "cosyvoice_model_load_seconds") == 12.5
        assert value(samples, "cosyvoice_build_info", engine="cosyvoice2", model="",
                     device="cuda:0", precision="bfloat16") == 1
        with pytest.raises(OSError, match="--metrics-port"):
            Metrics().serve("127.0.0.1", port)
    finally:
        stop()
    with pytest.raises(OSError):  # stopped: nothing listens there any more
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_metrics_options_reach_the_server_from_the_launcher(tmp_path):
    assert ServerOptions().metrics_port == 9464
    assert ServerOptions().metrics_host == "127.0.0.1"
    gateway = parse_options(["--metrics-port", "9500", "--metrics-host", "0.0.0.0"])
    server = parse_server_options(service_command(gateway.server, tmp_path)[3:])
    assert (server.metrics_port, server.metrics_host) == (9500, "0.0.0.0")
    assert parse_server_options(["--metrics-port", "0"]).metrics_port == 0
