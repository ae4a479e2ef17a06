"""Run a one-off piece of torch work on a thread of its own that ends with it.

libgomp (the OpenMP runtime of the CPU torch wheels) keeps a pool of worker threads for every
live thread that ever ran a parallel region. Once the workers of all pools outnumber the cores
it cuts how long idle workers spin, so every small parallel region of the thread that does
the real work pays a wake-up: on a 2-core machine a CosyVoice 2 decode step took 41 ms on the
batch scheduler's thread while the loading thread was alive, 32 ms once loading had run on a
thread that ended. Work done once per model, speaker or prompt (loading, a registered voice's
features and flow prompt cache) therefore runs here, so the server's long-lived threads
(main, gRPC handlers) never hold a pool of their own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def on_short_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on a new thread, waited for; its result or its exception."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((True, fn(*args, **kwargs)))
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            outcome.append((False, error))

    thread = threading.Thread(target=run, name="torch-oneoff", daemon=True)
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value
