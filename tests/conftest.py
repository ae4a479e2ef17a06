"""Shared fixtures: the real stack (gRPC server + Envoy gateway) on free loopback ports.

``stack`` (session scope) runs ``python -m gateway`` exactly as an operator would, with the
embedded engine and a fresh API key, and stops it at the end of the session. Any test can use
it::

    def test_something(stack):
        requests.get(stack.rest_url + "/v1/speakers", headers={"X-API-TOKEN": stack.api_key})

Its capacity is small on purpose (``STACK_MAX_CONCURRENT`` running + ``STACK_MAX_QUEUE``
waiting), so that overload is cheap to provoke. Tests that start long syntheses must cancel
them and wait for ``stack.wait_idle()`` so the next test finds the server idle.
"""

from __future__ import annotations

import io
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
AUDIO_DIR = SHARED / "audio"

STACK_MAX_CONCURRENT = 2
STACK_MAX_QUEUE = 1
STACK_START_TIMEOUT = 300.0  # loading the engine on a busy 2-core machine


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Stack:
    """A running gateway + gRPC server, with what a client needs to reach it."""

    rest_url: str  # e.g. http://127.0.0.1:41234 (no trailing slash)
    grpc_target: str  # e.g. 127.0.0.1:41235
    api_key: str
    admin_url: str  # Envoy admin, loopback only
    metrics_url: str  # the server's Prometheus /metrics, loopback only
    state_dir: Path
    log_path: Path  # stdout + stderr of the launcher, the gRPC server and Envoy
    max_concurrent: int
    max_queue: int
    process: subprocess.Popen = field(repr=False)

    @property
    def headers(self) -> dict[str, str]:
        return {"X-API-TOKEN": self.api_key}

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-api-token", self.api_key),)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict:
        reply = requests.get(f"{self.rest_url}/v1/status", headers=self.headers, timeout=30)
        reply.raise_for_status()
        return reply.json()

    def stop(self) -> int | None:
        """SIGTERM the launcher (it stops Envoy and the server); returns its exit code."""
        return stop_stack(self)

    def wait_idle(self, timeout: float = 60.0) -> dict:
        """Wait until no synthesis runs or waits; returns the last status."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if status["active_syntheses"] == 0 and status["queued_syntheses"] == 0:
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"server still busy after {timeout:.0f} s: {status}")
            time.sleep(0.1)


def start_stack(workdir: Path, *, max_concurrent: int = STACK_MAX_CONCURRENT,
                max_queue: int = STACK_MAX_QUEUE, extra_args: tuple[str, ...] = (),
                generate_key: bool = False) -> Stack:
    """Run ``python -m gateway``; with ``generate_key`` the launcher makes the key itself."""
    workdir.mkdir(parents=True, exist_ok=True)
    state_dir = workdir / "state"
    log_path = workdir / "stack.log"
    api_key = "" if generate_key else secrets.token_urlsafe(24)
    rest_port, grpc_port, admin_port, metrics_port = (free_port(), free_port(), free_port(),
                                                      free_port())
    env = {**os.environ, "COSYVOICE_API_KEYS": api_key, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", str(rest_port),
           "--grpc-host", "127.0.0.1", "--grpc-port", str(grpc_port),
           "--admin-port", str(admin_port), "--metrics-port", str(metrics_port),
           "--state-dir", str(state_dir),
           "--engine", "embedded", "--threads", "1",
           "--max-concurrent", str(max_concurrent), "--max-queue", str(max_queue), *extra_args]
    log = log_path.open("wb")
    process = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    log.close()
    stack = Stack(rest_url=f"http://127.0.0.1:{rest_port}",
                  grpc_target=f"127.0.0.1:{grpc_port}", api_key=api_key,
                  admin_url=f"http://127.0.0.1:{admin_port}",
                  metrics_url=f"http://127.0.0.1:{metrics_port}/metrics", state_dir=state_dir,
                  log_path=log_path, max_concurrent=max_concurrent, max_queue=max_queue,
                  process=process)
    deadline = time.monotonic() + STACK_START_TIMEOUT
    while "Ready." not in stack.logs():
        if process.poll() is not None or time.monotonic() > deadline:
            stop_stack(stack)
            raise RuntimeError("the stack did not start:\n" + stack.logs()[-4000:])
        time.sleep(0.3)
    if generate_key:
        lines = stack.logs().splitlines()
        announced = [i for i, line in enumerate(lines) if line.startswith("Generated an API key")]
        assert announced, "the launcher did not show the generated key"
        stack.api_key = lines[announced[0] + 1].strip()
    return stack


def stop_stack(stack: Stack, timeout: float = 20.0) -> int | None:
    if stack.process.poll() is None:
        stack.process.send_signal(signal.SIGTERM)
        try:
            stack.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(stack.process.pid, signal.SIGKILL)
            stack.process.wait()
    return stack.process.returncode


def collect_replies(replies) -> tuple[list, object]:
    """(audio chunks, stats) of a Synthesize or SynthesizeTextStream call, checking its shape:
    audio chunks, then exactly one stats message at the end."""
    chunks, stats = [], None
    for reply in replies:
        if reply.HasField("audio"):
            assert stats is None, "audio after the stats message"
            chunks.append(reply.audio)
        else:
            stats = reply.stats
    assert stats is not None, "the stream did not end with stats"
    return chunks, stats


def rpc_error(call):
    """The grpc.RpcError that ends the streaming ``call`` (fails if it ends without one)."""
    import grpc

    with pytest.raises(grpc.RpcError) as caught:
        for _ in call:
            pass
    return caught.value


def decode_stream(data: bytes) -> tuple[np.ndarray, int]:
    """Decode a whole stream of any of our compressed or container formats with PyAV
    (FFmpeg): mono float32 samples and their rate."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        frames = [frame.to_ndarray().reshape(-1) for frame in container.decode(stream)]
        rate = stream.rate
    samples = np.concatenate(frames).astype(np.float32)
    if np.issubdtype(frames[0].dtype, np.integer):
        samples /= 32768
    return samples, rate


