"""Prometheus metrics of one engine server process, served in the text format at ``/metrics``.

What is measured, and where:

- per synthesis call (``server.CallLog`` reports each call here once, when it ends):
  ``cosyvoice_requests_total{surface,mode,code}``, the duration and time-to-first-audio
  histograms, audio produced, real-time factor, cancellations and engine errors;
- per process, read when scraped: the synthesizer's queue depth (``watch_queue``), the batch
  scheduler's occupancy and capacity (``watch_batch``; 0 of 1 without a scheduler), the engine's
  load time and what it runs (``engine_loaded``).

One process, one registry, one scrape target. With several engine processes each serves its
own ``/metrics`` on its own port and Prometheus scrapes each as a target (per-replica scrape,
as a Kubernetes pod is scraped), rather than prometheus-client's multiprocess mode: that mode
needs a shared directory wiped at every restart, cannot compute gauges at scrape time nor
export info metrics, and merges away which replica is slow or failing, the thing an operator
looks for first.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import start_http_server

log = logging.getLogger("service.metrics")

SURFACES = ("grpc", "rest", "openai")
# Time to first audio and whole-call duration: from a fast first chunk (~50 ms) to a long
# text on a CPU (~30 s).
SECONDS_BUCKETS = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0,
                   20.0, 30.0, math.inf)
# Real-time factor (processing seconds per second of audio): below 1 keeps up with playback.
RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, math.inf)


def surface_of(call_name: str) -> str:
    """The API a call came through, from its ``CallLog`` name: the native gRPC API (its RPC
    name; also when reached as JSON through the gateway, POST /v1/synthesize), the reference
    server's REST endpoints (/inference_*) or OpenAI's (/v1/...)."""
    if call_name.startswith("/v1/"):
        return "openai"
    return "rest" if call_name.startswith("/") else "grpc"


class Metrics:
    """Every metric of the process, in one registry (a fresh one per instance, so tests can
    make their own)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "cosyvoice_requests", "Synthesis calls ended, by surface, mode and gRPC status name",
            ["surface", "mode", "code"], registry=r)
        self.time_to_first_audio = Histogram(
            "cosyvoice_time_to_first_audio_seconds",
            "From a synthesis call's arrival to its first audio chunk", ["surface"],
            buckets=SECONDS_BUCKETS, registry=r)
        self.duration = Histogram(
            "cosyvoice_request_duration_seconds", "Synthesis calls from arrival to end, any status",
            ["surface"], buckets=SECONDS_BUCKETS, registry=r)
        self.audio_seconds = Counter(
            "cosyvoice_audio_seconds", "Seconds of audio the engine produced", ["surface"],
            registry=r)
        self.real_time_factor = Histogram(
            "cosyvoice_real_time_factor",
            "Call duration divided by the audio's duration, for calls that ended OK",
            ["surface"], buckets=RTF_BUCKETS, registry=r)
        self.active_streams = Gauge(
            "cosyvoice_active_streams", "Synthesis calls open now (waiting for a slot or speaking)",
            registry=r)
        self.queue_depth = Gauge(
            "cosyvoice_queue_depth", "Syntheses waiting for an engine slot", registry=r)
        self.batch_occupancy = Gauge(
            "cosyvoice_batch_occupancy",
            "Requests the engine's batch scheduler is stepping together now (or about to)",
            registry=r)
        self.max_batch = Gauge(
            "cosyvoice_max_batch", "Requests the batch scheduler steps at most (--max-batch; 1: "
            "no scheduler)", registry=r)
        self.max_batch.set(1)
        self.cancelled = Counter(
            "cosyvoice_cancelled", "Synthesis calls the client left before their end",
            ["surface"], registry=r)
        self.engine_errors = Counter(
            "cosyvoice_engine_errors",
            "Synthesis calls that failed unexpectedly (INTERNAL; the traceback is in the log)",
            ["surface"], registry=r)
        self.model_load = Gauge(
            "cosyvoice_model_load_seconds", "Seconds the engine took to load at start",
            registry=r)
        self.build = Info(
            "cosyvoice_build", "The engine this process runs: engine, model directory's name, "
            "device, precision", registry=r)
        for surface in SURFACES:  # shown as 0 from the start, so rate() and alerts see them
            for counter in (self.audio_seconds, self.cancelled, self.engine_errors):
                counter.labels(surface)

    # ---------------------------------------------------------------- per call

    def call_started(self) -> None:
        self.active_streams.inc()

    def call_ended(self, surface: str, mode: str, code: str, *, duration: float,
                   first_audio: float | None, audio_seconds: float) -> None:
        """One synthesis call ended with gRPC status ``code`` (``first_audio``: None when no
        audio went out)."""
        self.active_streams.dec()
        # "-": the call failed before its request was decoded
        self.requests.labels(surface, mode if mode != "-" else "unknown", code).inc()
        self.duration.labels(surface).observe(duration)
        if first_audio is not None:
            self.time_to_first_audio.labels(surface).observe(first_audio)
        if audio_seconds > 0:
            self.audio_seconds.labels(surface).inc(audio_seconds)
            if code == "OK":
                self.real_time_factor.labels(surface).observe(duration / audio_seconds)
        if code == "CANCELLED":
            self.cancelled.labels(surface).inc()
        elif code == "INTERNAL":
            self.engine_errors.labels(surface).inc()

    # ---------------------------------------------------------------- per process

    def watch_queue(self, queued: Callable[[], int]) -> None:
        """Read the queue depth from ``queued`` at each scrape."""
        self.queue_depth.set_function(queued)

    def watch_batch(self, occupancy: Callable[[], tuple[int, int]]) -> None:
        """Read (requests in the batch, max batch) from ``occupancy`` at each scrape."""
        self.batch_occupancy.set_function(lambda: occupancy()[0])
        self.max_batch.set_function(lambda: occupancy()[1])

    def engine_loaded(self, *, engine: str, model_dir: Path | None, device: str, precision: str,
                      seconds: float) -> None:
        self.model_load.set(seconds)
        self.build.info({"engine": engine, "model": model_dir.name if model_dir else "",
                         "device": device, "precision": precision})

    def serve(self, host: str, port: int) -> Callable[[], None]:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread; returns a stop function."""
        try:
            httpd, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as error:
            raise OSError(f"cannot serve metrics on {host}:{port} ({error.strerror or error}): "
                          "choose another --metrics-port, or 0 to turn metrics off") from None
        log.info("metrics at http://%s:%d/metrics", host, httpd.server_port)

        def stop() -> None:
            httpd.shutdown()
            httpd.server_close()
            thread.join(5)

        return stop


# The process's metrics: server.CallLog reports to it, ``python -m service`` serves it.
METRICS = Metrics()


def engine_description(engine: object, device: str, precision: str) -> tuple[str, str]:
    """(device, precision) the engine really runs on: what it resolved ``auto`` to where it
    says (the CosyVoice engines' models), else the options as given."""
    if getattr(engine, "name", "") == "embedded":
        return "cpu", "int8"  # its one model: int8 ONNX on onnxruntime's CPU provider
    models = getattr(engine, "models", None)
    resolved_device = getattr(models, "device", None)
    dtype = getattr(models, "dtype", None)
    plan = getattr(models, "precision", None)  # the resolved option, e.g. "int8w" for "auto"
    if resolved_device is not None:
        device = str(resolved_device)
    if plan is not None:
        precision = plan.name
    elif dtype is not None:
        precision = str(dtype).removeprefix("torch.")
    return device, precision
