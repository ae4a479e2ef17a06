#!/usr/bin/env python
"""Time to first audio byte: REST through Envoy vs direct gRPC, same texts, same server.

Starts its own stack (``python -m gateway``, embedded engine, loopback ports) unless
``--rest-url``, ``--grpc-target`` and ``--api-key`` point at a running one. Requests run one at a
time; figures are medians over ``--runs`` runs. Example:

    .venv/bin/python scripts/bench_ttfb.py --runs 5
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import grpc  # noqa: E402
import requests  # noqa: E402

from service.gen.cosyvoice.v1 import tts_pb2, tts_pb2_grpc  # noqa: E402

TEXTS = {
    "short-zh": ("中文女", "你好，欢迎使用语音合成服务。"),
    "long-en": ("英文女", "Streaming starts early. Each sentence is sent as soon as it is ready. "
                         "The client hears the first words long before the last one is made."),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_stack(workdir: Path) -> tuple[subprocess.Popen, str, str, str]:
    key = secrets.token_urlsafe(24)
    rest, grpc_port, admin = free_port(), free_port(), free_port()
    log = (workdir / "stack.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", str(rest),
         "--grpc-host", "127.0.0.1", "--grpc-port", str(grpc_port), "--admin-port", str(admin),
         "--state-dir", str(workdir / "state")],
        cwd=REPO_ROOT, env={**os.environ, "COSYVOICE_API_KEYS": key}, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while "Ready." not in (workdir / "stack.log").read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("stack did not start:\n" + (workdir / "stack.log").read_text())
        time.sleep(0.3)
    return proc, f"http://127.0.0.1:{rest}", f"127.0.0.1:{grpc_port}", key


def rest_run(rest_url: str, key: str, speaker: str, text: str) -> tuple[float, float, float]:
    started = time.perf_counter()
    reply = requests.request("GET", f"{rest_url}/inference_sft",
                             data={"tts_text": text, "spk_id": speaker}, stream=True,
                             headers={"X-API-TOKEN": key}, timeout=300)
    reply.raise_for_status()
    first, size = None, 0
    for piece in reply.iter_content(chunk_size=None):
        if first is None and piece:
            first = time.perf_counter() - started
        size += len(piece)
    total = time.perf_counter() - started
    return first, total, size / 2 / 22050


def grpc_run(stub, key: str, speaker: str, text: str) -> tuple[float, float, float, float]:
    started = time.perf_counter()
    first, server_first, audio = None, 0.0, 0.0
    request = tts_pb2.SynthesizeRequest(text=text, sft=tts_pb2.SftMode(speaker_id=speaker),
                                        sample_rate=22050)
    for reply in stub.Synthesize(request, metadata=(("x-api-token", key),), timeout=300):
        if reply.HasField("audio") and first is None:
            first = time.perf_counter() - started
        if reply.HasField("stats"):
            server_first, audio = reply.stats.time_to_first_chunk_seconds, reply.stats.audio_seconds
    return first, time.perf_counter() - started, audio, server_first


def overhead(rest_url: str, stub, key: str, runs: int = 30) -> None:
    """The gateway's own cost, without the engine: GET /v1/speakers vs ListSpeakers."""
    def timed(call) -> float:
        started = time.perf_counter()
        call()
        return time.perf_counter() - started

    session = requests.Session()
    rest = [timed(lambda: session.get(f"{rest_url}/v1/speakers", headers={"X-API-TOKEN": key},
                                      timeout=30).raise_for_status()) for _ in range(runs)]
    direct = [timed(lambda: stub.ListSpeakers(tts_pb2.ListSpeakersRequest(),
                                              metadata=(("x-api-token", key),), timeout=30))
              for _ in range(runs)]
    print(f"ListSpeakers round trip, median of {runs}: REST/Envoy "
          f"{statistics.median(rest) * 1000:.2f} ms, gRPC direct "
          f"{statistics.median(direct) * 1000:.2f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rest-url")
    parser.add_argument("--grpc-target")
    parser.add_argument("--api-key")
    args = parser.parse_args()

    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.rest_url and args.grpc_target and args.api_key:
            rest_url, target, key = args.rest_url, args.grpc_target, args.api_key
        else:
            proc, rest_url, target, key = start_stack(Path(tmp))
        try:
            with grpc.insecure_channel(target) as channel:
                stub = tts_pb2_grpc.TextToSpeechServiceStub(channel)
                overhead(rest_url, stub, key)
                grpc_run(stub, key, *TEXTS["short-zh"])  # warm both paths once
                rest_run(rest_url, key, *TEXTS["short-zh"])
                print(f"{'text':10} {'path':13} {'ttfb med':>9} {'ttfb min':>9} "
                      f"{'total med':>10} {'audio s':>8} {'RTF':>6}")
                for name, (speaker, text) in TEXTS.items():
                    rest = [rest_run(rest_url, key, speaker, text) for _ in range(args.runs)]
                    direct = [grpc_run(stub, key, speaker, text) for _ in range(args.runs)]
                    for label, runs in (("REST/Envoy", rest), ("gRPC direct", direct)):
                        ttfb = [r[0] for r in runs]
                        total = statistics.median(r[1] for r in runs)
                        audio = statistics.median(r[2] for r in runs)
                        print(f"{name:10} {label:13} {statistics.median(ttfb):9.3f} "
                              f"{min(ttfb):9.3f} {total:10.3f} {audio:8.2f} "
                              f"{total / audio:6.2f}")
                    server = statistics.median(r[3] for r in direct)
                    gap = (statistics.median(r[0] for r in rest)
                           - statistics.median(r[0] for r in direct))
                    print(f"{name:10} server-side first chunk {server:.3f} s; "
                          f"REST minus gRPC TTFB {gap * 1000:+.1f} ms")
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
