"""The server's options: one dataclass, each option declared once, for both programs.

``python -m service`` parses them with :func:`server_parser`; ``python -m gateway`` adds its own
options (REST listener, Envoy) to the same declarations (:func:`add_server_arguments`) and
starts the server with :meth:`ServerOptions.argv`, which is generated from the declarations, so
a new option is one entry in ``_OPTIONS`` and one field in ``ServerOptions``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from service import limits
from service.auth import ENV_KEYS
from service.logs import LOG_FORMATS
from tts_core.memory import parse_size
from tts_core.registry import ENGINE_NAMES, PRECISIONS, is_cosyvoice, runs_on_gpu


@dataclass(frozen=True)
class ServerOptions:
    """How to run the gRPC server and its engine."""

    engine: str | None = None  # None: see engine_name
    model_dir: Path | None = None
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    first_chunk_tokens: int | None = None
    grpc_host: str = "0.0.0.0"
    grpc_port: int = 50051
    max_concurrent: int = limits.DEFAULT_MAX_CONCURRENT
    max_queue: int = limits.DEFAULT_MAX_QUEUE
    max_batch: int | None = None  # None: see resolved_max_batch
    flow_cache_memory: int | None = None  # bytes; None: the engine's default
    flow_cache_share: float | None = None  # of the free memory; None: the engine's default
    api_key_file: Path | None = None
    state_dir: Path | None = None
    port_file: Path | None = None
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464
    log_level: str = "INFO"
    log_format: str = "text"
    drain_seconds: float = 30.0
    warm_up: str = "on"

    @property
    def engine_name(self) -> str:
        """The engine to run: ``engine``, else ``auto`` (CosyVoice 2 or 3, from the directory)
        when a model directory is given, else ``embedded``."""
        return self.engine or ("auto" if self.model_dir is not None else "embedded")

    def resolved_max_batch(self) -> int:
        """``max_batch``, else the default for the engine and where it runs: a CosyVoice engine
        gets the batch scheduler, GPU_MAX_BATCH on a GPU and CPU_MAX_BATCH on a CPU; the
        embedded engine DEFAULT_MAX_BATCH (it has no scheduler)."""
        if self.max_batch is not None:
            return self.max_batch
        if not is_cosyvoice(self.engine_name, self.model_dir):
            return limits.DEFAULT_MAX_BATCH
        if runs_on_gpu(self.engine_name, self.model_dir, self.device):
            return limits.GPU_MAX_BATCH
        return limits.CPU_MAX_BATCH

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> ServerOptions:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def argv(self) -> list[str]:
        """Command-line arguments that give ``python -m service`` exactly these options."""
        out: list[str] = []
        for option in _OPTIONS:
            value = getattr(self, option.field)
            if value is not None:
                out += [option.flags[0], str(value)]
        return out


@dataclass(frozen=True)
class _Option:
    field: str
    flags: tuple[str, ...]  # the first is the one ``argv`` writes
    help: str
    type: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:  # argparse then exits 2 with this message
        raise argparse.ArgumentTypeError(str(error)) from None


_OPTIONS = (
    _Option("engine", ("--engine",), "the synthesis engine (default: auto, which picks "
            "cosyvoice2 or cosyvoice3 from the directory, when --model-dir is given; else "
            "embedded)", choices=ENGINE_NAMES),
    _Option("model_dir", ("--model-dir",), "model directory (cosyvoice2, cosyvoice3, auto)", Path),
    _Option("device", ("--device",), "CosyVoice engines: cpu, cuda[:N] or auto"),
    _Option("precision", ("--precision",), "numeric precision of the engine's models: auto "
            "(float32 on CPU; bfloat16, else float16, on CUDA), float32, bfloat16, float16 or "
            "int8, where the engine offers it", choices=PRECISIONS),
    _Option("threads", ("--threads",), "engine compute threads (default: the engine's)", int),
    _Option("first_chunk_tokens", ("--first-chunk-tokens",), "CosyVoice engines: speech tokens "
            "in the first streamed chunk (default 10; the reference uses 25)", int),
    # The server alone calls its gRPC address --host/--port; the launcher's are for REST.
    _Option("grpc_host", ("--grpc-host", "--host"), "gRPC listen address (it checks keys too)"),
    _Option("grpc_port", ("--grpc-port", "--port"), "gRPC port (0: any free one)", int),
    _Option("max_concurrent", ("--max-concurrent",), "syntheses running at once without a "
            "batch scheduler (the embedded engine, or --max-batch 1)", int),
    _Option("max_queue", ("--max-queue",), "syntheses waiting for a slot; beyond, new ones get "
            "RESOURCE_EXHAUSTED (HTTP 503)", int),
    _Option("max_batch", ("--max-batch",), "cosyvoice2/3 engines: requests one batch scheduler "
            "steps together (1: none, each synthesis on its own thread); above 1 it replaces "
            "--max-concurrent as the number of syntheses running at once (default for a "
            f"CosyVoice engine: {limits.GPU_MAX_BATCH} on a GPU, {limits.CPU_MAX_BATCH} on a "
            f"CPU; the embedded engine: {limits.DEFAULT_MAX_BATCH})", int),
    _Option("flow_cache_memory", ("--flow-cache-memory",), "cosyvoice2/3 engines: memory the "
            "flow stream caches of all syntheses running at once may hold together, e.g. 8G, "
            "512M or bytes; each of the --max-batch (else --max-concurrent) streams gets an equal "
            "share, and a stream past its share recomputes instead (same audio, slower). "
            "Default: --flow-cache-share of the memory free once the models are loaded", _size),
    _Option("flow_cache_share", ("--flow-cache-share",), "cosyvoice2/3 engines without "
            "--flow-cache-memory: the share of the memory free once the models are loaded that "
            "the flow stream caches may hold (default 0.5); replicas sharing a machine or a GPU "
            "get their part of it from the launcher", float),
    _Option("api_key_file", ("--api-key-file",), f"API keys, one per line (else ${ENV_KEYS}, "
            "else a key generated into the state directory)", Path),
    _Option("state_dir", ("--state-dir",), "where a generated key, registered speakers and the "
            "gateway's config are kept (default $COSYVOICE_STATE_DIR or var/)", Path),
    _Option("port_file", ("--port-file",), "write the bound gRPC port here once serving (useful "
            "with port 0)", Path),
    _Option("metrics_host", ("--metrics-host",), "Prometheus /metrics listen address (loopback "
            "unless the scraper runs elsewhere)"),
    _Option("metrics_port", ("--metrics-port",), "Prometheus /metrics port (0: no metrics)", int),
    _Option("log_level", ("--log-level",), "gRPC server log level"),
    _Option("log_format", ("--log-format",), "log lines as text, or json (one object per line, "
            "with one line per synthesis call: request id, surface, mode, status, times, "
            "audio seconds; never text or keys)", choices=LOG_FORMATS),
    _Option("warm_up", ("--warm-up",), "CosyVoice engines: before serving, stream 10 s of "
            "audio through the flow and the vocoder once, so that the first request does not "
            "pay for building their kernels (seconds on a CPU)", choices=("on", "off")),
    _Option("drain_seconds", ("--drain-seconds",), "on SIGTERM: stop taking new syntheses "
            "(503 / UNAVAILABLE) and give running ones this long to finish before they are cut "
            "off (a second SIGTERM cuts them at once); then exit 0", float),
)


def add_server_arguments(parser: argparse.ArgumentParser, *, standalone: bool) -> None:
    """Declare every server option on ``parser``.

    ``standalone``: the server's own command line, where --host and --port name the gRPC
    listener; the launcher spells them --grpc-host and --grpc-port only.
    """
    group = parser.add_argument_group("gRPC server and engine")
    defaults = ServerOptions()
    for option in _OPTIONS:
        flags = option.flags if standalone else option.flags[:1]
        default = getattr(defaults, option.field)
        note = f" (default {default})" if default is not None else ""
        group.add_argument(*flags, dest=option.field, type=option.type, choices=option.choices,
                           default=default, help=option.help + note)


def server_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service",
                                     description="Run the gRPC text-to-speech server.")
    add_server_arguments(parser, standalone=True)
    return parser


def parse_server_options(argv: list[str] | None = None) -> ServerOptions:
    return ServerOptions.from_namespace(server_parser().parse_args(argv))
