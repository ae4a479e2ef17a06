"""``python -m gateway --upstream HOST:PORT[,...]``: Envoy alone, in front of engine servers
that run elsewhere (``python -m service`` on other machines, or Kubernetes pods).

Same keys as the servers (``--api-key-file``, else ``$COSYVOICE_API_KEYS``, else the key file
in the state directory): Envoy checks them at the edge and every server checks them again.
Starts Envoy, waits until it is ready (not until a server is up: servers may start later, and
Envoy's health checks pick them up), prints the URLs, and stops Envoy on SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from gateway.envoy_config import GatewaySettings, Upstream
from gateway.upstream import parse_upstreams
from service.auth import default_state_dir, load_api_keys
from service.protogen import REPO_ROOT, build_descriptor_set
from service.state_dir import StateDirError, prepare_state_dir

ENVOY_START_TIMEOUT = 60.0
UPSTREAM_FLAG = "--upstream"


def wants_gateway_only(argv: list[str]) -> bool:
    return any(a == UPSTREAM_FLAG or a.startswith(UPSTREAM_FLAG + "=") for a in argv)


@dataclass(frozen=True)
class GatewayOnlyOptions:
    upstreams: tuple[Upstream, ...]
    host: str
    port: int
    admin_port: int
    web_dir: Path
    envoy_log_level: str
    api_key_file: Path | None
    state_dir: Path | None
    stats_port: int | None


def _upstreams(text: str) -> tuple[Upstream, ...]:
    try:
        return parse_upstreams(text)
    except ValueError as error:  # argparse prints it as "error: argument --upstream: ..."
        raise argparse.ArgumentTypeError(str(error).removeprefix("--upstream: ")) from None


def parse_options(argv: list[str] | None = None) -> GatewayOnlyOptions:
    p = argparse.ArgumentParser(
        prog="python -m gateway",
        description="Run only the Envoy gateway, in front of engine servers started elsewhere "
                    "with python -m service.")
    p.add_argument(UPSTREAM_FLAG, type=_upstreams, required=True, metavar="HOST:PORT[,...]",
                   help="the engine servers' gRPC addresses; a DNS name stands for every "
                        "address it resolves to (a Kubernetes headless Service), re-resolved "
                        "every few seconds")
    p.add_argument("--host", default="0.0.0.0", help="REST listen address (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=50000, help="REST port (default 50000)")
    p.add_argument("--admin-port", type=int, default=9901,
                   help="Envoy admin port, bound to 127.0.0.1 only (default 9901)")
    p.add_argument("--stats-port", type=int, default=None,
                   help="also serve Envoy's /stats/prometheus (only that path) on this port, "
                        "on every address, for a scraper on another machine (default: none; "
                        "the admin port has it on loopback)")
    p.add_argument("--web-dir", type=Path, default=REPO_ROOT / "web",
                   help="static files served at / (default web/)")
    p.add_argument("--envoy-log-level", default="warning",
                   help="Envoy's log level (default warning; debug and trace log API keys)")
    p.add_argument("--api-key-file", type=Path, default=None,
                   help="API keys, one per line (else $COSYVOICE_API_KEYS, else the key file "
                        "in the state directory); the servers must accept the same keys")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="where Envoy's config (mode 0600) and a generated key are kept "
                        "(default $COSYVOICE_STATE_DIR or var/)")
    a = p.parse_args(argv)
    return GatewayOnlyOptions(upstreams=a.upstream, host=a.host, port=a.port,
                              admin_port=a.admin_port, web_dir=a.web_dir,
                              envoy_log_level=a.envoy_log_level, api_key_file=a.api_key_file,
                              state_dir=a.state_dir, stats_port=a.stats_port)


def _healthy(rest_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{rest_url}/healthz", timeout=2) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


def run(o: GatewayOnlyOptions) -> int:

    from gateway.launch import _stop_envoy, _url_host, _wait_http_ok, start_envoy

    try:
        state = prepare_state_dir(o.state_dir or default_state_dir())
    except StateDirError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    keys = load_api_keys(o.api_key_file, state)
    if keys.generated:
        print(f"Generated an API key (stored in {keys.source}, mode 0600):\n  {keys.generated}\n"
              "The engine servers must accept it too (same key file or $COSYVOICE_API_KEYS).",
              flush=True)
    settings = GatewaySettings(
        listen_host=o.host, listen_port=o.port, upstreams=o.upstreams, admin_port=o.admin_port,
        descriptor_path=build_descriptor_set(state / "cosyvoice.descriptor.pb"),
        api_keys=keys.keys, web_dir=o.web_dir, stats_port=o.stats_port)
    stop = {"signal": None}

    def on_signal(signum: int, _frame: object) -> None:
        stop["signal"] = signum

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    envoy = start_envoy(settings, state, o.envoy_log_level)
    try:
        # Envoy's own readiness, not /healthz: the servers may come up later.
        _wait_http_ok(f"http://127.0.0.1:{o.admin_port}/ready", envoy, ENVOY_START_TIMEOUT)
        rest_url = f"http://{_url_host(o.host)}:{o.port}"
        names = ",".join(f"[{u.host}]:{u.port}" if ":" in u.host else f"{u.host}:{u.port}"
                         for u in o.upstreams)
        serving = "at least one is serving" if _healthy(rest_url) else (
            "none serving yet: /healthz answers 503 until one passes its health check")
        print(f"Ready (gateway only). Web page and REST API: {rest_url}/ (gRPC on the same "
              f"port)\nEngine servers: {names} ({serving}). Keys from {keys.source}.",
              flush=True)
        while stop["signal"] is None:
            if envoy.poll() is not None:
                print(f"Envoy exited with code {envoy.returncode}; stopping", file=sys.stderr,
                      flush=True)
                return 1
            time.sleep(0.2)
        return 0
    except (RuntimeError, TimeoutError, OSError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        _stop_envoy(envoy)


def main(argv: list[str] | None = None) -> int:
    return run(parse_options(argv))
