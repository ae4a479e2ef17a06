#!/usr/bin/env python
"""Load through the gateway: N concurrent REST clients for a fixed time, embedded engine.

Starts its own stack (``python -m gateway`` with the default capacity unless told otherwise)
unless ``--rest-url`` and ``--api-key`` point at a running one. For each client count in
``--clients`` (default 16 and 32), every client sends ``/inference_sft`` requests back to back for
``--seconds`` (a refused request is retried after ``--retry-delay``), and reads each admitted
stream to its end. Printed per run: requests by status, the share of clients that got audio at
least once, and p50/p95 time to the first audio byte of admitted requests. Example:

    .venv/bin/python scripts/bench_load.py --clients 16 32 --seconds 25
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
import threading
import time
from collections import Counter
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parents[1]
TEXTS = [("英文女", "Hello there, how are you today?"),
         ("中文女", "你好，欢迎使用语音合成服务。"),
         ("英文男", "The weather is fine. We will walk to the park after lunch."),
         ("日语男", "今日はいい天気ですね。")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_stack(workdir: Path, extra: list[str]) -> tuple[subprocess.Popen, str, str]:
    key = secrets.token_urlsafe(24)
    rest, grpc_port, admin = free_port(), free_port(), free_port()
    log_path = workdir / "stack.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", str(rest),
         "--grpc-host", "127.0.0.1", "--grpc-port", str(grpc_port), "--admin-port", str(admin),
         "--state-dir", str(workdir / "state"), "--log-level", "WARNING", *extra],
        cwd=REPO_ROOT, env={**os.environ, "COSYVOICE_API_KEYS": key},
        stdout=log_path.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    while "Ready." not in log_path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("stack did not start:\n" + log_path.read_text())
        time.sleep(0.3)
    return proc, f"http://127.0.0.1:{rest}", key


def run(rest_url: str, key: str, clients: int, seconds: float, retry_delay: float) -> None:
    deadline = time.monotonic() + seconds
    lock = threading.Lock()
    statuses: Counter[str] = Counter()
    ttfb: list[float] = []
    served: set[int] = set()

    def client(index: int) -> None:
        session = requests.Session()
        n = index
        while time.monotonic() < deadline:
            speaker, text = TEXTS[n % len(TEXTS)]
            n += 1
            started = time.perf_counter()
            try:
                reply = session.post(f"{rest_url}/inference_sft",
                                     data={"tts_text": text, "spk_id": speaker},
                                     headers={"X-API-TOKEN": key}, stream=True, timeout=120)
                first = None
                if reply.status_code == 200:
                    for piece in reply.iter_content(chunk_size=None):
                        if piece and first is None:
                            first = time.perf_counter() - started
                else:
                    reply.content  # noqa: B018 - read the JSON error to reuse the connection
                outcome = str(reply.status_code)
            except requests.RequestException as error:
                outcome, first = type(error).__name__, None
            with lock:
                statuses[outcome] += 1
                if first is not None:
                    ttfb.append(first)
                    served.add(index)
            if outcome != "200":
                time.sleep(retry_delay)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    quantiles = statistics.quantiles(ttfb, n=20) if len(ttfb) >= 2 else [float("nan")] * 19
    print(f"{clients:3d} clients, {seconds:.0f} s: requests {dict(sorted(statuses.items()))}; "
          f"clients served {len(served)}/{clients} ({100 * len(served) / clients:.0f} %); "
          f"TTFB of admitted: p50 {statistics.median(ttfb) if ttfb else float('nan'):.2f} s, "
          f"p95 {quantiles[18]:.2f} s (n={len(ttfb)}); load {os.getloadavg()[0]:.1f}",
          flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--seconds", type=float, default=25.0)
    parser.add_argument("--retry-delay", type=float, default=0.0,
                        help="pause after a refused request (default 0: retry at once)")
    parser.add_argument("--rest-url")
    parser.add_argument("--api-key")
    parser.add_argument("--stack-args", nargs=argparse.REMAINDER, default=[],
                        help="extra arguments for python -m gateway (e.g. --max-concurrent 2)")
    args = parser.parse_args()
    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.rest_url and args.api_key:
            rest_url, key = args.rest_url, args.api_key
        else:
            proc, rest_url, key = start_stack(Path(tmp), args.stack_args)
        try:
            for clients in args.clients:
                run(rest_url, key, clients, args.seconds, args.retry_delay)
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
