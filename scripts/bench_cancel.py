#!/usr/bin/env python
"""Cancellation latency: how long the engine keeps working after a client hangs up.

Starts ``python -m service`` (embedded engine) on a loopback port unless ``--target`` and
``--api-key`` name a running server. ``--runs`` times: a long synthesis over gRPC, the client
cancels the call (an RST_STREAM to the server, as when a client goes away) right after the first
audio chunk, and ``GetServerStatus`` is polled every 5 ms until no synthesis is active any more
(the server frees the slot only when the engine has really stopped). Prints the median, p90 and
maximum of hang-up -> engine idle. Example:

    .venv/bin/python scripts/bench_cancel.py --runs 20
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import grpc  # noqa: E402

from service.gen.cosyvoice.v1 import tts_pb2, tts_pb2_grpc  # noqa: E402

TEXT = "Well, " + " ".join(["people like to hear long sentences"] * 50)


def start_server(workdir: Path, key: str, threads: int) -> tuple[subprocess.Popen, str]:
    port_file = workdir / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", "0", "--port-file",
         str(port_file), "--state-dir", str(workdir / "state"), "--threads", str(threads),
         "--log-level", "WARNING"],
        cwd=REPO_ROOT, env={**os.environ, "COSYVOICE_API_KEYS": key},
        stdout=(workdir / "server.log").open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while not port_file.exists() or not port_file.read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("server did not start:\n" + (workdir / "server.log").read_text())
        time.sleep(0.2)
    return proc, f"127.0.0.1:{port_file.read_text().strip()}"


def one_hang_up(stub, metadata) -> float:
    request = tts_pb2.SynthesizeRequest(text=TEXT, sft=tts_pb2.SftMode(speaker_id="英文女"))
    call = stub.Synthesize(request, metadata=metadata, timeout=600)
    for reply in call:
        if reply.HasField("audio"):
            break
    hung_up = time.perf_counter()
    call.cancel()
    while True:
        status = stub.GetServerStatus(tts_pb2.GetServerStatusRequest(), metadata=metadata,
                                      timeout=30)
        if status.active_syntheses == 0 and status.queued_syntheses == 0:
            return time.perf_counter() - hung_up
        time.sleep(0.005)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--target")
    parser.add_argument("--api-key")
    args = parser.parse_args()
    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.target and args.api_key:
            target, key = args.target, args.api_key
        else:
            key = secrets.token_urlsafe(24)
            proc, target = start_server(Path(tmp), key, args.threads)
        try:
            with grpc.insecure_channel(target) as channel:
                stub = tts_pb2_grpc.TextToSpeechServiceStub(channel)
                metadata = (("x-api-token", key),)
                delays = []
                for run in range(args.runs):
                    delays.append(one_hang_up(stub, metadata))
                    print(f"hang-up {run + 1}: engine idle after {delays[-1] * 1000:.0f} ms",
                          flush=True)
                status = stub.GetServerStatus(tts_pb2.GetServerStatusRequest(),
                                              metadata=metadata, timeout=30)
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
    delays.sort()
    print(f"hang-up -> engine idle over {len(delays)} hang-ups: median "
          f"{statistics.median(delays) * 1000:.0f} ms, p90 "
          f"{delays[int(0.9 * (len(delays) - 1))] * 1000:.0f} ms, max {delays[-1] * 1000:.0f} ms"
          f" (cancelled_total {status.cancelled_total}); load {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
