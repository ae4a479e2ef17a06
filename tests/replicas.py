"""Real replicas for tests and benchmarks: N server-only engine servers (``python -m service``,
embedded engine, free ports) behind one gateway-only Envoy (``python -m gateway --upstream``),
and a load of raw HTTP/1.1 REST streams that records how each one ended.

The raw client reads the chunked framing itself, so "complete" means exactly what the README
promises: status 200, a terminating chunk, and the trailer ``x-cosyvoice-status: 0``.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 300.0  # three engines loading at once on a busy 2-core machine
STATUS_TRAILER = "x-cosyvoice-status"
# Several sentences: a stream lasts long enough to be cut in the middle by a kill.
LOAD_TEXT = ("The weather is fine today. We will walk to the park after lunch, and then we "
             "will read a book under the old tree.")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Replica:
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        """``kill -9``: no drain, no goodbye; its connections die with it."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()


@dataclass
class ReplicaSet:
    replicas: list[Replica]
    gateway: subprocess.Popen
    gateway_log: Path
    rest_url: str
    admin_url: str
    api_key: str

    @property
    def rest_address(self) -> tuple[str, int]:
        host, port = self.rest_url.split("//")[1].rsplit(":", 1)
        return host, int(port)

    def host_stats(self, timeout: float = 60.0) -> dict[str, dict[str, str]]:
        """Envoy's view of each replica (admin /clusters): health_flags, rq_active, ..."""
        with urllib.request.urlopen(f"{self.admin_url}/clusters", timeout=timeout) as reply:
            text = reply.read().decode()
        hosts: dict[str, dict[str, str]] = {}
        for line in text.splitlines():
            parts = line.split("::")
            if len(parts) == 4 and parts[0] == "tts_grpc":
                hosts.setdefault(parts[1], {})[parts[2]] = parts[3]
        return hosts

    def wait_healthy(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            hosts = self.host_stats()
            healthy = [h for h, s in hosts.items() if s.get("health_flags") == "healthy"]
            if len(healthy) >= count:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(healthy)} of {count} replicas healthy: {hosts}")
            time.sleep(0.3)

    def stop(self) -> None:
        processes = [self.gateway, *(r.process for r in self.replicas)]
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _spawn(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    with log_path.open("wb") as log:
        return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def start_replica_set(workdir: Path, count: int = 3, *, max_concurrent: int = 2,
                      max_queue: int = 16, threads: int = 1, by_name: bool = True) -> ReplicaSet:
    """``by_name``: name the replicas after the first as ``localhost:PORT``, so Envoy resolves
    them (a STRICT_DNS cluster, as with a Kubernetes headless Service)."""
    workdir.mkdir(parents=True, exist_ok=True)
    api_key = secrets.token_urlsafe(24)
    env = {**os.environ, "COSYVOICE_API_KEYS": api_key, "PYTHONUNBUFFERED": "1"}
    started: list[tuple[subprocess.Popen, Path, Path]] = []
    gateway = None
    try:
        for i in range(count):
            port_file, log_path = workdir / f"replica{i}.port", workdir / f"replica{i}.log"
            process = _spawn(
                [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", "0",
                 "--port-file", str(port_file), "--state-dir", str(workdir / "state"),
                 "--engine", "embedded", "--threads", str(threads), "--metrics-port", "0",
                 "--max-concurrent", str(max_concurrent), "--max-queue", str(max_queue)],
                env, log_path)
            started.append((process, port_file, log_path))
        replicas = []
        deadline = time.monotonic() + START_TIMEOUT
        for process, port_file, log_path in started:
            while not (port_file.exists() and port_file.read_text().strip()):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"a replica did not start:\n{log_path.read_text()}")
                time.sleep(0.2)
            replicas.append(Replica(process, int(port_file.read_text()), log_path))
        rest_port, admin_port = free_port(), free_port()
        gateway_log = workdir / "gateway.log"
        gateway = _spawn(
            [sys.executable, "-m", "gateway",
             "--upstream", ",".join(f"localhost:{r.port}" if by_name and i else r.address
                                    for i, r in enumerate(replicas)),
             "--host", "127.0.0.1", "--port", str(rest_port), "--admin-port", str(admin_port),
             "--state-dir", str(workdir / "gateway-state")], env, gateway_log)
        replica_set = ReplicaSet(replicas, gateway, gateway_log,
                                 f"http://127.0.0.1:{rest_port}",
                                 f"http://127.0.0.1:{admin_port}", api_key)
        deadline = time.monotonic() + 60
        while b"Ready" not in gateway_log.read_bytes():
            if gateway.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start:\n{gateway_log.read_text()}")
            time.sleep(0.2)
        replica_set.wait_healthy(count)
        return replica_set
    except BaseException:
        for process in [p for p, _, _ in started] + ([gateway] if gateway else []):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        raise


