"""``python -m service``: run the gRPC text-to-speech server."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from service.auth import default_state_dir, load_api_keys
from service.options import ServerOptions, parse_server_options
from service.state_dir import prepare_state_dir
from tts_core.registry import create_engine

log = logging.getLogger("service")


def _listen_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


async def serve(args: ServerOptions) -> None:
    from service.server import start_server

    state_dir = prepare_state_dir(args.state_dir or default_state_dir())
    keys = load_api_keys(args.api_key_file, state_dir)
    if keys.generated:
        # Shown once, on the terminal (stdout), never through the logger.
        print(f"Generated an API key (stored in {keys.source}, mode 0600):\n  {keys.generated}",
              flush=True)
    log.info("API keys: %d from %s", len(keys.keys), keys.source)
    log.info("loading engine %s", args.engine)
    engine = await asyncio.to_thread(create_engine, args.engine, model_dir=args.model_dir,
                                     threads=args.threads, device=args.device,
                                     state_dir=state_dir,
                                     first_chunk_tokens=args.first_chunk_tokens,
                                     precision=args.precision)
    running = await start_server(engine, host=_listen_host(args.grpc_host), port=args.grpc_port,
                                 api_keys=list(keys.keys), max_concurrent=args.max_concurrent,
                                 max_queue=args.max_queue)
    caps = engine.capabilities()
    log.info("serving engine %s (%d Hz, modes: %s) on %s:%d, max_concurrent=%d max_queue=%d",
             caps.engine, caps.sample_rate, ", ".join(sorted(m.value for m in caps.modes)),
             args.grpc_host, running.port, args.max_concurrent, args.max_queue)
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
    args = parse_server_options(argv)
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
