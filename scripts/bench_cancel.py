#!/usr/bin/env python
"""Cancellation latency: how long the engine keeps working after a client hangs up.

Starts ``python -m service`` (the embedded engine, or ``--engine cosyvoice2 --model-dir DIR``)
on a loopback port unless ``--target`` and ``--api-key`` name a running server. ``--runs``
times: a long synthesis over gRPC, the client cancels the call (an RST_STREAM to the server, as
when a client goes away) right after the first audio chunk (``--after-chunks``), and
``GetServerStatus`` is polled every 5 ms until no synthesis is active any more (the server frees
the slot only when the engine has really stopped). With ``--whole-sentences`` each sentence is
made in one piece (``stream_within_sentence=false``), the longest model calls there are. Prints
the median, p95 and maximum of hang-up -> engine idle, and ``cancelled_total``. Examples:

    .venv/bin/python scripts/bench_cancel.py --runs 20
    .venv/bin/python scripts/make_cv2_model_dir.py /tmp/cv2-tiny --preset tiny --spk2info
    .venv/bin/python scripts/bench_cancel.py --engine cosyvoice2 --model-dir /tmp/cv2-tiny
    .venv/bin/python scripts/bench_cancel.py --engine cosyvoice2 --model-dir /work/models/cv2-full
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


def start_server(workdir: Path, key: str, args: argparse.Namespace
                 ) -> tuple[subprocess.Popen, str]:
    port_file = workdir / "port"
    engine = ["--engine", args.engine] + (["--model-dir", str(args.model_dir)]
                                          if args.model_dir else [])
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", "0", "--port-file",
         str(port_file), "--state-dir", str(workdir / "state"), "--threads", str(args.threads),
         "--log-level", "WARNING", "--metrics-port", "0", *engine],
        cwd=REPO_ROOT, env={**os.environ, "COSYVOICE_API_KEYS": key},
        stdout=(workdir / "server.log").open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while not port_file.exists() or not port_file.read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("server did not start:\n" + (workdir / "server.log").read_text())
        time.sleep(0.2)
    return proc, f"127.0.0.1:{port_file.read_text().strip()}"


def one_hang_up(stub, metadata, speaker: str, args: argparse.Namespace) -> float:
    request = tts_pb2.SynthesizeRequest(text=TEXT, sft=tts_pb2.SftMode(speaker_id=speaker),
                                        stream_within_sentence=not args.whole_sentences)
    call = stub.Synthesize(request, metadata=metadata, timeout=600)
    chunks = 0
    for reply in call:
        chunks += reply.HasField("audio")
        if chunks >= args.after_chunks:
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
    parser.add_argument("--engine", default="embedded")
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--speaker", help="speaker id (default: the first the server lists)")
    parser.add_argument("--after-chunks", type=int, default=1,
                        help="audio chunks to receive before hanging up")
    parser.add_argument("--whole-sentences", action="store_true",
                        help="stream_within_sentence=false: one model call per sentence")
    parser.add_argument("--target")
    parser.add_argument("--api-key")
    args = parser.parse_args()
    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.target and args.api_key:
            target, key = args.target, args.api_key
        else:
            key = secrets.token_urlsafe(24)
            proc, target = start_server(Path(tmp), key, args)
        try:
            with grpc.insecure_channel(target) as channel:
                stub = tts_pb2_grpc.TextToSpeechServiceStub(channel)
                metadata = (("x-api-token", key),)
                speaker = args.speaker or stub.ListSpeakers(
                    tts_pb2.ListSpeakersRequest(), metadata=metadata, timeout=30).speakers[0].id
                delays = []
                for run in range(args.runs):
                    delays.append(one_hang_up(stub, metadata, speaker, args))
                    print(f"hang-up {run + 1}: engine idle after {delays[-1] * 1000:.0f} ms",
                          flush=True)
                status = stub.GetServerStatus(tts_pb2.GetServerStatusRequest(),
                                              metadata=metadata, timeout=30)
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
    delays.sort()
    p95 = delays[round(0.95 * (len(delays) - 1))]
    print(f"{args.engine} {args.model_dir or ''} whole_sentences={args.whole_sentences}: "
          f"hang-up -> engine idle over {len(delays)} hang-ups: median "
          f"{statistics.median(delays) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, "
          f"max {delays[-1] * 1000:.0f} ms"
          f" (cancelled_total {status.cancelled_total}); load {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
