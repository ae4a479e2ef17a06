"""``python -m service``: run the gRPC text-to-speech server."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time

from service.auth import default_state_dir, load_api_keys
from service.metrics import METRICS, engine_description
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
    # Served from before the engine loads (minutes for a CosyVoice model on a CPU), so a
    # taken port fails at once and a scrape shows the process alive meanwhile.
    stop_metrics = (METRICS.serve(args.metrics_host, args.metrics_port)
                    if args.metrics_port else None)
    log.info("loading engine %s", args.engine_name)
    load_started = time.perf_counter()
    engine = await asyncio.to_thread(create_engine, args.engine_name, model_dir=args.model_dir,
                                     threads=args.threads, device=args.device,
                                     state_dir=state_dir,
                                     first_chunk_tokens=args.first_chunk_tokens,
                                     precision=args.precision, max_batch=args.max_batch)
    device, precision = engine_description(engine, args.device, args.precision)
    METRICS.engine_loaded(engine=engine.name, model_dir=args.model_dir, device=device,
                          precision=precision, seconds=time.perf_counter() - load_started)
    # With a batch scheduler, admission follows its capacity: max_batch running, then the queue.
    max_concurrent = args.max_batch if args.max_batch > 1 else args.max_concurrent
    running = await start_server(engine, host=_listen_host(args.grpc_host), port=args.grpc_port,
                                 api_keys=list(keys.keys), max_concurrent=max_concurrent,
                                 max_queue=args.max_queue)
    caps = engine.capabilities()
    log.info("serving engine %s (%d Hz, modes: %s) on %s:%d, max_concurrent=%d max_queue=%d "
             "max_batch=%d", caps.engine, caps.sample_rate,
             ", ".join(sorted(m.value for m in caps.modes)), args.grpc_host, running.port,
             max_concurrent, args.max_queue, args.max_batch)
    METRICS.watch_queue(lambda: running.synthesizer.counters.queued)
    occupancy = getattr(engine, "batch_occupancy", None)
    if occupancy is not None:
        METRICS.watch_batch(occupancy)
    if args.port_file:
        args.port_file.write_text(f"{running.port}\n")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await running.stop(grace=3.0)
    if stop_metrics is not None:
        stop_metrics()


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
