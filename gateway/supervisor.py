"""Keeps the engine server processes (replicas) running: start, watch, restart with backoff.

Each replica has a thread of its own that starts ``python -m service``, waits until its gRPC
health check says SERVING, waits for it to exit and, unless the launcher is stopping, starts it
again after a delay that doubles with each crash in a row (``BACKOFF_FIRST`` ... ``BACKOFF_MAX``
seconds; back to the first after ``STABLE_SECONDS`` of uptime). Every exit is logged with its
reason (exit code or signal name). A replica that never became SERVING gives up after
``START_FAILURE_LIMIT`` failed starts in a row (a bad model directory fails the same way each
time), and the launcher then stops with that message.

The thread that starts a process stays until the process has exited: the children ask for
SIGTERM when their parent *thread* ends (``PR_SET_PDEATHSIG``), which must only happen when the
launcher itself dies.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger("gateway.supervisor")

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
STABLE_SECONDS = 60.0  # up this long: the next crash starts the backoff afresh
START_FAILURE_LIMIT = 3


@dataclass(frozen=True)
class ReplicaSpec:
    """How to run one engine server process."""

    index: int
    command: list[str]
    target: str  # host:port its health is checked on
    metrics_url: str | None
    device: str | None = None


def exit_reason(code: int) -> str:
    """``Popen.returncode`` in words: the exit code, or the signal that ended the process."""
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def check_serving(target: str, timeout: float = 2.0) -> bool:
    """Whether the gRPC server at ``target`` says SERVING now."""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


class Replica:
    """One engine server process and the thread that keeps it running."""

    def __init__(self, spec: ReplicaSpec, *, env: dict[str, str], cwd: Path,
                 start_timeout: float, stopping: threading.Event,
                 preexec_fn: Callable[[], None] | None = None):
        self.spec = spec
        self._env, self._cwd, self._preexec_fn = env, cwd, preexec_fn
        self.start_timeout = start_timeout
        self.stopping = stopping  # shared by every replica: the launcher is shutting down
        self.serving = threading.Event()  # set while the current process is SERVING
        self.gave_up: str | None = None  # why, once it has stopped trying
        self.restarts = 0
        self.process: subprocess.Popen | None = None
        self._lock = threading.Lock()  # a process is started or signalled, not both at once
        self._thread = threading.Thread(target=self._keep_running, daemon=True,
                                        name=f"replica-{spec.index}")

    @property
    def name(self) -> str:
        return f"engine server {self.spec.index}"

    def start(self) -> None:
        self._thread.start()

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the running process, if any."""
        with self._lock:
            if self.process is not None and self.process.poll() is None:
                self.process.send_signal(signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread (and so the process) to end; True when it has."""
        if self._thread.ident is None:
            return True  # never started
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ------------------------------------------------------------------ the thread

    def _spawn(self) -> subprocess.Popen | None:
        with self._lock:
            if self.stopping.is_set():
                return None
            self.process = subprocess.Popen(self.spec.command, env=self._env, cwd=self._cwd,
                                            start_new_session=True, preexec_fn=self._preexec_fn)
            return self.process

    def _keep_running(self) -> None:
        delay, failed_starts, ever_served = BACKOFF_FIRST, 0, False
        while True:
            process = self._spawn()
            if process is None:
                return
            started = time.monotonic()
            if self._wait_serving(process):
                ever_served, failed_starts = True, 0
                self.serving.set()
                log.info("%s serving on %s (pid %d)", self.name, self.spec.target, process.pid)
                code = process.wait()
                self.serving.clear()
                if self.stopping.is_set():
                    log.info("%s (pid %d) %s", self.name, process.pid, exit_reason(code))
                    return
                uptime = time.monotonic() - started
                if uptime >= STABLE_SECONDS:
                    delay = BACKOFF_FIRST
                log.warning("%s (pid %d) %s after %.0f s serving; restarting in %g s",
                            self.name, process.pid, exit_reason(code), uptime, delay)
            else:
                code = process.wait()  # _wait_serving ended it, or it ended itself
                if self.stopping.is_set():
                    return
                failed_starts += 1
                if not ever_served and failed_starts >= START_FAILURE_LIMIT:
                    self.gave_up = (
                        f"{self.name} {exit_reason(code)} before it was serving, "
                        f"{failed_starts} times in a row; giving up (the lines above say why: "
                        "e.g. a wrong --model-dir, a port in use, or too little memory)")
                    log.error("%s", self.gave_up)
                    return
                log.warning("%s (pid %d) %s before it was serving (attempt %d); restarting "
                            "in %g s", self.name, process.pid, exit_reason(code),
                            failed_starts, delay)
            if self.stopping.wait(delay):
                return
            self.restarts += 1
            delay = min(delay * 2, BACKOFF_MAX)

    def _wait_serving(self, process: subprocess.Popen) -> bool:
        """Until the process is SERVING (True), exits, is too slow to start (killed) or the
        launcher stops (False)."""
        deadline = time.monotonic() + self.start_timeout
        while not self.stopping.is_set():
            if process.poll() is not None:
                return False
            if check_serving(self.spec.target):
                return True
            if time.monotonic() > deadline:
                log.error("%s was not serving on %s after %.0f s; stopping it", self.name,
                          self.spec.target, self.start_timeout)
                process.kill()
                return False
            time.sleep(0.5)
        return False
