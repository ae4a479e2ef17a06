"""Memory for the flow estimator's attention keys/values of a stream, reused from stream to stream.

A stream keeps, per Euler step, attention layer and CFG row, the keys and values of its finished
frames (about a gigabyte per stream of a few seconds at the official size). Grown buffer by
buffer, every growth copied all earlier rows into new memory, and on this project's VM each
fresh page costs a fault that is tens of times dearer than a copy into memory already in use:
following one stream of 200 tokens call by call, its late calls (100 frames each) took three
times as long as its early ones, most of it in those copies, and a second run of the same
stream in the same process took half the time of the first (648 k page faults against 88 k).

So a stream takes one block for all its keys/values at its start, room for its whole budget of
frames (``--flow-cache-memory``), and writes its rows in place: nothing is ever copied but the
prompt's rows of a stored speaker, once. When the stream ends, its block goes back to the pool
and the next stream writes into pages already mapped. Only the rows a stream writes are touched,
so a block costs the memory its longest stream used, not its capacity.

The pool hands a block out as an :class:`ArenaLease`; the block returns to the pool when the
lease is garbage, i.e. when no cache that holds rows in it is left (a clone of a stream's cache
shares its finished rows and so keeps the lease alive).
"""

from __future__ import annotations

import threading
import weakref

import torch


def _tagged(tag: list[object], prompt: object | None) -> bool:
    """Whether a block's tag [weak reference, frames] names ``prompt`` (None names nothing)."""
    ref = tag[0]
    return prompt is not None and ref is not None and ref() is prompt  # type: ignore[operator]


class ArenaLease:
    """One stream's block [steps, layers, 2, rows, capacity, width] (keys then values), for as
    long as this object lives. ``prompt``: a weak reference to the shared prompt cache whose
    finished rows the block already holds from an earlier stream of the same speaker (those rows
    are never written by a stream that goes on after them), so they need not be copied again."""

    def __init__(self, block: torch.Tensor, tag: list[object]):
        self.block = block
        self._tag = tag  # shared with the pool entry, so the tag outlives this lease

    def holds_prompt(self, prompt: object, frames: int) -> bool:
        """Whether rows 0..frames of every buffer are already ``prompt``'s."""
        return _tagged(self._tag, prompt) and self._tag[1] >= frames  # type: ignore[operator]

    def mark_prompt(self, prompt: object | None, frames: int) -> None:
        self._tag[:] = [None if prompt is None else weakref.ref(prompt), frames]


class ArenaPool:
    """Blocks of stream key/value memory, kept when their stream ends and handed to the next."""

    def __init__(self) -> None:
        self._free: dict[tuple, list[tuple[torch.Tensor, list[object]]]] = {}
        self._lock = threading.Lock()
        self.allocated = 0  # blocks made so far (for tests and logs)

    def __reduce__(self) -> tuple:
        # A copied or pickled model (deepcopy, torch.save) starts with an empty pool of its own.
        return (ArenaPool, ())

    def lease(self, steps: int, layers: int, rows: int, capacity: int, width: int,
              dtype: torch.dtype, device: torch.device, prompt: object | None = None
              ) -> ArenaLease:
        """A block of that shape: one that already holds ``prompt``'s rows if one is free (a
        stream of that stored speaker need not copy them), else the last one given back, else a
        new one."""
        key = (steps, layers, rows, capacity, width, dtype, torch.device(device))
        with self._lock:
            free = self._free.get(key)
            entry = None
            if free:
                index = next((i for i, (_, tag) in enumerate(free) if _tagged(tag, prompt)),
                             len(free) - 1)
                entry = free.pop(index)
        if entry is None:
            # Not zeroed: a stream reads only rows it wrote (or the prompt rows it copied in).
            entry = (torch.empty(steps, layers, 2, rows, capacity, width, dtype=dtype,
                                 device=device), [None, 0])
            with self._lock:
                self.allocated += 1
        lease = ArenaLease(*entry)
        weakref.finalize(lease, self._give_back, key, entry)
        return lease

    def _give_back(self, key: tuple, entry: tuple[torch.Tensor, list[object]]) -> None:
        with self._lock:
            self._free.setdefault(key, []).append(entry)

    def free_blocks(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._free.values())