def assert_same_audio(samples: np.ndarray, rate: int, reference: np.ndarray,
                      reference_rate: int, *, lossless: bool) -> None:
    """``samples`` (decoded) is ``reference`` (what the engine produced): the same length
    within a codec frame after the codec's leading delay, and exact (lossless) or correlated
    >= 0.9 (lossy)."""
    import soxr

    if rate != reference_rate:  # Opus decoders answer at 48 kHz
        samples = soxr.resample(samples, rate, reference_rate).astype(np.float32)
    window = samples[:len(reference) + reference_rate // 10]
    delay = int(np.argmax(np.correlate(window, reference, "valid"))) if len(window) >= len(
        reference) else 0
    aligned = samples[delay:delay + len(reference)]
    frame = 1200 * reference_rate // 24000  # larger than any codec's frame or delay
    assert delay <= frame and abs(len(samples) - delay - len(reference)) <= frame, (
        delay, len(samples), len(reference))
    n = min(len(aligned), len(reference))
    if lossless:
        assert delay == 0 and np.abs(aligned[:n] - reference[:n]).max() <= 2 / 32768
    else:
        assert np.corrcoef(aligned[:n], reference[:n])[0, 1] >= 0.9


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = start_stack(tmp_path_factory.mktemp("stack"))
    try:
        yield running
    finally:
        stop_stack(running)


@pytest.fixture
def launch_stack(tmp_path: Path):
    """Start extra stacks (e.g. with other limits); all are stopped after the test."""
    started: list[Stack] = []

    def launch(**options) -> Stack:
        started.append(start_stack(tmp_path / f"stack{len(started)}", **options))
        return started[-1]

    yield launch
    for running in started:
        stop_stack(running)


@pytest.fixture(scope="session")
def grpc_channel(stack: Stack):
    import grpc

    with grpc.insecure_channel(stack.grpc_target) as channel:
        yield channel


@pytest.fixture(scope="session")
def prompt_wav() -> Path:
    """Real speech, float32 WAV at 24 kHz, 3.5 s (transcript in shared/audio/README.md)."""
    return AUDIO_DIR / "zero_shot_prompt.wav"


@pytest.fixture(scope="session")
def prompt(prompt_wav: Path):  # noqa: ANN201 - an Audio (tts_core imported lazily, as below)
    """The zero-shot prompt recording as engine input."""
    import soundfile

    from tts_core.engine import Audio

    samples, rate = soundfile.read(prompt_wav, dtype="float32")
    return Audio(samples, rate)


@pytest.fixture(scope="session")
def cross_lingual_wav() -> Path:
    """Real English speech, 16-bit WAV at 22.05 kHz, 13.75 s."""
    return AUDIO_DIR / "cross_lingual_prompt.wav"


@pytest.fixture(scope="session")
def cv3_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny CosyVoice 3 model directory with two preset speakers, made once per session
    (engine and service tests share it; they must not modify it)."""
    import torch

    from tts_core.cosyvoice3.testing.make_model_dir import make_model_dir

    torch.set_num_threads(1)
    return make_model_dir(tmp_path_factory.mktemp("cv3-model") / "tiny", "tiny", seed=3,
                          spk2info=True)
