"""Let the process reuse the memory it frees instead of faulting in fresh pages.

glibc hands every allocation above its mmap threshold (128 KiB at start, raised only as
blocks are freed) fresh pages from the kernel and returns them on free, trims the free top of
its heap above a threshold, and gives each thread arena its own 64 MiB heaps that it unmaps
once empty. Each fresh 4 KiB page then costs a fault and zeroing, and on this project's VM a
copy into fresh pages was tens of times slower than into reused memory. The CosyVoice flow
allocates and frees such blocks constantly: activations of a few hundred rows, and attention
key/value buffers that grow with every stream (about a gigabyte per stream of a few seconds).
With four streams the faults took most of the flow's time: ``scripts/bench_cv2_flow_batch.py
--streams 4 --first 38 --upto 138`` (bfloat16 flow, 2 threads, streams packed) gave 1.74 s
per audio second with glibc's defaults and 0.69 with nothing trimmed (1 stream: 0.93), at 5.6M
and 1.0M minor page faults; keeping freed memory only up to 1 GiB was no better than the
defaults.

:func:`tune_allocator` therefore sets, once per process: blocks up to 32 MiB from the heap,
the heap never trimmed, and one arena for all threads (the compute work runs on one
scheduler thread anyway). The process keeps its high-water mark of memory instead of handing
freed memory back; the flow cache budget (``--flow-cache-memory``) is what bounds that mark.
Call it before starting threads. ``TTS_MALLOC_TUNING=0`` in the environment leaves glibc's
defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = -1  # as size_t: never trim
ARENA_MAX = 1

_lock = threading.Lock()
_tuned: bool | None = None


def tune_allocator() -> bool:
    """Set glibc's thresholds once per process; False where that is not possible (another C
    library, or mallopt refused a value)."""
    global _tuned
    with _lock:
        if _tuned is not None:
            return _tuned
        if os.environ.get("TTS_MALLOC_TUNING", "1") == "0":
            _tuned = False
            return False
        try:
            mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
        except (OSError, AttributeError):
            _tuned = False
            return False
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        mallopt.restype = ctypes.c_int
        _tuned = all(mallopt(param, value) == 1 for param, value in (
            (_M_ARENA_MAX, ARENA_MAX), (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
        if not _tuned:
            log.info("glibc malloc thresholds not set (mallopt refused a value)")
        return _tuned
