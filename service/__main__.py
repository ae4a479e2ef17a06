"""``python -m service``: run the gRPC text-to-speech server."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time

from service import logs
from service.auth import default_state_dir, load_api_keys
from service.metrics import METRICS, engine_description
from service.options import ServerOptions, parse_server_options
from service.state_dir import prepare_state_dir
from tts_core.allocator import tune_allocator
from tts_core.registry import create_engine
from tts_core.short_thread import on_short_thread

log = logging.getLogger("service")
EXIT_THREAD_WAIT = 1.0  # seconds the exit waits for engine threads after a drain


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
    # With a batch scheduler, admission follows its capacity: max_batch running, then the queue.
    max_batch = args.resolved_max_batch()
    max_concurrent = max_batch if max_batch > 1 else args.max_concurrent
    engine = await asyncio.to_thread(create_engine, args.engine_name, model_dir=args.model_dir,
                                     threads=args.threads, device=args.device,
                                     state_dir=state_dir,
                                     first_chunk_tokens=args.first_chunk_tokens,
                                     precision=args.precision, max_batch=max_batch,
                                     flow_cache_memory=args.flow_cache_memory,
                                     flow_cache_share=args.flow_cache_share,
                                     # the syntheses that share the flow cache memory
                                     concurrent_streams=max_concurrent)
    device, precision = engine_description(engine, args.device, args.precision)
    METRICS.engine_loaded(engine=engine.name, model_dir=args.model_dir, device=device,
                          precision=precision, seconds=time.perf_counter() - load_started)
    warm_up = getattr(engine, "warm_up", None)
    if warm_up is not None and args.warm_up == "on":
        # on a thread of its own that ends: a live thread keeps an OpenMP pool (short_thread.py)
        await asyncio.to_thread(on_short_thread, warm_up)
    running = await start_server(engine, host=_listen_host(args.grpc_host), port=args.grpc_port,
                                 api_keys=list(keys.keys), max_concurrent=max_concurrent,
                                 max_queue=args.max_queue)
    caps = engine.capabilities()
    log.info("serving engine %s (%d Hz, modes: %s) on %s:%d, max_concurrent=%d max_queue=%d "
             "max_batch=%d", caps.engine, caps.sample_rate,
             ", ".join(sorted(m.value for m in caps.modes)), args.grpc_host, running.port,
             max_concurrent, args.max_queue, max_batch)
    METRICS.watch_queue(lambda: running.synthesizer.counters.queued)
    occupancy = getattr(engine, "batch_occupancy", None)
    if occupancy is not None:
        METRICS.watch_batch(occupancy)
    if args.port_file:
        args.port_file.write_text(f"{running.port}\n")

    # The first SIGTERM (or SIGINT) drains, the second cuts what still runs.
    stop, cut = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda sig=sig: _on_signal(sig, stop, cut))
    await stop.wait()
    await running.drain(args.drain_seconds, cut)
    if stop_metrics is not None:
        stop_metrics()


def _on_signal(signum: int, stop: asyncio.Event, cut: asyncio.Event) -> None:
    name = signal.Signals(signum).name
    if not stop.is_set():
        log.info("%s: shutting down (health NOT_SERVING, new syntheses refused)", name)
        stop.set()
    elif not cut.is_set():
        log.warning("%s again: cutting the running syntheses short", name)
        cut.set()


def _leave(code: int) -> int:
    """Exit without waiting long for engine threads: a cancelled synthesis stops within one model
    step, but one stuck in a long step must not hold the exit (and so the launcher's drain)."""
    deadline = time.monotonic() + EXIT_THREAD_WAIT
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() and not t.daemon for t in threading.enumerate()
           if t is not threading.main_thread()):
        log.warning("engine threads still busy at exit; leaving without them")
        logging.shutdown()
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(code)
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_server_options(argv)
    logs.configure(args.log_level, args.log_format)
    tune_allocator()  # before any thread starts, so that all of them share one arena
    try:
        asyncio.run(serve(args))
    except (ValueError, OSError) as error:  # StateDirError included: one line, no traceback
        log.error("%s", error)
        return 2
    return _leave(0)


if __name__ == "__main__":
    sys.exit(main())
