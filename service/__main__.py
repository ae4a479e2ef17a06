"""``python -m service``: run the gRPC text-to-speech server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from service import limits
from service.auth import ENV_KEYS, default_state_dir, load_api_keys
from service.state_dir import prepare_state_dir
from tts_core.registry import ENGINE_NAMES, create_engine

log = logging.getLogger("service")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m service",
                                description="Run the gRPC text-to-speech server.")
    p.add_argument("--engine", choices=ENGINE_NAMES, default="embedded")
    p.add_argument("--model-dir", type=Path, help="model directory (cosyvoice2 engine)")
    p.add_argument("--device", default="auto", help="cosyvoice2 engine: cpu, cuda or auto")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (default 50051; 0: any)")
    p.add_argument("--threads", type=int, default=None, help="engine compute threads")
    p.add_argument("--first-chunk-tokens", type=int, default=None,
                   help="cosyvoice2 engine: speech tokens in the first streamed chunk "
                        "(default 10; the reference uses 25)")
    p.add_argument("--max-concurrent", type=int, default=limits.DEFAULT_MAX_CONCURRENT,
                   help="syntheses running at once (default %(default)s)")
    p.add_argument("--max-queue", type=int, default=limits.DEFAULT_MAX_QUEUE,
                   help="syntheses waiting for a slot before new ones get RESOURCE_EXHAUSTED "
                        "(default %(default)s)")
    p.add_argument("--api-key-file", type=Path,
                   help=f"file with API keys, one per line (else ${ENV_KEYS}, else a key "
                        "generated into the state directory)")
    p.add_argument("--state-dir", type=Path, help="where a generated key and registered "
                   "speakers are kept (default $COSYVOICE_STATE_DIR or var/ in the repository)")
    p.add_argument("--port-file", type=Path,
                   help="write the bound port here once serving (useful with --port 0)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def _listen_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


async def serve(args: argparse.Namespace) -> None:
    from service.server import start_server

    args.state_dir = prepare_state_dir(args.state_dir or default_state_dir())
    keys = load_api_keys(args.api_key_file, args.state_dir)
    if keys.generated:
        # Shown once, on the terminal (stdout), never through the logger.
        print(f"Generated an API key (stored in {keys.source}, mode 0600):\n  {keys.generated}",
              flush=True)
    log.info("API keys: %d from %s", len(keys.keys), keys.source)
    log.info("loading engine %s", args.engine)
    engine = await asyncio.to_thread(create_engine, args.engine, model_dir=args.model_dir,
                                     threads=args.threads, device=args.device,
                                     state_dir=args.state_dir or default_state_dir(),
                                     first_chunk_tokens=args.first_chunk_tokens)
    running = await start_server(engine, host=_listen_host(args.host), port=args.port,
                                 api_keys=list(keys.keys), max_concurrent=args.max_concurrent,
                                 max_queue=args.max_queue)
    caps = engine.capabilities()
    log.info("serving engine %s (%d Hz, modes: %s) on %s:%d, max_concurrent=%d max_queue=%d",
             caps.engine, caps.sample_rate, ", ".join(sorted(m.value for m in caps.modes)),
             args.host, running.port, args.max_concurrent, args.max_queue)
    if args.port_file:
        args.port_file.write_text(f"{running.port}\n")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await running.stop(grace=3.0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(args))
    except (ValueError, OSError) as error:  # StateDirError included: one line, no traceback
        log.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
