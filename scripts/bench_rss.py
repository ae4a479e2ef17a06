#!/usr/bin/env python
"""Server memory over many mixed requests: does the resident set stay flat after warm-up?

Starts ``python -m service`` (embedded engine unless ``--engine``/``--model-dir`` say otherwise)
on a loopback port and sends ``--requests`` requests over gRPC from ``--clients`` threads, a fixed
mix of: short sentences in every preset language (heard to the end), texts with numbers and
symbols, refused inputs (a 1 400-letter word, an unknown speaker, empty text), and long inputs (a
1 000-digit number, a 1 800-character text) whose client hangs up after the first chunk. The
server's RSS (``/proc/PID/status``) is read after ``--warmup`` requests and at the end; growth
after warm-up is the figure. Example:

    .venv/bin/python scripts/bench_rss.py --requests 1000 --warmup 200
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import grpc  # noqa: E402

from service.gen.cosyvoice.v1 import tts_pb2, tts_pb2_grpc  # noqa: E402

_RNG = random.Random(12)
_LONG_WORD = "".join(_RNG.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(1400))
_LONG_NUMBER = "".join(_RNG.choice("0123456789") for _ in range(1000))
_LONG_TEXT = ("The service streams speech while it is being made, so a long text starts "
              "playing early. ") * 20

# (name, speaker, text, hang up after the first chunk)
MIX: list[tuple[str, str, str, bool]] = [
    ("en", "英文女", "Hello there, how are you today?", False),
    ("en-numbers", "英文男", "Call 555-123-4567 before 9:30, it costs $12.50 or 30%.", False),
    ("zh", "中文女", "你好，欢迎使用语音合成服务。", False),
    ("zh-numbers", "中文男", "今天是2024年5月3日，气温25度。", False),
    ("ja", "日语男", "今日はいい天気ですね。", False),
    ("ko", "韩语女", "안녕하세요, 만나서 반갑습니다.", False),
    ("yue", "粤语女", "你食咗飯未呀？", False),
    ("long-word", "英文女", _LONG_WORD, False),  # refused
    ("unknown-speaker", "nobody", "Hello.", False),  # refused
    ("empty", "英文女", "   ", False),  # refused
    ("long-number", "英文女", f"The code is {_LONG_NUMBER}.", True),
    ("long-text", "英文男", _LONG_TEXT, True),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start_server(workdir: Path, key: str, args: argparse.Namespace) -> tuple[subprocess.Popen,
                                                                             str]:
    port_file = workdir / "port"
    cmd = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", "0",
           "--port-file", str(port_file), "--state-dir", str(workdir / "state"),
           "--engine", args.engine, "--max-concurrent", str(args.clients),
           "--max-queue", str(args.clients), "--log-level", "WARNING", "--metrics-port", "0"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.model_dir:
        cmd += ["--model-dir", str(args.model_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env={**os.environ, "COSYVOICE_API_KEYS": key},
                            stdout=(workdir / "server.log").open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while not port_file.exists() or not port_file.read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("server did not start:\n" + (workdir / "server.log").read_text())
        time.sleep(0.2)
    return proc, f"127.0.0.1:{port_file.read_text().strip()}"


def one_request(stub, key: str, case: tuple[str, str, str, bool]) -> str:
    name, speaker, text, hang_up = case
    request = tts_pb2.SynthesizeRequest(text=text, sft=tts_pb2.SftMode(speaker_id=speaker))
    call = stub.Synthesize(request, metadata=(("x-api-token", key),), timeout=600)
    try:
        for reply in call:
            if hang_up and reply.HasField("audio"):
                call.cancel()
                return "hung up"
        return "ok"
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.CANCELLED:
            return "hung up"
        return error.code().name
    finally:
        call.cancel()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--engine", default="embedded")
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report-every", type=int, default=100)
    parser.add_argument("--duration", type=float, default=0.0,
                        help="stop sending new requests after this many seconds (0: never); "
                             "the summary then counts the requests actually sent")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()

    key = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory() as tmp:
        proc, target = start_server(Path(tmp), key, args)
        try:
            cases = itertools.islice(itertools.cycle(MIX), args.requests)
            lock = threading.Lock()
            outcomes: Counter[tuple[str, str]] = Counter()
            done = [0]
            marks: dict[str, float] = {"start": rss_mib(proc.pid)}
            samples: list[float] = []
            started = time.monotonic()

            def worker() -> None:
                with grpc.insecure_channel(target) as channel:
                    stub = tts_pb2_grpc.TextToSpeechServiceStub(channel)
                    while True:
                        out_of_time = (args.duration > 0
                                       and time.monotonic() - started > args.duration)
                        with lock:
                            case = None if out_of_time else next(cases, None)
                        if case is None:
                            return
                        outcome = one_request(stub, key, case)
                        with lock:
                            outcomes[(case[0], outcome)] += 1
                            if args.verbose:
                                print(case[0], outcome, f"{time.monotonic() - started:.1f}",
                                      flush=True)
                            done[0] += 1
                            rss = rss_mib(proc.pid)
                            samples.append(rss)
                            if done[0] == args.warmup:
                                marks["after warm-up"] = rss
                            if done[0] % args.report_every == 0:
                                print(f"{done[0]:5d} requests  {time.monotonic() - started:7.1f} s"
                                      f"  RSS {rss:7.1f} MiB", flush=True)

            threads = [threading.Thread(target=worker) for _ in range(args.clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            time.sleep(1.0)
            marks["end"] = rss_mib(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)

    print("\noutcomes:", ", ".join(f"{n}={o}:{c}" for (n, o), c in sorted(outcomes.items())))
    warm = marks.get("after warm-up", marks["start"])
    print(f"RSS MiB: start {marks['start']:.1f}, after {args.warmup} requests {warm:.1f}, "
          f"peak {max(samples):.1f}, end {marks['end']:.1f}")
    sent = sum(outcomes.values())
    print(f"growth after warm-up: {100 * (marks['end'] - warm) / warm:+.1f} % "
          f"({sent - args.warmup} requests after warm-up, {sent} in all, "
          f"{time.monotonic() - started:.0f} s); load: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