@dataclass
class StreamResult:
    started: float  # monotonic
    ended: float
    status: int | None  # None: no response at all (connection refused or reset)
    ttfb: float | None  # seconds to the response's first byte
    audio_bytes: int
    trailer: str | None  # x-cosyvoice-status; None: no terminating chunk (cut off)

    @property
    def outcome(self) -> str:
        """ok: complete; broken: started streaming, then cut (a client can tell); failed:
        refused or errored before any audio."""
        if self.status == 200 and self.trailer == "0":
            return "ok"
        if self.status == 200:
            return "broken"
        return "failed"


def rest_stream(address: tuple[str, int], api_key: str, text: str = LOAD_TEXT,
                speaker: str = "英文女", on_first_byte=None) -> StreamResult:
    """One /inference_sft stream over raw HTTP/1.1, read to its end; ``on_first_byte()`` is
    called when the response begins."""
    body = urlencode({"tts_text": text, "spk_id": speaker}).encode()
    request = (f"POST /inference_sft HTTP/1.1\r\nHost: {address[0]}\r\n"
               f"X-API-TOKEN: {api_key}\r\n"
               "Content-Type: application/x-www-form-urlencoded\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    started = time.monotonic()
    data, ttfb = b"", None
    try:
        # Generous: on a loaded 2-core machine a queued stream may wait minutes for its turn.
        with socket.create_connection(address, timeout=600) as sock:
            sock.sendall(request)
            while True:
                piece = sock.recv(65536)
                if not piece:
                    break
                if ttfb is None:
                    ttfb = time.monotonic() - started
                    if on_first_byte is not None:
                        on_first_byte()
                data += piece
    except OSError:
        pass  # a reset: what was read so far decides the outcome
    ended = time.monotonic()
    head, _, rest = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 "):
        return StreamResult(started, ended, None, ttfb, 0, None)
    status = int(head.split(b" ", 2)[1])
    audio, trailer = 0, None
    while rest:
        line, _, rest = rest.partition(b"\r\n")
        if not re.fullmatch(rb"[0-9a-fA-F]+(;.*)?", line):
            break
        size = int(line.split(b";")[0], 16)
        if size == 0:
            block = rest.split(b"\r\n\r\n")[0].decode("latin-1")
            fields = dict(f.split(": ", 1) for f in block.split("\r\n") if ": " in f)
            trailer = fields.get(STATUS_TRAILER, "")
            break
        if len(rest) < size + 2:
            break  # cut off inside a chunk
        audio += size
        rest = rest[size + 2:]
    return StreamResult(started, ended, status, ttfb, audio, trailer)


@dataclass
class Load:
    """``clients`` threads sending REST streams back to back until stopped."""

    replica_set: ReplicaSet
    clients: int
    results: list[StreamResult] = field(default_factory=list)
    streaming: int = 0  # responses begun and not yet ended
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _began(self) -> None:
        with self._lock:
            self.streaming += 1

    def _client(self) -> None:
        while not self._stop.is_set():
            result = rest_stream(self.replica_set.rest_address, self.replica_set.api_key,
                                 on_first_byte=self._began)
            with self._lock:
                self.results.append(result)
                self.streaming -= result.ttfb is not None

    def wait_streaming(self, count: int, timeout: float) -> None:
        """Until at least ``count`` responses are under way at once."""
        deadline = time.monotonic() + timeout
        while self.streaming < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {self.streaming} streams under way after "
                                     f"{timeout:.0f} s")
            time.sleep(0.01)

    def wait_completed_since(self, since: float, count: int, timeout: float) -> None:
        """Until ``count`` requests that started after ``since`` have ended."""
        deadline = time.monotonic() + timeout
        while sum(r.started > since for r in list(self.results)) < count:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)

    def start(self) -> Load:
        self._threads = [threading.Thread(target=self._client, daemon=True)
                         for _ in range(self.clients)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> list[StreamResult]:
        """Stop sending; every stream under way is read to its end."""
        self._stop.set()
        for thread in self._threads:
            thread.join(180)
        return self.results
